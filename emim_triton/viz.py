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
    """Class names: one per line, a JSON list, or a JSON {name: index} dict (SSv2's labels.json).

    A file must name every class exactly once: a name too few or too many means the file belongs to
    another label set, and printing its names next to this model's scores would mislabel them.
    """
    if path is None:
        return [f"class {i}" for i in range(num_classes)]
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = lines
    if not isinstance(data, (list, dict)):  # a one-line file such as "42" parses as a JSON number
        data = lines
    if isinstance(data, list):
        if len(data) != num_classes:
            raise ValueError(f"it names {len(data)} classes and the model has {num_classes}")
        return [str(name) for name in data]
    names: list[str | None] = [None] * num_classes
    for label, index in data.items():
        try:
            index = int(index)
        except (TypeError, ValueError):
            raise ValueError(f"class {label!r} has index {index!r}; expected an integer") from None
        if not 0 <= index < num_classes:
            raise ValueError(f"class {label!r} has index {index}; the model's classes are 0 to {num_classes - 1}")
        if names[index] is not None:
            raise ValueError(f"index {index} is given to both {names[index]!r} and {label!r}")
        names[index] = label
    unnamed = [i for i, name in enumerate(names) if name is None]
    if unnamed:
        raise ValueError(f"it names {num_classes - len(unnamed)} of the model's {num_classes} classes; no name for "
                         f"index {', '.join(map(str, unnamed[:5]))}{', ...' if len(unnamed) > 5 else ''}")
    return names


def _int_at_least(low: int, high: int | None = None):
    """An argparse type: an integer in low..high (no upper limit when high is None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            expected = f">= {low}" if high is None else f"in {low}..{high}"
            raise argparse.ArgumentTypeError(f"expected an integer {expected}, got {value}")
        return value
    return parse


def _device(text: str) -> str:
    """An argparse type: a device torch can use here (its availability is checked, not only its spelling)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected a device such as cpu, cuda or cuda:1, got {text!r}") from None
    if device.type != "cpu":
        backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu: each says if it runs here
        if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: torch sees no {device.type} device here; use --device cpu")
        if device.index is not None and device.index >= backend.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: there are {backend.device_count()} {device.type} "
                                             f"devices here, numbered from 0")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emim-viz",
        description="Show the motion EMIM layers see in a video: flow-coloured fields, arrows and a GIF.")
    parser.add_argument("--model", help="a registered model name, e.g. emim_uniformer_xt")
    parser.add_argument("--checkpoint", help="weights: a state dict, or a dict with a 'model' entry")
    parser.add_argument("--video", help="the video file to decode (anything FFmpeg reads)")
    parser.add_argument("--out", help="directory for flow.png, arrows.png and motion.gif (created if missing)")
    parser.add_argument("--frames", type=_int_at_least(1),
                        help="frames to sample uniformly over the video, at most as many as it has "
                             "(default: the model's num_frames)")
    parser.add_argument("--size", type=_int_at_least(1),
                        help="frame side after resize + centre crop (default: the model's)")
    parser.add_argument("--labels", help="class names: a text file (one per line) or JSON list / {name: index}, "
                                         "one name for each of the model's classes")
    parser.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "reference"),
                        help="the EMIM op's backend for the model's forward (the fields use the reference)")
    parser.add_argument("--seed", type=int, default=0,
                        help="initialises the weights a checkpoint does not give (all of them without one)")
    # Below 16 pixels the legend disc and the arrows have no room; above 1024 a sheet of many frames
    # runs to gigabytes while each token only gets more pixels.
    parser.add_argument("--cell", type=_int_at_least(16, 1024), default=128,
                        help="side in pixels of each picture panel, 16..1024 (default 128)")
    parser.add_argument("--make-demo-clip", metavar="PATH",
                        help="only write a synthetic clip (a textured square moving at constant speed) to PATH "
                             "(.mp4, .mkv, .mov, .avi or .webm); takes no other flag")
    return parser


