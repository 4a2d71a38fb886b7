"""A generated motion-sensitive video dataset, written to disk in the Something-Something V2 layout.

Every clip shows a textured object on a textured background. The classes differ **only in how the object
moves**, and each class is the time reversal of its partner, so that frame order is needed to tell them
apart:

    0/1  moving left to right / right to left        direction
    2/3  turning clockwise / counterclockwise        rotation sense
    4/5  moving closer / away (growing / shrinking)  approach vs recede
    6/7  speeding up / slowing down (any direction)  forward vs time-reversed (same path, either way)
    8/9  moving up / down                            direction

Nothing in a single frame tells the class: the colours, textures, shape, size, orientation and place of
object and background are drawn at random per clip, with the same ranges for both classes of a pair. Only
the change between frames — direction, sense, sign of the size change, growth or decay of the speed —
carries the label. (A position seen at a known time is a weak hint for translations — the object tends to
start on the side it leaves — but that, too, is motion.) Per frame the object moves 6-9 px or turns
20-30 degrees: about one stage-3 token of the tiny models (8 px at 64 px input), inside EMIM's 7 x 7
window, and beyond the reach of a single 3 x 3 or 5 x 5 convolution at the earlier stages' resolutions.

``--classes N`` keeps the first N classes (the main job uses 4: in its ten-minute CPU budget neither tiny
model gets off chance on 6 or more, see README).

Layout (what the trainer's ``ssv2`` format reads, so the demo goes through the real data path):

    <root>/videos/<id>.webm                              VP9, 12 fps, 8-12 frames of size x size
    <root>/something-something-v2-labels.json           {"Moving something from left to right": "0", ...}
    <root>/something-something-v2-{train,validation}.json   [{"id", "label", "template", "placeholders"}]
    <root>/meta.json                                     the generator's parameters (the cache key)

    python -m emim_triton.data.motion --out data/motion --train 1000 --val 200 --classes 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from ..video_io import write_video
from .seeding import generator

VERSION = 4  # bump when the rendering changes, so cached datasets are regenerated
FPS = 12
DEFAULT_TRAIN, DEFAULT_VAL = 1000, 200
OBJECTS = (1, 1)          # objects per clip (min, max), all moving the same way
RADIUS = (0.2, 0.3)       # object radius, fraction of the frame side
MARGIN = 0.0              # how far inside the borders the centre stays (fraction of the side): 0 lets an
                          # object be half out of view, which is what lets it move fast in a small frame
SPEED = (6.0, 9.0)        # px per frame
TURN = (20.0, 30.0)       # degrees per frame
ZOOM = (2.5, 3.5)         # size ratio over the clip
FAST = (10.0, 13.0)       # px per frame at the fast end of speeding up / slowing down

# (template, motion kind, parameter): the parameter is the direction angle in degrees for "translate"
# (image coordinates, y pointing down: 90 is down), the sign of rotation or of size change, or of acceleration.
CLASSES = [
    ("Moving [something] from left to right", "translate", 0.0),
    ("Moving [something] from right to left", "translate", 180.0),
    ("Turning [something] clockwise", "rotate", 1.0),
    ("Turning [something] counterclockwise", "rotate", -1.0),
    ("Moving [something] closer", "scale", 1.0),
    ("Moving [something] away", "scale", -1.0),
    ("Speeding up [something]", "accelerate", 1.0),
    ("Slowing down [something]", "accelerate", -1.0),
    ("Moving [something] up", "translate", 270.0),
    ("Moving [something] down", "translate", 90.0),
]


def _uniform(gen: torch.Generator, low: float, high: float, *shape) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape or (1,), generator=gen)


def _colours(gen: torch.Generator, n: int) -> torch.Tensor:
    """n random RGB colours in [0, 1], (n, 3, 1, 1)."""
    return torch.rand(n, 3, 1, 1, generator=gen)


def _background(gen: torch.Generator, size: int) -> torch.Tensor:
    """A smooth random blend of two random colours plus fine grain, (3, size, size)."""
    colours = _colours(gen, 2)
    blend = F.interpolate(torch.rand(1, 1, 4, 4, generator=gen), size=(size, size), mode="bicubic",
                          align_corners=False)[0].clamp(0, 1)
    grain = 0.05 * torch.randn(1, size, size, generator=gen)
    return (colours[0] * blend + colours[1] * (1 - blend) + grain).clamp(0, 1)


def _object(gen: torch.Generator, canvas: int = 32) -> tuple[torch.Tensor, torch.Tensor, str]:
    """A textured object: RGB texture (3, c, c), alpha mask (1, c, c) over [-1, 1]^2, and its description."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, canvas), torch.linspace(-1, 1, canvas), indexing="ij")
    angle = float(_uniform(gen, 0, math.pi))
    frequency = float(_uniform(gen, 2.0, 4.5))
    pattern = int(torch.randint(3, (1,), generator=gen))
    u = x * math.cos(angle) + y * math.sin(angle)
    v = -x * math.sin(angle) + y * math.cos(angle)
    if pattern == 0:
        value, name = (torch.sin(math.pi * frequency * u) > 0).float(), "striped"
    elif pattern == 1:
        value = ((torch.sin(math.pi * frequency * u) > 0) ^ (torch.sin(math.pi * frequency * v) > 0)).float()
        name = "checkered"
    else:  # blotches: smooth noise, thresholded
        noise = F.interpolate(torch.rand(1, 1, 5, 5, generator=gen), size=(canvas, canvas), mode="bicubic",
                              align_corners=False)[0, 0]
        value, name = (noise > noise.median()).float(), "spotted"
    colours = _colours(gen, 2)
    texture = colours[0] * value + colours[1] * (1 - value)
    if int(torch.randint(2, (1,), generator=gen)):
        mask, shape = ((x ** 2 + y ** 2).sqrt() < 0.95).float(), "disc"
    else:
        mask, shape = ((x.abs() < 0.8) & (y.abs() < 0.8)).float(), "square"
    # a dark rim so the object stands out from any background, whatever the colours drawn
    rim = (F.max_pool2d(mask[None, None], 3, 1, 1)[0, 0] - (-F.max_pool2d(-mask[None, None], 3, 1, 1))[0, 0])
    texture = texture * (1 - 0.6 * rim)
    return texture, mask[None], f"a {name} {shape}"


