"""Clip transforms as small tensor operations on (C, T, H, W): one random draw per clip, applied to all frames.

Written here rather than taken from torchvision because torchvision has no CPU wheel matching the pinned
torch on the machines this project targets, and pulling it in would pull a CUDA torch. Every frame of a
clip gets the same crop, flip and erased box: per-frame randomness would add fake motion.

Training: random resized crop (area fraction `scale`, aspect ratio `ratio`, log-uniform) resized to
size x size, optional horizontal flip (never on Something-Something: it swaps "left" and "right" classes),
normalisation, optional random erasing. Test: resize the short side to `size`, then 1 centre crop or 3
crops along the long side (start, centre, end), normalisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

Box = tuple[int, int, int, int]  # top, left, height, width


def to_clip(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 frames -> a (3, T, H, W) uint8 view (no copy)."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2)


def random_resized_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                       generator: torch.Generator) -> Box:
    """A box covering a random fraction `scale` of the frame with a random aspect ratio (w / h) in `ratio`.

    Ten tries to fit the drawn box inside the frame; after that, the largest centred box whose ratio is
    clamped into `ratio` (so tiny or extreme frames still get a valid crop).
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        draws = torch.rand(4, generator=generator).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * draws[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * draws[1])
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(draws[2] * (height - h + 1)), int(draws[3] * (width - w + 1))
            return top, left, h, w
    aspect = min(max(width / height, ratio[0]), ratio[1])
    w, h = (width, round(width / aspect)) if width / height < aspect else (round(height * aspect), height)
    w, h = min(w, width), min(h, height)
    return (height - h) // 2, (width - w) // 2, h, w


def crop(clip: torch.Tensor, box: Box) -> torch.Tensor:
    top, left, h, w = box
    return clip[..., top:top + h, left:left + w]


def resize(clip: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of every frame of a float (C, T, H, W) clip, antialiased when shrinking."""
    if tuple(clip.shape[-2:]) == tuple(size):
        return clip
    frames = clip.transpose(0, 1)  # (T, C, H, W): interpolate works on batches of images
    shrinking = size[0] < clip.shape[-2] or size[1] < clip.shape[-1]
    frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=False, antialias=shrinking)
    return frames.transpose(0, 1)


def short_side_size(height: int, width: int, short: int) -> tuple[int, int]:
    """(h, w) after resizing so that the short side is `short`, keeping the aspect ratio."""
    if height <= width:
        return short, max(short, round(width * short / height))
    return max(short, round(height * short / width)), short


def eval_crop_boxes(height: int, width: int, size: int, crops: int) -> list[Box]:
    """1 centre crop, or 3 crops spread along the long side (the usual 3-crop test of video models)."""
    if crops not in (1, 3):
        raise ValueError(f"test crops must be 1 or 3, got {crops}")
    top, left = (height - size) // 2, (width - size) // 2
    if crops == 1:
        return [(top, left, size, size)]
    if height > width:
        return [(t, left, size, size) for t in (0, top, height - size)]
    return [(top, l, size, size) for l in (0, left, width - size)]


def normalize(clip: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8-range float clip -> (clip / 255 - mean) / std, per channel."""
    mean = torch.tensor(mean, dtype=clip.dtype).view(-1, 1, 1, 1) * 255
    std = torch.tensor(std, dtype=clip.dtype).view(-1, 1, 1, 1) * 255
    return (clip - mean) / std


def random_erase(clip: torch.Tensor, probability: float, generator: torch.Generator,
                 scale=(0.02, 1 / 3), ratio=(0.3, 3.3)) -> torch.Tensor:
    """With `probability`, replace one box (same in every frame) of a normalised clip by Gaussian noise."""
    if probability <= 0 or torch.rand(1, generator=generator).item() >= probability:
        return clip
    _, _, height, width = clip.shape
    top, left, h, w = random_resized_box(height, width, scale, ratio, generator)
    clip = clip.clone()
    clip[..., top:top + h, left:left + w] = torch.randn(clip[..., top:top + h, left:left + w].shape,
                                                        generator=generator)
    return clip


@dataclass(frozen=True)
class TrainTransform:
    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    flip: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    erase: float = 0.0

    def __call__(self, frames: np.ndarray, generator: torch.Generator) -> torch.Tensor:
        clip = to_clip(frames)
        box = random_resized_box(clip.shape[-2], clip.shape[-1], self.scale, self.ratio, generator)
        clip = resize(crop(clip, box).float(), (self.size, self.size))
        if self.flip and torch.rand(1, generator=generator).item() < 0.5:
            clip = clip.flip(-1)
        clip = normalize(clip, self.mean, self.std)
        return random_erase(clip, self.erase, generator).contiguous()


@dataclass(frozen=True)
class EvalTransform:
    size: int
    crops: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, frames: np.ndarray, crop_index: int) -> torch.Tensor:
        clip = to_clip(frames).float()
        clip = resize(clip, short_side_size(clip.shape[-2], clip.shape[-1], self.size))
        box = eval_crop_boxes(clip.shape[-2], clip.shape[-1], self.size, self.crops)[crop_index]
        return normalize(crop(clip, box), self.mean, self.std).contiguous()
