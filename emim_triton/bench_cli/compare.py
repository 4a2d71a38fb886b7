"""`emim-bench compare`: every backend on the same inputs, in one process and one run.

For each case, input sets are drawn once (random, never zeros) and shared by all backends: q, k, v as
the strided views of one qkv tensor (the layout models pass), float32 parameters (mixed-precision master
weights), the upstream gradient. Each backend first computes the forward on set 0, checked against a
float64 reference; a backend that computes something else is reported as wrong and not timed. Then
"forward" (under torch.no_grad, as at inference: nothing saved for backward) and "forward+backward"
(gradients of qkv and all parameters, as in a training step) are timed rotating over the sets, and the
peak memory of one call is read. TFLOP/s and GB/s come from the cost model; the roofline fraction is the
larger floor (ceilings measured in this run) over the measured time.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import triton

from ..checks import EMIMShape
from ..cost_model import MODES, emim_cost
from ..reference import emim_reference
from ..testing import BENCH_CORRECTNESS_RTOL, qkv_views_of, random_parameters, random_qkv, relative_error
from .backends import LABELS, make_op, unavailable
from .cases import BenchCase
from .roofline import Ceilings, floors, measure_ceilings
from .timing import Rotating, first_call_seconds, peak_memory_bytes, time_call

@dataclass
class Row:
    """One backend, one mode, one case."""

    case: str
    mode: str
    backend: str
    status: str  # "ok", "skipped" (cannot run here), "failed" (raised), "wrong" (result off)
    note: str = ""
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    first_call_s: float | None = None  # includes compiling / autotuning
    tflops: float | None = None
    gbps: float | None = None
    roofline_fraction: float | None = None  # larger floor / median time
    peak_mib: float | None = None
    rel_err: float | None = None  # forward vs float64 reference
    speedup_vs_reference: float | None = None  # eager reference time / this time
    fused_speedup: float | None = None  # this time / fused time: how much faster the fused op is


@dataclass
class Report:
    meta: dict
    cases: list[dict] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"meta": self.meta, "cases": self.cases, "rows": [asdict(r) for r in self.rows]}


@dataclass(frozen=True)
class Settings:
    device: torch.device
    dtype: torch.dtype
    backends: tuple[str, ...]
    modes: tuple[str, ...] = MODES
    warmup_ms: float = 25
    rep_ms: float = 100
    rotate: int = 3  # input sets cycled through while timing
    tune: bool = True  # autotune the fused kernels for shapes the cache does not have
    max_configs: int | None = 64
    direction: str = "next"  # the op's variants (docs/operation.md#variants-beyond-the-paper)
    dilation: int = 1

    @property
    def variant(self) -> dict:
        """The op's variant options, as keyword arguments of emim_attention / emim_reference."""
        return dict(direction=self.direction, dilation=self.dilation)


def run_compare(cases: list[BenchCase], settings: Settings, log: Callable[[str], None] = print) -> Report:
    device, dtype = settings.device, settings.dtype
    log(f"measuring the ceilings on {device} ...")
    ceilings = measure_ceilings(device, dtype)
    report = Report(meta=_meta(settings, ceilings))
    for case in cases:
        torch._dynamo.reset()  # each case compiles afresh, specialised to its shape
        cost = emim_cost(case.shape, dtype)
        report.cases.append({**case.as_dict(), "rows_computed": case.shape.rows,
                             **{f"{m}_{k}": v for m in MODES for k, v in _cost_entry(cost, m, ceilings).items()}})
        sets = [make_input_set(case.shape, dtype, device, seed) for seed in range(settings.rotate)]
        expected = _float64_forward(sets[0], settings.variant)
        for backend in settings.backends:
            log(f"{case.name}: {LABELS[backend]} ...")
            report.rows += _measure_backend(case, backend, sets, expected, cost, ceilings, settings)
        del sets, expected
        _fill_speedups([r for r in report.rows if r.case == case.name])
    return report


def _meta(settings: Settings, ceilings: Ceilings) -> dict:
    device = settings.device
    fused = "fused" in settings.backends and device.type == "cuda"
    notes = [] if fused else ["The fused Triton path was NOT measured in this run"
                              + (" (no CUDA GPU)." if device.type != "cuda" else " (not requested).")]
    return {
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": str(settings.dtype).removeprefix("torch."),
        "parameters": "float32",
        "variant": settings.variant,
        "ceilings": {"bandwidth_GBps": ceilings.bandwidth / 1e9, "matmul_TFLOPs": ceilings.matmul_flops / 1e12,
                     "source": ceilings.source},
        "fused_measured": fused,
        "timing": {"warmup_ms": settings.warmup_ms, "rep_ms": settings.rep_ms, "input_sets": settings.rotate,
                   "method": "triton.testing.do_bench (CUDA events, L2 flushed), median" if device.type == "cuda"
                   else "wall clock per call after warm-up, median"},
        "notes": notes,
    }


def _cost_entry(cost, mode: str, ceilings: Ceilings) -> dict:
    f = floors(cost, mode, ceilings)
    return {"flops": cost.flops(mode), "bytes": cost.bytes(mode), "memory_floor_ms": f.memory_s * 1e3,
            "compute_floor_ms": f.compute_s * 1e3}


