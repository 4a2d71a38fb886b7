"""The tensor-core EMIM forward ("halo" strategy, ``kernels/forward_tensor_core.py``): configuration, host-side
repacking of the parameters, the launch description and a runner with the interface of
``triton_backend.forward``.

The kernel multiplies a tile of queries with the whole key/value halo around it on tensor cores and picks each
query's K x K window out of that product with a per-head bias table (rpb inside the window, -inf outside),
so the host prepares, per call:

- the bias table, (heads, tile queries, halo slots) float32, pre-multiplied by log2(e) (the kernel's
  softmax is in base 2);
- the motion MLP padded to the kernel's tile shapes: W1 (hidden pad, Kp * Kp), its window (i, j) padded to
  Kp x Kp, Kp = K padded to a power of two, and W2^T (hidden pad, D pad), in the MLP operand dtype (W1 times
  ln 2: the kernel's affinities are base 2); b1 and b2 padded in float32. Padding is 0, which makes padded
  window entries and padded hidden units contribute nothing (QuickGELU(0) = 0).

MLP operands: fp16 for fp16 and bf16 activations. Measured at K = 7, D = 64 (random inputs of
`emim_triton.testing`): fp16 operands (float32 accumulation) put the MLP 4e-4 from float64, bf16 operands
3.2e-3, twice the bf16 reference's own output error (1.7e-3), so bf16 operands would not pass the op's
accuracy bound. fp16's range ends at 65504: an affinity or hidden pre-activation beyond it becomes inf.
float32 activations keep float32 operands with the op's usual dot precision ("ieee").

`supports` says which calls this strategy is meant for; the launcher keeps the offset-loop kernel for the rest.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton

from .checks import EMIMShape
from .launch_configs import next_power_of_2, padded_head_dim
from .kernels.forward_tensor_core import emim_forward_tensor_core_kernel
from . import triton_backend
from .triton_backend import DEFAULT_VARIANT, KernelLaunch, Variant, _strides, dot_precision

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class TensorCoreConfig:
    """Launch configuration of the tensor-core forward.

    tile_h x tile_w queries per program (at least 16: the tl.dot minimum); the halo is the smallest
    power-of-two rectangle holding tile + K - 1 positions on each side, processed halo_block_rows rows at a
    time (the affinities of one block live in registers: 4 rows of a 16-wide halo are 64 float32 a thread at
    4 warps; 8 rows spill at the S16 shape). hidden_chunk: hidden units of the motion MLP per step.
    """

    tile_h: int = 8
    tile_w: int = 8
    hidden_chunk: int = 32
    halo_block_rows: int = 4
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self):
        for name in ("tile_h", "tile_w", "hidden_chunk", "halo_block_rows", "num_warps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ValueError(f"TensorCoreConfig: {name} must be a power of two, got {value!r}")
        if self.tile_h * self.tile_w < 16 or self.hidden_chunk < 16:
            raise ValueError(f"TensorCoreConfig: tile_h * tile_w and hidden_chunk must be >= 16 (tl.dot's "
                             f"minimum), got {self.tile_h}x{self.tile_w} and {self.hidden_chunk}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"TensorCoreConfig: num_stages must be an int >= 1, got {self.num_stages!r}")

    def halo(self, window: int) -> tuple[int, int]:
        return next_power_of_2(self.tile_h + window - 1), next_power_of_2(self.tile_w + window - 1)

    def hidden_pad(self, window: int) -> int:
        return triton.cdiv(4 * window * window, self.hidden_chunk) * self.hidden_chunk


def default_tensor_core_config(shape: EMIMShape) -> TensorCoreConfig:
    """Tiles whose halo stays 16 x 16 slots while K allows (K <= 9: 8 x 8 queries; K <= 13: 4 x 4);
    K = 15 takes 2 x 8 queries, a 16 x 32 halo. 4-row halo blocks: at K = 7, 2-row blocks model faster with
    triton 3.9 (S16 stage 3: 0.199 ms, 3 CTAs per SM, against 0.212) but slower with triton 3.6, the GPU
    machine's (0.224 against 0.189), so the measured choice waits for a GPU."""
    if shape.window <= 9:
        return TensorCoreConfig(8, 8)
    if shape.window <= 13:
        return TensorCoreConfig(4, 4)
    return TensorCoreConfig(2, 8)


