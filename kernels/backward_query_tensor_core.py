"""EMIM backward, query side, with the halo products on tensor cores: the "halo" strategy of the query kernel.

Writes what kernels/backward_query.py writes (dq, and the float32 scratch rows a and dA, (B, pairs, H, W, heads,
K²)), so the key/value and weights kernels read them unchanged. One program per TILE_H x TILE_W tile of queries
of one (batch, frame pair, head); every window of the tile lies in the key/value halo around it, held as
HALO_H x HALO_W slots (slot (hy, hx) is position (y0 - r + hy, x0 - r + hx)), as in kernels/forward_tensor_core.py.
The halo is walked in blocks of HALO_BLOCK_ROWS rows, twice:

    pass 1   S  = Q @ K_block^T,  dP = G_ctx @ V_block^T       (TILE, block slots) by tl.dot
             S_w, dP_w = the window's entries of S and dP       two short-axis tl.gathers (columns, rows), of
                                                                S and dP joined (the index work is shared)
    window   a  = scale * S_w + rpb                            (TILE, Kp, Kp), Kp = K padded to a power of two
             p  = exp(a - lse);  dA = p * (dP_w - sum p * dP_w) + (W2^T g * QuickGELU'(z)) @ W1,  z = a W1^T + b1
             a and dA stored as the K² scratch rows
    pass 2   dA_block = dA at the block's halo slots            loaded back from the dA rows just stored, at
                                                                each (query, slot)'s window entry (a host-made
                                                                table of the tile geometry; -1: not in window)
             dq += dA_block @ K_block                           (TILE, D) by tl.dot

Every window quantity lives in window layout (TILE, Kp, Kp) once gathered, so the softmax, the rpb and the MLP
need no bias table: only the halo products and the two layout changes depend on the halo. Pass 2 reading dA
from memory (L2: the program wrote it a moment before, behind a barrier) replaced two register gathers of the
window, which cost ~18 instructions per (query, slot) and kept a (TILE, Kp, halo width) tile live.

Precision. S multiplies the 16-bit q and k themselves (exact products, float32 accumulation). dP and dq multiply
a float32 operand (the upstream gradient g, the gradient dA) with v or k, which today's kernel does in float32
FMAs; a single 16-bit or tf32 operand would cost them 8-11 bits. So that operand is split in two, head + tail,
and multiplied twice: g into two values of v's 16-bit dtype (`split_to`: g is the op's 16-bit upstream gradient,
exact in the head, except the folded frame's sum), dA into two tf32 values (`split`, `split_dot`; a 16-bit split
would flush small gradients in fp16, and k, v are exact in tf32). The motion MLP takes the float32 operands and
the tf32 rounding of today's kernel (kernels/common.py: mlp_dot). Out-of-frame k and v rows hold pad_value
rounded to their dtype, as in the tensor-core forward (bf16: 1e-6 becomes 9.98e-7).

With the authors' 32-channel context (context_channels < D) only g's channels below it enter dP, and dq is
zeroed from there on, as in kernels/backward_query.py.
"""

import triton
import triton.language as tl

from .common import (LOG2E, context_channel_mask, fast_quick_gelu_and_grad, frame_pair, halo_block_positions,
                     halo_tile, head_of_frame, round_to_tf32, split, split_dot, split_to)


@triton.jit
def tf32_dot(a, b, DOT_PRECISION: tl.constexpr):
    """a @ b for the motion MLP, `a` rounded to tf32 here, `b` already rounded on the host (as today's kernel
    rounds both: kernels/common.py, mlp_dot)."""
    return tl.dot(round_to_tf32(a, DOT_PRECISION), b, input_precision=DOT_PRECISION)