def make_input_set(shape: EMIMShape, dtype, device, seed: int) -> dict:
    """One input set: a qkv tensor (its three views are made per call, as a model does), float32
    parameters, and an upstream gradient for the backward; drawn on the device (bench shapes are large)."""
    gen = torch.Generator(device).manual_seed(seed)
    s = shape
    qkv = random_qkv(s.batch, s.frames, s.height, s.width, s.heads, s.head_dim, gen, dtype=dtype, device=device)
    params = list(random_parameters(s.heads, s.head_dim, s.window, gen, device=device).values())
    grad_out = torch.randn(s.batch, s.frames, s.height, s.width, s.heads, s.head_dim, device=device,
                           generator=gen).to(dtype)
    return {"qkv": qkv, "params": params, "grad_out": grad_out, "shape": shape}


def qkv_views(qkv: torch.Tensor, shape: EMIMShape):
    return qkv_views_of(qkv, shape.frames, shape.height, shape.width, shape.heads)


def _float64_forward(inputs: dict, variant: dict) -> torch.Tensor:
    q, k, v = (t.double() for t in qkv_views(inputs["qkv"], inputs["shape"]))
    with torch.no_grad():
        return emim_reference(q, k, v, *(p.double() for p in inputs["params"]), **variant)


def forward_call(op, inputs: dict) -> Callable[[], torch.Tensor]:
    def call():
        with torch.no_grad():
            return op(*qkv_views(inputs["qkv"], inputs["shape"]), *inputs["params"])
    return call


def training_call(op, inputs: dict) -> Callable[[], tuple]:
    leaves = [inputs["qkv"].detach().requires_grad_(True)] + [p.detach().requires_grad_(True)
                                                              for p in inputs["params"]]

    def call():
        out = op(*qkv_views(leaves[0], inputs["shape"]), *leaves[1:])
        return torch.autograd.grad(out, leaves, inputs["grad_out"])
    return call


def _measure_backend(case, backend, sets, expected, cost, ceilings, settings: Settings) -> list[Row]:
    device = settings.device
    rows = []
    op = None
    for mode in settings.modes:
        row = Row(case.name, mode, backend, "ok")
        rows.append(row)
        reason = unavailable(backend, device, mode, settings.variant)
        if reason:
            row.status, row.note = "skipped", reason
            continue
        try:
            if op is None:
                if backend == "fused":
                    row.note = _fused_configs(case.shape, settings)
                op = make_op(backend, case, device, settings.variant)
                out = forward_call(op, sets[0])()  # compiles on first use
                row.rel_err = relative_error(out, expected)
                del out
                if not row.rel_err <= BENCH_CORRECTNESS_RTOL[settings.dtype]:  # NaN fails too
                    raise _WrongResult(f"forward differs from the float64 reference by {row.rel_err:.2e} "
                                       f"(allowed {BENCH_CORRECTNESS_RTOL[settings.dtype]:.0e}); not timed")
            make_call = forward_call if mode == "forward" else training_call
            calls = [make_call(op, inputs) for inputs in sets]
            row.first_call_s = first_call_seconds(calls[0], device)
            timing = time_call(Rotating(calls), device, settings.warmup_ms, settings.rep_ms)
            peak = peak_memory_bytes(calls[0], device)
            row.note = row.note or getattr(op, "note", "")  # e.g. FlexAttention's fallback tiles
        except _WrongResult as e:
            row.status, row.note = "wrong", str(e)
            for later in settings.modes[settings.modes.index(mode) + 1:]:
                rows.append(Row(case.name, later, backend, "wrong", str(e), rel_err=row.rel_err))
            break
        except Exception as e:  # report and go on with the other backends
            row.status, row.note = "failed", f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
            continue
        seconds = timing.median_ms / 1e3
        row.median_ms, row.p20_ms, row.p80_ms = timing.median_ms, timing.p20_ms, timing.p80_ms
        row.tflops = cost.flops(mode) / seconds / 1e12
        row.gbps = cost.bytes(mode) / seconds / 1e9
        row.roofline_fraction = floors(cost, mode, ceilings).bound_s / seconds
        row.peak_mib = None if peak is None else peak / 2 ** 20
    return rows


class _WrongResult(Exception):
    pass


def _fused_configs(shape: EMIMShape, settings: Settings) -> str:
    """Make sure the fused op runs tuned configurations for `shape` (unless --no-tune); say which it runs."""
    from .. import autotune

    resolved = autotune.resolve_configs(shape, settings.dtype)
    if not settings.tune or resolved.source in ("cache", "tuned", "interpreter"):
        return f"configs: {resolved.source}"
    autotune.tune_and_cache(shape, settings.dtype, max_configs=settings.max_configs)
    return "configs: tuned in this run"


def _fill_speedups(rows: list[Row]) -> None:
    for mode in MODES:
        timed = {r.backend: r for r in rows if r.mode == mode and r.median_ms}
        reference, fused = timed.get("reference"), timed.get("fused")
        for row in timed.values():
            if reference:
                row.speedup_vs_reference = reference.median_ms / row.median_ms
            if fused:
                row.fused_speedup = row.median_ms / fused.median_ms


__all__ = ["Report", "Row", "Settings", "forward_call", "make_input_set", "run_compare",
           "training_call"]