def supports(shape: EMIMShape, dtype: torch.dtype, variant: Variant = DEFAULT_VARIANT) -> bool:
    """Whether this strategy is the one to run: fp16/bf16 activations, no dilation, K <= 7 (any D).

    The kernel computes every case it is given correctly except dilation (the tests run float32 and other
    shapes too); these are the cases where it is meant to be faster, by the static model (H200, sm_90, at
    B=32 T=16 14x14, 4 warps: no spills for K 3..7 and D 32, 64, 128). float32 activations keep exact
    ("ieee") products, which do not run on tensor cores. K = 9 pads the window to 16 x 16 (the MLP input 256
    wide) and spills 428 B a thread; K >= 11 takes 4 x 4 or 2 x 8 query tiles, too small for wgmma.
    """
    # The tensor-core kernels index within one frame (pair) in int32: a frame's rows of D channels or K² scratch
    # entries must stay below 2**31 elements (a 2048 x 2048 frame with 16 heads and K = 7 does not).
    frame_elements = shape.height * shape.width * shape.heads * max(padded_head_dim(shape.head_dim), shape.window_area)
    return (dtype in (torch.float16, torch.bfloat16) and variant.dilation == 1 and shape.window <= 7
            and frame_elements < 2 ** 31)


def window_pad_side(window: int) -> int:
    """K padded to a power of two, at least 4 (so the MLP's input, its square, is >= 16 wide: tl.dot's minimum)."""
    return max(4, next_power_of_2(window))


def mlp_operand_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16 operands for fp16/bf16 activations (see the module notes), float32 for float32."""
    return torch.float32 if dtype == torch.float32 else torch.float16


@functools.lru_cache(maxsize=None)
def window_entries(tile_h: int, tile_w: int, halo_h: int, halo_w: int, window: int, mirrored: bool,
                   device: torch.device) -> torch.Tensor:
    """(tile positions, halo slots) int32: the window entry o = i*K + j that links each position of the tile to
    each halo slot, or -1 where none does. Geometry only, so built once per geometry and device.

    Not mirrored (queries in the tile, keys in the halo: the forward and the query side): slot (hy, hx) is entry
    (hy - ty, hx - tx) of the window of the query at (ty, tx). Mirrored (keys in the tile, queries in the halo:
    the key/value side): the key at (ty, tx) is entry (K-1 - (hy - ty), K-1 - (hx - tx)) of the window of the
    slot's query."""
    positions, slots = torch.arange(tile_h * tile_w, device=device), torch.arange(halo_h * halo_w, device=device)
    i = slots.div(halo_w, rounding_mode="floor")[None, :] - positions.div(tile_w, rounding_mode="floor")[:, None]
    j = slots[None, :] % halo_w - positions[:, None] % tile_w
    if mirrored:
        i, j = (window - 1) - i, (window - 1) - j
    inside = (i >= 0) & (i < window) & (j >= 0) & (j < window)
    return torch.where(inside, i * window + j, -1).to(torch.int32).contiguous()


def tile_window_entries(cfg: TensorCoreConfig, window: int, mirrored: bool, like: torch.Tensor) -> torch.Tensor:
    """`window_entries` of `cfg`'s tile and halo, beside `like`: on its device, or on the CPU for a launch on meta
    tensors (compiling, timing), which needs real indices (the tuner moves them to its GPU)."""
    device = torch.device("cpu") if like.device.type == "meta" else like.device
    return window_entries(cfg.tile_h, cfg.tile_w, *cfg.halo(window), window, mirrored, device)


