"""Small Triton helpers shared by the EMIM kernels: tile positions, padded window loads, QuickGELU."""

import triton
import triton.language as tl


@triton.jit
def frame_pair(pid_pair, num_pairs, key_frame_offset):
    """(batch, query frame, key frame) of program axis 2, which enumerates batch x frame pairs.

    The key frame is the next one (key_frame_offset = 1, direction "next": pairs are query frames 0..T-2),
    the previous one (-1, direction "prev": pairs are all T query frames, and frame 0, which has no
    predecessor, attends to itself), or the query frame itself when T = 1 (0).
    """
    b = pid_pair // num_pairs
    tq = pid_pair % num_pairs
    return b, tq, tl.maximum(tq + key_frame_offset, 0)


@triton.jit
def window_displacement(o, WINDOW: tl.constexpr, dilation):
    """(dy, dx) of window entry o = i*K + j: ((i - r) * dilation, (j - r) * dilation), r = K // 2."""
    return (o // WINDOW - WINDOW // 2) * dilation, (o % WINDOW - WINDOW // 2) * dilation


@triton.jit
def context_channel_mask(channels, context_channels):
    """The channels that carry the softmax context: all D of them (context_channels = D, the definition),
    or only the first 32 (the authors' kernels; channels >= 32 then carry motion only)."""
    return channels < context_channels


@triton.jit
def head_of_frame(ptr, b, t, head, stride_b, stride_t, stride_head):
    """Pointer to (b, t, 0, 0, head, 0) of a strided (B, T, H, W, heads, D) tensor.

    int64 offsets: B*T*H*W*heads*D can exceed 2**31 elements for large clips.
    """
    return ptr + b.to(tl.int64) * stride_b + t.to(tl.int64) * stride_t + head * stride_head


@triton.jit
def tile_positions(pid_tile, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Row and column of each of the BLOCK_H*BLOCK_W positions of spatial tile `pid_tile` (row-major)."""
    tiles_w = tl.cdiv(W, BLOCK_W)
    offs = tl.arange(0, BLOCK_H * BLOCK_W)
    y = (pid_tile // tiles_w) * BLOCK_H + offs // BLOCK_W
    x = (pid_tile % tiles_w) * BLOCK_W + offs % BLOCK_W
    return y, x


@triton.jit
def halo_tile(pid_tile, H, W, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """For the tensor-core kernels: the corner (y0, x0) of spatial tile `pid_tile` (row-major), the offsets
    (ty, tx) of its TILE_H * TILE_W positions in it, and which of them lie in the frame."""
    tiles_w = tl.cdiv(W, TILE_W)
    y0 = (pid_tile // tiles_w) * TILE_H
    x0 = (pid_tile % tiles_w) * TILE_W
    positions = tl.arange(0, TILE_H * TILE_W)
    ty = positions // TILE_W
    tx = positions % TILE_W
    return y0, x0, ty, tx, (y0 + ty < H) & (x0 + tx < W)


@triton.jit
def halo_block_positions(block_slots, first_row, y0, x0, H, W, RADIUS: tl.constexpr, HALO_W: tl.constexpr,
                         USED_H: tl.constexpr, USED_W: tl.constexpr):
    """For the tensor-core kernels' halo, held as slots (hy, hx) = frame position (y0 - r + hy, x0 - r + hx):
    the positions (sy, sx) of the block of slots starting at halo row `first_row` (slot s of the block is halo
    row first_row + s // HALO_W, column s % HALO_W), and which of them to read: inside the frame and within
    the USED_H x USED_W slots any window of the tile reaches (tile + K - 1 on each side)."""
    hy = first_row + block_slots // HALO_W
    hx = block_slots % HALO_W
    sy = y0 - RADIUS + hy
    sx = x0 - RADIUS + hx
    readable = (sy >= 0) & (sy < H) & (sx >= 0) & (sx < W) & (hy < USED_H) & (hx < USED_W)
    return sy, sx, readable


@triton.jit
def load_rows(frame_ptr, y, x, H, W, stride_h, stride_w, channels, D):
    """Load the D-vectors at positions (y, x) of one frame as float32; zero outside the frame.

    Returns (rows, in_frame). Out-of-frame and padded channels read 0.  Upcasting right after the load
    keeps all arithmetic in float32 (and avoids bf16 arithmetic, which the interpreter gets wrong).
    """
    in_frame = (y >= 0) & (y < H) & (x >= 0) & (x < W)
    ptrs = frame_ptr + y[:, None] * stride_h + x[:, None] * stride_w + channels[None, :]
    rows = tl.load(ptrs, mask=in_frame[:, None] & (channels[None, :] < D), other=0.0)
    return rows.to(tl.float32), in_frame


@triton.jit
def load_padded_rows(frame_ptr, y, x, H, W, stride_h, stride_w, channels, D, pad_value):
    """Like `load_rows`, but positions outside the frame read `pad_value` in every real channel.

    This is the authors' constant padding of the key/value frame.  The pad is applied in float32 with a
    `where` (loading with other=pad_value would round 1e-6 to the storage dtype first).
    """
    rows, in_frame = load_rows(frame_ptr, y, x, H, W, stride_h, stride_w, channels, D)
    rows = tl.where(in_frame[:, None], rows, pad_value)
    return rows


@triton.jit
def quick_gelu(z):
    """QuickGELU(z) = z * sigmoid(1.702 z)."""
    return z * tl.sigmoid(1.702 * z)


@triton.jit
def quick_gelu_grad(z):
    """d/dz QuickGELU(z) = s + 1.702 z s (1 - s), with s = sigmoid(1.702 z)."""
    s = tl.sigmoid(1.702 * z)
    return s + 1.702 * z * s * (1.0 - s)


@triton.jit
def load_w1_transposed(w1_ptr, hidden_units, window_cols, WINDOW_AREA: tl.constexpr, HIDDEN: tl.constexpr):
    """W1[hidden_units, :]^T as a (padded K², hidden chunk) float32 tile; padded entries are 0."""
    mask = (window_cols[:, None] < WINDOW_AREA) & (hidden_units[None, :] < HIDDEN)
    tile = tl.load(w1_ptr + hidden_units[None, :] * WINDOW_AREA + window_cols[:, None], mask=mask, other=0.0)
    return tile.to(tl.float32)


@triton.jit
def load_w2_columns(w2_ptr, hidden_units, channels, D, HIDDEN: tl.constexpr):
    """W2[:, hidden_units] as a (padded D, hidden chunk) float32 tile; padded entries are 0."""
    mask = (channels[:, None] < D) & (hidden_units[None, :] < HIDDEN)
    tile = tl.load(w2_ptr + channels[:, None] * HIDDEN + hidden_units[None, :], mask=mask, other=0.0)
    return tile.to(tl.float32)


@triton.jit
def round_to_tf32(x, DOT_PRECISION: tl.constexpr):
    """x rounded to the nearest tf32 value (10 mantissa bits, ties away from zero) when the dots run in tf32.

    The tensor cores read a float32 operand as tf32 by dropping its 13 low mantissa bits: truncation, which
    pulls every product towards zero and so biases sums instead of averaging out (measured on an H200: fp16
    outputs 6x further from float64 than the reference's own error). Adding half a tf32 unit to the bit
    pattern first makes the dropped bits a rounding (then masking them off: two integer instructions). A
    no-op for "ieee" (float32-exact) dots.
    """
    if DOT_PRECISION == "tf32":
        x = ((x.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return x


# Base-2 exponentials (one MUFU.EX2 each) stand in for exp in the tensor-core kernels.
LOG2E = tl.constexpr(1.4426950408889634)
QUICK_GELU_LOG2 = tl.constexpr(-1.702 * 1.4426950408889634)  # sigmoid(1.702 z) = 1 / (1 + 2^(z * this))


@triton.jit
def fast_quick_gelu_and_grad(z):
    """(QuickGELU(z), QuickGELU'(z)) from one exp2 and one fast division (2 ulp), for the kernels with 16-bit
    or tf32 MLP operands, where the precise forms (`tl.sigmoid`: exp with range handling and an IEEE division, ~12
    instructions an element) were most of the floating-point work.

    s = sigmoid(1.702 z) = 1 / (1 + 2^(-1.702 log2(e) z)); QuickGELU'(z) = s + 1.702 z s (1 - s), with
    s (1 - s) formed as s - s² (one FFMA). An overflowing exponential gives s = 0, hence both limits 0, with
    no NaN to mask.
    """
    s = tl.fdiv(tl.full(z.shape, 1.0, tl.float32), 1.0 + tl.exp2(z * QUICK_GELU_LOG2), ieee_rounding=False)
    return z * s, s + (1.702 * z) * (s - s * s)


@triton.jit
def split_to(x, dtype: tl.constexpr):
    """(head, tail) of a float32 `x` in the 16-bit `dtype`, for x @ b = head @ b + tail @ b on 16-bit tensor
    cores (half the operand registers and shared memory of a tf32 split): head + tail = x to 16 (bf16) or 22
    (fp16) bits. Used for the upstream gradient g (the op's fp16/bf16 gradient, so head alone is g, except in the
    pair that folds two output frames' gradients, where the tail keeps the sum's low bits: in fp16 to the
    subnormal spacing 6e-8, the resolution of the gradient itself) and for probabilities p in [0, 1]. fp16:
    head is clamped to the largest finite value (the folded sum may pass it), the tail takes the excess.
    float32: (x, 0).
    """
    if dtype == tl.float32:
        return x, tl.zeros_like(x)
    if dtype == tl.float16:
        head = tl.minimum(tl.maximum(x, -65504.0), 65504.0).to(dtype)
    else:
        head = x.to(dtype)
    return head, (x - head.to(tl.float32)).to(dtype)


@triton.jit
def split(a, DOT_PRECISION: tl.constexpr):
    """(head, tail) of a float32 `a` for `split_dot`: head = a rounded to tf32, tail = the rest."""
    head = round_to_tf32(a, DOT_PRECISION)
    return head, a - head


@triton.jit
def split_dot(head, tail, b, acc, DOT_PRECISION: tl.constexpr):
    """acc + a @ b to about float32 accuracy, a = head + tail (`split`), for a `b` exact in tf32 (upcast fp16/bf16
    values): two tf32 products accumulated on the tensor cores, the tail's truncation by the tensor cores costing
    ~2^-21 of a. "ieee" dots are exact already: one product (the tail is 0)."""
    acc = tl.dot(head, b, acc, input_precision=DOT_PRECISION)
    if DOT_PRECISION == "tf32":
        acc = tl.dot(tail, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def mlp_dot(a, b, DOT_PRECISION: tl.constexpr):
    """a @ b for the motion MLP's products, float32 accumulation, operands rounded for tf32."""
    return tl.dot(round_to_tf32(a, DOT_PRECISION), round_to_tf32(b, DOT_PRECISION), input_precision=DOT_PRECISION)