_PICTURES = ("flow.png", "arrows.png", "motion.gif")


def _check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The checks that need no model and no video, so that a bad flag costs nothing."""
    from .bench.paths import directory_problem
    from .functional import interpreter_enabled

    missing = [flag for flag in ("model", "video", "out") if getattr(args, flag) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join('--' + m for m in missing)}")
    device = torch.device(args.device)
    if args.backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and interpreter_enabled()):
        parser.error(f"--backend triton runs the fused kernels on a CUDA GPU and --device is {args.device}; use "
                     f"--backend reference (or auto), or set TRITON_INTERPRET=1 for Triton's slow CPU interpreter")
    problem = directory_problem(args.out)
    if problem is None:
        taken = [name for name in _PICTURES if os.path.isdir(os.path.join(args.out, name))]
        problem = f"holds a directory named {taken[0]}, where that picture would go" if taken else None
    if problem:
        parser.error(f"--out {args.out!r}: {problem}; expected a directory to write {', '.join(_PICTURES)} into")
    if args.labels is not None and not os.path.isfile(args.labels):
        parser.error(f"--labels {args.labels!r}: no such file")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .bench.paths import file_problem
    from .video_io import clip_from_frames, decode_video, write_demo_clip  # PyAV and Pillow: only the command
    from .viz_draw import write_pictures

    if args.make_demo_clip is not None:
        others = ["--" + name.replace("_", "-") for name, value in vars(args).items()
                  if name != "make_demo_clip" and value != parser.get_default(name)]
        if others:
            parser.error(f"--make-demo-clip only writes the demo clip; it takes no other flag, got {', '.join(others)}")
        problem = file_problem(args.make_demo_clip)
        if problem:
            parser.error(f"--make-demo-clip {args.make_demo_clip!r}: {problem}")
        try:
            write_demo_clip(args.make_demo_clip)
        except ValueError as error:
            parser.error(f"--make-demo-clip: {error}")
        print(f"wrote {args.make_demo_clip}")
        return 0
    _check_flags(parser, args)

    torch.manual_seed(args.seed)
    try:
        model = load_model(args.model, args.checkpoint, args.device, args.backend)
        cfg = model.default_cfg
        if not any(isinstance(m, EMIM) for m in model.modules()):  # fail before decoding: nothing to show
            from .models import list_models

            raise ValueError(f"model {args.model!r} has no EMIM layer, so there is no motion to show; models "
                             f"with EMIM: {', '.join(list_models('emim_*'))}")
    except (KeyError, ValueError, OSError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error  # KeyError adds quotes
        print(f"emim-viz: error: {message}", file=sys.stderr)
        return 2
    size = args.size if args.size is not None else cfg["img_size"]
    min_size = getattr(model, "min_size", 1)  # UniFormer's total spatial stride
    if size < min_size:
        parser.error(f"--size {size}: {args.model} needs frames of at least {min_size} pixels (its total stride)")
    try:
        labels = read_labels(args.labels, cfg["num_classes"])
    except (OSError, ValueError) as error:  # UnicodeDecodeError is a ValueError
        parser.error(f"--labels {args.labels!r}: {error}")

    try:
        decoded = decode_video(args.video)
    except ValueError as error:
        print(f"emim-viz: error: {error}", file=sys.stderr)
        return 2
    num_frames = args.frames if args.frames is not None else cfg["num_frames"]
    if num_frames > len(decoded):  # repeating frames would show motion the video does not have
        asked = (f"--frames {num_frames}" if args.frames is not None
                 else f"--frames (default: {args.model}'s {num_frames})")
        parser.error(f"{asked}: the video {args.video!r} has only {len(decoded)} frames; expected --frames "
                     f"{len(decoded)} or fewer")
    frames, clip = clip_from_frames(decoded, num_frames, size, mean=cfg["mean"], std=cfg["std"])

    with record_motion(model) as fields, torch.no_grad():
        logits = model(clip.to(args.device))
    probabilities = logits.float().softmax(-1)[0].cpu()
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
