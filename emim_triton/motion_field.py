"""The motion an EMIM layer sees: motion fields read off its attention.

In an EMIM layer, each query's softmax over its K x K window in the next frame (the previous one for
direction "prev") is a distribution over displacements (dy, dx) = ((i - r) d, (j - r) d) to that frame
(d = the layer's dilation). Read as such it gives, per token, head and frame pair:

    expected displacement  sum_o p[o] * (dy_o, dx_o)      a flow vector, in tokens
    peak displacement      the (dy, dx) of the largest p  the most likely displacement
    confidence             1 - entropy(p) / log(K²)       0 for a uniform window, 1 for a single entry

`motion_fields(model, clip)` runs the model once and returns these for every EMIM layer. They are computed
beside the model's own forward, from the q and k the layer sees (`EMIM.qkv_views`), with the reference helpers
(speed does not matter here, and the fused kernels never form p): so the model itself may run on any backend.
`emim-viz` (emim_triton/viz.py) draws them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from .convert import GridEMIM
from .module import EMIM
from .reference import affinities, autocast_disabled, frame_pairs, gather_windows


@dataclass
class MotionField:
    """The motion one EMIM layer sees, for each frame pair it computes: t -> t + 1 for P = max(T - 1, 1)
    pairs (direction "next"), or t -> t - 1 for P = T pairs (direction "prev"; frame 0 -> 0).

    Displacements are (dy, dx) in tokens of the layer's grid (y down, x right); multiply by the layer's
    stride in pixels to get pixels. The head-averaged entries describe the heads' mixture (the mean of
    their distributions): its expected displacement is the mean of the heads', its confidence is lower
    when the heads disagree.
    """

    name: str
    grid: tuple[int, int, int]          # T, H, W of the layer's tokens
    window: int
    displacement: torch.Tensor          # (B, P, H, W, heads, 2) expected (dy, dx) per head
    peak: torch.Tensor                  # (B, P, H, W, heads, 2) most likely (dy, dx) per head
    confidence: torch.Tensor            # (B, P, H, W, heads)
    mean_displacement: torch.Tensor     # (B, P, H, W, 2) of the heads' mixture
    mean_confidence: torch.Tensor       # (B, P, H, W) of the heads' mixture
    direction: str = "next"             # the layer's pairing: pair n is frame n -> n + 1, or n -> n - 1 ("prev")
    dilation: int = 1                   # the layer's window dilation (displacements are in tokens already)


def window_displacements(window: int, device=None, dilation: int = 1) -> torch.Tensor:
    """(K², 2): the displacement (dy, dx) = ((i - r) d, (j - r) d) that window entry o = i*K + j stands for."""
    r = window // 2
    offsets = (torch.arange(window, device=device, dtype=torch.float32) - r) * dilation
    dy, dx = torch.meshgrid(offsets, offsets, indexing="ij")
    return torch.stack([dy.reshape(-1), dx.reshape(-1)], dim=-1)


def _confidence(p: torch.Tensor) -> torch.Tensor:
    """1 - entropy / log(K²) over the last axis (0 * log 0 taken as 0)."""
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
    return 1 - entropy / math.log(p.shape[-1])


def field_from_qk(q: torch.Tensor, k: torch.Tensor, emim: EMIM, name: str = "") -> MotionField:
    """The motion field of one EMIM layer from its q and k, (B, T, H, W, heads, D) each."""
    B, T, H, W, heads, D = q.shape
    K = emim.window
    offsets = window_displacements(K, device=q.device, dilation=emim.dilation)
    rpb = emim.rpb.detach().float()
    probs = []
    with torch.no_grad(), autocast_disabled(q.device):
        # One frame pair at a time: the gathered key windows of a whole clip can be large (K² x keys).
        for tq, tk in zip(*frame_pairs(T, emim.direction)):
            k_windows = gather_windows(k[:, tk].float(), K, emim.pad_value, emim.dilation)
            a = affinities(q[:, tq].float(), k_windows, rpb, emim.scale)
            probs.append(torch.softmax(a, dim=-1))
        p = torch.stack(probs, dim=1)                              # (B, P, H, W, heads, K²)
        mixture = p.mean(dim=-2)                                   # (B, P, H, W, K²)
        return MotionField(
            name=name, grid=(T, H, W), window=K,
            displacement=p @ offsets,
            peak=offsets[p.argmax(dim=-1)],
            confidence=_confidence(p),
            mean_displacement=mixture @ offsets,
            mean_confidence=_confidence(mixture),
            direction=emim.direction, dilation=emim.dilation,
        )


def emim_layers(model: nn.Module) -> dict[str, EMIM]:
    """The EMIM modules of a model by name; a clear error when there is none."""
    layers = {name or "(model)": m for name, m in model.named_modules() if isinstance(m, EMIM)}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no EMIM layer, so there is no motion to show: use an "
                         f"emim_* model from emim_triton.models, or convert yours with "
                         f"emim_triton.convert_to_emim")
    return layers


@contextlib.contextmanager
def record_motion(model: nn.Module) -> Iterator[dict[str, MotionField]]:
    """Within the context, every forward of an EMIM layer of ``model`` stores its `MotionField` (the last
    call of each layer wins) in the dict this yields.

        with record_motion(model) as fields:
            logits = model(clip)
    """
    fields: dict[str, MotionField] = {}

    def make_hook(name: str):
        def hook(emim: EMIM, args, kwargs):
            x = args[0] if args else kwargs["x"]
            frames = kwargs.get("frames")
            if frames is None:  # a converted layer knows its grid; EMIM.forward(x, frames) may be positional
                frames = emim.grid if isinstance(emim, GridEMIM) else (args[1] if len(args) > 1 else None)
            with torch.no_grad():
                q, k, _ = emim.qkv_views(x, frames)  # a class token has no place in the grid: left out
            fields[name] = field_from_qk(q, k, emim, name)
        return hook

    handles = [m.register_forward_pre_hook(make_hook(name), with_kwargs=True)
               for name, m in emim_layers(model).items()]
    try:
        yield fields
    finally:
        for handle in handles:
            handle.remove()


def motion_fields(model: nn.Module, clip: torch.Tensor, **forward_kwargs) -> dict[str, MotionField]:
    """Run ``model(clip, **forward_kwargs)`` once (eval mode, no gradients) and return the motion field of
    every EMIM layer, by module name, in the order the layers ran."""
    was_training = model.training
    model.eval()
    try:
        with record_motion(model) as fields, torch.no_grad():
            model(clip, **forward_kwargs)
    finally:
        model.train(was_training)
    if not fields:
        raise ValueError(f"no EMIM layer of {type(model).__name__} ran in this forward pass")
    return fields
