"""EMIM forward with the affinities and the context on tensor cores: the "halo" strategy.

One program computes a TILE_H x TILE_W tile of queries of one (batch, frame pair, head). Every window of the
tile lies inside one key/value *halo*: the (TILE_H + K - 1) x (TILE_W + K - 1) positions of frame tk around
the tile, held as HALO_H x HALO_W slots (powers of two; slot (hy, hx) is position (y0 - r + hy, x0 - r + hx)).
So the query-key products of the whole tile are matrix products, and so is the context. The halo is
walked in blocks of HALO_BLOCK_ROWS rows (one block's affinities live in registers), with an online softmax:

    S   = Q @ K_block^T                             (TILE, block slots) by tl.dot: every query, every slot
    a   = scale * S + bias_table                    bias_table: rpb at the slots in the query's window,
                                                    -inf elsewhere (host-built, see tensor_core_forward.py)
    p   = exp(a - running max)                      the -inf slots get 0: softmax over the halo = over the window
    ctx = ctx * rescale + p @ V_block               (TILE, D) by tl.dot
    a_w = a at the query's window slots             two short-axis tl.gathers (columns, then rows)
    out = ctx / sum + QuickGELU(a_w @ W1^T + b1) @ W2^T + b2     (K x K window padded to a power of two)

Padding (docs/operation.md: out-of-frame keys and values are pad_value in every channel, not masked): out-of-frame k and v
rows are loaded as pad_value, so the padded entries' affinity scale * P * sum(q) and value P come out of the
products. The pad is rounded to the activation dtype there, like every k and v element (bf16: 1e-6 becomes
9.98e-7, a change of ~2e-9 in those affinities and values); adding its exact float32 contributions instead
cost ~500 instructions a thread (a rank-1 correction of every affinity and a second row sum).

The softmax runs in base 2 (exp2 is one MUFU instruction; exp costs an extra multiply and range handling):
the bias table comes pre-multiplied by log2(e), S is scaled by scale * log2(e), W1 by ln 2 (so the MLP sees
natural-base affinities), and the log-sum-exp is turned back into natural log at the end. Divisions are the
approximate ones (tl.fdiv, ieee_rounding=False: a reciprocal and a multiply, 2 ulp), per row for the softmax.
"""

import triton
import triton.language as tl

from .common import QUICK_GELU_LOG2, context_channel_mask, frame_pair, halo_block_positions, halo_tile, head_of_frame

LN2 = tl.constexpr(0.6931471805599453)  # turns base-2 logarithms back into natural ones


