"""What only the tests share: their tiny shapes, the device they run on, hardware limits they check against.

The random inputs, the error measure and its tolerances, and the oracle are shared with the benchmarks, the
tuner and the demo, so they live in `emim_triton.testing`; they are re-exported here so that a test module
imports all of its helpers from one place.
"""

from __future__ import annotations

import os

import pytest
import torch

from emim_triton.testing import (FP32_KERNEL_RTOL, INPUT_NAMES, REFERENCE_RTOL, local_next_frame_attention,
                                 low_precision_bound, make_inputs, relative_error)

__all__ = ["AOT_REPORT", "FP32_KERNEL_RTOL", "GRAD_NAMES", "REFERENCE_RTOL", "SHARED_MEMORY_LIMIT", "TINY_SHAPES",
           "local_next_frame_attention", "low_precision_bound", "make_inputs", "relative_error", "test_device"]

GRAD_NAMES = INPUT_NAMES  # every input of the op receives a gradient

# Tiny (B, T, H, W, heads, D, K) cases, as (id, shape), for both the reference and the interpreted
# kernels: T in {1, 2, 3}, H != W, H or W < K, K in {3, 5, 7}, D not a power of two.
TINY_SHAPES = (
    ("T1-self-attention-W<K", (1, 1, 3, 2, 1, 16, 3)),
    ("T2-two-heads", (1, 2, 4, 5, 2, 16, 3)),
    ("T3-H<K", (1, 3, 3, 5, 1, 32, 5)),
    ("B2-D24-frame-smaller-than-window", (2, 2, 2, 3, 2, 24, 5)),
    ("K7", (1, 2, 5, 4, 1, 16, 7)),
)

# Largest shared memory one program may use (opt-in limit per block): A100 163 KB, H100/H200 227 KB.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

# Filled by tests/test_aot_compile.py, printed at the end of the session by tests/conftest.py.
AOT_REPORT: list = []


def test_device() -> str:
    """CUDA when present; else CPU tensors, which the interpreter runs (tests/conftest.py)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


test_device.__test__ = False  # a helper, not a test, despite its name


# Child processes compiling at once (when the test process interprets): the compiles are independent.
AOT_WORKERS = max(1, min(4, os.cpu_count() or 1))


def compile_params(params, launch_and_arch) -> dict:
    """Test id -> CompiledKernelInfo (or the AOTCompileError compiling it raised) for pytest params, compiled
    in one batch: under the interpreter every compile runs in a child process, and one batch starts them once
    instead of once per test. `launch_and_arch(param)` gives the param's (KernelLaunch, arch). Skips when an
    arch cannot be compiled here."""
    from emim_triton.aot import CompileJob, aot_supported, compile_jobs

    jobs = [launch_and_arch(p) for p in params]
    for arch in sorted({arch for _, arch in jobs}):
        supported, why = aot_supported(arch)
        if not supported:
            pytest.skip(why)
    results = compile_jobs([CompileJob.of_launch(launch, arch) for launch, arch in jobs], workers=AOT_WORKERS)
    return {p.id: result for p, result in zip(params, results)}


# Tiny (B, T, H, W, heads, D, K) cases of the tensor-core backward tests: T = 1 and 3; H or W < K; D = 24 (not a
# power of two); K = 3, 5, 7; a 9 x 10 frame (four 8 x 8 tiles, partly outside the frame).
TENSOR_CORE_BACKWARD_SHAPES = {
    "T1-self-attention-W<K": (1, 1, 3, 2, 1, 16, 3),
    "T3-two-heads-H<K": (1, 3, 3, 5, 2, 32, 5),
    "B2-D24-frame-smaller-than-window": (2, 2, 2, 3, 2, 24, 5),
    "K7-four-tiles": (1, 2, 9, 10, 1, 16, 7),
}


def backward_case(inputs, pad_value, variant):
    """What a backward kernel launch needs besides its outputs, from today's kernels: (shape, (rpb, w1, b1,
    w2, b2) dense, configs, scale, lse of today's forward, the folded random upstream gradient)."""
    from emim_triton import triton_backend
    from emim_triton.checks import EMIMShape
    from emim_triton.launch_configs import default_configs

    q = inputs["q"]
    shape = EMIMShape.of(q, inputs["rpb"])
    params = triton_backend.contiguous_parameters(*(inputs[n] for n in ("rpb", "w1", "b1", "w2", "b2")))
    configs = default_configs(shape.height, shape.width, shape.window, shape.head_dim, q.dtype)
    scale = shape.head_dim ** -0.5
    _, lse = triton_backend.forward(q, inputs["k"], inputs["v"], *params, shape, scale, pad_value, configs,
                                    store_lse=True, variant=variant)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(q)
    return shape, params, configs, scale, lse, triton_backend.fold_last_frame_grad(grad_out, shape, variant)


def assert_same_kernel_result(actual, expected) -> None:
    """Two kernels' results of the same float32 sums. float32: within FP32_KERNEL_RTOL. 16-bit: the float32
    values agree to FP32_KERNEL_RTOL of the largest element (small elements are sums with cancellation), then
    the rounding to 16 bits adds at most one unit in the last place of each element."""
    if actual.dtype == torch.float32:
        assert relative_error(actual, expected) < FP32_KERNEL_RTOL
        return
    actual, expected = actual.float(), expected.float()
    allowed = torch.finfo(torch.float16).eps * expected.abs() + FP32_KERNEL_RTOL * expected.abs().max()
    assert ((actual - expected).abs() <= allowed).all()


def compile_for_hopper(launch, also_sm80: bool = True, operand: str = ""):
    """Compile `launch` for sm_90 (and sm_80) on the CPU: (the sm_90 `CompiledKernelInfo`, the stripped source
    lines that issue HGMMA (warpgroup MMA) instructions there, restricted to opcodes containing `operand`, e.g.
    "BF16"). Every line of an instruction's location chain counts: triton 3.9 records the call site in the
    kernel of a product made in a helper, triton 3.6 only the helper's own line, so a test names both. Skips
    the test where Triton cannot compile for those targets; fails when a compile does."""
    from emim_triton.aot import CompileJob, aot_supported, compile_jobs
    from emim_triton.bench_cli.sass import disassemble, parse_sass

    archs = (90, 80) if also_sm80 else (90,)
    for arch in archs:
        ok, why = aot_supported(arch)
        if not ok:
            pytest.skip(why)
    infos = compile_jobs([CompileJob.of_launch(launch, arch) for arch in archs], keep_cubin=True)
    for info in infos:
        assert not isinstance(info, Exception), info
    sources: dict[str, list[str]] = {}
    products = set()
    for ins in parse_sass(disassemble(infos[0].cubin)).executed():
        if ins.mnemonic == "HGMMA" and operand in ins.opcode:
            for file, line in ins.locations:
                if file not in sources:
                    sources[file] = open(file).read().splitlines() if os.path.exists(file) else []
                if 0 < line <= len(sources[file]):
                    products.add(sources[file][line - 1].strip())
    return infos[0], products


def has_product(products: set, *alternatives: str) -> bool:
    """Whether one of the HGMMA source lines (`compile_for_hopper`) starts with one of `alternatives`."""
    return any(line.startswith(alternative) for line in products for alternative in alternatives)


def switch_on_motion(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> None:
    """Give the motion MLP's output layer (zero at initialisation, which hides the motion term and W1's gradient
    from a test) random weights and biases, N(0, std²), in every EMIM of `model` (or `model` itself)."""
    from emim_triton import EMIM

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, EMIM):
                for p in module.motion_conv[2].parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * std)

