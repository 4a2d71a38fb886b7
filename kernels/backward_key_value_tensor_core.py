"""EMIM backward, key/value side, with the products on tensor cores: the "halo" strategy of the key/value kernel.

Writes what kernels/backward_key_value.py writes (dk, dv in k's and v's dtype, contiguous (B, T, H, W, heads, D),
zero in channels >= context_channels), for direction "next" (one query frame per key frame) without dilation.

One program per TILE_H x TILE_W tile of keys of one key frame tk of one (batch, head). The queries whose windows
cover a key of the tile form the halo around it: the window is centred, so key (y', x') is window entry
(i, j) of the query at (y' + r - i, x' + r - j), and with halo slot (hy, hx) = query (y0 - r + hy, x0 - r + hx)
that query is slot (ty + K-1-i, tx + K-1-j) for the tile's key (ty, tx): the mirrored window, again a K x K
block of slots per key. The halo is walked in blocks of HALO_BLOCK_ROWS rows:

    S        = K_tile @ Q_block^T                               (TILE, block slots) by tl.dot
    P, dA    at each (key, slot) of the key's mirrored window: p = exp(scale S + rpb[o] - lse[slot]), dA the
             query kernel's float32 dA[slot, o] (o = the key's window entry in that query's window); 0 elsewhere
    dv      += P @ G_block,   dk += dA @ Q_block                (TILE, D) by tl.dot, accumulated on the tensor cores

P and dA are formed directly in the halo layout (no gathers). Which window entry o each (key, slot) pair is,
and log2(e) rpb[head, o], depend on the tile geometry only, so the host passes them as two (TILE, halo slots)
tables (-1 and -inf outside the mirrored window; emim_triton/tensor_core_key_value.py): the pairs load them
instead of computing entries, window tests and bias gathers (that index work was half the kernel). An
out-of-frame query gets lse = +inf, hence p = 0, with no mask. The kernel indexes within a frame pair in int32
(`tensor_core_forward.supports` keeps frames that would pass 2**31 on the offset loop).

Precision. S multiplies the 16-bit k and q themselves (exact products, float32 accumulation). dA @ Q takes a
float32 dA and a 16-bit q (exact in tf32): dA is split into two tf32 values and multiplied twice
(common.split_dot: a 16-bit split would flush small fp16 gradients). P @ G has two float32 operands (G is the
folded float32 upstream gradient, P in [0, 1]): each is split into two values of the inputs' 16-bit dtype
(common.split_to; G is exact in its head but for the folded frame) and multiplied three times, head·head +
head·tail + tail·head: 22 (fp16) or 16 (bf16) bits, at half the tensor-core time and operand registers of a
tf32 split. float32 inputs ("ieee" dots) take one exact product each.
"""

import triton
import triton.language as tl

from .common import LOG2E, context_channel_mask, halo_block_positions, halo_tile, head_of_frame, split, split_dot, split_to


