"""Tensors with the same values in other memory layouts, for the tests of strided inputs.

Every layout here keeps the values and the logical shape and changes only the strides, so a call with the
re-laid-out tensor must give what the contiguous call gives. q, k and v keep stride 1 along D (the op's
one layout rule); the parameters may take any layout.
"""

from __future__ import annotations

import torch

LAYOUTS = ("transposed", "sliced", "expanded")


def transposed(t: torch.Tensor) -> torch.Tensor:
    """The axes stored in reverse order (for q, k, v: the first five axes, D stays innermost).

    For a 2-D weight this is `w.t()` of a stored transposed weight; for rpb (heads, K, K) it is the
    layout of a Swin-style `table[index].view(K, K, heads).permute(2, 0, 1)` bias.
    """
    axes = list(range(t.dim()))
    order = axes[:5][::-1] + axes[5:] if t.dim() == 6 else axes[::-1]
    inverse = [order.index(a) for a in axes]
    return t.permute(order).contiguous().permute(inverse)


def sliced(t: torch.Tensor) -> torch.Tensor:
    """Every other element of a buffer twice as long along axis 0 (1-D), or the leading part of a wider
    last axis (2-D and up, so q, k, v keep stride 1 along D)."""
    if t.dim() == 1:
        buffer = t.new_zeros(2 * t.shape[0])
        buffer[::2] = t
        return buffer[::2]
    buffer = t.new_zeros(*t.shape[:-1], t.shape[-1] + 8)
    buffer[..., :t.shape[-1]] = t
    return buffer[..., :t.shape[-1]]


def expanded(t: torch.Tensor) -> torch.Tensor:
    """Axis 0 expanded from one stored slice (stride 0): only equal to `t` when `t` is constant along
    axis 0, so callers first make it so with `constant_along_first_axis`."""
    return t[:1].expand(t.shape)


def constant_along_first_axis(t: torch.Tensor) -> torch.Tensor:
    return t[:1].expand(t.shape).contiguous()


def relaid(t: torch.Tensor, layout: str) -> torch.Tensor:
    """`t`'s values in `layout`, as a leaf that keeps those strides (detach keeps strides)."""
    out = {"transposed": transposed, "sliced": sliced, "expanded": expanded}[layout](t.detach())
    return out.detach()
