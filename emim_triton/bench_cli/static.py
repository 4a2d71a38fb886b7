"""`emim-bench static`: the fused kernels' GPU time predicted from their SASS, without a GPU.

    emim-bench static [--shape B,T,H,W,heads,D,K] [--dtype bf16] [--gpu h200] [--configs shipped|heuristic]
                      [--forward tensor_core] [--backward tensor_core] [--json FILE] [--sass-dir DIR]

(its options are defined with the other commands' in cli.py, which imports this module only when it runs).

For each of the op's four launches at a shape (`triton_backend.example_launches`), with the configurations
shipped for the chosen GPU (or the heuristic's):

1. compile it for the GPU's architecture on the CPU (`emim_triton.aot`; results cached on disk under
   $EMIM_TRITON_CACHE/static, default ~/.cache/emim_triton/static, keyed by the job, Triton's version and
   the kernel sources), and disassemble the cubin (`sass.py`);
2. count the instructions of each class (`sass.CLASSES`), find the loops by their back-edges, map each
   back-edge through its line information to a ``for`` of the kernel's source and evaluate that loop's
   bounds at the launch (`trips.py`), and weight every instruction by the trip counts of the loops
   around it: dynamic warp-instructions per warp, times warps per CTA, times CTAs;
3. model the time as the largest of three floors, each reported:
   issue     = warp-instructions / (SMs x schedulers x clock)      (one instruction per scheduler per cycle)
   tensor    = sum over MMA instructions of their FLOPs / the tensor rate of their operand type
   memory    = bytes of every tensor argument (each touched once) / HBM bandwidth
   and flag occupancy too low to hide latency (registers or shared memory allowing <= 2 CTAs per SM).

What is exact: the static instruction counts, registers, spills and shared memory (ptxas's), the loop
structure, trip counts of loops whose bounds the launch fixes. What is a model, and errs high or low:
every instruction outside a loop is counted as executed (branches around code, e.g. a masked store,
are not followed: an upper bound); one instruction issues per scheduler per cycle whatever its latency,
so stalls (memory latency, dependent MMA chains, low occupancy) make real kernels slower than the issue
floor -- the flags point at them; tail effects of the last wave are ignored; a loop the compiler split
into several SASS loops (peeling, unrolling with a remainder) has each part weighted by the source
loop's full trip count, which is noted; a loop whose bounds are not known statically is counted once,
which is noted too. The memory floor counts compulsory traffic only (no re-reads through L2 misses).

Calibration, H200, shipped configurations, S16 stage 3 bf16 (triton 3.9, ptxas 13.1 from its wheel):
modelled 1.262 / 1.661 / 0.909 / 0.243 ms for forward / backward query / key-value / weights, against the
2026-11-25 issue-bound estimates 1.24 / 1.64 / 0.87 ms (triton 3.6, ptxas 12.8; same method) and the
autotuner's measurements 1.805 / 3.164 / 1.005 / 0.874 ms: measured/modelled 1.43 / 1.90 / 1.11 / 3.59.
The two kernels furthest off are the two flagged for 2 CTAs per SM (254 and 255 registers).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import triton

from ..aot import AOTCompileError, CompiledKernelInfo, CompileJob, compile_jobs, kernel_function
from ..autotune import kernel_version
from ..tuning_cache import write_json_atomically
from .cases import DTYPES
from .gpus import GPUS, GPU
from .sass import CLASSES, Listing, disassemble, mma_work, parse_sass
from .trips import innermost_loop, source_loops

LOW_OCCUPANCY_CTAS = 2  # at most this many CTAs per SM: too few warps to hide latency


@dataclass
class LoopReport:
    head: int  # SASS address range of the loop
    end: int
    instructions: int  # static instructions in its body (nested loops included)
    trips: int | None  # None: unknown, counted once
    source: str  # "forward.py:60  for o in range(WINDOW_AREA):" or why it has none


@dataclass
class KernelReport:
    kernel: str  # the launch's role: forward, backward_query, ...
    function: str
    grid: tuple
    ctas: int
    warps_per_cta: int
    registers: int | None
    spills: int | None  # bytes of spill stores per thread
    shared_bytes: int
    ctas_per_sm: int
    low_occupancy: bool  # <= LOW_OCCUPANCY_CTAS CTAs per SM: too few warps to hide latency
    occupancy_limit: str  # what bounds ctas_per_sm: registers, shared memory, warps or the CTA limit
    static_instructions: int
    loops: list
    warp_instructions: float  # dynamic, over the whole launch
    by_class: dict  # class -> dynamic warp-instructions
    tensor_share: float  # of the dynamic warp-instructions, the tensor-core ones
    tensor_flops: dict  # operand type -> FLOPs of the MMA instructions
    bytes: int
    issue_ms: float
    tensor_ms: float
    memory_ms: float
    modelled_ms: float
    bound: str  # which floor: issue, tensor or memory
    measured_ms: float | None = None
    notes: list = field(default_factory=list)


@dataclass
class StaticReport:
    gpu: GPU
    kernels: dict  # role -> KernelReport
    context: dict  # shape, dtype, configurations, their source, versions

    @property
    def forward_ms(self) -> float:
        return sum(r.modelled_ms for role, r in self.kernels.items() if role.startswith("forward"))

    @property
    def backward_ms(self) -> float:
        return sum(r.modelled_ms for role, r in self.kernels.items() if role.startswith("backward"))

    def as_dict(self) -> dict:
        return {"gpu": self.gpu.as_dict(), **self.context, "forward_ms": self.forward_ms,
                "backward_ms": self.backward_ms, "kernels": {role: asdict(r) for role, r in self.kernels.items()}}


# --- the model ---------------------------------------------------------------------------------------------


def model_kernel(role: str, launch, info: CompiledKernelInfo, listing: Listing, gpu: GPU) -> KernelReport:
    """The static model of one launch from its compiled kernel's listing (see the module notes)."""
    executed = listing.executed()
    loops, trips_of, notes = _loops_with_trips(listing, launch)
    per_warp = dict.fromkeys(CLASSES, 0)
    flops_per_warp: dict[str, int] = {}
    for ins in executed:
        weight = math.prod(trips for loop, trips in trips_of if loop.contains(ins.address))
        per_warp[ins.instruction_class] += weight
        work = mma_work(ins.opcode)
        if work is not None:
            flops_per_warp[work[0]] = flops_per_warp.get(work[0], 0) + weight * work[1]
    ctas = math.prod(launch.grid)
    warps = ctas * launch.num_warps
    by_class = {cls: count * warps for cls, count in per_warp.items() if count}
    total = sum(by_class.values())
    tensor_flops = {kind: flops * warps for kind, flops in flops_per_warp.items()}
    unrated = sorted(set(tensor_flops) - set(gpu.tensor_flops))
    if unrated:
        notes.append(f"no {gpu.name} tensor rate for {unrated}: left out of the tensor floor")
    tensor_s = sum(flops / gpu.tensor_flops[kind] for kind, flops in tensor_flops.items() if kind in gpu.tensor_flops)
    moved = sum(t.numel() * t.element_size() for t in launch.args.values() if isinstance(t, torch.Tensor))
    floors = {"issue": total / gpu.issue_rate, "tensor": tensor_s, "memory": moved / gpu.hbm_bytes_per_s}
    bound = max(floors, key=floors.get)
    ctas_per_sm, limit = occupancy(gpu, info.registers, launch.num_warps, info.shared_bytes)
    if ctas_per_sm <= LOW_OCCUPANCY_CTAS:
        notes.append(f"low occupancy: {ctas_per_sm} CTA(s) of {launch.num_warps} warps per SM ({limit}); too few "
                     f"warps to hide latency, expect slower than modelled")
    if info.spills:
        notes.append(f"spills {info.spills} B per thread to local memory")
    return KernelReport(
        kernel=role, function=listing.function, grid=tuple(launch.grid), ctas=ctas, warps_per_cta=launch.num_warps,
        registers=info.registers, spills=info.spills, shared_bytes=info.shared_bytes, ctas_per_sm=ctas_per_sm,
        low_occupancy=ctas_per_sm <= LOW_OCCUPANCY_CTAS, occupancy_limit=limit, static_instructions=len(executed),
        loops=loops, warp_instructions=total,
        by_class=by_class, tensor_share=by_class.get("tensor", 0) / total if total else 0.0,
        tensor_flops=tensor_flops, bytes=moved, issue_ms=floors["issue"] * 1e3, tensor_ms=floors["tensor"] * 1e3,
        memory_ms=floors["memory"] * 1e3, modelled_ms=floors[bound] * 1e3, bound=bound, notes=notes)