@triton.jit
def emim_forward_tensor_core_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qt, stride_qy, stride_qx, stride_qn,
    stride_kb, stride_kt, stride_ky, stride_kx, stride_kn,
    stride_vb, stride_vt, stride_vy, stride_vx, stride_vn,
    T, H, W, HEADS, D, num_pairs, key_frame_offset, context_channels,
    scale_log2, pad_value,
    WINDOW: tl.constexpr,          # K
    WINDOW_PAD_SIDE: tl.constexpr,  # K padded to a power of two; the MLP's input is its square (i, j) grid
    BLOCK_D: tl.constexpr,         # D padded to a power of two >= 16
    TILE_H: tl.constexpr, TILE_W: tl.constexpr,
    HALO_H: tl.constexpr, HALO_W: tl.constexpr,   # powers of two >= TILE + K - 1
    HALO_BLOCK_ROWS: tl.constexpr,  # halo rows per step (a power of two dividing HALO_H)
    HIDDEN_PAD: tl.constexpr,      # 4K² padded to a multiple of HIDDEN_CHUNK (W1, b1, W2 are padded with 0)
    HIDDEN_CHUNK: tl.constexpr,
    STORE_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,   # for float32 inputs: "ieee" or "tf32"; ignored for fp16/bf16 operands
):
    TILE: tl.constexpr = TILE_H * TILE_W
    HALO: tl.constexpr = HALO_H * HALO_W
    RADIUS: tl.constexpr = WINDOW // 2

    pid_tile, head, pid_pair = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, tq, tk = frame_pair(pid_pair, num_pairs, key_frame_offset)
    y0, x0, ty, tx, query_valid = halo_tile(pid_tile, H, W, TILE_H, TILE_W)
    queries = tl.arange(0, TILE)
    qy = y0 + ty
    qx = x0 + tx
    channels = tl.arange(0, BLOCK_D)
    channel_ok = channels < D

    q_frame = head_of_frame(q_ptr, b, tq, head, stride_qb, stride_qt, stride_qn)
    k_frame = head_of_frame(k_ptr, b, tk, head, stride_kb, stride_kt, stride_kn)
    v_frame = head_of_frame(v_ptr, b, tk, head, stride_vb, stride_vt, stride_vn)
    q = tl.load(q_frame + qy[:, None] * stride_qy + qx[:, None] * stride_qx + channels[None, :],
                mask=query_valid[:, None] & channel_ok[None, :], other=0.0)

    # The window of query (ty, tx) of the tile is halo rows ty .. ty + K - 1, columns tx .. tx + K - 1; the
    # MLP needs it in window order, picked out block by block below. Padded window entries (i or j >= K)
    # repeat entry 0 (finite; W1's padded columns are 0).
    WINDOW_SIDE: tl.constexpr = WINDOW_PAD_SIDE
    side = tl.arange(0, WINDOW_SIDE)
    side = tl.where(side < WINDOW, side, 0)
    window_row = ty[:, None] + side[None, :]  # (TILE, side): halo row of window row i
    window_col = tx[:, None, None] + side[None, None, :]  # (TILE, 1, side): halo column of j
    # In base 2 (the host folded ln 2 into W1).
    a_window = tl.zeros((TILE, WINDOW_SIDE, WINDOW_SIDE), dtype=tl.float32)

    # The halo in blocks of HALO_BLOCK_ROWS rows, so that one block's affinities, not the whole halo's, are
    # live in registers; the softmax is online across blocks (running max and sum, context rescaled).
    BLOCK_SLOTS: tl.constexpr = HALO_BLOCK_ROWS * HALO_W
    block_slots = tl.arange(0, BLOCK_SLOTS)
    row_max = tl.full((TILE,), -1e30, dtype=tl.float32)  # finite: a block may hold no slot of a window
    row_sum = tl.zeros((TILE,), dtype=tl.float32)
    context = tl.zeros((TILE, BLOCK_D), dtype=tl.float32)
    # Blocks past the last used halo row (TILE_H + K - 2) are skipped.
    USED_BLOCKS: tl.constexpr = (TILE_H + WINDOW - 2) // HALO_BLOCK_ROWS + 1
    for block in range(USED_BLOCKS):
        first_row = block * HALO_BLOCK_ROWS
        # Slots past TILE + K - 1 are in no window: not loaded (their bias is -inf).
        sy, sx, in_frame = halo_block_positions(block_slots, first_row, y0, x0, H, W, RADIUS, HALO_W,
                                                TILE_H + WINDOW - 1, TILE_W + WINDOW - 1)
        # Out-of-frame k and v rows hold pad_value (rounded to their dtype, like every k and v element): the
        # padded entries' affinity scale * P * sum(q) and value P come out of the products themselves.
        kv_mask = in_frame[:, None] & channel_ok[None, :]
        k = tl.load(k_frame + sy[:, None] * stride_ky + sx[:, None] * stride_kx + channels[None, :], mask=kv_mask,
                    other=pad_value)
        v = tl.load(v_frame + sy[:, None] * stride_vy + sx[:, None] * stride_vx + channels[None, :], mask=kv_mask,
                    other=pad_value)
        # Base-2 affinities; slots outside the query's window get -inf from the bias table.
        bias = tl.load(bias_ptr + head * (TILE * HALO) + queries[:, None] * HALO + first_row * HALO_W
                       + block_slots[None, :])
        a2 = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2 + bias

        # This block's share of the window: each query's K columns of the block's rows, then of those the
        # rows that are window rows (a gather costs about one shuffle per source element a thread holds along
        # its axis: two short-axis gathers, not one over the block).
        columns = tl.gather(tl.reshape(a2, (TILE, HALO_BLOCK_ROWS, HALO_W)),
                            tl.broadcast_to(window_col, (TILE, HALO_BLOCK_ROWS, WINDOW_SIDE)), axis=2)
        local_row = window_row - first_row
        picked = tl.gather(columns, tl.broadcast_to(tl.minimum(tl.maximum(local_row, 0), HALO_BLOCK_ROWS - 1)[:, :, None],
                                                    (TILE, WINDOW_SIDE, WINDOW_SIDE)), axis=1)
        here = (local_row >= 0) & (local_row < HALO_BLOCK_ROWS)
        a_window = tl.where(here[:, :, None], picked, a_window)

        new_max = tl.maximum(row_max, tl.max(a2, axis=1))
        rescale = tl.exp2(row_max - new_max)
        p = tl.exp2(a2 - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(p, axis=1)
        context = context * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        row_max = new_max
    context = tl.where(context_channel_mask(channels, context_channels)[None, :],
                       tl.fdiv(context, row_sum[:, None], ieee_rounding=False), 0.0)

    a_window = tl.reshape(a_window, (TILE, WINDOW_SIDE * WINDOW_SIDE)).to(w1_ptr.dtype.element_ty)

    motion = tl.zeros((TILE, BLOCK_D), dtype=tl.float32)
    window_cols = tl.arange(0, WINDOW_SIDE * WINDOW_SIDE)
    for start in range(0, HIDDEN_PAD, HIDDEN_CHUNK):
        units = start + tl.arange(0, HIDDEN_CHUNK)
        w1t = tl.load(w1_ptr + units[None, :] * (WINDOW_SIDE * WINDOW_SIDE) + window_cols[:, None])
        z = tl.dot(a_window, w1t, input_precision=DOT_PRECISION) + tl.load(b1_ptr + units)[None, :]
        # QuickGELU(z) = z * sigmoid(1.702 z) = z / (1 + 2^(-1.702 log2(e) z)): one exp2 and a fast division
        # (an overflowing 2^... gives z / inf = 0, the right limit).
        hidden = tl.fdiv(z, 1.0 + tl.exp2(z * QUICK_GELU_LOG2), ieee_rounding=False)
        w2t = tl.load(w2_ptr + units[:, None] * BLOCK_D + channels[None, :])  # (chunk, D pad)
        motion += tl.dot(hidden.to(w2_ptr.dtype.element_ty), w2t, input_precision=DOT_PRECISION)
    out = context + motion + tl.load(b2_ptr + channels)[None, :]

    # out is contiguous (B, T, H, W, heads, D).
    position = (qy * W + qx) * HEADS + head
    out_mask = query_valid[:, None] & channel_ok[None, :]
    frame_elems = H * W * HEADS * D
    out_ptrs = out_ptr + (b.to(tl.int64) * T + tq) * frame_elems + position[:, None] * D + channels[None, :]
    out = out.to(out_ptr.dtype.element_ty)
    tl.store(out_ptrs, out, mask=out_mask)
    # Direction "next": output frame T-1 repeats frame T-2 ("prev" and T = 1 compute every frame).
    if (tq == T - 2) & (num_pairs < T):
        tl.store(out_ptrs + frame_elems, out, mask=out_mask)
    if STORE_LSE:  # lse is contiguous (B, pairs, H, W, heads), natural log
        lse_ptrs = lse_ptr + (b.to(tl.int64) * num_pairs + tq) * (H * W * HEADS) + position
        tl.store(lse_ptrs, (row_max + tl.log2(row_sum)) * LN2, mask=query_valid)
