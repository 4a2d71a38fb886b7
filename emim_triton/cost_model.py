"""The cost model of EMIM: floating-point operations and the fewest bytes, forward and backward.

The one home of these counts (docs/operation.md#cost): the benchmark CLI and bench/ROOFLINE.md read them from
here, and so should any other FLOP count of the op. Conventions, decided once:

FLOPs count the products and sums of the matrix-like parts (a multiply-add is 2 FLOPs); the softmax,
QuickGELU and the bias adds are elementwise and not counted, as is usual for attention. Per query row
(one query position of one head) of a computed frame pair:

    affinities  QK    2 K² D
    context     AV    2 K² D
    motion MLP        2 K² 4K²  +  2 4K² D          (W1: K² -> 4K², W2: 4K² -> D)

For K = 7, D = 64 that is 6,272 + 6,272 + 19,208 + 25,088 = 56,840 FLOPs. Only the T - 1 frame pairs are
computed (output frame T - 1 is a copy of T - 2, no arithmetic), so the rows are B * (T-1) * H * W * heads
(B * H * W * heads when T = 1, where the frame attends to itself).

Backward FLOPs are 2x the forward: the gradient of each product needs two products of the same size
(QK -> dq and dk, AV -> dP and dv, each MLP layer -> its input and its weight gradient). Recomputation is
not credited: the fused backward recomputes the affinities once, and the MLP's hidden layer and W2^T g in
both its query and its weights kernel (+61% arithmetic at K = 7, D = 64), where the eager reference stores
them instead; counting only the work the maths needs keeps TFLOP/s comparable across implementations
(the fused one reads lower than the work it really does, never higher).

Bytes are the fewest any implementation must move through device memory: each input read once, each
output written once, in its own dtype. Forward: q of the T-1 query frames, k and v of the T-1 key frames
(frames 0..T-2 and 1..T-1: the last query frame and the first key frame are never needed), the output of
all T frames (frame T-1 is a real, written copy), and the small parameters (rpb, W1, b1, W2, b2) once.
Backward: the same reads of q, k, v, the upstream gradient of all T frames, dq, dk, dv of all T frames
(whole tensors, zeros included), and the parameters read plus their gradients written. The float32
log-sum-exp the fused op saves between the two is an implementation choice, not part of the floor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import EMIMShape

#: The two things the benchmarks time: the forward alone, and forward plus backward (a training step).
MODES = ("forward", "forward+backward")


def flops_per_query(window: int, head_dim: int) -> dict[str, int]:
    """FLOPs of one query row (one position, one head) of the forward, by part."""
    area, hidden = window * window, 4 * window * window
    return {
        "qk": 2 * area * head_dim,
        "av": 2 * area * head_dim,
        "mlp_hidden": 2 * area * hidden,  # W1: K² -> 4K²
        "mlp_out": 2 * hidden * head_dim,  # W2: 4K² -> D
    }


def parameter_count(shape: EMIMShape) -> int:
    """Elements of rpb, W1, b1, W2, b2."""
    area, hidden = shape.window_area, shape.hidden
    return shape.heads * area + hidden * area + hidden + shape.head_dim * hidden + shape.head_dim


@dataclass(frozen=True)
class EMIMCost:
    """FLOPs and fewest bytes of one EMIM call, forward and backward (see the module docstring)."""

    shape: EMIMShape
    forward_flops: int
    backward_flops: int
    forward_bytes: int
    backward_bytes: int

    def flops(self, mode: str) -> int:
        """FLOPs of "forward" or "forward+backward"."""
        return self.forward_flops + (self.backward_flops if _check_mode(mode) == "forward+backward" else 0)

    def bytes(self, mode: str) -> int:
        """Fewest bytes of "forward" or "forward+backward"."""
        return self.forward_bytes + (self.backward_bytes if _check_mode(mode) == "forward+backward" else 0)

    def intensity(self, mode: str) -> float:
        """FLOPs per byte: above a device's (matrix rate / bandwidth) the call is compute-bound."""
        return self.flops(mode) / self.bytes(mode)


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def emim_cost(shape: EMIMShape, dtype: torch.dtype = torch.bfloat16,
              param_dtype: torch.dtype = torch.float32) -> EMIMCost:
    """The cost of EMIM at `shape` with activations in `dtype` and parameters in `param_dtype`.

    param_dtype defaults to float32: mixed-precision training keeps float32 master weights, and the op
    accepts them as they are.
    """
    forward_flops = shape.rows * sum(flops_per_query(shape.window, shape.head_dim).values())
    act, par = _itemsize(dtype), _itemsize(param_dtype)
    # Elements of one (B, frames, H, W, heads, D) slab per frame count.
    per_frame = shape.batch * shape.height * shape.width * shape.heads * shape.head_dim
    reads_qkv = 3 * shape.pairs * per_frame  # q of the query frames, k and v of the key frames
    all_frames = shape.frames * per_frame
    params = parameter_count(shape) * par
    forward_bytes = (reads_qkv + all_frames) * act + params  # + out of all T frames
    # + upstream gradient (all frames) + dq, dk, dv (all frames) + parameters read and their gradients.
    backward_bytes = (reads_qkv + all_frames + 3 * all_frames) * act + 2 * params
    return EMIMCost(shape, forward_flops, 2 * forward_flops, forward_bytes, backward_bytes)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
