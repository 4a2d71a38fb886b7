"""Launching the fused EMIM kernels: grids, strides, scratch buffers and the fixed-order reductions.

The kernels are in ``emim_triton.kernels``; the autograd and custom-op glue is in ``emim_triton.ops``.
Everything here works on already-checked inputs (``emim_triton.checks``) with the launch configurations it is
given (``emim_triton.autotune`` chooses them): the launcher imports nothing above it.

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

The op's options beyond the paper (direction, dilation, the authors' 32-channel context) reach the kernels
as plain runtime arguments derived in `Variant`; the default `Variant()` is the paper's op, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from .checks import EMIMShape, check_variant
from .launch_configs import EMIMConfigs, RowConfig, TileConfig, padded_head_dim, padded_window_area
from .kernels.backward_key_value import emim_backward_key_value_kernel
from .kernels.backward_query import emim_backward_query_kernel
from .kernels.backward_weights import emim_backward_weights_kernel
from .kernels.forward import emim_forward_kernel


def new_buffer(shape, dtype, device) -> torch.Tensor:
    """Every buffer a kernel writes is allocated here, uninitialised (tests fill it with NaN to catch
    elements a kernel forgets to write)."""
    return torch.empty(shape, dtype=dtype, device=device)


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get float32-exact products; fp16/bf16 inputs may use tf32 tensor cores.

    tf32 keeps a 10-bit mantissa, more than the bf16 (7-bit) or fp16 (10-bit) inputs carry, so the
    low-precision paths lose nothing measurable to it.
    """
    return "ieee" if dtype == torch.float32 else "tf32"


@dataclass(frozen=True)
class Variant:
    """Which EMIM the kernels compute (docs/operation.md#variants-beyond-the-paper and #context-channel-switch).

    direction: "next" (query frame t attends to frame t+1; T-1 pairs, output frame T-1 copies T-2) or "prev"
        (t attends to t-1, frame 0 to itself; all T pairs, no copy). A single frame attends to itself.
    dilation: window entry (i, j) is displacement ((i - r) * dilation, (j - r) * dilation).
    context_channels: 0, the definition (the context over all D channels), or the authors' 32: the context is
        zero in channels >= 32 and q, k, v get no gradient there.
    """

    direction: str = "next"
    dilation: int = 1
    context_channels: int = 0

    def __post_init__(self):
        # The public op checks these first; this guards direct calls of the custom op, by the same rule.
        check_variant(self.direction, self.dilation, self.context_channels or None)

    def pairs(self, shape: EMIMShape) -> int:
        """(query frame, key frame) pairs computed: the query frames 0..pairs-1 (pair index = query frame)."""
        return shape.frames if self.direction == "prev" else shape.pairs

    def key_frame_offset(self, shape: EMIMShape) -> int:
        """Key frame minus query frame (the kernels clamp "prev"'s frame -1 to frame 0)."""
        if shape.frames == 1:
            return 0
        return 1 if self.direction == "next" else -1

    def key_frames(self, shape: EMIMShape) -> range:
        """The frames whose k and v receive gradient ("next": 1..T-1; "prev": 0..T-2; T = 1: frame 0)."""
        first = 1 if (self.direction == "next" and shape.frames > 1) else 0
        return range(first, first + shape.pairs)

    def key_sources(self, shape: EMIMShape) -> int:
        """Most query frames one key frame serves: 2 for "prev" (key frame 0 serves query frames 1 and 0)."""
        return 2 if self.direction == "prev" and shape.frames > 1 else 1

    def rows(self, shape: EMIMShape) -> int:
        """Query rows computed: one per (batch, pair, y, x, head)."""
        return shape.batch * self.pairs(shape) * shape.height * shape.width * shape.heads

    def kernel_context_channels(self, shape: EMIMShape) -> int:
        """Channels < this carry the context: D for the definition (and when D <= 32), else 32."""
        return min(self.context_channels, shape.head_dim) if self.context_channels else shape.head_dim


DEFAULT_VARIANT = Variant()


