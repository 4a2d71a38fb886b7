"""EMIM backward, query side: dq, and the affinities a and their gradient dA for the other two kernels.

One program per BLOCK_H x BLOCK_W tile of query positions of one (batch, frame pair, head). With the
upstream gradient g of the pair (direction "next": output frame T-1 already added to T-2) and the saved
log-sum-exp:

    a[:, o]  = scale * <q, k_o> + rpb[o]              (recomputed)
    p        = exp(a - lse)                          (the forward's softmax)
    dp[:, o] = <g, v_o>
    dA       = p * (dp - sum_o p * dp)               (through the softmax; sum_o p*dp = <g, context>)
             + (W2^T g * QuickGELU'(z)) @ W1         (through the motion MLP, z = a @ W1^T + b1)
    dq       = scale * sum_o dA[:, o] * k_o          (k_o = pad_value outside the frame)

a and dA are written as float32 rows (B, pairs, H, W, heads, K²): the key/value kernel needs dA to gather
dk, the weights kernel needs a to rebuild the hidden layer. Padded window columns are kept at 0 so they
never leak into tl.dot's. Frame pairs and dilated windows as in the forward kernel.

With the authors' 32-channel context (context_channels < D) the forward's context is zero in channels
>= context_channels, so only g's channels below it enter dp; the motion path sees all of g. dq is then zeroed
in channels >= context_channels, as the authors' kernels left it (docs/operation.md: deliberately not the gradient of
that forward); everything else is the ordinary gradient.
"""

import triton
import triton.language as tl

from .common import (context_channel_mask, frame_pair, head_of_frame, load_padded_rows, load_rows, load_w1_transposed,
                     load_w2_columns, mlp_dot, quick_gelu_grad, tile_positions, window_displacement)