def trajectory(kind: str, parameter: float, frames: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Per-frame centre offset (x, y) in pixels from the clip's middle position, rotation (radians) and scale.

    Speeds are per generated frame; the clips have about as many frames as a model samples (8-12 vs 8), so
    they are also about the displacement between the frames a model sees. Rotation is relative to each
    object's own random orientation.
    """
    t = torch.arange(frames, dtype=torch.float32)
    middle = (frames - 1) / 2
    offset = torch.zeros(frames, 2)
    angle = torch.zeros(frames)  # relative to each object's own random orientation
    scale = torch.ones(frames)
    if kind == "translate":
        direction = math.radians(parameter) + float(_uniform(gen, -0.25, 0.25))
        speed = float(_uniform(gen, *SPEED))
        offset = speed * (t - middle)[:, None] * torch.tensor([math.cos(direction), math.sin(direction)])
    elif kind == "rotate":
        rate = math.radians(float(_uniform(gen, *TURN)))
        angle = parameter * rate * (t - middle)
    elif kind == "scale":
        ratio = float(_uniform(gen, *ZOOM))  # last size / first size (or its inverse)
        scale = torch.exp(parameter * math.log(ratio) * (t - middle) / (frames - 1))
    elif kind == "accelerate":
        direction = float(_uniform(gen, 0, 2 * math.pi))
        slow, fast = float(_uniform(gen, 0.0, 1.0)), float(_uniform(gen, *FAST))
        speeds = slow + (fast - slow) * t / (frames - 1)
        if parameter < 0:
            speeds = speeds.flip(0)
        distance = torch.cat([torch.zeros(1), speeds[:-1].cumsum(0)])
        distance = distance - distance[int(middle)]
        offset = distance[:, None] * torch.tensor([math.cos(direction), math.sin(direction)])
    else:
        raise ValueError(f"unknown motion kind {kind!r}")
    return dict(offset=offset, angle=angle, scale=scale)


def _shrink(offset: torch.Tensor, extent: torch.Tensor, size: int) -> float:
    """Factor (<= 1) that makes a trajectory short enough for the object to stay inside the frame."""
    span = float((offset.amax(0) - offset.amin(0)).max())
    room = size - 2 * float(extent.max())
    return 1.0 if span <= room else max(room / span, 0.0) * 0.999


def _place(offset: torch.Tensor, extent: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """A random middle position that keeps the object (half-size `extent` per frame) inside the frame all
    clip long, for the trajectory `offset` shrunk by `_shrink`."""
    offset = offset * _shrink(offset, extent, size)
    low = (extent[:, None] - offset).amax(0)
    high = (size - extent[:, None] - offset).amin(0)
    return low + (high - low).clamp_min(0) * torch.rand(2, generator=gen)


def render_clip(label: int, gen: torch.Generator, size: int = 64) -> tuple[np.ndarray, str]:
    """One clip of class `label`: (T, size, size, 3) uint8 frames and a description of its objects
    (`OBJECTS` of them, each with its own look, size, orientation and place, all moving the same way)."""
    _, kind, parameter = CLASSES[label]
    frames = int(torch.randint(8, 13, (1,), generator=gen))
    video = _background(gen, size)[None].expand(frames, -1, -1, -1)
    motion = trajectory(kind, parameter, frames, gen)
    pixels = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="xy"), -1).float() + 0.5
    descriptions = []
    for _ in range(int(torch.randint(OBJECTS[0], OBJECTS[1] + 1, (1,), generator=gen))):
        texture, mask, description = _object(gen)
        descriptions.append(description)
        radius = float(_uniform(gen, *RADIUS)) * size
        angle = motion["angle"] + float(_uniform(gen, 0, 2 * math.pi))
        # how far the centre must stay from the borders: the whole object for small ones (a rotated square's
        # corner reaches 0.8 * sqrt(2) of the radius); large ones may extend past the frame
        extent = torch.clamp(1.15 * radius * motion["scale"], max=MARGIN * size)
        centres = _place(motion["offset"].clone(), extent, size, gen)
        centres = centres + motion["offset"] * _shrink(motion["offset"], extent, size)    # (T, 2)
        # Where each output pixel falls in the object's own [-1, 1]^2 frame, per time step: the offset from
        # its centre, rotated back, divided by its (scaled) radius; then paint it over what is there.
        delta = pixels[None] - centres[:, None, None]                                 # (T, H, W, 2)
        cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
        local = torch.stack([cos * delta[..., 0] + sin * delta[..., 1], -sin * delta[..., 0] + cos * delta[..., 1]], -1)
        local = local / (radius * motion["scale"])[:, None, None, None]
        rgba = torch.cat([texture, mask])[None].expand(frames, -1, -1, -1)
        sampled = F.grid_sample(rgba, local, mode="bilinear", padding_mode="zeros", align_corners=False)
        alpha = sampled[:, 3:]
        video = alpha * sampled[:, :3] + (1 - alpha) * video
    video = video + 0.02 * torch.randn(video.shape, generator=gen)  # sensor noise, new in every frame
    return (video.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy(), " and ".join(descriptions)


def write_webm(path: str, frames: np.ndarray, fps: int = FPS) -> None:
    """VP9 in WebM (the SSv2 container), near-lossless and fast (realtime preset)."""
    write_video(path, frames, fps=fps, crf=18, realtime=True)


def _make(job: tuple) -> dict:
    root, split, number, seed, size, num_classes = job
    torch.set_num_threads(1)
    label = number % num_classes
    frames, description = render_clip(label, generator(seed, "motion", split, number), size)
    video_id = f"{split[0]}{number:05d}"
    write_webm(os.path.join(root, "videos", f"{video_id}.webm"), frames)
    template = CLASSES[label][0]
    return {"id": video_id, "label": template.replace("[something]", description), "template": template,
            "placeholders": [description]}


def generate(root: str, train: int = DEFAULT_TRAIN, val: int = DEFAULT_VAL, size: int = 64, seed: int = 0,
             num_classes: int = len(CLASSES), workers: int | None = None) -> bool:
    """Write the dataset under `root` unless an identical one is there. Returns True if it was written."""
    if not 2 <= num_classes <= len(CLASSES):
        raise ValueError(f"num_classes must be in 2..{len(CLASSES)}, got {num_classes}")
    meta = dict(version=VERSION, train=train, val=val, size=size, seed=seed, num_classes=num_classes)
    meta_path = os.path.join(root, "meta.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as handle:
            if json.load(handle) == meta:
                return False
        os.remove(meta_path)  # another configuration: regenerate everything, meta.json last
    os.makedirs(os.path.join(root, "videos"), exist_ok=True)
    start = time.time()
    jobs = {split: [(root, split, i, seed, size, num_classes) for i in range(count)]
            for split, count in (("train", train), ("validation", val))}
    workers = workers or min(os.cpu_count() or 1, 8)
    with ProcessPoolExecutor(workers) as pool:
        for split, split_jobs in jobs.items():
            entries = list(pool.map(_make, split_jobs, chunksize=16))
            with open(os.path.join(root, f"something-something-v2-{split}.json"), "w") as handle:
                json.dump(entries, handle, indent=1)
    labels = {template.replace("[", "").replace("]", ""): str(i) for i, (template, _, _) in
              enumerate(CLASSES[:num_classes])}
    with open(os.path.join(root, "something-something-v2-labels.json"), "w") as handle:
        json.dump(labels, handle, indent=1)
    with open(meta_path, "w") as handle:
        json.dump(meta, handle)
    print(f"motion dataset: {train} + {val} clips of {num_classes} classes written to {root} "
          f"in {time.time() - start:.0f} s")
    return True


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/motion", help="dataset root (default: data/motion)")
    parser.add_argument("--train", type=int, default=DEFAULT_TRAIN, help="training clips")
    parser.add_argument("--val", type=int, default=DEFAULT_VAL, help="validation clips")
    parser.add_argument("--size", type=int, default=64, help="frame side in pixels")
    parser.add_argument("--classes", type=int, default=len(CLASSES), help="use the first N classes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPU count, at most 8)")
    args = parser.parse_args(argv)
    if not generate(args.out, args.train, args.val, args.size, args.seed, args.classes, args.workers):
        print(f"motion dataset in {args.out} is up to date")


if __name__ == "__main__":
    main()
