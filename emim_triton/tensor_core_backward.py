"""The tensor-core query-side backward ("halo" strategy, ``kernels/backward_query_tensor_core.py``): host-side
packing of the motion MLP, the launch description, and a runner.

A drop-in for ``triton_backend.backward_query_launch``: same arguments, same outputs (dq in q's dtype, contiguous
(B, T, H, W, heads, D), rows of the computed pairs only; the float32 scratch rows a and dA, (B, pairs, H, W,
heads, K²)), so the key/value and weights kernels of ``triton_backend.backward`` read them unchanged. Only the
launch configuration differs: a ``tensor_core_forward.TensorCoreConfig`` (query tile, halo block rows, hidden
chunk, warps): `default_config`, the forward's with wider hidden chunks.

The kernel works on each query's window padded to Kp x Kp (Kp = K padded to a power of two), so W1 is repacked
to (hidden pad, Kp * Kp) with zero columns at the padded window entries, and also transposed (both products read
it row by row); b1 and W2 (as (D pad, hidden pad)) are padded with zeros, so padded hidden units add nothing
(their d_hidden is 0). All stay float32; for tf32 products the weights are rounded to tf32 here, once, as
today's kernel rounds them in every program (``kernels/common.py: round_to_tf32``).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .checks import EMIMShape
from .launch_configs import padded_head_dim
from .kernels.backward_query_tensor_core import emim_backward_query_tensor_core_kernel
from .tensor_core_forward import (TensorCoreConfig, default_tensor_core_config, halo_geometry, tile_window_entries,
                                  window_pad_side)
from .tensor_core_forward import supports as forward_supports
from .triton_backend import DEFAULT_VARIANT, KernelLaunch, Variant, _strides, dot_precision, stand_in_qkv


def supports(shape: EMIMShape, dtype: torch.dtype, variant: Variant = DEFAULT_VARIANT) -> bool:
    """Whether this strategy is the one to run: the tensor-core forward's cases (fp16/bf16, no dilation, K <= 7,
    any D, both directions, either context).

    The kernel computes every undilated case it is given (the tests run float32 and K = 9 too); float32 inputs
    keep exact ("ieee") products, which do not run on tensor cores, and larger windows shrink the query tile
    below a warpgroup, so those stay on the offset-loop kernel.
    """
    return forward_supports(shape, dtype, variant)


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 x rounded to the nearest tf32 value, ties away from zero: bit for bit kernels/common.py's
    round_to_tf32."""
    return ((x.view(torch.int32) + 0x1000) & -0x2000).view(torch.float32)


def pack_mlp(w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, shape: EMIMShape, cfg: TensorCoreConfig,
             precision: str):
    """(W1 (hidden pad, Kp²), W1^T (Kp², hidden pad), b1 (hidden pad,), W2 (D pad, hidden pad)): float32,
    zero-padded, the weights rounded to tf32 for `precision` "tf32" (module notes)."""
    hidden, window, D = shape.hidden, shape.window, shape.head_dim
    hidden_pad, side = cfg.hidden_pad(window), window_pad_side(window)
    w1p = w1.new_zeros((hidden_pad, side, side), dtype=torch.float32)
    w1p[:hidden, :window, :window] = w1.reshape(hidden, window, window)
    w1p = w1p.reshape(hidden_pad, side * side)
    b1p = b1.new_zeros((hidden_pad,), dtype=torch.float32)
    b1p[:hidden] = b1
    w2p = w2.new_zeros((padded_head_dim(D), hidden_pad), dtype=torch.float32)
    w2p[:D, :hidden] = w2
    if precision == "tf32" and w1p.device.type != "meta":  # meta tensors have no values to round
        w1p, w2p = round_to_tf32(w1p), round_to_tf32(w2p)
    return w1p, w1p.t().contiguous(), b1p, w2p


def default_config(shape: EMIMShape) -> TensorCoreConfig:
    """The forward's tiles, with 64-wide hidden chunks up to D = 64 (static model, H200, bf16: fastest at the S16
    stage-3 shape, 0.390 ms modelled against 0.382 with 32-wide chunks, and 8 B spilled against 28 B; at D = 128
    32-wide chunks spill less). The spilled values are per-query pointers stored and reloaded once per program,
    outside every loop."""
    config = default_tensor_core_config(shape)
    return replace(config, hidden_chunk=64) if shape.head_dim <= 64 else config