@dataclass
class KernelLaunch:
    """One kernel launch, fully described: kernel, grid, runtime arguments and compile-time choices.

    The op runs these; the AOT-compile test and the autotuner build the same launches (on meta
    tensors) and compile or time them, so argument lists exist in exactly one place.
    """

    kernel: object
    grid: tuple
    args: dict
    constexprs: dict
    num_warps: int
    num_stages: int

    def __call__(self) -> None:
        self.kernel[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps,
                               num_stages=self.num_stages)


def _strides(prefix: str, t: torch.Tensor) -> dict:
    """Strides of a (B, T, H, W, heads, D) tensor along its first five axes (D's stride is 1)."""
    names = ("b", "t", "y", "x", "n")
    return {f"stride_{prefix}{axis}": stride for axis, stride in zip(names, t.stride()[:5])}


def _frame_args(shape: EMIMShape, variant: Variant) -> dict:
    return dict(T=shape.frames, H=shape.height, W=shape.width, HEADS=shape.heads, D=shape.head_dim,
                num_pairs=variant.pairs(shape), key_frame_offset=variant.key_frame_offset(shape),
                dilation=variant.dilation, context_channels=variant.kernel_context_channels(shape))


def _tile_grid(shape: EMIMShape, cfg: TileConfig, frames: int) -> tuple[int, int, int]:
    """Spatial tiles x heads x (batch * `frames`: the frame pairs, or the key frames)."""
    tiles = triton.cdiv(shape.height, cfg.block_h) * triton.cdiv(shape.width, cfg.block_w)
    return tiles, shape.heads, shape.batch * frames


def _window_constexprs(shape: EMIMShape, dtype: torch.dtype) -> dict:
    return dict(WINDOW=shape.window, WINDOW_PAD=padded_window_area(shape.window),
                BLOCK_D=padded_head_dim(shape.head_dim), DOT_PRECISION=dot_precision(dtype))


def forward_launch(q, k, v, rpb, w1, b1, w2, b2, out, lse, shape, scale, pad_value, cfg: TileConfig,
                   store_lse: bool, variant: Variant = DEFAULT_VARIANT) -> KernelLaunch:
    return KernelLaunch(
        emim_forward_kernel, _tile_grid(shape, cfg, variant.pairs(shape)),
        dict(q_ptr=q, k_ptr=k, v_ptr=v, rpb_ptr=rpb, w1_ptr=w1, b1_ptr=b1, w2_ptr=w2, b2_ptr=b2,
             out_ptr=out, lse_ptr=lse, **_strides("q", q), **_strides("k", k), **_strides("v", v),
             **_frame_args(shape, variant), scale=scale, pad_value=pad_value),
        dict(**_window_constexprs(shape, q.dtype), **cfg.constexprs(), STORE_LSE=store_lse),
        cfg.num_warps, cfg.num_stages,
    )


def backward_query_launch(q, k, v, rpb, w1, b1, w2, grad_pairs, lse, dq, affinity, d_affinity, shape, scale,
                          pad_value, cfg: TileConfig, variant: Variant = DEFAULT_VARIANT) -> KernelLaunch:
    return KernelLaunch(
        emim_backward_query_kernel, _tile_grid(shape, cfg, variant.pairs(shape)),
        dict(q_ptr=q, k_ptr=k, v_ptr=v, rpb_ptr=rpb, w1_ptr=w1, b1_ptr=b1, w2_ptr=w2, grad_ptr=grad_pairs,
             lse_ptr=lse, dq_ptr=dq, affinity_ptr=affinity, d_affinity_ptr=d_affinity,
             **_strides("q", q), **_strides("k", k), **_strides("v", v), **_frame_args(shape, variant),
             scale=scale, pad_value=pad_value),
        dict(**_window_constexprs(shape, q.dtype), **cfg.constexprs()),
        cfg.num_warps, cfg.num_stages,
    )


