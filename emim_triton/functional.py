"""`emim_attention`: the public op, and the choice between the fused kernels and the reference."""

from __future__ import annotations

import torch

from .checks import check_fused_inputs, check_inputs, check_options, check_variant
from .environment import BACKENDS, interpreter_enabled
from .reference import emim_reference_checked


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> 'triton' (the fused kernels) for CUDA tensors, 'reference' for anything else.

    TRITON_INTERPRET=1 does not steer 'auto': the interpreter is a test harness's switch, and a user's model
    on the CPU should not run the kernels one program at a time because of it. Ask for backend='triton' to
    run the kernels in the interpreter.
    """
    if backend not in BACKENDS:
        raise ValueError(f"emim_attention: backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    return "triton" if device.type == "cuda" else "reference"


def emim_attention(q, k, v, rpb, w1, b1, w2, b2, *, scale=None, pad_value=1e-6, backend="auto",
                   direction="next", dilation=1, authors_context_channels=None):
    """EMIM attention: local window attention to the next (or previous) frame plus motion features from
    the cost volume.

    Args:
        q, k, v: (B, T, H, W, heads, D), any strides with stride 1 along D (e.g. the three views
            ``qkv.view(B, T, H, W, 3, heads, D).unbind(4)`` of a qkv projection, read without copies).
        rpb: (heads, K, K) relative-position bias; K (odd, 3..15) is read from it.
        w1 (4K², K²), b1 (4K²,), w2 (D, 4K²), b2 (D,): the motion MLP (nn.Linear convention).
            float32 or q's dtype (mixed precision keeps float32 master weights).
        scale: attention scale, a number (default D ** -0.5); not a tensor: the op gives no gradient
            for it.
        pad_value: value of keys and values outside the frame (the authors' constant padding).
        backend: "auto" (the fused kernels for CUDA tensors, else the reference), "triton" (the fused
            kernels; CPU tensors need TRITON_INTERPRET=1, the interpreter) or "reference" (plain PyTorch).
        direction: "next" (the paper: output frame t attends to frame t+1, the last output frame copies the
            one before) or "prev" (causal: frame t attends to frame t-1, frame 0 to itself; output frame t
            depends on frames <= t only).
        dilation: an int >= 1; window entry (i, j) is displacement ((i - r) * dilation, (j - r) * dilation),
            so the window spans (K - 1) * dilation + 1 tokens at the cost of K x K.
        authors_context_channels: None (the definition, over all D channels) or 32: the authors' CUDA
            kernels' behaviour, for their checkpoints: context channels >= 32 of each head are zero (motion
            unchanged), and q, k, v get no gradient in those channels. Changes nothing when D <= 32.
    Returns:
        (B, T, H, W, heads, D) contiguous tensor in q's dtype; ``.view(B, T*H*W, heads*D)`` is free.
    """
    check_inputs(q, k, v, rpb, w1, b1, w2, b2)
    check_options(scale, pad_value)
    check_variant(direction, dilation, authors_context_channels)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    variant = dict(direction=direction, dilation=int(dilation))
    if resolve_backend(backend, q.device) == "reference":
        return emim_reference_checked(q, k, v, rpb, w1, b1, w2, b2, scale=scale, pad_value=pad_value,
                                      authors_context_channels=authors_context_channels, **variant)
    check_fused_inputs(q, interpreter_enabled())
    from .ops import emim_fused  # imported here: the reference path must not need a Triton build

    # The kernels take the switch as a channel count, 0 meaning "all D channels" (the definition).
    return emim_fused(q, k, v, rpb, w1, b1, w2, b2, scale=float(scale), pad_value=float(pad_value),
                      context_channels=int(authors_context_channels or 0), **variant)
