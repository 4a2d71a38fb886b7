"""EMIM backward, key/value side: dk and dv gathered over the mirrored window (deterministic, no atomics).

One program per BLOCK_H x BLOCK_W tile of key positions of one key frame tk of one (batch, head). The key
at (y', x') sits at window entry o = (i, j) of exactly one query of each query frame tq that attends to tk:
the one at (y' - (i - r) d, x' - (j - r) d), if that is inside the frame (d: the dilation). So

    dv[y', x'] = sum_tq sum_o p_o(query) * g(query)          p_o = exp(scale <q, k> + rpb[o] - lse)
    dk[y', x'] = scale * sum_tq sum_o dA_o(query) * q(query)

where g is the folded upstream gradient of the pair and dA the affinity gradient written by the query kernel.
The query frames of key frame tk are tk - key_frame_offset (direction "next": tk - 1; "prev": tk + 1; T = 1:
tk), and with "prev" key frame 0 is also frame 0's own key frame (frame 0 attends to itself): that second
source is added after the first, always in this order, so the sum is the same run after run.
Keys and values of padded (out-of-frame) positions are constants and get no gradient. With the authors'
32-channel context (context_channels < D), dk and dv are zero in channels >= context_channels, as the
authors' kernels left them; below it they are the ordinary gradient.
"""

import triton
import triton.language as tl

from .common import context_channel_mask, head_of_frame, load_rows, tile_positions, window_displacement


@triton.jit
def emim_backward_key_value_kernel(
    q_ptr, k_ptr, rpb_ptr, grad_ptr, lse_ptr, d_affinity_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qt, stride_qy, stride_qx, stride_qn,
    stride_kb, stride_kt, stride_ky, stride_kx, stride_kn,
    T, H, W, HEADS, D, num_pairs, key_frame_offset, first_key_frame, num_key_frames, key_sources, dilation,
    context_channels, scale,
    WINDOW: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    WINDOW_AREA: tl.constexpr = WINDOW * WINDOW

    # Program axis 2 enumerates batch x the key frames that receive gradient
    # (first_key_frame .. first_key_frame + num_key_frames - 1).
    pid_tile, head, pid_key = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = pid_key // num_key_frames
    tk = first_key_frame + pid_key % num_key_frames

    y, x = tile_positions(pid_tile, W, BLOCK_H, BLOCK_W)
    channels = tl.arange(0, BLOCK_D)

    k_frame = head_of_frame(k_ptr, b, tk, head, stride_kb, stride_kt, stride_kn)
    krows, key_valid = load_rows(k_frame, y, x, H, W, stride_ky, stride_kx, channels, D)

    dk = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_D), dtype=tl.float32)
    # key_sources (a launch argument, so the loop's trip count is known before the launch): 1, or 2 for "prev",
    # where key frame 0 is also the key frame of query frame 0 itself; other key frames skip that second pass.
    for source in range(key_sources):
        if (source == 0) | (tk == 0):
            tq = tl.where(source == 0, tk - key_frame_offset, 0)  # query frame == pair index in both directions
            q_frame = head_of_frame(q_ptr, b, tq, head, stride_qb, stride_qt, stride_qn)
            pair_index = b.to(tl.int64) * num_pairs + tq
            grad_frame = grad_ptr + pair_index * (H * W * HEADS * D) + head * D
            lse_frame = lse_ptr + pair_index * (H * W * HEADS)
            d_affinity_frame = d_affinity_ptr + pair_index * (H * W * HEADS * WINDOW_AREA)
            for o in range(WINDOW_AREA):
                # The query whose window puts this key at entry o.
                dy, dx = window_displacement(o, WINDOW, dilation)
                qy = y - dy
                qx = x - dx
                qrows, query_in_frame = load_rows(q_frame, qy, qx, H, W, stride_qy, stride_qx, channels, D)
                grows, _ = load_rows(grad_frame, qy, qx, H, W, W * HEADS * D, HEADS * D, channels, D)
                valid = query_in_frame & key_valid
                query_position = (qy * W + qx) * HEADS + head
                lse = tl.load(lse_frame + query_position, mask=valid, other=0.0)
                da = tl.load(d_affinity_frame + query_position.to(tl.int64) * WINDOW_AREA + o, mask=valid,
                             other=0.0)

                a = tl.sum(qrows * krows, axis=1) * scale \
                    + tl.load(rpb_ptr + head * WINDOW_AREA + o).to(tl.float32)
                p = tl.where(valid, tl.exp(a - lse), 0.0)
                dv += p[:, None] * grows
                dk += da[:, None] * qrows
    has_context = context_channel_mask(channels, context_channels)[None, :]
    dk = tl.where(has_context, dk * scale, 0.0)
    dv = tl.where(has_context, dv, 0.0)

    # dk, dv are contiguous (B, T, H, W, heads, D).
    offsets = (b.to(tl.int64) * T + tk) * (H * W * HEADS * D) + ((y * W + x) * HEADS + head)[:, None] * D \
        + channels[None, :]
    mask = key_valid[:, None] & (channels[None, :] < D)
    tl.store(dk_ptr + offsets, dk.to(dk_ptr.dtype.element_ty), mask=mask)
    tl.store(dv_ptr + offsets, dv.to(dv_ptr.dtype.element_ty), mask=mask)
