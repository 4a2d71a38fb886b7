"""EMIM from stock PyTorch parts: FlexAttention for the context, an unfold cost volume for the motion MLP.

This is the best composition a PyTorch user could write without custom kernels, a competitor in
``emim-bench compare`` (run under torch.compile, which is what makes FlexAttention fast).

The context part is attention of each query over the K x K window centred on its position in the next
frame. EMIM does not mask the window's out-of-frame entries: they are keys and values equal to the pad
value, with their rpb bias, and they take softmax mass. FlexAttention can only attend to keys that
exist, so the key/value frames are padded by r = K // 2 on every side with the pad value first
(an (H+2r) x (W+2r) frame); then every query has exactly K² keys, real or pad, and

    mask_mod:  key (ky, kx) of the padded frame is visible from query (y, x) iff
               0 <= ky - y < K and 0 <= kx - x < K      (padded coordinates: the window starts at (y, x))
    score_mod: score + rpb[head, ky - y, kx - x]

The padding costs one extra write and read of k and v, part of this composition's price. The block mask
depends only on H, W and K and is built once per shape, outside the timed region (like a compile).

The motion MLP needs the raw affinity rows, which FlexAttention does not return, so they are computed a
second time as a cost volume: F.unfold of the padded key frame gives each query's K² keys, an einsum with
q gives a = scale * q.k + rpb, and two F.linear's with QuickGELU give the motion features. As in
the reference (and docs/operation.md#precision), the cost volume and the MLP are computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference import frame_pairs, quick_gelu


def window_block_mask(height: int, width: int, window: int, device):
    """FlexAttention's block mask for the next-frame window over an r-padded key frame."""
    from torch.nn.attention.flex_attention import create_block_mask

    padded_width = width + 2 * (window // 2)

    def in_window(b, h, q_idx, kv_idx):
        dy = kv_idx // padded_width - q_idx // width
        dx = kv_idx % padded_width - q_idx % width
        return (dy >= 0) & (dy < window) & (dx >= 0) & (dx < window)

    padded_height = height + 2 * (window // 2)
    return create_block_mask(in_window, B=None, H=None, Q_LEN=height * width,
                             KV_LEN=padded_height * padded_width, device=device)


def emim_flex(q, k, v, rpb, w1, b1, w2, b2, *, block_mask, scale=None, pad_value=1e-6, kernel_options=None):
    """EMIM with FlexAttention + an unfold cost volume; same arguments and result as `emim_reference`.

    block_mask: `window_block_mask(H, W, K, device)` for these inputs.
    kernel_options: FlexAttention's tile options (None: Inductor's own choice).
    """
    from torch.nn.attention.flex_attention import flex_attention

    B, T, H, W, heads, D = q.shape
    K = rpb.shape[-1]
    r = K // 2
    Hp, Wp = H + 2 * r, W + 2 * r
    scale = D ** -0.5 if scale is None else scale
    q_frames, k_frames = frame_pairs(T)
    N = B * max(T - 1, 1)  # batch x computed frame pairs

    # (N, heads, H*W, D) queries; keys and values padded by r with the pad value: (N, heads, Hp, Wp, D).
    queries = q[:, q_frames].reshape(N, H * W, heads, D).transpose(1, 2).contiguous()

    def padded(x):
        frames = x[:, k_frames].reshape(N, H, W, heads, D).permute(0, 3, 1, 2, 4)
        return F.pad(frames, (0, 0, r, r, r, r), value=pad_value)

    keys, values = padded(k), padded(v)

    def add_bias(score, b, h, q_idx, kv_idx):
        dy = (kv_idx // Wp - q_idx // W).clamp(0, K - 1)  # clamped: evaluated for masked entries too
        dx = (kv_idx % Wp - q_idx % W).clamp(0, K - 1)
        return score + rpb[h, dy, dx]

    context = flex_attention(queries, keys.reshape(N, heads, Hp * Wp, D).contiguous(),
                             values.reshape(N, heads, Hp * Wp, D).contiguous(), score_mod=add_bias,
                             block_mask=block_mask, scale=scale,
                             kernel_options=kernel_options)  # (N, heads, H*W, D)

    # Cost volume: the K² keys of every query, by unfolding the padded key frame.
    windows = F.unfold(keys.permute(0, 1, 4, 2, 3).reshape(N * heads, D, Hp, Wp).float(), K)
    windows = windows.view(N, heads, D, K * K, H * W)
    affinity = torch.einsum("nhpd,nhdop->nhpo", queries.float(), windows) * scale
    affinity = affinity + rpb.float().reshape(1, heads, 1, K * K)
    motion = F.linear(quick_gelu(F.linear(affinity, w1.float(), b1.float())), w2.float(), b2.float())

    out = (context.float() + motion).view(B, -1, heads, H, W, D).permute(0, 1, 3, 4, 2, 5)
    if T > 1:  # output frame T-1 is a copy of output frame T-2
        out = torch.cat([out, out[:, -1:]], dim=1)
    return out.to(q.dtype).contiguous()
