"""The tensor-core key/value-side backward ("halo" strategy, ``kernels/backward_key_value_tensor_core.py``): the
launch description and its support rule.

A drop-in for ``triton_backend.backward_key_value_launch``: same arguments (plus the config), same outputs (dk
and dv in k's and v's dtype, contiguous (B, T, H, W, heads, D), rows of the key frames that receive gradient,
zero in channels >= context_channels), read from the same inputs (q, k, the folded float32 upstream gradient, the
forward's lse and the query kernel's float32 dA rows). Only the launch configuration differs: a
``tensor_core_forward.TensorCoreConfig`` (key tile, halo block rows, warps; its hidden chunk is unused here):
`default_config`. The launch also carries two tables of the tile geometry, `tensor_core_forward.window_entries`
(mirrored) and the `bias_table` made from it and rpb.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .checks import EMIMShape
from .launch_configs import padded_head_dim
from .kernels.backward_key_value_tensor_core import emim_backward_key_value_tensor_core_kernel
from .tensor_core_forward import (LOG2E, TensorCoreConfig, bias_table, default_tensor_core_config, halo_geometry,
                                  tile_window_entries)
from .tensor_core_forward import supports as forward_supports
from .triton_backend import DEFAULT_VARIANT, KernelLaunch, Variant, _strides, dot_precision, stand_in_qkv


def supports(shape: EMIMShape, dtype: torch.dtype, variant: Variant = DEFAULT_VARIANT) -> bool:
    """Whether this strategy is the one to run: the tensor-core forward's cases (fp16/bf16, no dilation,
    K <= 7, any D, either context) with one query frame per key frame: direction "next", or any direction
    at T = 1. Direction "prev" at T > 1 (key frame 0 also serves query frame 0) stays on today's kernel."""
    return forward_supports(shape, dtype, variant) and variant.key_sources(shape) == 1


def default_config(shape: EMIMShape) -> TensorCoreConfig:
    """The forward's tiles, with 2-row halo blocks (static model, H200, S16 stage 3 bf16: 0.180 ms modelled and
    no spills at 2 rows; 4 rows spill)."""
    return replace(default_tensor_core_config(shape), halo_block_rows=2)


def backward_key_value_tensor_core_launch(q, k, rpb, grad_pairs, lse, d_affinity, dk, dv, shape: EMIMShape,
                                          scale: float, cfg: TensorCoreConfig | None = None,
                                          variant: Variant = DEFAULT_VARIANT) -> KernelLaunch:
    """The launch, with `triton_backend.backward_key_value_launch`'s arguments (rpb contiguous (heads, K, K);
    grad_pairs, lse and d_affinity contiguous, as triton_backend.backward makes them) and a `TensorCoreConfig`
    (None: `default_config`)."""
    name = "backward_key_value_tensor_core_launch"
    cfg = cfg or default_config(shape)
    key_frames = variant.key_frames(shape)
    grid, halo = halo_geometry(name, shape, cfg, variant, len(key_frames))
    if variant.key_sources(shape) != 1:
        raise ValueError(f"{name}: variant.direction must be 'next' when T > 1 (this kernel reads one query frame "
                         f"per key frame; 'prev' gives key frame 0 two), got {variant.direction!r} at T = "
                         f"{shape.frames}")
    for arg, t in (("rpb", rpb), ("grad_pairs", grad_pairs), ("lse", lse), ("d_affinity", d_affinity),
                   ("dk", dk), ("dv", dv)):
        if not t.is_contiguous():  # the kernel indexes these by raw offsets
            raise ValueError(f"{name}: {arg} must be contiguous (as triton_backend.backward makes it)")
    entries = tile_window_entries(cfg, shape.window, True, rpb)
    return KernelLaunch(
        emim_backward_key_value_tensor_core_kernel, grid,
        dict(q_ptr=q, k_ptr=k, entry_ptr=entries, bias_ptr=bias_table(rpb, entries), grad_ptr=grad_pairs,
             lse_ptr=lse, d_affinity_ptr=d_affinity, dk_ptr=dk, dv_ptr=dv, **_strides("q", q), **_strides("k", k),
             T=shape.frames, H=shape.height, W=shape.width, HEADS=shape.heads, D=shape.head_dim,
             num_pairs=variant.pairs(shape), key_frame_offset=variant.key_frame_offset(shape),
             first_key_frame=key_frames.start, num_key_frames=len(key_frames),
             context_channels=variant.kernel_context_channels(shape), scale=scale, scale_log2=scale * LOG2E),
        dict(WINDOW=shape.window, BLOCK_D=padded_head_dim(shape.head_dim), **halo, DOT_PRECISION=dot_precision(q.dtype)),
        cfg.num_warps, cfg.num_stages,
    )


def example_launch(shape: EMIMShape, dtype: torch.dtype, cfg: TensorCoreConfig | None = None, device="meta",
                   variant: Variant = DEFAULT_VARIANT) -> KernelLaunch:
    """The launch at `shape` on stand-in tensors (meta by default), q and k as strided views of one qkv projection
    (as `triton_backend.example_launches` builds them): for compiling ahead of time and the static model."""
    B, T, H, W, heads, D = shape.batch, shape.frames, shape.height, shape.width, shape.heads, shape.head_dim
    q, k, _ = stand_in_qkv(shape, dtype, device)
    f32 = dict(dtype=torch.float32, device=device)
    rpb = torch.empty((heads, shape.window, shape.window), **f32)
    pairs = variant.pairs(shape)
    grad_pairs = torch.empty((B, pairs, H, W, heads, D), **f32)
    lse = torch.empty((B, pairs, H, W, heads), **f32)
    d_affinity = torch.empty((B, pairs, H, W, heads, shape.window_area), **f32)
    dk, dv = (torch.empty((B, T, H, W, heads, D), dtype=dtype, device=device) for _ in range(2))
    return backward_key_value_tensor_core_launch(q, k, rpb, grad_pairs, lse, d_affinity, dk, dv, shape, D ** -0.5,
                                                 cfg, variant)
