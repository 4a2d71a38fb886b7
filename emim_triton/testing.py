"""What the tests, the benchmarks, the tuner's result check and the demo share: random inputs of the op, the
error measure and its tolerances, and an independent oracle for EMIM without its motion term.

Only torch and the modules below the op are imported here (no triton, no `emim_triton.reference`), so that
the tuner can use it without an import cycle and the oracle stays a second, independent implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .environment import interpreter_enabled

# The op's eight inputs in its argument order (each receives a gradient).
INPUT_NAMES = ("q", "k", "v", "rpb", "w1", "b1", "w2", "b2")


# --- Tolerances: relative (Frobenius) errors, see `relative_error` ---------------------------------------

# The PyTorch reference (or a module running it) in a given dtype vs a float64 computation of the same maths,
# both computed from the same input values. float64/float32: only summation order and float32 rounding
# differ. bf16/fp16: the compute is float32, so the error is that of rounding the output to 8/11 significant
# bits (measured ~1.6e-3 for bf16, ~2e-4 for fp16 at the test shapes).
REFERENCE_RTOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}

# float32 kernels vs the float64 reference. Measured ~2e-7 on the interpreter; on a GPU the products are
# "ieee" float32 too, so the same bound holds.
FP32_KERNEL_RTOL = 1e-5

# Two units of tf32 rounding (unit roundoff 2**-11): on a GPU the kernels run the motion MLP's products on
# tensor cores with tf32-rounded operands when the inputs are fp16/bf16 (float32 accumulation, docs/operation.md),
# where the reference multiplies in full float32.
TF32_ALLOWANCE = 2.0 ** -10

# The tuner's check that its winners compute what the heuristic's configurations compute: the same function,
# only the summation order differs, which moves float32 results by ~1e-6 and flips the last bit of a few
# 16-bit outputs.
SAME_FUNCTION_RTOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}

# `emim-bench compare`: a backend whose forward differs from the float64 reference by more than this computes
# another function (and is not timed). Rounding the output to bf16 alone costs ~2e-3 and fp16 ~3e-4.
BENCH_CORRECTNESS_RTOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def low_precision_bound(reference_error: float, interpreted: bool | None = None) -> float:
    """Allowed error of the fused op in fp16/bf16, given the reference's own error in that dtype.

    Both compute in float32 from the same rounded inputs, so the fused op should land near the reference's
    own error: 2x it on a GPU. The interpreter truncates float32 -> bfloat16 on store where a GPU rounds to
    nearest, which doubles the output rounding error (measured 2.0-2.1x): 2.5x there. The tf32 rounding of
    the MLP's operands (done by the kernels, so also in the interpreter) adds its own error, which shows
    where the reference's is tiny (the float32 rpb's gradient: 1e-7 vs 4e-4): at least `TF32_ALLOWANCE`.
    interpreted: whether the kernels ran in Triton's interpreter (default: whether it is switched on).
    """
    if interpreted is None:
        interpreted = interpreter_enabled()
    return max((2.5 if interpreted else 2.0) * reference_error, TF32_ALLOWANCE)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (NaN anywhere makes it NaN, so `error <= bound` fails)."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


# --- Random inputs ---------------------------------------------------------------------------------------


def make_inputs(B, T, H, W, heads, D, K, *, dtype=torch.float32, device="cpu", qkv_views=False, seed=0,
                param_dtype=torch.float32, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The eight inputs of emim_attention, random and never zero, as a dict in `INPUT_NAMES` order.

    q, k, v (dtype) are standard normal; the parameters (param_dtype) are those of `random_parameters`.
    qkv_views=True makes q, k, v the three strided views of one `random_qkv` tensor, as a qkv projection
    produces them.

    Values are drawn in float32 from `generator`, then cast and moved to `device`. The default generator is
    a CPU one seeded with `seed`, so the values do not depend on the device (a GPU failure reproduces on a
    CPU); inputs too large to draw on the host pass a generator on the device.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    if qkv_views:
        q, k, v = qkv_views_of(random_qkv(B, T, H, W, heads, D, gen, dtype=dtype, device=device), T, H, W, heads)
    else:
        q, k, v = (_normal(gen, (B, T, H, W, heads, D), 1.0, dtype, device) for _ in range(3))
    return dict(q=q, k=k, v=v, **random_parameters(heads, D, K, gen, dtype=param_dtype, device=device))


def random_qkv(B, T, H, W, heads, D, generator: torch.Generator, *, dtype=torch.float32,
               device="cpu") -> torch.Tensor:
    """A standard normal (B, T*H*W, 3*heads*D) tensor: what a model's qkv projection hands the op."""
    return _normal(generator, (B, T * H * W, 3 * heads * D), 1.0, dtype, device)


