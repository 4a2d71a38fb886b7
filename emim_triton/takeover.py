"""What an EMIM layer takes over from the attention module it replaces, and the refusal of everything else.

Replacing a module discards whatever the replacement does not copy, so `EMIM.from_attention` and
`convert_to_emim` both ask here first: each parameter and buffer of the old module is either one the new layer
takes over (`TAKEN_OVER`) or named in a ValueError before anything is replaced.
"""

from __future__ import annotations

import torch
import torch.nn as nn

# Biases some attention modules keep beside a bias-free qkv projection (timm's BEiT and EVA: q_bias and v_bias
# parameters, k_bias a buffer of zeros or absent), added to q, k and v.
SEPARATE_BIASES = ("q_bias", "k_bias", "v_bias")

# The parameters and buffers, by name relative to the attention module, that each layout's EMIM layer takes
# over. Replacing the module drops everything else, so anything else is refused.
_LINEAR = ("weight", "bias")
TAKEN_OVER = {
    "timm": {*(f"{p}.{t}" for p in ("qkv", "proj") for t in _LINEAR), *SEPARATE_BIASES},
    "hf-split": {*(f"attention.{p}.{t}" for p in ("query", "key", "value") for t in _LINEAR),
                 *(f"attention.{b}" for b in SEPARATE_BIASES), "output.dense.weight", "output.dense.bias"},
    "hf-proj": {f"{p}.{t}" for p in ("q_proj", "k_proj", "v_proj", "o_proj") for t in _LINEAR},
}
TAKEN_OVER["uniformer"] = TAKEN_OVER["timm"]

_RELATIVE_POSITION = (" A relative position bias over the layer's tokens (BEiT, timm's RelPos ViTs) has no place "
                      "in EMIM, whose only position bias is its own K x K next-frame window bias, rpb.")


def refuse_what_is_not_taken_over(attn: nn.Module, layout: str) -> None:
    """Raise ValueError if ``attn`` has a parameter or buffer that its EMIM layer (``layout``) cannot take over.

    Replacing a module discards whatever the replacement does not copy, so each parameter and buffer must be
    one `TAKEN_OVER` lists for the layout; the others are named in the error, never silently lost. Swin-style
    window attention is refused first with its own reason: even its qkv and proj act on another token set.
    """
    if "WindowAttention" in type(attn).__name__ or hasattr(attn, "window_area"):
        raise ValueError(f"{type(attn).__name__} is window attention (Swin): its block cuts the feature map into "
                         f"windows, shifted every other block and masked, and the layer attends within one "
                         f"window's tokens, not over the clip's T*H*W grid; EMIM cannot represent it")
    taken = TAKEN_OVER[layout]
    left = [f"{name} ({kind})" for kind, named in (("parameter", attn.named_parameters()),
                                                   ("buffer", attn.named_buffers()))
            for name, _ in named if name not in taken]
    if left:
        relative = any("relative_position" in name or name.startswith("rel_pos.") for name in left)
        why = _RELATIVE_POSITION if relative else ""
        raise ValueError(f"{type(attn).__name__} has parameters or buffers EMIM cannot take over: "
                         f"{', '.join(left)}; converting the layer would drop them.{why} "
                         f"Leave the layer out (layers=...), or, to drop them on purpose, set those attributes "
                         f"of the layer to None before converting")


def combined_qkv_bias(attn: nn.Module) -> torch.Tensor | None:
    """The bias of a timm-style module's qkv projection as one (3C,) tensor, or None if it has none.

    That is ``qkv.bias`` plus [q_bias; k_bias; v_bias] (`SEPARATE_BIASES`, a missing one counting as zero),
    the bias BEiT's and EVA's forward add to ``qkv(x)``.
    """
    qkv = attn.qkv
    dim = qkv.in_features
    separate = [getattr(attn, name, None) for name in SEPARATE_BIASES]
    for name, bias in zip(SEPARATE_BIASES, separate):
        if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (dim,)):
            shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"{name} must be None or a tensor of shape ({dim},) (one bias per channel of "
                             f"{name[0]}), got {shape}")
    if qkv.bias is None and all(bias is None for bias in separate):
        return None
    zeros = qkv.weight.new_zeros(dim)
    total = torch.cat([zeros if bias is None else bias.to(zeros) for bias in separate])
    return (total if qkv.bias is None else total + qkv.bias).detach()
