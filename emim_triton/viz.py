"""`emim-viz`: decode a clip, run a registered model, and draw the motion field of every EMIM layer
(computed by emim_triton/motion_field.py; drawn by emim_triton/viz_draw.py).

    python -m emim_triton.viz --model emim_uniformer_xt --video clip.mp4 --out viz/   (or: emim-viz ...)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn as nn

from .checks import DIRECTIONS
from .environment import BACKENDS
from .module import EMIM
from .motion_field import record_motion


# ----------------------------------------------------------------------------------------------------
# emim-viz: decode a clip, run a registered model, write pictures
# ----------------------------------------------------------------------------------------------------

def load_model(name: str, checkpoint: str | None = None, device: str = "cpu", backend: str = "auto",
               **emim_options) -> nn.Module:
    """A registered model, with the weights of a checkpoint if given (a plain state dict, or a dict with a
    ``model`` entry as the trainer writes; read with ``torch.load(weights_only=True)``). The class count
    is read off the checkpoint's head, so a model trained on any number of classes loads as it was.
    ``emim_options`` (``direction``, ``dilation``) configure the model's EMIM layers."""
    from .models import create_model
    from .models.pretrained import read_state_dict

    state = read_state_dict(checkpoint) if checkpoint else None
    num_classes = state["head.weight"].shape[0] if state is not None and "head.weight" in state else None
    model = create_model(name, num_classes=num_classes, attn_backend=backend, **emim_options)
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
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="the EMIM op's backend for the model's forward (the fields use the reference)")
    parser.add_argument("--direction", default="next", choices=DIRECTIONS,
                        help="the EMIM layers' frame pairing: next (the paper: frame t -> t+1) or prev "
                             "(causal: frame t -> t-1)")
    parser.add_argument("--dilation", type=_int_at_least(1), default=1,
                        help="the EMIM layers' window dilation: entries DILATION tokens apart, so the window "
                             "reaches (K-1)/2 * DILATION tokens (default 1)")
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




def _check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The checks that need no model and no video, so that a bad flag costs nothing."""
    from .output_paths import directory_problem
    from .checks import fused_kernels_run_on
    from .environment import interpreter_enabled
    from .viz_draw import PICTURES

    missing = [flag for flag in ("model", "video", "out") if getattr(args, flag) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join('--' + m for m in missing)}")
    device = torch.device(args.device)
    if args.backend == "triton" and not fused_kernels_run_on(device, interpreter_enabled()):
        parser.error(f"--backend triton runs the fused kernels on a CUDA GPU and --device is {args.device}; use "
                     f"--backend reference (or auto), or set TRITON_INTERPRET=1 for Triton's slow CPU interpreter")
    problem = directory_problem(args.out)
    if problem is None:
        taken = [name for name in PICTURES if os.path.isdir(os.path.join(args.out, name))]
        problem = f"holds a directory named {taken[0]}, where that picture would go" if taken else None
    if problem:
        parser.error(f"--out {args.out!r}: {problem}; expected a directory to write {', '.join(PICTURES)} into")
    if args.labels is not None and not os.path.isfile(args.labels):
        parser.error(f"--labels {args.labels!r}: no such file")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .output_paths import file_problem
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
        model = load_model(args.model, args.checkpoint, args.device, args.backend, direction=args.direction,
                           dilation=args.dilation)
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