def _loops_with_trips(listing: Listing, launch) -> tuple[list, list, list]:
    """([LoopReport], [(sass.Loop, weight)], notes): each SASS loop matched, through the line of its
    back-edge, to the innermost loop of the kernel's source around that line, with that loop's trip count
    at the launch (1 where unknown, with a note)."""
    source_file = inspect.getsourcefile(kernel_function(launch.kernel))
    sources = source_loops(launch.kernel, launch.args, launch.constexprs)
    executed = listing.executed()
    reports, weights, notes, seen = [], [], [], {}
    for loop in listing.loops():
        body = [ins for ins in executed if loop.contains(ins.address)]
        line = loop.back_edge.line_in(source_file)
        if line is None:  # no line information on the branch itself: the body's first located instruction
            line = next((ins.line_in(source_file) for ins in body if ins.line_in(source_file)), None)
        source = innermost_loop(sources, line) if line is not None else None
        trips = source.trips if source is not None else None
        if source is None:
            where = "no source loop found (line information missing?)"
            notes.append(f"loop {loop.head:#06x}-{loop.back_edge.address:#06x}: {where}; counted once")
        else:
            where = f"{os.path.basename(source.file)}:{source.first_line}  {source.text}"
            if trips is None:
                notes.append(f"loop at {where}: trip count unknown ({source.why_unknown}); counted once")
            seen.setdefault(source.first_line, []).append(loop)
        reports.append(LoopReport(loop.head, loop.back_edge.address, len(body), trips, where))
        weights.append((loop, trips if trips is not None else 1))
    for line, parts in seen.items():
        if len(parts) > 1:
            notes.append(f"{len(parts)} SASS loops come from the source loop at line {line} (unrolled with a "
                         f"remainder loop?): each is weighted by the full trip count, an overestimate")
    return reports, weights, notes


