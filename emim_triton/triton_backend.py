"""Launching the fused EMIM kernels: grids, strides, scratch buffers and the fixed-order reductions.

The kernels are in ``emim_triton.kernels``; the autograd and custom-op glue is in ``emim_triton.ops``.
Everything here works on already-checked inputs (``emim_triton.checks``).

Backward plan (no atomics anywhere, so gradients are bit-identical run after run):
1. query kernel, one program per query tile: recomputes the affinities from the saved log-sum-exp,
   back-propagates through the softmax and the motion MLP, writes dq and two K²-wide float32 scratch
   rows per query (the affinities a and their gradient dA) that the next two kernels read;
2. key/value kernel, one program per key tile: gathers dk and dv over the mirrored window (a key at
   (y', x') is in the window of the query at (y', x') minus the displacement) instead of scattering;
3. weights kernel: dW1, db1, dW2 over all queries as rows, split into a fixed number of partial sums
   that are added in a fixed order; db2 and drpb are plain fixed-order torch sums.
The scratch is transient (freed when backward returns): 2 * 4 * K² bytes per query and head, e.g. 184 MB
for the UniFormer-S16 stage-3 shape, against 64 MB for bf16 q alone; nothing K²-wide is saved between
forward and backward.
"""

from __future__ import annotations

import torch
import triton

