"""Triton's CPU interpreter (TRITON_INTERPRET=1) gets bf16 wrong: tl.dot of bf16 operands returns garbage, and
a float32 -> bf16 cast truncates instead of rounding to nearest.

Standalone, needs torch and triton. Run: python interpreter_bf16_dot.py
Expected: both differences about 0 (the dot: float32 accumulation of the same bf16 products; the cast: equal to
torch's round-to-nearest). Seen with triton 3.9.0 and torch 2.13.0+cpu: the dot is off by ~1e10 on unit-normal
16 x 16 inputs, the cast by up to one bf16 unit (it truncates, e.g. 0.8320 -> 0.8281 instead of 0.8320).

Why this project meets it: its tensor-core kernels' bf16 paths cannot be checked in the interpreter. The op's
tests run them in fp16 there (the same kernel code with another 16-bit dtype), and the bf16 paths on a GPU
(bench/gpu_session.sh).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def bf16_dot_and_cast(a_ptr, b_ptr, dot_ptr, cast_ptr):
    rows = tl.arange(0, 16)
    tile = rows[:, None] * 16 + rows[None, :]
    a = tl.load(a_ptr + tile)
    b = tl.load(b_ptr + tile)
    tl.store(dot_ptr + tile, tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16)))
    tl.store(cast_ptr + tile, a.to(tl.bfloat16).to(tl.float32))


if __name__ == "__main__":
    torch.manual_seed(0)
    a, b = torch.randn(16, 16), torch.randn(16, 16)
    dot, cast = torch.empty(16, 16), torch.empty(16, 16)
    bf16_dot_and_cast[(1,)](a, b, dot, cast)
    expected_dot = a.bfloat16().double() @ b.bfloat16().double()
    print(f"triton {triton.__version__}: max |dot - float64 of the bf16 operands| = "
          f"{(dot.double() - expected_dot).abs().max().item():.3g}")
    print(f"max |cast - torch's bf16 rounding| = {(cast - a.bfloat16().float()).abs().max().item():.3g}")