def occupancy(gpu: GPU, registers: int | None, warps_per_cta: int, shared_bytes: int) -> tuple[int, str]:
    """(CTAs resident per SM, what limits it). Registers are allocated per warp in units of 256."""
    limits = {"warps": gpu.max_warps_per_sm // warps_per_cta, "CTA limit": gpu.max_ctas_per_sm,
              "shared memory": gpu.shared_per_sm // (shared_bytes + gpu.reserved_shared_per_cta)}
    if registers:
        per_warp = math.ceil(registers * 32 / 256) * 256
        limits["registers"] = (gpu.registers_per_sm // per_warp) // warps_per_cta
    limit = min(limits, key=limits.get)
    return limits[limit], limit


def model_launches(launches: dict, gpu: GPU, *, cache_dir: Path | None = None, sass_dir: Path | None = None,
                   measured: dict | None = None) -> dict:
    """role -> KernelReport for each launch (a `KernelLaunch`), compiled for `gpu.arch`."""
    compiled = compile_cached({role: CompileJob.of_launch(launch, gpu.arch) for role, launch in launches.items()},
                              cache_dir)
    reports = {}
    for role, launch in launches.items():
        text = disassemble(compiled[role].cubin)
        if sass_dir is not None:
            sass_dir.mkdir(parents=True, exist_ok=True)
            (sass_dir / f"{role}.sm{gpu.arch}.sass").write_text(text)
        reports[role] = model_kernel(role, launch, compiled[role], parse_sass(text), gpu)
        reports[role].measured_ms = (measured or {}).get(role)
    return reports


def compile_cached(jobs: dict, cache_dir: Path | None) -> dict:
    """role -> CompiledKernelInfo with its cubin; compiles (in one batch) only what `cache_dir` lacks."""
    found, keys = {}, {}
    for role, job in jobs.items():
        if cache_dir is None:
            continue
        keys[role] = _cache_key(job)
        path = cache_dir / f"{keys[role]}.json"
        if path.exists():
            try:
                found[role] = CompiledKernelInfo.from_json(json.loads(path.read_text()))
            except (ValueError, TypeError, KeyError):
                pass  # a torn or foreign file: compile again and overwrite it
    missing = [role for role in jobs if role not in found]
    for role, result in zip(missing, compile_jobs([jobs[role] for role in missing], keep_cubin=True)):
        if isinstance(result, AOTCompileError):
            raise result
        found[role] = result
        if cache_dir is not None:
            write_json_atomically(cache_dir / f"{keys[role]}.json", result.to_json())
    return found


def _cache_key(job: CompileJob) -> str:
    """The job (kernel, argument types and values, constexprs, options, arch), Triton's version and every
    source file beside the kernel's (its helpers live there)."""
    folder = Path(inspect.getsourcefile(kernel_function(job.kernel))).parent
    digest = hashlib.sha256(json.dumps(job.to_json(), sort_keys=True).encode() + triton.__version__.encode()
                            + kernel_version(folder).encode())
    return digest.hexdigest()[:32]


# --- the command --------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from ..launch_configs import default_configs
    from ..triton_backend import example_launches
    from ..tuning_cache import DeviceId, configs_from_json, default_cache_dir, entry_key, read_shipped_defaults

    gpu, shape, dtype = GPUS[args.gpu], args.shape.shape, DTYPES[args.dtype]
    configs = default_configs(shape.height, shape.width, shape.window, shape.head_dim, dtype)
    source, measured = "heuristic (emim_triton/launch_configs.py)", {}
    if args.configs == "shipped":
        device = DeviceId(gpu.device_name, divmod(gpu.arch, 10))
        entry = read_shipped_defaults().get(device.slug, {}).get(entry_key(shape, dtype))
        if entry is None:
            source = f"heuristic (emim_triton/launch_configs.py): nothing shipped for the {gpu.name} at this shape"
        else:
            configs = configs_from_json(entry)
            info = entry.get("info", {})
            source = f"shipped for the {gpu.device_name} ({entry_key(shape, dtype)}, tuned {info.get('tuned_at', '?')})"
            # The autotuner's timings of these very configurations, when the shipped entry is for this shape.
            if tuple(info.get("shape", ())) == tuple(vars(shape).values()):
                measured = {role: k["ms"] for role, k in info.get("kernels", {}).items() if "ms" in k}
    launches = example_launches(shape, dtype, configs)
    from .. import tensor_core_backward, tensor_core_forward, tensor_core_key_value

    strategies = (("forward", args.forward, tensor_core_forward, "forward"),
                  ("backward_query", args.backward, tensor_core_backward, "query backward"),
                  ("backward_key_value", args.backward, tensor_core_key_value, "key/value backward"))
    tensor_core_roles = {role for role, wanted, _, _ in strategies if wanted == "tensor_core"}
    for role, wanted, module, name in strategies:
        if wanted != "tensor_core":
            continue
        if not module.supports(shape, dtype):
            print(f"emim-bench static: the tensor-core {name} does not take this shape and dtype (it runs "
                  f"fp16/bf16, K <= 7); the op would use the offset loop", file=sys.stderr)
            return 2
        launches[role] = module.example_launch(shape, dtype)
        measured.pop(role, None)  # the shipped timing is the offset loop's
    try:
        kernels = model_launches(launches, gpu, cache_dir=None if args.no_cache else default_cache_dir() / "static",
                                 sass_dir=Path(args.sass_dir) if args.sass_dir else None, measured=measured)
    except AOTCompileError as e:
        print(f"emim-bench static: a kernel does not compile for sm_{gpu.arch}: {e}", file=sys.stderr)
        return 1
    context = dict(shape=dict(zip(("B", "T", "H", "W", "heads", "D", "K"), vars(shape).values())), dtype=args.dtype,
                   arch=gpu.arch, configs_source=source,
                   configs={role: getattr(configs, role).as_dict() if role not in tensor_core_roles else
                            {"strategy": "tensor_core (its own default configuration)"} for role in launches},
                   forward_strategy=args.forward,
                   backward_strategy=args.backward,
                   triton=triton.__version__, measured_source="the autotuner's timing in the shipped entry" if measured
                   else None)
    report = StaticReport(gpu, kernels, context)
    if args.json:
        write_json(report, args.json)
    print(format_report(report))
    return 0


def write_json(report: StaticReport, path) -> None:
    with open(path, "w") as f:
        json.dump(report.as_dict(), f, indent=1)


def format_report(report: StaticReport) -> str:
    gpu, ctx = report.gpu, report.context
    s = ctx["shape"]
    out = [f"{gpu.name} (sm_{gpu.arch}: {gpu.sms} SMs x {gpu.schedulers_per_sm} schedulers at "
           f"{gpu.clock_hz / 1e9:.2f} GHz, HBM {gpu.hbm_bytes_per_s / 1e12:.2f} TB/s), triton {ctx['triton']}",
           f"shape B={s['B']} T={s['T']} {s['H']}x{s['W']} heads={s['heads']} D={s['D']} K={s['K']}, {ctx['dtype']}; "
           f"configurations: {ctx['configs_source']}", ""]
    header = (f"{'kernel':19} {'CTAs':>7} {'warps':>5} {'regs':>4} {'spill':>5} {'smem KB':>7} {'CTA/SM':>6} "
              f"{'warp-instr':>10} {'tensor':>6} {'issue ms':>8} {'tensor ms':>9} {'memory ms':>9} {'model ms':>8} "
              f"{'bound':>6} {'measured':>8} {'meas/model':>10}")
    out += [header, "-" * len(header)]
    for r in report.kernels.values():
        measured = (f"{r.measured_ms:8.3f} {r.measured_ms / r.modelled_ms:10.2f}" if r.measured_ms
                    else f"{'-':>8} {'-':>10}")
        out.append(f"{r.kernel:19} {r.ctas:>7} {r.warps_per_cta:>5} {r.registers!s:>4} {r.spills!s:>5} "
                   f"{r.shared_bytes / 1024:7.1f} {r.ctas_per_sm:>6} {r.warp_instructions / 1e9:9.3f}G "
                   f"{100 * r.tensor_share:5.1f}% {r.issue_ms:8.3f} {r.tensor_ms:9.3f} {r.memory_ms:9.3f} "
                   f"{r.modelled_ms:8.3f} {r.bound:>6} {measured}")
    line = f"forward_ms {report.forward_ms:.3f}   backward_ms {report.backward_ms:.3f}"
    if all(r.measured_ms for r in report.kernels.values()):
        forward = sum(r.measured_ms for role, r in report.kernels.items() if role.startswith("forward"))
        line += (f"   measured {forward:.3f} / {sum(r.measured_ms for r in report.kernels.values()) - forward:.3f} "
                 f"({ctx['measured_source']})")
    out += ["", line, ""]
    for r in report.kernels.values():
        out.append(f"{r.kernel} ({r.function}): {r.static_instructions} static instructions, "
                   f"{r.warp_instructions / (r.ctas * r.warps_per_cta):,.0f} per warp executed")
        for loop in r.loops:
            trips = "?" if loop.trips is None else loop.trips
            out.append(f"  loop {loop.head:#06x}-{loop.end:#06x} {loop.instructions:>5} x {trips!s:<5} {loop.source}")
        total = r.warp_instructions or 1
        mix = ", ".join(f"{cls} {100 * n / total:.1f}%" for cls, n in
                        sorted(r.by_class.items(), key=lambda kv: -kv[1]) if n / total >= 0.005)
        out.append(f"  mix: {mix}")
        out += [f"  note: {note}" for note in r.notes]
    return "\n".join(out)