def bias_table(rpb: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
    """(heads, tile positions, halo slots) float32 on rpb's device: log2(e) * rpb[head, o] at each window entry o
    of `entries` (`window_entries`), -inf where there is none (the softmax then gives the slot no mass)."""
    heads = rpb.shape[0]
    entries = entries.to(rpb.device)
    values = rpb.float().reshape(heads, -1)[:, entries.clamp(min=0).long()] * LOG2E
    return torch.where(entries >= 0, values, torch.full_like(values, float("-inf"))).contiguous()


def pack_mlp(w1, b1, w2, b2, shape: EMIMShape, cfg: TensorCoreConfig, dtype: torch.dtype):
    """(W1 (hidden pad, K² pad), b1 (hidden pad,), W2^T (hidden pad, D pad), b2 (D pad,)): zero-padded,
    weights in the MLP operand dtype for activations of `dtype`, biases float32."""
    hidden, D = shape.hidden, shape.head_dim
    hidden_pad, d_pad = cfg.hidden_pad(shape.window), padded_head_dim(D)
    operand = mlp_operand_dtype(dtype)
    side = window_pad_side(shape.window)
    w1p = w1.new_zeros((hidden_pad, side, side), dtype=operand)
    # ln 2 folded in: the kernel's affinities are in base 2.
    w1p[:hidden, :shape.window, :shape.window] = w1.reshape(hidden, shape.window, shape.window).float() * math.log(2)
    w1p = w1p.reshape(hidden_pad, side * side)
    w2p = w2.new_zeros((hidden_pad, d_pad), dtype=operand)
    w2p[:hidden, :D] = w2.t()
    b1p = b1.new_zeros((hidden_pad,), dtype=torch.float32)
    b1p[:hidden] = b1
    b2p = b2.new_zeros((d_pad,), dtype=torch.float32)
    b2p[:D] = b2
    return w1p, b1p, w2p, b2p


def halo_geometry(owner: str, shape: EMIMShape, cfg: TensorCoreConfig, variant: Variant,
                  frames: int) -> tuple[tuple[int, int, int], dict]:
    """(grid, tile and halo constexprs) of a halo-strategy launch over `frames` frame indices per batch, after
    refusing, by `owner`'s name, what the strategy cannot do (the three tensor-core kernels share it)."""
    if not isinstance(cfg, TensorCoreConfig):
        raise TypeError(f"{owner}: cfg must be a TensorCoreConfig or None, got {type(cfg).__name__}")
    if variant.dilation != 1:
        raise ValueError(f"{owner}: dilation must be 1 (the halo strategy has no dilated windows), got "
                         f"{variant.dilation}")
    halo_h, halo_w = cfg.halo(shape.window)
    block_rows = min(cfg.halo_block_rows, halo_h)
    if block_rows * halo_w < 16:
        raise ValueError(f"{owner}: a halo block of {block_rows} x {halo_w} slots is below tl.dot's minimum of 16; "
                         f"raise cfg.halo_block_rows (got {cfg.halo_block_rows})")
    grid = (triton.cdiv(shape.height, cfg.tile_h) * triton.cdiv(shape.width, cfg.tile_w), shape.heads,
            shape.batch * frames)
    return grid, dict(TILE_H=cfg.tile_h, TILE_W=cfg.tile_w, HALO_H=halo_h, HALO_W=halo_w, HALO_BLOCK_ROWS=block_rows)


def tensor_core_forward_launch(q, k, v, bias, w1p, b1p, w2p, b2p, out, lse, shape: EMIMShape, scale: float,
                               pad_value: float, cfg: TensorCoreConfig, store_lse: bool,
                               variant: Variant = DEFAULT_VARIANT) -> KernelLaunch:
    """The launch, on parameters already prepared by `bias_table` and `pack_mlp`."""
    pairs = variant.pairs(shape)
    grid, halo = halo_geometry("tensor_core_forward_launch", shape, cfg, variant, pairs)
    return KernelLaunch(
        emim_forward_tensor_core_kernel, grid,
        dict(q_ptr=q, k_ptr=k, v_ptr=v, bias_ptr=bias, w1_ptr=w1p, b1_ptr=b1p, w2_ptr=w2p, b2_ptr=b2p,
             out_ptr=out, lse_ptr=lse, **_strides("q", q), **_strides("k", k), **_strides("v", v),
             T=shape.frames, H=shape.height, W=shape.width, HEADS=shape.heads, D=shape.head_dim,
             num_pairs=pairs, key_frame_offset=variant.key_frame_offset(shape),
             context_channels=variant.kernel_context_channels(shape),
             scale_log2=scale * LOG2E, pad_value=pad_value),
        dict(WINDOW=shape.window, WINDOW_PAD_SIDE=window_pad_side(shape.window),
             BLOCK_D=padded_head_dim(shape.head_dim), **halo, HIDDEN_PAD=cfg.hidden_pad(shape.window),
             HIDDEN_CHUNK=cfg.hidden_chunk, STORE_LSE=store_lse, DOT_PRECISION=dot_precision(q.dtype)),
        cfg.num_warps, cfg.num_stages,
    )


def forward_tensor_core(q, k, v, rpb, w1, b1, w2, b2, shape: EMIMShape, scale: float, pad_value: float,
                        store_lse: bool, variant: Variant = DEFAULT_VARIANT, cfg: TensorCoreConfig | None = None):
    """Like `triton_backend.forward`: (out, lse). out: q's dtype, contiguous (B, T, H, W, heads, D) including
    the copied last frame; lse: (B, pairs, H, W, heads) float32 log-sum-exp of each affinity row, or None."""
    cfg = cfg or default_tensor_core_config(shape)
    bias = bias_table(rpb, tile_window_entries(cfg, shape.window, False, rpb))  # both repack the parameters, whatever their strides
    w1p, b1p, w2p, b2p = pack_mlp(w1, b1, w2, b2, shape, cfg, q.dtype)
    B, T, H, W, heads, D = q.shape
    out = triton_backend.new_buffer((B, T, H, W, heads, D), q.dtype, q.device)
    lse = triton_backend.new_buffer((B, variant.pairs(shape), H, W, heads), torch.float32, q.device) if store_lse else out
    tensor_core_forward_launch(q, k, v, bias, w1p, b1p, w2p, b2p, out, lse, shape, scale, pad_value, cfg,
                               store_lse, variant)()
    return out, (lse if store_lse else None)


def example_launch(shape: EMIMShape, dtype: torch.dtype, cfg: TensorCoreConfig | None = None, device="meta",
                   variant: Variant = DEFAULT_VARIANT) -> KernelLaunch:
    """The launch at `shape` on stand-in tensors (meta by default), q, k, v as the strided views of one qkv
    projection: for compiling ahead of time and for `emim_triton.bench_cli.static`."""
    cfg = cfg or default_tensor_core_config(shape)
    B, T, H, W, heads, D = shape.batch, shape.frames, shape.height, shape.width, shape.heads, shape.head_dim
    q, k, v = triton_backend.stand_in_qkv(shape, dtype, device)
    halo_h, halo_w = cfg.halo(shape.window)
    bias = torch.empty((heads, cfg.tile_h * cfg.tile_w, halo_h * halo_w), dtype=torch.float32, device=device)
    operand = mlp_operand_dtype(dtype)
    hidden_pad = cfg.hidden_pad(shape.window)
    w1p = torch.empty((hidden_pad, window_pad_side(shape.window) ** 2), dtype=operand, device=device)
    w2p = torch.empty((hidden_pad, padded_head_dim(D)), dtype=operand, device=device)
    b1p = torch.empty((hidden_pad,), dtype=torch.float32, device=device)
    b2p = torch.empty((padded_head_dim(D),), dtype=torch.float32, device=device)
    out = torch.empty((B, T, H, W, heads, D), dtype=dtype, device=device)
    lse = torch.empty((B, variant.pairs(shape), H, W, heads), dtype=torch.float32, device=device)
    return tensor_core_forward_launch(q, k, v, bias, w1p, b1p, w2p, b2p, out, lse, shape, D ** -0.5, 1e-6, cfg,
                                      True, variant)