@triton.jit
def halo_block_to_window(block, window_row, window_col, first_row, window,
                         TILE: tl.constexpr, BLOCK_ROWS: tl.constexpr, HALO_W: tl.constexpr,
                         SIDE: tl.constexpr):
    """The entries of a (TILE, BLOCK_ROWS * HALO_W, 2) halo block (two quantities joined) at each query's window
    slots, in window layout (TILE, SIDE, SIDE, 2); entries whose window row is not in this block keep `window`'s
    value.

    Two gathers along short axes (the block's columns, then its rows): a gather costs about one shuffle per
    source element a thread holds along its axis, so one over the whole block would cost far more.
    """
    columns = tl.gather(tl.reshape(block, (TILE, BLOCK_ROWS, HALO_W, 2)),
                        tl.broadcast_to(window_col[:, :, :, None], (TILE, BLOCK_ROWS, SIDE, 2)), axis=2)
    local_row = window_row - first_row
    picked = tl.gather(columns, tl.broadcast_to(tl.minimum(tl.maximum(local_row, 0), BLOCK_ROWS - 1)[:, :, None, None],
                                                (TILE, SIDE, SIDE, 2)), axis=1)
    here = (local_row >= 0) & (local_row < BLOCK_ROWS)
    return tl.where(here[:, :, None, None], picked, window)


