"""The implementations `emim-bench compare` puts side by side, and when each can run.

    fused      the fused Triton kernels (emim_attention, backend="triton"), autotuned for the GPU
    reference  the eager PyTorch reference: the structure of the authors' code (separate ops, the
               K²-wide affinities and the 4K²-wide hidden layer written out and saved for backward)
    compiled   torch.compile(reference): what a user would try first
    flex       FlexAttention + unfold cost volume under torch.compile (bench/flex.py): the best
               composition of stock PyTorch parts

Each builds an `op(q, k, v, rpb, w1, b1, w2, b2) -> out` for one shape; compiling happens at its first
call, outside the timed region.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap
from typing import Callable

import torch

from ..reference import emim_reference
from .cases import BenchCase

BACKENDS = ("fused", "reference", "compiled", "flex")
LABELS = {
    "fused": "fused Triton (autotuned)",
    "reference": "eager reference",
    "compiled": "torch.compile(reference)",
    "flex": "FlexAttention + unfold",
}
# What runs when --backends is not given: everything on a GPU; on the CPU the fused kernels cannot be
# timed, and FlexAttention has no CPU backward, compiles for tens of seconds there and gave wrong results
# at some shapes (torch 2.13, CPU), so it runs only on request (--backends flex, checked like the rest).
DEFAULT_BACKENDS = {"cuda": BACKENDS, "cpu": ("fused", "reference", "compiled")}

Op = Callable[..., torch.Tensor]


def unavailable(backend: str, device: torch.device, mode: str, variant: dict | None = None) -> str | None:
    """Why `backend` cannot be measured here in `mode` (for the op's `variant` options), or None if it can."""
    if backend == "flex" and variant and variant != dict(direction="next", dilation=1):
        return f"not available: the FlexAttention formulation implements the paper's op only, not {variant}"
    if backend == "fused" and device.type != "cuda":
        return ("not measured: no CUDA GPU here. The fused Triton kernels run only on a GPU (the CPU "
                "interpreter executes them for the tests, far too slowly to time)")
    if backend == "flex":
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError:
            return f"not available: torch {torch.__version__} has no torch.nn.attention.flex_attention"
        if device.type == "cpu" and mode == "forward+backward":
            return f"not available: FlexAttention has no CPU backward (torch {torch.__version__})"
    if backend == "compiled" and device.type == "cpu" and mode == "forward+backward":
        crash = compiled_backward_crash_on_cpu()
        if crash:
            return f"not run: {crash}"
    return None


def make_op(backend: str, case: BenchCase, device: torch.device, variant: dict | None = None) -> Op:
    """The callable that computes EMIM with `backend` for `case`'s shape (and the op's `variant` options,
    e.g. direction="prev", dilation=2)."""
    variant = variant or {}
    if backend == "fused":
        from ..functional import emim_attention

        return functools.partial(emim_attention, backend="triton", **variant)
    if backend == "reference":
        return functools.partial(emim_reference, **variant)
    if backend == "compiled":
        # dynamic=False: specialise to this shape, as a fixed-shape training job would; the caller resets
        # dynamo between shapes so no case inherits another's guards or recompile budget. One chunk: the
        # reference's memory-bounding chunk loop would be unrolled into the graph (~100 chunks at the S16
        # stage-3 shape: minutes of compiling, seen on an H200), and Inductor fuses the window gather anyway.
        return torch.compile(functools.partial(emim_reference, chunk_pairs=1 << 30, **variant), dynamic=False)
    if backend == "flex":
        from .flex import emim_flex, window_block_mask

        s = case.shape
        mask = window_block_mask(s.height, s.width, s.window, device)
        return _FlexWithFallback(torch.compile(emim_flex, dynamic=False), mask)
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


# FlexAttention tiles that fit any GPU of sm_80 or later; 64 divides the block mask's 128-token blocks.
FLEX_SMALL_TILES = dict(BLOCK_M=64, BLOCK_N=64, num_stages=2,
                        BLOCK_M1=32, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=32)


class _FlexWithFallback:
    """FlexAttention with Inductor's own tile choice; if that needs more shared memory than the GPU has
    (seen: torch 2.11 on an H200, 240 KB asked, 227 KB there), once more with `FLEX_SMALL_TILES`, as a user
    would. `note` says which ran."""

    def __init__(self, compiled, block_mask):
        self.compiled, self.block_mask = compiled, block_mask
        self.kernel_options = None
        self.note = ""

    def __call__(self, *args, **kwargs):
        try:
            return self.compiled(*args, block_mask=self.block_mask, kernel_options=self.kernel_options, **kwargs)
        except Exception as error:  # noqa: BLE001 - Inductor wraps the resource error in its own types
            if self.kernel_options is not None or "out of resource" not in str(error):
                raise
            self.kernel_options = dict(FLEX_SMALL_TILES)
            self.note = "flex tiles: " + ",".join(f"{k}={v}" for k, v in FLEX_SMALL_TILES.items())
            return self.compiled(*args, block_mask=self.block_mask, kernel_options=self.kernel_options, **kwargs)


# A child process runs torch.compile(emim_reference) forward + backward at a tiny size, because a crash there
# aborts the process, which no try/except can catch. With torch 2.13.0+cpu the reference's earlier windows
# gather (unfold) did exactly that (an out-of-bounds Inductor scatter-add, docs/upstream/); the reference now
# gathers from slices and the probe passes, but it stays as a guard. One probe per process, ~10-20 s.
_PROBE = textwrap.dedent("""
    import torch
    from emim_triton import emim_reference
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(1, 3, 4, 4, 2, 16, generator=g, requires_grad=True) for _ in range(3)]
    p = [torch.randn(*s, generator=g, requires_grad=True) for s in ((2, 3, 3), (36, 9), (36,), (16, 36), (16,))]
    out = torch.compile(emim_reference, dynamic=False)(*x, *p)
    torch.autograd.grad(out, x + p, torch.randn_like(out))
""")


@functools.lru_cache(maxsize=None)
def compiled_backward_crash_on_cpu() -> str | None:
    """None if a compiled reference's backward survives on this CPU; else what happened to the probe."""
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return "torch.compile(emim_reference) backward did not finish within 600 s on a tiny CPU probe"
    if done.returncode == 0:
        return None
    last = (done.stderr.strip().splitlines() or ["no message"])[-1][:200]
    return (f"torch.compile(emim_reference) backward kills the process on this CPU (torch {torch.__version__}, "
            f"probe exit status {done.returncode}: {last})")
