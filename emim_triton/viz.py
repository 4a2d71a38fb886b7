"""Seeing the motion EMIM finds: motion fields from the attention of every EMIM layer, and `emim-viz`.

In an EMIM layer, each query's softmax over its K x K window in the next frame is a distribution over
displacements (dy, dx) = (i - r, j - r) to that frame. Read as such it gives, per token, head and frame pair:

    expected displacement  sum_o p[o] * (dy_o, dx_o)      a flow vector, in tokens
    peak displacement      the (dy, dx) of the largest p  the most likely displacement
    confidence             1 - entropy(p) / log(K²)       0 for a uniform window, 1 for a single entry

`motion_fields(model, clip)` runs the model once and returns these for every EMIM layer. They are computed
beside the model's own forward, from the q and k the layer sees, with the reference helpers (speed does not
matter here, and the fused kernels never form p): so the model itself may run on any backend.

    python -m emim_triton.viz --model emim_uniformer_xt --video clip.mp4 --out viz/   (or: emim-viz ...)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from .convert import GridEMIM
from .module import EMIM
from .reference import affinities, autocast_disabled, frame_pairs, gather_windows


@dataclass
class MotionField:
    """The motion one EMIM layer sees, for each frame pair (t -> t + 1), P = max(T - 1, 1) pairs.

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


def window_displacements(window: int, device=None) -> torch.Tensor:
    """(K², 2): the displacement (dy, dx) = (i - r, j - r) that window entry o = i*K + j stands for."""
    r = window // 2
    offsets = torch.arange(window, device=device, dtype=torch.float32) - r
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
    q_frames, k_frames = frame_pairs(T)
    offsets = window_displacements(K, device=q.device)
    rpb = emim.rpb.detach().float()
    probs = []
    with torch.no_grad(), autocast_disabled(q.device):
        # One frame pair at a time: the gathered key windows of a whole clip can be large (K² x keys).
        for tq, tk in zip(range(T)[q_frames], range(T)[k_frames]):
            k_windows = gather_windows(k[:, tk].float(), K, emim.pad_value)
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
            B, T, H, W = emim._layout(x, frames)
            with torch.no_grad():
                qkv = emim.qkv(x)
                if emim.num_prefix_tokens:  # a class token has no place in the grid
                    qkv = qkv[:, emim.num_prefix_tokens:]
                q, k, _ = qkv.reshape(B, T, H, W, 3, emim.num_heads, emim.head_dim).unbind(4)
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


# ----------------------------------------------------------------------------------------------------
# emim-viz: decode a clip, run a registered model, write pictures
# ----------------------------------------------------------------------------------------------------

def load_model(name: str, checkpoint: str | None = None, device: str = "cpu", backend: str = "auto") -> nn.Module:
    """A registered model, with the weights of a checkpoint if given (a plain state dict, or a dict with a
    ``model`` entry as the trainer writes; read with ``torch.load(weights_only=True)``). The class count
    is read off the checkpoint's head, so a model trained on any number of classes loads as it was."""
    from .models import create_model
    from .models.checkpoint import read_state_dict

    state = read_state_dict(checkpoint) if checkpoint else None
    num_classes = state["head.weight"].shape[0] if state is not None and "head.weight" in state else None
    model = create_model(name, num_classes=num_classes, attn_backend=backend)
    if state is not None:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise ValueError(f"checkpoint {checkpoint!r} does not fit model {name!r}: {error}") from error
    return model.to(device).eval()


def read_labels(path: str | None, num_classes: int) -> list[str]:
    """Class names: one per line, a JSON list, or a JSON {name: index} dict (SSv2's labels.json)."""
    if path is None:
        return [f"class {i}" for i in range(num_classes)]
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(data, dict):
        names = [f"class {i}" for i in range(num_classes)]
        for label, index in data.items():
            if 0 <= int(index) < num_classes:
                names[int(index)] = label
        return names
    return [str(name) for name in data] + [f"class {i}" for i in range(len(data), num_classes)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emim-viz",
        description="Show the motion EMIM layers see in a video: flow-coloured fields, arrows and a GIF.")
    parser.add_argument("--model", help="a registered model name, e.g. emim_uniformer_xt")
    parser.add_argument("--checkpoint", help="weights: a state dict, or a dict with a 'model' entry")
    parser.add_argument("--video", help="the video file to decode (anything FFmpeg reads)")
    parser.add_argument("--out", help="directory for flow.png, arrows.png and motion.gif")
    parser.add_argument("--frames", type=int, help="frames to sample uniformly over the video "
                                                   "(default: the model's num_frames)")
    parser.add_argument("--size", type=int, help="frame side after resize + centre crop (default: the model's)")
    parser.add_argument("--labels", help="class names: a text file (one per line) or JSON list / {name: index}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "reference"),
                        help="the EMIM op's backend for the model's forward (the fields use the reference)")
    parser.add_argument("--seed", type=int, default=0,
                        help="initialises the weights a checkpoint does not give (all of them without one)")
    parser.add_argument("--cell", type=int, default=128, help="side in pixels of each picture panel")
    parser.add_argument("--make-demo-clip", metavar="PATH",
                        help="only write a synthetic clip (a textured square moving at constant speed) to PATH")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .video_io import read_clip, write_demo_clip  # PyAV and Pillow are needed only by the command
    from .viz_draw import write_pictures

    if args.make_demo_clip:
        write_demo_clip(args.make_demo_clip)
        print(f"wrote {args.make_demo_clip}")
        return 0
    missing = [flag for flag in ("model", "video", "out") if getattr(args, flag) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join('--' + m for m in missing)}")

    torch.manual_seed(args.seed)
    try:
        model = load_model(args.model, args.checkpoint, args.device, args.backend)
        cfg = model.default_cfg
        if not any(isinstance(m, EMIM) for m in model.modules()):  # fail before decoding: nothing to show
            from .models import list_models

            raise ValueError(f"model {args.model!r} has no EMIM layer, so there is no motion to show; models "
                             f"with EMIM: {', '.join(list_models('emim_*'))}")
        frames, clip = read_clip(args.video, args.frames or cfg["num_frames"], args.size or cfg["img_size"],
                                 mean=cfg["mean"], std=cfg["std"])
    except (KeyError, ValueError, OSError) as error:
        print(f"emim-viz: error: {error}", file=sys.stderr)
        return 2

    with record_motion(model) as fields, torch.no_grad():
        logits = model(clip.to(args.device))
    probabilities = logits.float().softmax(-1)[0].cpu()
    labels = read_labels(args.labels, len(probabilities))
    top = probabilities.topk(min(5, len(probabilities)))
    print(f"{args.model} on {args.video}: top-{len(top.indices)} classes"
          f"{'' if args.checkpoint else ' (untrained weights: no checkpoint given)'}")
    for rank, (p, index) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
        print(f"  {rank}. {labels[index]:<30} {p:6.1%}")

    os.makedirs(args.out, exist_ok=True)
    for path in write_pictures(frames, list(fields.values()), args.out, cell=args.cell):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