@triton.jit
def emim_backward_query_tensor_core_kernel(
    q_ptr, k_ptr, v_ptr, rpb_ptr, entry_ptr, w1_ptr, w1t_ptr, b1_ptr, w2_ptr, grad_ptr, lse_ptr,
    dq_ptr, affinity_ptr, d_affinity_ptr,
    stride_qb, stride_qt, stride_qy, stride_qx, stride_qn,
    stride_kb, stride_kt, stride_ky, stride_kx, stride_kn,
    stride_vb, stride_vt, stride_vy, stride_vx, stride_vn,
    T, H, W, HEADS, D, num_pairs, key_frame_offset, context_channels,
    scale, pad_value,
    WINDOW: tl.constexpr,          # K
    WINDOW_PAD_SIDE: tl.constexpr,  # K padded to a power of two; the MLP's input is its square (i, j) grid
    BLOCK_D: tl.constexpr,         # D padded to a power of two >= 16
    TILE_H: tl.constexpr, TILE_W: tl.constexpr,
    HALO_H: tl.constexpr, HALO_W: tl.constexpr,   # powers of two >= TILE + K - 1
    HALO_BLOCK_ROWS: tl.constexpr,  # halo rows per step (a power of two dividing HALO_H)
    HIDDEN_PAD: tl.constexpr,      # 4K² padded to a multiple of HIDDEN_CHUNK (packed W1, b1, W2 are 0 there)
    HIDDEN_CHUNK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,   # "ieee" (float32 inputs) or "tf32"
):
    TILE: tl.constexpr = TILE_H * TILE_W
    SIDE: tl.constexpr = WINDOW_PAD_SIDE
    RADIUS: tl.constexpr = WINDOW // 2
    WINDOW_AREA: tl.constexpr = WINDOW * WINDOW
    BLOCK_SLOTS: tl.constexpr = HALO_BLOCK_ROWS * HALO_W
    # Blocks past the last used halo row (TILE_H + K - 2) hold no window slot: skipped in both passes.
    USED_BLOCKS: tl.constexpr = (TILE_H + WINDOW - 2) // HALO_BLOCK_ROWS + 1

    pid_tile, head, pid_pair = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, tq, tk = frame_pair(pid_pair, num_pairs, key_frame_offset)
    y0, x0, ty, tx, query_valid = halo_tile(pid_tile, H, W, TILE_H, TILE_W)
    queries = tl.arange(0, TILE)
    qy = y0 + ty
    qx = x0 + tx
    channels = tl.arange(0, BLOCK_D)
    channel_ok = channels < D
    query_mask = query_valid[:, None] & channel_ok[None, :]

    q_frame = head_of_frame(q_ptr, b, tq, head, stride_qb, stride_qt, stride_qn)
    k_frame = head_of_frame(k_ptr, b, tk, head, stride_kb, stride_kt, stride_kn)
    v_frame = head_of_frame(v_ptr, b, tk, head, stride_vb, stride_vt, stride_vn)
    q = tl.load(q_frame + qy[:, None] * stride_qy + qx[:, None] * stride_qx + channels[None, :], mask=query_mask,
                other=0.0)
    # The per-pair tensors (grad, lse, scratch rows) are contiguous (B, pairs, H, W, heads, ...).
    pair_index = b.to(tl.int64) * num_pairs + tq
    position = (qy * W + qx) * HEADS + head
    grad_rows = grad_ptr + pair_index * (H * W * HEADS * D) + position * D  # per query: g is loaded twice
    # The context's upstream gradient: g below context_channels. Split once for the dP products of every block.
    g_context = tl.load(grad_rows[:, None] + channels[None, :],
                        mask=query_mask & context_channel_mask(channels, context_channels)[None, :], other=0.0)
    g_head, g_tail = split_to(g_context, v_ptr.dtype.element_ty)

    # Window entry (i, j) of query (ty, tx) is halo slot (ty + i, tx + j). Padded entries (i or j >= K) repeat
    # entry 0 while gathering (finite) and are masked out below.
    side = tl.arange(0, SIDE)
    window_ok = (side[:, None] < WINDOW) & (side[None, :] < WINDOW)  # (SIDE, SIDE)
    side_clamped = tl.where(side < WINDOW, side, 0)
    window_row = ty[:, None] + side_clamped[None, :]  # (TILE, SIDE): halo row of window row i
    window_col = tx[:, None, None] + side_clamped[None, None, :]  # (TILE, 1, SIDE): halo column of window column j

    # Pass 1: S and dP on the halo, picked out to window layout.
    block_slots = tl.arange(0, BLOCK_SLOTS)
    s_dp_window = tl.zeros((TILE, SIDE, SIDE, 2), dtype=tl.float32)
    for block in range(USED_BLOCKS):
        first_row = block * HALO_BLOCK_ROWS
        sy, sx, in_frame = halo_block_positions(block_slots, first_row, y0, x0, H, W, RADIUS, HALO_W,
                                                TILE_H + WINDOW - 1, TILE_W + WINDOW - 1)
        kv_mask = in_frame[:, None] & channel_ok[None, :]
        k = tl.load(k_frame + sy[:, None] * stride_ky + sx[:, None] * stride_kx + channels[None, :], mask=kv_mask,
                    other=pad_value)
        v = tl.load(v_frame + sy[:, None] * stride_vy + sx[:, None] * stride_vx + channels[None, :], mask=kv_mask,
                    other=pad_value)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        dp = tl.dot(g_head, tl.trans(v), input_precision=DOT_PRECISION)
        if v_ptr.dtype.element_ty != tl.float32:
            dp += tl.dot(g_tail, tl.trans(v), input_precision=DOT_PRECISION)
        s_dp_window = halo_block_to_window(tl.join(s, dp), window_row, window_col, first_row, s_dp_window, TILE,
                                           HALO_BLOCK_ROWS, HALO_W, SIDE)
    s_window, dp_window = tl.split(s_dp_window)

    # The window: affinities, softmax and its gradient. Padded entries: a = 0 (W1's padded columns are 0, so
    # they add nothing to the MLP), p = 0 (no softmax mass, no gradient).
    rpb = tl.load(rpb_ptr + head * WINDOW_AREA + side[:, None] * WINDOW + side[None, :], mask=window_ok, other=0.0)
    affinity = tl.where(window_ok[None, :, :], s_window * scale + rpb.to(tl.float32)[None, :, :], 0.0)
    # lse is loaded here, not with q: live through pass 1, it spilled.
    lse = tl.load(lse_ptr + pair_index * (H * W * HEADS) + position, mask=query_valid, other=0.0)
    prob = tl.where(window_ok[None, :, :],
                    tl.exp2((affinity - lse[:, None, None]) * LOG2E), 0.0)
    prob_dp = prob * dp_window
    d_affinity_softmax = prob_dp - prob * tl.sum(tl.sum(prob_dp, axis=2), axis=1)[:, None, None]

    # The scratch rows: window entry (i, j) is column i * K + j. a is stored now, so that only its flat copy for
    # the MLP stays live; the row pointers are per query and the (i, j) offsets int32, so that no (TILE, Kp, Kp)
    # 64-bit offset tensor lives across the MLP loop (it spilled).
    row_base = (pair_index * (H * W * HEADS) + position) * WINDOW_AREA
    entry = (side[:, None] * WINDOW + side[None, :])[None, :, :]
    scratch_mask = query_valid[:, None, None] & window_ok[None, :, :]
    tl.store((affinity_ptr + row_base)[:, None, None] + entry, affinity, mask=scratch_mask)

    # Through the motion MLP, hidden chunk by hidden chunk, on the window flattened to SIDE² columns, adding to
    # the softmax path's dA. The operands that do not change from chunk to chunk are rounded to tf32 once, the
    # weights on the host.
    affinity_flat = round_to_tf32(tl.reshape(affinity, (TILE, SIDE * SIDE)), DOT_PRECISION)
    # All channels of g (the motion's too), loaded again: keeping it, or its (TILE, D) 64-bit pointers, live
    # through pass 1 spilled registers.
    g = round_to_tf32(tl.load(grad_rows[:, None] + channels[None, :].to(tl.int64), mask=query_mask, other=0.0),
                  DOT_PRECISION)
    d_affinity_flat = tl.reshape(d_affinity_softmax, (TILE, SIDE * SIDE))
    window_cols = tl.arange(0, SIDE * SIDE)
    for start in range(0, HIDDEN_PAD, HIDDEN_CHUNK):
        units = start + tl.arange(0, HIDDEN_CHUNK)
        w1t = tl.load(w1t_ptr + window_cols[:, None] * HIDDEN_PAD + units[None, :])  # (SIDE², chunk)
        z = tl.dot(affinity_flat, w1t, input_precision=DOT_PRECISION) + tl.load(b1_ptr + units)[None, :]
        w2 = tl.load(w2_ptr + channels[:, None] * HIDDEN_PAD + units[None, :])  # (D pad, chunk)
        d_hidden = tl.dot(g, w2, input_precision=DOT_PRECISION)
        dz = d_hidden * fast_quick_gelu_and_grad(z)[1]
        w1 = tl.load(w1_ptr + units[:, None] * (SIDE * SIDE) + window_cols[None, :])  # (chunk, SIDE²)
        d_affinity_flat += tf32_dot(dz, w1, DOT_PRECISION)
    d_affinity = tl.where(window_ok[None, :, :], tl.reshape(d_affinity_flat, (TILE, SIDE, SIDE)), 0.0)
    d_affinity_rows = d_affinity_ptr + row_base
    tl.store(d_affinity_rows[:, None, None] + entry, d_affinity, mask=scratch_mask)

    # Pass 2: dq = scale * dA @ K on the halo. dA at the halo slots is read back from the rows just stored, at
    # each (query, slot)'s window entry (a host-made table of the tile geometry, -1 where the slot is outside
    # the query's window): gathers from L2 instead of two register gathers of the (TILE, Kp, Kp) window.
    tl.debug_barrier()  # the rows were stored by other threads of this program
    table_rows = queries[:, None] * (HALO_H * HALO_W)
    dq = tl.zeros((TILE, BLOCK_D), dtype=tl.float32)
    for block in range(USED_BLOCKS):
        first_row = block * HALO_BLOCK_ROWS
        entry_block = tl.load(entry_ptr + table_rows + (first_row * HALO_W + block_slots)[None, :])
        d_affinity_block = tl.load(d_affinity_rows[:, None] + entry_block,
                                   mask=(entry_block >= 0) & query_valid[:, None], other=0.0)
        sy, sx, in_frame = halo_block_positions(block_slots, first_row, y0, x0, H, W, RADIUS, HALO_W,
                                                TILE_H + WINDOW - 1, TILE_W + WINDOW - 1)
        k = tl.load(k_frame + sy[:, None] * stride_ky + sx[:, None] * stride_kx + channels[None, :],
                    mask=in_frame[:, None] & channel_ok[None, :], other=pad_value)
        da_head, da_tail = split(d_affinity_block, DOT_PRECISION)
        dq = split_dot(da_head, da_tail, k.to(tl.float32), dq, DOT_PRECISION)
    dq = tl.where(context_channel_mask(channels, context_channels)[None, :], dq * scale, 0.0)

    # dq is contiguous (B, T, H, W, heads, D).
    dq_ptrs = dq_ptr + (b.to(tl.int64) * T + tq) * (H * W * HEADS * D) + position[:, None] * D + channels[None, :]
    tl.store(dq_ptrs, dq.to(dq_ptr.dtype.element_ty), mask=query_mask)
