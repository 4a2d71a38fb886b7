"""`emim-bench static`: SASS parsing and classes, loop trip counts from the kernel source, the weighting of
instructions by trip counts, and the JSON report.

One real compile (a tiny kernel with two nested runtime loops, for sm_80, in a child process under the
interpreter); the rest works on listings written here and on the kernels' source. The calibration against
the H200 measurements compiles the four EMIM kernels (tens of seconds): `python -m emim_triton.bench_cli.static`.
"""

import inspect
import json

import pytest
import torch
import triton
import triton.language as tl

from emim_triton.aot import CompiledKernelInfo, aot_supported
from emim_triton.bench_cli.gpus import GPUS
from emim_triton.bench_cli.sass import instruction_class, mma_work, parse_sass
from emim_triton.bench_cli.static import StaticReport, model_kernel, model_launches, occupancy, write_json
from emim_triton.bench_cli.trips import source_loops
from emim_triton.checks import EMIMShape
from emim_triton.triton_backend import KernelLaunch, example_launches
from emim_triton.tuning_cache import configs_from_json, entry_key, read_shipped_defaults


@triton.jit
def _nested_loop_kernel(x_ptr, y_ptr, n_outer, n_inner, a, BLOCK: tl.constexpr):
    """Per iteration of the inner loop: one load and one division (one MUFU.RCP) per thread."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, n_outer):
        for j in range(0, n_inner):
            x = tl.load(x_ptr + (i * n_inner + j) * BLOCK + offs)
            acc = acc * a + x / tl.sum(x)
    tl.store(y_ptr + offs, acc)


N_OUTER, N_INNER, WARPS = 3, 5, 4
_X = torch.empty(N_OUTER * N_INNER * 128, device="meta")


def _launch(programs: int) -> KernelLaunch:
    # BLOCK = 128 over 4 warps: one element, hence one LDG, per thread and iteration.
    return KernelLaunch(_nested_loop_kernel, (programs, ), dict(x_ptr=_X, y_ptr=_X, n_outer=N_OUTER, n_inner=N_INNER,
                                                                a=0.5), dict(BLOCK=128), WARPS, 1)


def _for_lines() -> tuple[int, int]:
    """File lines of the outer and inner `for` of _nested_loop_kernel."""
    lines, start = inspect.getsourcelines(_nested_loop_kernel.fn)
    fors = [start + i for i, text in enumerate(lines) if text.strip().startswith("for ")]
    return fors[0], fors[1]


# --- SASS parsing and classes ---------------------------------------------------------------------------


def test_tensor_core_work_per_warp():
    assert mma_work("HMMA.1688.F32.TF32") == ("tf32", 2 * 16 * 8 * 8)
    assert mma_work("HMMA.16816.F32.BF16") == ("bf16", 2 * 16 * 8 * 16)
    assert mma_work("HMMA.16816.F32") == ("fp16", 2 * 16 * 8 * 16)  # no type modifier: fp16
    assert mma_work("HGMMA.64x32x8.F32.TF32") == ("tf32", 2 * 64 * 32 * 8 // 4)  # a quarter per warp of the group
    assert mma_work("FFMA") is None
    assert [instruction_class(op) for op in ("FFMA", "LDG.E.128", "STS.128", "IMAD.MOV.U32", "FSEL", "ULDC.64",
                                             "MUFU.EX2", "SHFL.BFLY", "HGMMA.64x16x8.F32.TF32", "STL")] == \
        ["float", "load_global", "shared", "integer", "select", "uniform", "mufu", "shuffle", "tensor", "local"]


def _listing_text(file: str, outer: int, inner: int) -> str:
    """An nvdisasm -c -gi listing of two nested loops whose back-edges carry the `for` lines."""
    return f"""
//--------------------- .text.k --------------------------
.text.k:
        //## File "{file}", line {outer - 2}
        /*0000*/                   MOV R0, RZ ;
.L_x_0:
        //## File "{file}", line {outer + 1}
        /*0010*/                   IADD3 R4, R4, 0x1, RZ ;
.L_x_1:
        //## File "/elsewhere/helper.py", line 3 inlined at "{file}", line {inner + 1}
        //## File "{file}", line {inner + 1}
        /*0020*/                   LDG.E R1, desc[UR4][R2.64] ;
        /*0030*/                   FFMA R0, R0, R1, R0 ;
        //## File "{file}", line {inner}
        /*0040*/               @P0 BRA `(.L_x_1) ;
        //## File "{file}", line {outer}
        /*0050*/              @!P1 BRA `(.L_x_0) ;
        /*0060*/                   STG.E desc[UR4][R2.64], R0 ;
        /*0070*/                   EXIT ;