from .checks import EMIMShape
from .configs import EMIMConfigs, default_configs, interpreter_configs, padded_head_dim, padded_window_area
from .functional import interpreter_enabled
from .kernels.backward_key_value import emim_backward_key_value_kernel
from .kernels.backward_query import emim_backward_query_kernel
from .kernels.backward_weights import emim_backward_weights_kernel
from .kernels.forward import emim_forward_kernel


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get float32-exact products; fp16/bf16 inputs may use tf32 tensor cores.

    tf32 keeps a 10-bit mantissa, more than the bf16 (7-bit) or fp16 (10-bit) inputs carry, so the
    low-precision paths lose nothing measurable to it.
    """
    return "ieee" if dtype == torch.float32 else "tf32"


def frame_strides(t: torch.Tensor) -> tuple[int, ...]:
    """Strides of a (B, T, H, W, heads, D) tensor along its first five axes (D's stride is 1)."""
    return tuple(t.stride()[:5])


def _tile_grid(shape: EMIMShape, block_h: int, block_w: int) -> tuple[int, int, int]:
    tiles = triton.cdiv(shape.height, block_h) * triton.cdiv(shape.width, block_w)
    return tiles, shape.heads, shape.batch * shape.pairs


def _common_constexprs(shape: EMIMShape, dtype: torch.dtype) -> dict:
    return dict(
        WINDOW=shape.window,
        WINDOW_PAD=padded_window_area(shape.window),
        BLOCK_D=padded_head_dim(shape.head_dim),
        DOT_PRECISION=dot_precision(dtype),
    )


def configs_for(shape: EMIMShape) -> EMIMConfigs:
    """The launch configurations for a shape (the autotuner's cache will slot in here)."""
    choose = interpreter_configs if interpreter_enabled() else default_configs
    return choose(shape.height, shape.width, shape.window, shape.head_dim)


def key_frame_offset(shape: EMIMShape) -> int:
    """Key frame = query frame + 1, or the query frame itself for a single frame."""
    return 1 if shape.frames > 1 else 0


def forward(q, k, v, rpb, w1, b1, w2, b2, shape: EMIMShape, scale: float, pad_value: float,
            store_lse: bool, configs: EMIMConfigs | None = None):
    """Run the forward kernel. Returns (out, lse); lse is (B, pairs, H, W, heads) float32 or None."""
    configs = configs or configs_for(shape)
    cfg = configs.forward
    B, T, H, W, heads, D = q.shape
    out = torch.empty((B, T, H, W, heads, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, shape.pairs, H, W, heads), dtype=torch.float32, device=q.device) if store_lse else out
    emim_forward_kernel[_tile_grid(shape, cfg.block_h, cfg.block_w)](
        q, k, v, rpb, w1, b1, w2, b2, out, lse,
        *frame_strides(q), *frame_strides(k), *frame_strides(v),
        T, H, W, heads, D, shape.pairs, key_frame_offset(shape),
        scale, pad_value,
        **_common_constexprs(shape, q.dtype), **cfg.constexprs(), STORE_LSE=store_lse,
        **cfg.launch_options(),
    )
    return out, (lse if store_lse else None)


def fold_last_frame_grad(grad_out: torch.Tensor, shape: EMIMShape) -> torch.Tensor:
    """Upstream gradient per computed pair, contiguous (B, pairs, H, W, heads, D), in float32.

    Output frame T-1 is a copy of output frame T-2, so its gradient adds to frame T-2's.
    """
    if shape.frames == 1:
        return grad_out.float().contiguous()
    folded = grad_out[:, :-1].float().clone()  # float() may return grad_out itself: clone, then add
    folded[:, -1] += grad_out[:, -1].float()
    return folded.contiguous()


def backward(grad_out, q, k, v, rpb, w1, b1, w2, b2, lse, shape: EMIMShape, scale: float, pad_value: float,
             configs: EMIMConfigs | None = None):
    """Gradients for (q, k, v, rpb, w1, b1, w2, b2), each in its input's dtype."""
    configs = configs or configs_for(shape)
    B, T, H, W, heads, D = q.shape
    area, hidden = shape.window_area, shape.hidden
    device = q.device
    grad_pairs = fold_last_frame_grad(grad_out, shape)
    common = _common_constexprs(shape, q.dtype)
    frame_args = (T, H, W, heads, D, shape.pairs, key_frame_offset(shape), scale, pad_value)

    # Frames that are never a query (T-1) or never a key (0) get no gradient: zero them, write the rest.
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if T > 1:
        dq[:, T - 1].zero_()
        dk[:, 0].zero_()
        dv[:, 0].zero_()
    scratch_shape = (B, shape.pairs, H, W, heads, area)
    affinity = torch.empty(scratch_shape, dtype=torch.float32, device=device)
    d_affinity = torch.empty(scratch_shape, dtype=torch.float32, device=device)

    cfg = configs.backward_query
    emim_backward_query_kernel[_tile_grid(shape, cfg.block_h, cfg.block_w)](
        q, k, v, rpb, w1, b1, w2, grad_pairs, lse, dq, affinity, d_affinity,
        *frame_strides(q), *frame_strides(k), *frame_strides(v),
        *frame_args, **common, **cfg.constexprs(), **cfg.launch_options(),
    )

    cfg = configs.backward_key_value
    emim_backward_key_value_kernel[_tile_grid(shape, cfg.block_h, cfg.block_w)](
        q, k, rpb, grad_pairs, lse, d_affinity, dk, dv,
        *frame_strides(q), *frame_strides(k),
        *frame_args, **common, **cfg.constexprs(), **cfg.launch_options(),
    )

    cfg = configs.backward_weights
    rows = B * shape.pairs * H * W * heads
    programs = max(1, min(cfg.programs, triton.cdiv(rows, cfg.block_rows)))
    dw1_partial = torch.empty((programs, hidden, area), dtype=torch.float32, device=device)
    db1_partial = torch.empty((programs, hidden), dtype=torch.float32, device=device)
    dw2_partial = torch.empty((programs, D, hidden), dtype=torch.float32, device=device)
    chunks = triton.cdiv(hidden, cfg.hidden_chunk)
    emim_backward_weights_kernel[(chunks, programs)](
        affinity, grad_pairs, w1, b1, w2, dw1_partial, db1_partial, dw2_partial,
        rows, D, programs,
        WINDOW=shape.window, WINDOW_PAD=common["WINDOW_PAD"], BLOCK_D=common["BLOCK_D"],
        DOT_PRECISION=common["DOT_PRECISION"], **cfg.constexprs(), **cfg.launch_options(),
    )

    # Fixed-order reductions (torch sums do not use atomics), then each gradient in its input's dtype.
    dw1 = dw1_partial.sum(0)
    db1 = db1_partial.sum(0)
    dw2 = dw2_partial.sum(0)
    db2 = grad_pairs.sum(dim=(0, 1, 2, 3, 4))
    drpb = d_affinity.sum(dim=(0, 1, 2, 3)).view(heads, shape.window, shape.window)
    return (dq, dk, dv, drpb.to(rpb.dtype), dw1.to(w1.dtype), db1.to(b1.dtype), dw2.to(w2.dtype),
            db2.to(b2.dtype))