def qkv_views_of(qkv: torch.Tensor, T, H, W, heads) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as the (B, T, H, W, heads, D) views of a (B, T*H*W, 3*heads*D) projection, as models pass them."""
    B, _, channels = qkv.shape
    return qkv.view(B, T, H, W, 3, heads, channels // (3 * heads)).unbind(4)


def random_parameters(heads, D, K, generator: torch.Generator, *, dtype=torch.float32,
                      device="cpu") -> dict[str, torch.Tensor]:
    """rpb, w1, b1, w2, b2 with the spread of a trained layer's: unit-variance pre-activations in the motion
    MLP, and the biases and W2 random non-zero (unlike the module's init) so that every path of the op
    matters."""
    area = K * K
    shapes_and_stds = dict(rpb=((heads, K, K), 0.5), w1=((4 * area, area), area ** -0.5), b1=((4 * area,), 0.1),
                           w2=((D, 4 * area), (4 * area) ** -0.5), b2=((D,), 0.1))
    return {name: _normal(generator, shape, std, dtype, device) for name, (shape, std) in shapes_and_stds.items()}


def _normal(generator: torch.Generator, shape: tuple, std: float, dtype, device) -> torch.Tensor:
    # drawn in float32 on the generator's device, whatever the target dtype, so a seed means the same values
    return (torch.randn(*shape, generator=generator, device=generator.device) * std).to(device=device, dtype=dtype)


# --- An independent oracle -------------------------------------------------------------------------------


def local_next_frame_attention(q, k, v, rpb, scale, pad_value):
    """EMIM without its motion term (W2 = b2 = 0, a freshly initialised layer), written from docs/operation.md with
    shifted slices, independently of `emim_triton.reference`.

    Output frame t: the queries of frame tq = min(t, T-2) attend to the K x K window centred on their own
    position in frame tq + 1 (a single frame, T = 1, attends to itself). Window positions outside the frame
    hold pad_value in every channel of the keys and values (constant padding, not masking), and rpb[head, i, j]
    is added to the logit at window offset (i, j). q, k, v: (B, T, H, W, heads, D); rpb: (heads, K, K).
    """
    B, T, H, W, heads, D = q.shape
    K = rpb.shape[-1]
    r = K // 2
    query_frames = [min(t, T - 2) for t in range(T)] if T > 1 else [0]
    key_frames = [t + 1 for t in query_frames] if T > 1 else [0]
    q = q[:, query_frames]
    # pad H and W by r on each side: the window of (y, x) at offset (i, j) is padded[y + i, x + j]
    k, v = (F.pad(x[:, key_frames], (0, 0, 0, 0, r, r, r, r), value=pad_value) for x in (k, v))
    logits, values = [], []
    for i in range(K):
        for j in range(K):
            logits.append(scale * (q * k[:, :, i:i + H, j:j + W]).sum(-1) + rpb[:, i, j])
            values.append(v[:, :, i:i + H, j:j + W])
    weights = torch.stack(logits, -1).softmax(-1)  # (B, T, H, W, heads, K²)
    return sum(weights[..., o, None] * values[o] for o in range(K * K))
