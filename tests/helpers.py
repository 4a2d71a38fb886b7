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