def backward_key_value_launch(q, k, rpb, grad_pairs, lse, d_affinity, dk, dv, shape, scale,
                              cfg: TileConfig, variant: Variant = DEFAULT_VARIANT) -> KernelLaunch:
    key_frames = variant.key_frames(shape)
    return KernelLaunch(
        emim_backward_key_value_kernel, _tile_grid(shape, cfg, len(key_frames)),
        dict(q_ptr=q, k_ptr=k, rpb_ptr=rpb, grad_ptr=grad_pairs, lse_ptr=lse, d_affinity_ptr=d_affinity,
             dk_ptr=dk, dv_ptr=dv, **_strides("q", q), **_strides("k", k), **_frame_args(shape, variant),
             first_key_frame=key_frames.start, num_key_frames=len(key_frames),
             key_sources=variant.key_sources(shape), scale=scale),
        dict(WINDOW=shape.window, BLOCK_D=padded_head_dim(shape.head_dim), BLOCK_H=cfg.block_h,
             BLOCK_W=cfg.block_w),
        cfg.num_warps, cfg.num_stages,
    )


def weight_partial_programs(shape: EMIMShape, cfg: RowConfig, variant: Variant = DEFAULT_VARIANT) -> int:
    """How many partial sums the weights kernel writes: the config's count, fewer for few rows."""
    return max(1, min(cfg.programs, triton.cdiv(variant.rows(shape), cfg.block_rows)))


def backward_weights_launch(affinity, grad_pairs, w1, b1, w2, dw1_partial, db1_partial, dw2_partial, shape,
                            dtype, cfg: RowConfig, variant: Variant = DEFAULT_VARIANT) -> KernelLaunch:
    programs = dw1_partial.shape[0]
    rows = variant.rows(shape)
    return KernelLaunch(
        emim_backward_weights_kernel, (triton.cdiv(shape.hidden, cfg.hidden_chunk), programs),
        dict(affinity_ptr=affinity, grad_ptr=grad_pairs, w1_ptr=w1, b1_ptr=b1, w2_ptr=w2,
             dw1_partial_ptr=dw1_partial, db1_partial_ptr=db1_partial, dw2_partial_ptr=dw2_partial,
             rows=rows, D=shape.head_dim, programs=programs,
             steps=triton.cdiv(triton.cdiv(rows, cfg.block_rows), programs)),
        dict(**_window_constexprs(shape, dtype), **cfg.constexprs(), OPERAND=mlp_operand(dtype)),
        cfg.num_warps, cfg.num_stages,
    )


def mlp_operand(dtype: torch.dtype) -> str:
    """The weights kernel's tensor-core operands: fp16 for fp16 activations, tf32 (rounded, float32 storage)
    for bf16, float32 with exact "ieee" products for float32.

    Its four products are sums over every query row, whose rounding errors (random, unbiased) partly average
    out: fp16 operands (11 bits) put dW1, dW2 about 4e-4 from float64 on the tests' shapes, within the op's
    bound (the float32 reference's error, at least 2^-10). bf16 operands (8 bits) would be 3.5e-3, so bf16
    activations take tf32 (11 bits, float32's range: fp16 could underflow their gradients), at twice the
    tensor-core time of 16-bit operands."""
    return {torch.float16: "float16", torch.bfloat16: "tf32"}.get(dtype, "float32")


def contiguous_parameters(rpb, w1, b1, w2, b2) -> tuple[torch.Tensor, ...]:
    """The five parameters as the kernels read them: dense and row-major.

    The kernels index rpb, W1, b1, W2 and b2 by raw offsets (they are a few KB, so passing their strides
    would cost registers for nothing); a transposed, sliced or expanded parameter -- `w.t()` of a stored
    transposed weight, a Swin-style `table[index].view(K, K, h).permute(2, 0, 1)` bias -- is copied here.
    Without this copy such a parameter is read in the wrong order: wrong outputs, silently.
    """
    return tuple(t.contiguous() for t in (rpb, w1, b1, w2, b2))