.L_x_2:
        /*0080*/                   BRA `(.L_x_2);
        /*0090*/                   NOP;
"""


def test_listing_parse_finds_loops_lines_and_padding():
    outer, inner = _for_lines()
    listing = parse_sass(_listing_text(__file__, outer, inner))
    assert listing.function == "k" and len(listing.instructions) == 10
    assert [ins.opcode for ins in listing.executed()][-2:] == ["STG.E", "EXIT"], "trap loop and NOP padding dropped"
    loops = listing.loops()
    assert [(loop.head, loop.back_edge.address) for loop in loops] == [(0x20, 0x40), (0x10, 0x50)]
    ldg = listing.instructions[2]
    assert ldg.predicate == "" and listing.instructions[4].predicate == "@P0"
    assert ldg.line_in(__file__) == inner + 1, "inlined code is placed at its call in the kernel's file"


def test_trip_count_weighting():
    outer, inner = _for_lines()
    launch = _launch(programs=2)
    info = CompiledKernelInfo("k", 90, WARPS, 1, 0, 32, 0, 1)
    report = model_kernel("forward", launch, info, parse_sass(_listing_text(__file__, outer, inner)), GPUS["h200"])
    assert [(loop.trips, loop.instructions) for loop in report.loops] == [(N_INNER, 3), (N_OUTER, 5)]
    # Per warp: 3 outside the loops (MOV, STG, EXIT), 2 in the outer loop only (IADD3, its BRA) x 3,
    # 3 in the inner loop (LDG, FFMA, BRA) x 3 x 5; the trap BRA and the NOP never run.
    per_warp = 3 + 2 * N_OUTER + 3 * N_OUTER * N_INNER
    warps = 2 * WARPS
    assert report.warp_instructions == per_warp * warps
    assert report.by_class["load_global"] == N_OUTER * N_INNER * warps
    assert report.by_class["integer"] == N_OUTER * warps
    assert report.issue_ms == pytest.approx(per_warp * warps / GPUS["h200"].issue_rate * 1e3)
    assert report.bytes == 2 * _X.numel() * 4  # x and y, each once
    assert report.modelled_ms == max(report.issue_ms, report.tensor_ms, report.memory_ms)


# --- trip counts from the kernels' source ---------------------------------------------------------------


def test_trip_counts_come_from_the_emim_kernels_source_at_the_shape():
    shape = EMIMShape(32, 16, 14, 14, 5, 64, 7)
    entry = read_shipped_defaults()["nvidia-h200-sm90"][entry_key(shape, torch.bfloat16)]
    launches = example_launches(shape, torch.bfloat16, configs_from_json(entry))
    trips = {role: [loop.trips for loop in source_loops(launch.kernel, launch.args, launch.constexprs)]
             for role, launch in launches.items()}
    k2, hidden = 49, 4 * 49
    rows = 32 * 15 * 14 * 14 * 5  # B * pairs * H * W * heads
    assert trips == {
        "forward": [k2, -(-hidden // 64)],  # shipped hidden chunk 64
        "backward_query": [k2, -(-hidden // 16), k2],  # hidden chunk 16
        "backward_key_value": [1, k2],  # key sources (2 for direction "prev": key frame 0's two), offsets
        "backward_weights": [-(-(-(-rows // 32)) // 128)],  # cdiv(row blocks of 32, 128 programs)
    }


def test_unknown_bounds_are_reported_not_guessed():
    @triton.jit
    def _data_dependent(x_ptr, n):
        count = tl.load(x_ptr)
        for i in range(count):
            tl.store(x_ptr + i, n)

    (loop, ) = source_loops(_data_dependent, {"x_ptr": _X, "n": 4}, {})
    assert loop.trips is None and "not known" in loop.why_unknown


def test_occupancy_from_registers_and_shared_memory():
    h200 = GPUS["h200"]
    assert occupancy(h200, 254, 4, 36 * 1024) == (2, "registers")  # 256 registers x 128 threads
    assert occupancy(h200, 130, 4, 24 * 1024) == (3, "registers")  # 136 per thread after rounding
    assert occupancy(h200, 32, 4, 100 * 1024) == (2, "shared memory")
    assert occupancy(h200, 32, 4, 0) == (16, "warps")


# --- a real compile: exact counts and the JSON ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_reports():
    supported, why = aot_supported(80)
    if not supported:
        pytest.skip(why)
    launches = {"forward": _launch(programs=2), "backward_a": _launch(programs=3), "backward_b": _launch(programs=5)}
    return model_launches(launches, GPUS["a100"])


def test_exact_instruction_counts_of_a_compiled_kernel(tiny_reports):
    report = tiny_reports["forward"]
    outer, inner = _for_lines()
    assert [(loop.trips, loop.source.split()[0]) for loop in report.loops] == \
        [(N_INNER, f"test_static_model.py:{inner}"), (N_OUTER, f"test_static_model.py:{outer}")]
    warps = 2 * WARPS
    # One load and one reciprocal per thread and inner iteration, one store at the end: exact, per warp.
    assert report.by_class["load_global"] == N_OUTER * N_INNER * warps
    assert report.by_class["mufu"] == N_OUTER * N_INNER * warps
    assert report.by_class["store_global"] == 1 * warps
    assert report.registers > 0 and report.spills == 0 and not report.notes


def test_json_report(tiny_reports, tmp_path):
    report = StaticReport(GPUS["a100"], tiny_reports, {"dtype": "fp32"})
    path = tmp_path / "static.json"
    write_json(report, path)
    data = json.loads(path.read_text())
    kernels = data["kernels"]
    assert data["forward_ms"] == pytest.approx(kernels["forward"]["modelled_ms"])
    backward = kernels["backward_a"]["modelled_ms"] + kernels["backward_b"]["modelled_ms"]
    assert data["backward_ms"] == pytest.approx(backward)
    assert kernels["backward_b"]["warp_instructions"] == pytest.approx(kernels["forward"]["warp_instructions"] * 5 / 2)
    assert data["gpu"]["name"] == "NVIDIA A100 SXM 80GB" and data["dtype"] == "fp32"
    for entry in kernels.values():
        for key in ("registers", "spills", "shared_bytes", "ctas_per_sm", "low_occupancy", "warp_instructions", "tensor_share",
                    "issue_ms", "tensor_ms", "memory_ms", "modelled_ms", "bound", "by_class", "loops"):
            assert key in entry