@triton.jit
def emim_backward_query_kernel(
    q_ptr, k_ptr, v_ptr, rpb_ptr, w1_ptr, b1_ptr, w2_ptr, grad_ptr, lse_ptr,
    dq_ptr, affinity_ptr, d_affinity_ptr,
    stride_qb, stride_qt, stride_qy, stride_qx, stride_qn,
    stride_kb, stride_kt, stride_ky, stride_kx, stride_kn,
    stride_vb, stride_vt, stride_vy, stride_vx, stride_vn,
    T, H, W, HEADS, D, num_pairs, key_frame_offset, dilation, context_channels,
    scale, pad_value,
    WINDOW: tl.constexpr, WINDOW_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, HIDDEN_CHUNK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    WINDOW_AREA: tl.constexpr = WINDOW * WINDOW
    HIDDEN: tl.constexpr = 4 * WINDOW_AREA

    pid_tile, head, pid_pair = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, tq, tk = frame_pair(pid_pair, num_pairs, key_frame_offset)

    y, x = tile_positions(pid_tile, W, BLOCK_H, BLOCK_W)
    channels = tl.arange(0, BLOCK_D)
    has_context = context_channel_mask(channels, context_channels)
    window_cols = tl.arange(0, WINDOW_PAD)
    window_valid = window_cols < WINDOW_AREA

    q_frame = head_of_frame(q_ptr, b, tq, head, stride_qb, stride_qt, stride_qn)
    k_frame = head_of_frame(k_ptr, b, tk, head, stride_kb, stride_kt, stride_kn)
    v_frame = head_of_frame(v_ptr, b, tk, head, stride_vb, stride_vt, stride_vn)

    # Contiguous per-pair tensors: grad (B, pairs, H, W, heads, D), lse and scratch rows likewise.
    pair_index = b.to(tl.int64) * num_pairs + tq
    position = (y * W + x) * HEADS + head
    grad_frame = grad_ptr + pair_index * (H * W * HEADS * D) + head * D
    qrows, query_valid = load_rows(q_frame, y, x, H, W, stride_qy, stride_qx, channels, D)
    grows, _ = load_rows(grad_frame, y, x, H, W, W * HEADS * D, HEADS * D, channels, D)
    lse = tl.load(lse_ptr + pair_index * (H * W * HEADS) + position, mask=query_valid, other=0.0)
    context_grows = tl.where(has_context[None, :], grows, 0.0)  # the upstream gradient of the context

    # Recompute the affinity rows and dp = <g, v_o> column by column.
    affinity = tl.zeros((BLOCK_H * BLOCK_W, WINDOW_PAD), dtype=tl.float32)
    d_prob = tl.zeros((BLOCK_H * BLOCK_W, WINDOW_PAD), dtype=tl.float32)
    for o in range(WINDOW_AREA):
        dy, dx = window_displacement(o, WINDOW, dilation)
        krows = load_padded_rows(k_frame, y + dy, x + dx, H, W, stride_ky, stride_kx, channels, D, pad_value)
        vrows = load_padded_rows(v_frame, y + dy, x + dx, H, W, stride_vy, stride_vx, channels, D, pad_value)
        a = tl.sum(qrows * krows, axis=1) * scale + tl.load(rpb_ptr + head * WINDOW_AREA + o).to(tl.float32)
        dp = tl.sum(context_grows * vrows, axis=1)
        is_col = window_cols[None, :] == o
        affinity = tl.where(is_col, a[:, None], affinity)
        d_prob = tl.where(is_col, dp[:, None], d_prob)

    prob = tl.where(window_valid[None, :], tl.exp(affinity - lse[:, None]), 0.0)
    d_affinity = prob * (d_prob - tl.sum(prob * d_prob, axis=1)[:, None])

    # Through the motion MLP, hidden chunk by hidden chunk.
    for start in range(0, HIDDEN, HIDDEN_CHUNK):
        units = start + tl.arange(0, HIDDEN_CHUNK)
        w1t = load_w1_transposed(w1_ptr, units, window_cols, WINDOW_AREA, HIDDEN)
        b1 = tl.load(b1_ptr + units, mask=units < HIDDEN, other=0.0).to(tl.float32)
        z = mlp_dot(affinity, w1t, DOT_PRECISION) + b1[None, :]
        w2c = load_w2_columns(w2_ptr, units, channels, D, HIDDEN)
        d_hidden = mlp_dot(grows, w2c, DOT_PRECISION)
        dz = d_hidden * quick_gelu_grad(z)
        d_affinity += mlp_dot(dz, tl.trans(w1t), DOT_PRECISION)

    row_mask = query_valid[:, None] & window_valid[None, :]
    scratch_ptrs = (pair_index * (H * W * HEADS) + position)[:, None] * WINDOW_AREA + window_cols[None, :]
    tl.store(affinity_ptr + scratch_ptrs, affinity, mask=row_mask)
    tl.store(d_affinity_ptr + scratch_ptrs, d_affinity, mask=row_mask)

    # dq = scale * sum_o dA[:, o] k_o: a second pass over the window (k is re-read from cache).
    dq = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_D), dtype=tl.float32)
    for o in range(WINDOW_AREA):
        dy, dx = window_displacement(o, WINDOW, dilation)
        krows = load_padded_rows(k_frame, y + dy, x + dx, H, W, stride_ky, stride_kx, channels, D, pad_value)
        da = tl.sum(tl.where(window_cols[None, :] == o, d_affinity, 0.0), axis=1)
        dq += da[:, None] * krows
    dq = tl.where(has_context[None, :], dq * scale, 0.0)

    # dq is contiguous (B, T, H, W, heads, D).
    dq_ptrs = dq_ptr + (b.to(tl.int64) * T + tq) * (H * W * HEADS * D) + position[:, None] * D + channels[None, :]
    tl.store(dq_ptrs, dq.to(dq_ptr.dtype.element_ty), mask=query_valid[:, None] & (channels[None, :] < D))
