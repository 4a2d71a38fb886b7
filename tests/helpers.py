"""One home for what the tests share: random inputs, error measure and tolerances."""

from __future__ import annotations

import os

import torch

GRAD_NAMES = ("q", "k", "v", "rpb", "w1", "b1", "w2", "b2")

# Tiny (B, T, H, W, heads, D, K) cases, as (id, shape), for both the reference and the interpreted
# kernels: T in {1, 2, 3}, H != W, H or W < K, K in {3, 5, 7}, D not a power of two.
TINY_SHAPES = (
    ("T1-self-attention-W<K", (1, 1, 3, 2, 1, 16, 3)),
    ("T2-two-heads", (1, 2, 4, 5, 2, 16, 3)),
    ("T3-H<K", (1, 3, 3, 5, 1, 32, 5)),
    ("B2-D24-frame-smaller-than-window", (2, 2, 2, 3, 2, 24, 5)),
    ("K7", (1, 2, 5, 4, 1, 16, 7)),
)

# Filled by tests/test_aot_compile.py, printed at the end of the session by tests/conftest.py.
AOT_REPORT: list = []

# The PyTorch reference (or a module running it) in a given dtype vs a float64 computation of the same maths,
# relative (Frobenius) error, both computed from the same input values. float64/float32: only summation order
# and float32 rounding differ. bf16/fp16: the compute is float32, so the error is that of rounding the output
# to 8/11 significant bits (measured ~1.6e-3 for bf16, ~2e-4 for fp16 at the test shapes).
REFERENCE_RTOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}

# float32 kernels vs the float64 reference, relative (Frobenius) error. Measured ~2e-7 on the
# interpreter; on a GPU the products are "ieee" float32 too, so the same bound holds.
FP32_KERNEL_RTOL = 1e-5


# Two units of tf32 rounding (unit roundoff 2**-11): on a GPU the kernels run the motion MLP's products on
# tensor cores with tf32-rounded operands when the inputs are fp16/bf16 (float32 accumulation, SPEC.md),
# where the reference multiplies in full float32.
TF32_ALLOWANCE = 2.0 ** -10


def low_precision_bound(reference_error: float) -> float:
    """Allowed error of the fused op in fp16/bf16, given the reference's own error in that dtype.

    Both compute in float32 from the same rounded inputs, so the fused op should land near the reference's
    own error: 2x it on a GPU. The interpreter truncates float32 -> bfloat16 on store where a GPU rounds to
    nearest, which doubles the output rounding error (measured 2.0-2.1x): 2.5x there. The tf32 rounding of
    the MLP's operands (done by the kernels, so also in the interpreter) adds its own error, which shows
    where the reference's is tiny (the float32 rpb's gradient: 1e-7 vs 4e-4): at least `TF32_ALLOWANCE`.
    """
    factor = 2.5 if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else 2.0
    return max(factor * reference_error, TF32_ALLOWANCE)


def test_device() -> str:
    """CUDA when present; else CPU tensors, which the interpreter runs (tests/conftest.py)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


test_device.__test__ = False  # a helper, not a test, despite its name


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (NaN anywhere makes it NaN, so tests fail)."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def make_inputs(B, T, H, W, heads, D, K, *, dtype=torch.float32, device="cpu", qkv_views=False, seed=0,
                param_dtype=torch.float32):
    """The eight inputs of emim_attention, random and never zero, as a dict.

    Biases and W2 are random non-zero (unlike the module's init) so that every path of the op matters.
    qkv_views=True makes q, k, v the three strided views of one (B, T, H, W, 3, heads, D) tensor, as a
    qkv projection produces them.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0, dt=param_dtype):
        return (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=dt)

    if qkv_views:
        qkv = randn(B, T * H * W, 3 * heads * D, dt=dtype).view(B, T, H, W, 3, heads, D)
        q, k, v = qkv.unbind(4)
    else:
        q, k, v = (randn(B, T, H, W, heads, D, dt=dtype) for _ in range(3))
    area = K * K
    return dict(
        q=q, k=k, v=v,
        rpb=randn(heads, K, K, std=0.5),
        w1=randn(4 * area, area, std=area ** -0.5),
        b1=randn(4 * area, std=0.1),
        w2=randn(D, 4 * area, std=(4 * area) ** -0.5),
        b2=randn(D, std=0.1),
    )