def forward(q, k, v, rpb, w1, b1, w2, b2, shape: EMIMShape, scale: float, pad_value: float,
            configs: EMIMConfigs, store_lse: bool, variant: Variant = DEFAULT_VARIANT):
    """Run the forward kernel. Returns (out, lse); lse is (B, pairs, H, W, heads) float32 or None."""
    rpb, w1, b1, w2, b2 = contiguous_parameters(rpb, w1, b1, w2, b2)
    B, T, H, W, heads, D = q.shape
    out = new_buffer((B, T, H, W, heads, D), q.dtype, q.device)
    lse = new_buffer((B, variant.pairs(shape), H, W, heads), torch.float32, q.device) if store_lse else out
    forward_launch(q, k, v, rpb, w1, b1, w2, b2, out, lse, shape, scale, pad_value, configs.forward, store_lse,
                   variant)()
    return out, (lse if store_lse else None)


def fold_last_frame_grad(grad_out: torch.Tensor, shape: EMIMShape, variant: Variant = DEFAULT_VARIANT
                         ) -> torch.Tensor:
    """Upstream gradient per computed pair, contiguous (B, pairs, H, W, heads, D), in float32.

    Direction "next": output frame T-1 is a copy of output frame T-2, so its gradient adds to frame T-2's.
    "prev" computes every output frame: nothing to fold.
    """
    if shape.frames == 1 or variant.direction == "prev":
        return grad_out.float().contiguous()
    folded = grad_out[:, :-1].float().clone()  # float() may return grad_out itself: clone, then add
    folded[:, -1] += grad_out[:, -1].float()
    return folded.contiguous()


def backward(grad_out, q, k, v, rpb, w1, b1, w2, b2, lse, shape: EMIMShape, scale: float, pad_value: float,
             configs: EMIMConfigs, variant: Variant = DEFAULT_VARIANT, query_launch=None, key_value_launch=None):
    """Gradients for (q, k, v, rpb, w1, b1, w2, b2), each in its input's dtype (the parameters' gradients
    contiguous, whatever the parameters' own strides: autograd accepts any layout for a gradient).

    query_launch: another builder of the query-side launch with `backward_query_launch`'s arguments (the
    tensor-core strategy, emim_triton/tensor_core_backward.py); it must write the same dq and scratch rows.
    key_value_launch: likewise for the key/value side (emim_triton/tensor_core_key_value.py), the same dk, dv.
    Both are passed in by the caller, so that this module imports nothing above it."""
    rpb, w1, b1, w2, b2 = contiguous_parameters(rpb, w1, b1, w2, b2)
    B, T, H, W, heads, D = q.shape
    device = q.device
    grad_pairs = fold_last_frame_grad(grad_out, shape, variant)
    pairs, key_frames = variant.pairs(shape), variant.key_frames(shape)

    dq, dk, dv = (new_buffer(q.shape, t.dtype, device) for t in (q, k, v))
    # Frames that are never a query ("next": T-1) or never a key ("next": 0; "prev": T-1) get no gradient.
    dq[:, pairs:].zero_()
    for grad in (dk, dv):
        grad[:, :key_frames.start].zero_()
        grad[:, key_frames.stop:].zero_()
    scratch_shape = (B, pairs, H, W, heads, shape.window_area)
    affinity = new_buffer(scratch_shape, torch.float32, device)
    d_affinity = new_buffer(scratch_shape, torch.float32, device)
    if query_launch is None:
        backward_query_launch(q, k, v, rpb, w1, b1, w2, grad_pairs, lse, dq, affinity, d_affinity, shape, scale,
                              pad_value, configs.backward_query, variant)()
    else:
        query_launch(q, k, v, rpb, w1, b1, w2, grad_pairs, lse, dq, affinity, d_affinity, shape, scale, pad_value,
                     None, variant)()
    if key_value_launch is None:
        backward_key_value_launch(q, k, rpb, grad_pairs, lse, d_affinity, dk, dv, shape, scale,
                                  configs.backward_key_value, variant)()
    else:
        key_value_launch(q, k, rpb, grad_pairs, lse, d_affinity, dk, dv, shape, scale, None, variant)()

    programs = weight_partial_programs(shape, configs.backward_weights, variant)
    dw1_partial = new_buffer((programs, shape.hidden, shape.window_area), torch.float32, device)
    db1_partial = new_buffer((programs, shape.hidden), torch.float32, device)
    dw2_partial = new_buffer((programs, D, shape.hidden), torch.float32, device)
    backward_weights_launch(affinity, grad_pairs, w1, b1, w2, dw1_partial, db1_partial, dw2_partial, shape,
                            q.dtype, configs.backward_weights, variant)()

    # Fixed-order reductions (torch sums use no atomics), then each gradient in its input's dtype.
    drpb = d_affinity.sum(dim=(0, 1, 2, 3)).view(heads, shape.window, shape.window)
    db2 = grad_pairs.sum(dim=(0, 1, 2, 3, 4))
    grads = (dq, dk, dv, drpb, dw1_partial.sum(0), db1_partial.sum(0), dw2_partial.sum(0), db2)
    return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v, rpb, w1, b1, w2, b2)))


