"""Fused EMIM forward kernel.

One program computes a BLOCK_H x BLOCK_W tile of query positions of one (batch, frame pair, head):

    a[:, o]  = scale * <q, k_o> + rpb[head, o]          o = i*K + j over the K x K window in frame tk
    context  = sum_o softmax(a)[:, o] * v_o             (online softmax over the window, float32)
    motion   = QuickGELU(a @ W1^T + b1) @ W2^T + b2     (two tl.dot's per hidden chunk)
    out      = context + motion

Keys and values outside the frame are `pad_value` in every channel (not masked). Only `out` (and, when
a backward will follow, the float32 log-sum-exp of each softmax row) is written to global memory: the
K²-wide affinities and the 4K²-wide hidden layer live in registers.

Variants (docs/operation.md#variants-beyond-the-paper; the defaults are the paper's op): with direction "next" the key
frame is tk = tq + 1, the last output frame is a copy of the one before it, so T-1 frame pairs are computed
and the last pair is written twice; with "prev" tk = tq - 1 (frame 0: itself) and all T pairs are computed.
Window entry (i, j) is displacement ((i - r) d, (j - r) d) for dilation d. With context_channels < D (the
authors' 32-channel context) the context is zero in channels >= context_channels; the affinities still use
all D channels.
"""

import triton
import triton.language as tl

from .common import (context_channel_mask, frame_pair, head_of_frame, load_padded_rows, load_rows, load_w1_transposed,
                     load_w2_columns, mlp_dot, quick_gelu, tile_positions, window_displacement)


@triton.jit
def emim_forward_kernel(
    q_ptr, k_ptr, v_ptr, rpb_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qt, stride_qy, stride_qx, stride_qn,
    stride_kb, stride_kt, stride_ky, stride_kx, stride_kn,
    stride_vb, stride_vt, stride_vy, stride_vx, stride_vn,
    T, H, W, HEADS, D, num_pairs, key_frame_offset, dilation, context_channels,
    scale, pad_value,
    WINDOW: tl.constexpr,          # K
    WINDOW_PAD: tl.constexpr,      # K² padded to a power of two >= 16
    BLOCK_D: tl.constexpr,         # D padded to a power of two >= 16
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, HIDDEN_CHUNK: tl.constexpr,
    STORE_LSE: tl.constexpr,       # write the softmax log-sum-exp for the backward
    DOT_PRECISION: tl.constexpr,   # "ieee": float32-exact products; "tf32": tensor cores, operands rounded
):
    WINDOW_AREA: tl.constexpr = WINDOW * WINDOW
    HIDDEN: tl.constexpr = 4 * WINDOW_AREA

    pid_tile, head, pid_pair = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, tq, tk = frame_pair(pid_pair, num_pairs, key_frame_offset)

    y, x = tile_positions(pid_tile, W, BLOCK_H, BLOCK_W)
    channels = tl.arange(0, BLOCK_D)
    window_cols = tl.arange(0, WINDOW_PAD)

    q_frame = head_of_frame(q_ptr, b, tq, head, stride_qb, stride_qt, stride_qn)
    k_frame = head_of_frame(k_ptr, b, tk, head, stride_kb, stride_kt, stride_kn)
    v_frame = head_of_frame(v_ptr, b, tk, head, stride_vb, stride_vt, stride_vn)

    qrows, query_valid = load_rows(q_frame, y, x, H, W, stride_qy, stride_qx, channels, D)

    # Pass over the K² displacements: affinity column, online softmax and context accumulation.
    affinity = tl.zeros((BLOCK_H * BLOCK_W, WINDOW_PAD), dtype=tl.float32)  # padded columns stay 0
    row_max = tl.full((BLOCK_H * BLOCK_W,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_H * BLOCK_W,), dtype=tl.float32)
    context = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_D), dtype=tl.float32)
    for o in range(WINDOW_AREA):
        dy, dx = window_displacement(o, WINDOW, dilation)
        krows = load_padded_rows(k_frame, y + dy, x + dx, H, W, stride_ky, stride_kx, channels, D, pad_value)
        vrows = load_padded_rows(v_frame, y + dy, x + dx, H, W, stride_vy, stride_vx, channels, D, pad_value)
        a = tl.sum(qrows * krows, axis=1) * scale + tl.load(rpb_ptr + head * WINDOW_AREA + o).to(tl.float32)
        affinity = tl.where(window_cols[None, :] == o, a[:, None], affinity)

        new_max = tl.maximum(row_max, a)
        rescale = tl.exp(row_max - new_max)
        p = tl.exp(a - new_max)
        row_sum = row_sum * rescale + p
        context = context * rescale[:, None] + p[:, None] * vrows
        row_max = new_max
    context = tl.where(context_channel_mask(channels, context_channels)[None, :], context / row_sum[:, None], 0.0)

    # Motion MLP on the raw affinities, chunked over the 4K² hidden units to bound registers.
    motion = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_D), dtype=tl.float32)
    for start in range(0, HIDDEN, HIDDEN_CHUNK):
        units = start + tl.arange(0, HIDDEN_CHUNK)
        w1t = load_w1_transposed(w1_ptr, units, window_cols, WINDOW_AREA, HIDDEN)
        b1 = tl.load(b1_ptr + units, mask=units < HIDDEN, other=0.0).to(tl.float32)
        hidden = quick_gelu(mlp_dot(affinity, w1t, DOT_PRECISION) + b1[None, :])
        w2c = load_w2_columns(w2_ptr, units, channels, D, HIDDEN)
        motion += mlp_dot(hidden, tl.trans(w2c), DOT_PRECISION)
    b2 = tl.load(b2_ptr + channels, mask=channels < D, other=0.0).to(tl.float32)
    out = context + motion + b2[None, :]

    # out is contiguous (B, T, H, W, heads, D).
    position = (y * W + x) * HEADS + head
    out_mask = query_valid[:, None] & (channels[None, :] < D)
    frame_elems = H * W * HEADS * D
    out_frame = out_ptr + (b.to(tl.int64) * T + tq) * frame_elems
    out_ptrs = out_frame + position[:, None] * D + channels[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)
    # Direction "next" computes T-1 pairs and output frame T-1 repeats frame T-2 (never when T = 1);
    # "prev" computes all T frames (num_pairs == T) and copies nothing.
    if (tq == T - 2) & (num_pairs < T):
        tl.store(out_ptrs + frame_elems, out.to(out_ptr.dtype.element_ty), mask=out_mask)

    if STORE_LSE:  # lse is contiguous (B, pairs, H, W, heads)
        lse_ptrs = lse_ptr + (b.to(tl.int64) * num_pairs + tq) * (H * W * HEADS) + position
        tl.store(lse_ptrs, row_max + tl.log(row_sum), mask=query_valid)