@triton.jit
def split_dot_16bit(a, b, acc, dtype: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a @ b for two float32 operands, each split into two values of the 16-bit `dtype` (`split_to`):
    head·head + head·tail + tail·head, accumulated on the tensor cores (the tail·tail term is below the
    splits' resolution). float32 inputs ("ieee" dots): one exact product."""
    if dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    a_head, a_tail = split_to(a, dtype)
    b_head, b_tail = split_to(b, dtype)
    acc = tl.dot(a_head, b_head, acc)
    acc = tl.dot(a_head, b_tail, acc)
    return tl.dot(a_tail, b_head, acc)


@triton.jit
def emim_backward_key_value_tensor_core_kernel(
    q_ptr, k_ptr, entry_ptr, bias_ptr, grad_ptr, lse_ptr, d_affinity_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qt, stride_qy, stride_qx, stride_qn,
    stride_kb, stride_kt, stride_ky, stride_kx, stride_kn,
    T, H, W, HEADS, D, num_pairs, key_frame_offset, first_key_frame, num_key_frames, context_channels, scale,
    scale_log2,
    WINDOW: tl.constexpr,          # K
    BLOCK_D: tl.constexpr,         # D padded to a power of two >= 16
    TILE_H: tl.constexpr, TILE_W: tl.constexpr,
    HALO_H: tl.constexpr, HALO_W: tl.constexpr,   # powers of two >= TILE + K - 1
    HALO_BLOCK_ROWS: tl.constexpr,  # halo rows per step (a power of two dividing HALO_H)
    DOT_PRECISION: tl.constexpr,   # "ieee" (float32 inputs) or "tf32"
):
    TILE: tl.constexpr = TILE_H * TILE_W
    RADIUS: tl.constexpr = WINDOW // 2
    WINDOW_AREA: tl.constexpr = WINDOW * WINDOW
    BLOCK_SLOTS: tl.constexpr = HALO_BLOCK_ROWS * HALO_W
    HALO_SLOTS: tl.constexpr = HALO_H * HALO_W
    # Blocks past the last used halo row (TILE_H + K - 2) hold no query of any key's window: skipped.
    USED_BLOCKS: tl.constexpr = (TILE_H + WINDOW - 2) // HALO_BLOCK_ROWS + 1

    # Program axis 2 enumerates batch x the key frames that receive gradient; "next" has one query frame per
    # key frame, tk - key_frame_offset (T = 1: the frame itself), which is also the pair index.
    pid_tile, head, pid_key = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = pid_key // num_key_frames
    tk = first_key_frame + pid_key % num_key_frames
    tq = tk - key_frame_offset
    y0, x0, ty, tx, key_valid = halo_tile(pid_tile, H, W, TILE_H, TILE_W)
    keys = tl.arange(0, TILE)
    ky = y0 + ty
    kx = x0 + tx
    channels = tl.arange(0, BLOCK_D)
    channel_ok = channels < D

    k_frame = head_of_frame(k_ptr, b, tk, head, stride_kb, stride_kt, stride_kn)
    q_frame = head_of_frame(q_ptr, b, tq, head, stride_qb, stride_qt, stride_qn)
    # Out-of-frame keys are loaded as 0; whatever their dk and dv rows accumulate is never stored.
    k = tl.load(k_frame + ky[:, None] * stride_ky + kx[:, None] * stride_kx + channels[None, :],
                mask=key_valid[:, None] & channel_ok[None, :], other=0.0)
    # The per-pair tensors (grad, lse, dA rows) are contiguous (B, pairs, H, W, heads, ...).
    pair_index = b.to(tl.int64) * num_pairs + tq
    grad_frame = grad_ptr + pair_index * (H * W * HEADS * D) + head * D
    lse_frame = lse_ptr + pair_index * (H * W * HEADS) + head
    d_affinity_frame = d_affinity_ptr + pair_index * (H * W * HEADS * WINDOW_AREA) + head * WINDOW_AREA

    block_slots = tl.arange(0, BLOCK_SLOTS)
    # The geometry tables (host-made, emim_triton/tensor_core_key_value.py), rows = the tile's keys, columns = halo
    # slots: the key's window entry o in the slot's query's window (-1 outside the mirrored window), and
    # log2(e) rpb[head, o] (-inf outside), so that no (key, slot) pair computes its entry or window test.
    table_rows = keys[:, None] * HALO_SLOTS
    bias_head = bias_ptr + head * (TILE * HALO_SLOTS)
    dk = tl.zeros((TILE, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((TILE, BLOCK_D), dtype=tl.float32)
    for block in range(USED_BLOCKS):
        first_row = block * HALO_BLOCK_ROWS
        # Queries past TILE + K - 1 slots cover no key of the tile: not loaded (their entries are -1).
        sy, sx, query_in_frame = halo_block_positions(block_slots, first_row, y0, x0, H, W, RADIUS, HALO_W,
                                                      TILE_H + WINDOW - 1, TILE_W + WINDOW - 1)
        row_mask = query_in_frame[:, None] & channel_ok[None, :]
        q = tl.load(q_frame + sy[:, None] * stride_qy + sx[:, None] * stride_qx + channels[None, :], mask=row_mask,
                    other=0.0)
        position = sy * W + sx
        g = tl.load(grad_frame + position[:, None] * (HEADS * D) + channels[None, :], mask=row_mask, other=0.0)
        # Out-of-frame queries: lse = +inf, so their p is exp2(-inf) = 0 with no mask (their q, hence s, is 0).
        lse2 = tl.load(lse_frame + position * HEADS, mask=query_in_frame, other=float("inf")) * LOG2E

        table = table_rows + (first_row * HALO_W + block_slots)[None, :]
        entry = tl.load(entry_ptr + table)
        bias2 = tl.load(bias_head + table)
        da = tl.load(d_affinity_frame + (position * (HEADS * WINDOW_AREA))[None, :] + entry,
                     mask=(entry >= 0) & query_in_frame[None, :], other=0.0)

        s = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        # p = exp(scale s + rpb - lse), in base 2; 0 outside the mirrored window (bias -inf). Rows of keys outside
        # the frame hold values, but their dk and dv rows are never stored.
        p = tl.exp2(s * scale_log2 + bias2 - lse2[None, :])
        dv = split_dot_16bit(p, g, dv, k_ptr.dtype.element_ty, DOT_PRECISION)
        da_head, da_tail = split(da, DOT_PRECISION)
        dk = split_dot(da_head, da_tail, q.to(tl.float32), dk, DOT_PRECISION)
    has_context = context_channel_mask(channels, context_channels)[None, :]
    dk = tl.where(has_context, dk * scale, 0.0)
    dv = tl.where(has_context, dv, 0.0)

    # dk, dv are contiguous (B, T, H, W, heads, D).
    offsets = (b.to(tl.int64) * T + tk) * (H * W * HEADS * D) + ((ky * W + kx) * HEADS + head)[:, None] * D \
        + channels[None, :]
    mask = key_valid[:, None] & channel_ok[None, :]
    tl.store(dk_ptr + offsets, dk.to(dk_ptr.dtype.element_ty), mask=mask)
    tl.store(dv_ptr + offsets, dv.to(dv_ptr.dtype.element_ty), mask=mask)