def stand_in_qkv(shape: EMIMShape, dtype: torch.dtype, device="meta") -> tuple[torch.Tensor, ...]:
    """q, k, v at `shape` as the three strided views of one qkv projection (the layout models pass in), on
    stand-in storage (meta by default: no memory): for building launches to compile or time."""
    B, T, H, W, heads, D = shape.batch, shape.frames, shape.height, shape.width, shape.heads, shape.head_dim
    qkv = torch.empty((B, T * H * W, 3 * heads * D), dtype=dtype, device=device)
    return qkv.view(B, T, H, W, 3, heads, D).unbind(4)


def example_launches(shape: EMIMShape, dtype: torch.dtype, configs: EMIMConfigs,
                     param_dtype: torch.dtype = torch.float32, device="meta",
                     variant: Variant = DEFAULT_VARIANT) -> dict[str, KernelLaunch]:
    """The four launches the op makes for `shape` (and `variant`), on stand-in tensors (meta by default: no
    memory).

    For compiling ahead of time (tests, autotuner pruning) and timing (autotuner, on a GPU device).
    """
    B, T, H, W, heads, D = shape.batch, shape.frames, shape.height, shape.width, shape.heads, shape.head_dim
    q, k, v = stand_in_qkv(shape, dtype, device)
    area, hidden = shape.window_area, shape.hidden
    rpb, w1, b1 = (torch.empty(s, dtype=param_dtype, device=device) for s in ((heads, shape.window, shape.window),
                                                                              (hidden, area), (hidden,)))
    w2, b2 = torch.empty((D, hidden), dtype=param_dtype, device=device), torch.empty((D,), dtype=param_dtype,
                                                                                      device=device)
    out = torch.empty((B, T, H, W, heads, D), dtype=dtype, device=device)
    pairs = variant.pairs(shape)
    per_pair = lambda *tail: torch.empty((B, pairs, H, W, heads, *tail), dtype=torch.float32, device=device)
    lse, grad_pairs, scratch = per_pair(), per_pair(D), per_pair(area)
    programs = weight_partial_programs(shape, configs.backward_weights, variant)
    partials = [torch.empty(s, dtype=torch.float32, device=device)
                for s in ((programs, hidden, area), (programs, hidden), (programs, D, hidden))]
    scale, pad_value = D ** -0.5, 1e-6
    return {
        "forward": forward_launch(q, k, v, rpb, w1, b1, w2, b2, out, lse, shape, scale, pad_value,
                                  configs.forward, store_lse=True, variant=variant),
        "backward_query": backward_query_launch(q, k, v, rpb, w1, b1, w2, grad_pairs, lse, out, scratch, scratch,
                                                shape, scale, pad_value, configs.backward_query, variant),
        "backward_key_value": backward_key_value_launch(q, k, rpb, grad_pairs, lse, scratch, out, out, shape,
                                                        scale, configs.backward_key_value, variant),
        "backward_weights": backward_weights_launch(scratch, grad_pairs, w1, b1, w2, *partials, shape, dtype,
                                                    configs.backward_weights, variant),
    }