def backward_query_tensor_core_launch(q, k, v, rpb, w1, b1, w2, grad_pairs, lse, dq, affinity, d_affinity,
                                      shape: EMIMShape, scale: float, pad_value: float,
                                      cfg: TensorCoreConfig | None = None,
                                      variant: Variant = DEFAULT_VARIANT) -> KernelLaunch:
    """The launch, with `triton_backend.backward_query_launch`'s arguments (rpb contiguous (heads, K, K); w1, b1,
    w2 as the op gets them: packed here), and a `TensorCoreConfig` (None: `default_config`)."""
    cfg = cfg or default_config(shape)
    pairs = variant.pairs(shape)
    grid, halo = halo_geometry("backward_query_tensor_core_launch", shape, cfg, variant, pairs)
    if not rpb.is_contiguous():
        raise ValueError("backward_query_tensor_core_launch: rpb must be contiguous (heads, K, K) "
                         "(triton_backend.contiguous_parameters)")
    w1p, w1t, b1p, w2p = pack_mlp(w1, b1, w2, shape, cfg, dot_precision(q.dtype))
    # Pass 2 reads dA back at each (query, halo slot) by the slot's window entry.
    entries = tile_window_entries(cfg, shape.window, False, q)
    return KernelLaunch(
        emim_backward_query_tensor_core_kernel, grid,
        dict(q_ptr=q, k_ptr=k, v_ptr=v, rpb_ptr=rpb, entry_ptr=entries, w1_ptr=w1p, w1t_ptr=w1t, b1_ptr=b1p,
             w2_ptr=w2p, grad_ptr=grad_pairs, lse_ptr=lse, dq_ptr=dq, affinity_ptr=affinity, d_affinity_ptr=d_affinity,
             **_strides("q", q), **_strides("k", k), **_strides("v", v),
             T=shape.frames, H=shape.height, W=shape.width, HEADS=shape.heads, D=shape.head_dim,
             num_pairs=pairs, key_frame_offset=variant.key_frame_offset(shape),
             context_channels=variant.kernel_context_channels(shape), scale=scale, pad_value=pad_value),
        dict(WINDOW=shape.window, WINDOW_PAD_SIDE=window_pad_side(shape.window),
             BLOCK_D=padded_head_dim(shape.head_dim), **halo, HIDDEN_PAD=cfg.hidden_pad(shape.window),
             HIDDEN_CHUNK=cfg.hidden_chunk, DOT_PRECISION=dot_precision(q.dtype)),
        cfg.num_warps, cfg.num_stages,
    )


def example_launch(shape: EMIMShape, dtype: torch.dtype, cfg: TensorCoreConfig | None = None, device="meta",
                   variant: Variant = DEFAULT_VARIANT) -> KernelLaunch:
    """The launch at `shape` on stand-in tensors (meta by default), q, k, v as the strided views of one qkv
    projection (as `triton_backend.example_launches` builds them): for compiling ahead of time and the static
    model."""
    B, T, H, W, heads, D = shape.batch, shape.frames, shape.height, shape.width, shape.heads, shape.head_dim
    q, k, v = stand_in_qkv(shape, dtype, device)
    f32 = dict(dtype=torch.float32, device=device)
    rpb = torch.empty((heads, shape.window, shape.window), **f32)
    w1, b1, w2 = (torch.empty(s, **f32) for s in ((shape.hidden, shape.window_area), (shape.hidden,),
                                                   (D, shape.hidden)))
    pairs = variant.pairs(shape)
    grad_pairs = torch.empty((B, pairs, H, W, heads, D), **f32)
    lse = torch.empty((B, pairs, H, W, heads), **f32)
    scratch = torch.empty((B, pairs, H, W, heads, shape.window_area), **f32)
    dq = torch.empty((B, T, H, W, heads, D), dtype=dtype, device=device)
    return backward_query_tensor_core_launch(q, k, v, rpb, w1, b1, w2, grad_pairs, lse, dq, scratch, scratch, shape,
                                             D ** -0.5, 1e-6, cfg, variant)
