"""EMIM backward, key/value side: dk and dv gathered over the mirrored window (deterministic, no atomics).

One program per BLOCK_H x BLOCK_W tile of key positions of frame tk = tq + 1 (tq for T = 1) of one
(batch, pair, head). The key at (y', x') sits at window entry o = (i, j) of exactly one query: the one
at (y' - (i - r), x' - (j - r)) in frame tq, if that is inside the frame. So

    dv[y', x'] = sum_o p_o(query) * g(query)                p_o = exp(scale <q, k> + rpb[o] - lse)
    dk[y', x'] = scale * sum_o dA_o(query) * q(query)

where g is the folded upstream gradient and dA the affinity gradient written by the query kernel.
Keys and values of padded (out-of-frame) positions are constants and get no gradient.
"""

import triton
import triton.language as tl

from .common import frame_pair, head_of_frame, load_rows, tile_positions


@triton.jit
def emim_backward_key_value_kernel(
    q_ptr, k_ptr, rpb_ptr, grad_ptr, lse_ptr, d_affinity_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qt, stride_qy, stride_qx, stride_qn,
    stride_kb, stride_kt, stride_ky, stride_kx, stride_kn,
    T, H, W, HEADS, D, num_pairs, key_frame_offset,
    scale,
    WINDOW: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    WINDOW_AREA: tl.constexpr = WINDOW * WINDOW
    RADIUS: tl.constexpr = WINDOW // 2

    pid_tile, head, pid_pair = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, tq, tk = frame_pair(pid_pair, num_pairs, key_frame_offset)

    y, x = tile_positions(pid_tile, W, BLOCK_H, BLOCK_W)
    channels = tl.arange(0, BLOCK_D)

    q_frame = head_of_frame(q_ptr, b, tq, head, stride_qb, stride_qt, stride_qn)
    k_frame = head_of_frame(k_ptr, b, tk, head, stride_kb, stride_kt, stride_kn)
    pair_index = b.to(tl.int64) * num_pairs + tq
    grad_frame = grad_ptr + pair_index * (H * W * HEADS * D) + head * D
    lse_frame = lse_ptr + pair_index * (H * W * HEADS)
    d_affinity_frame = d_affinity_ptr + pair_index * (H * W * HEADS * WINDOW_AREA)

    krows, key_valid = load_rows(k_frame, y, x, H, W, stride_ky, stride_kx, channels, D)

    dk = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_D), dtype=tl.float32)
    for o in range(WINDOW_AREA):
        # The query whose window puts this key at entry o.
        qy = y - (o // WINDOW - RADIUS)
        qx = x - (o % WINDOW - RADIUS)
        qrows, query_in_frame = load_rows(q_frame, qy, qx, H, W, stride_qy, stride_qx, channels, D)
        grows, _ = load_rows(grad_frame, qy, qx, H, W, W * HEADS * D, HEADS * D, channels, D)
        valid = query_in_frame & key_valid
        query_position = (qy * W + qx) * HEADS + head
        lse = tl.load(lse_frame + query_position, mask=valid, other=0.0)
        da = tl.load(d_affinity_frame + query_position.to(tl.int64) * WINDOW_AREA + o, mask=valid, other=0.0)

        a = tl.sum(qrows * krows, axis=1) * scale + tl.load(rpb_ptr + head * WINDOW_AREA + o).to(tl.float32)
        p = tl.where(valid, tl.exp(a - lse), 0.0)
        dv += p[:, None] * grows
        dk += da[:, None] * qrows
    dk = dk * scale

    # dk, dv are contiguous (B, T, H, W, heads, D).
    offsets = (b.to(tl.int64) * T + tk) * (H * W * HEADS * D) + ((y * W + x) * HEADS + head)[:, None] * D \
        + channels[None, :]
    mask = key_valid[:, None] & (channels[None, :] < D)
    tl.store(dk_ptr + offsets, dk.to(dk_ptr.dtype.element_ty), mask=mask)
    tl.store(dv_ptr + offsets, dv.to(dv_ptr.dtype.element_ty), mask=mask)
