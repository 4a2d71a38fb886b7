"""Mixup / CutMix for clips (B, C, T, H, W), with label smoothing, producing soft targets.

Each batch is mixed with itself reversed along the batch axis (sample i with sample B-1-i), with one
lambda per batch ~ Beta(alpha, alpha). CutMix pastes a box cut along **H and W** — the same box in every
frame, over the whole clip length — never along T: a box in time would splice two actions together.
The box is clipped at the borders, and lambda is recomputed from the area actually pasted.

All draws come from a generator the caller seeds per step, so a resumed run mixes identically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """Targets with 1 - smoothing + smoothing / C on the label and smoothing / C elsewhere."""
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return targets.scatter_(1, labels[:, None], 1.0 - smoothing + off)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum(targets * log_softmax(logits)), computed in float32."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def cutmix_box(height: int, width: int, lam: float, generator: torch.Generator) -> tuple[int, int, int, int]:
    """A box of area about (1 - lam) x H x W with a random centre, clipped to the frame: y0, y1, x0, x1."""
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = (int(torch.randint(n, (1,), generator=generator)) for n in (height, width))
    return (max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height),
            max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width))


@dataclass(frozen=True)
class Mixer:
    num_classes: int
    mixup: float = 0.8
    cutmix: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5
    smoothing: float = 0.1

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup > 0 or self.cutmix > 0)

    def __call__(self, clips: torch.Tensor, labels: torch.Tensor, generator: torch.Generator):
        """(clips, labels) -> (mixed clips, soft targets (B, num_classes))."""
        targets = smooth_one_hot(labels, self.num_classes, self.smoothing)
        if not self.enabled or torch.rand(1, generator=generator).item() >= self.prob:
            return clips, targets
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or torch.rand(1, generator=generator).item() < self.switch_prob)
        alpha = self.cutmix if use_cutmix else self.mixup
        lam = _beta(alpha, generator)
        partner = clips.flip(0)
        if use_cutmix:
            height, width = clips.shape[-2:]
            y0, y1, x0, x1 = cutmix_box(height, width, lam, generator)
            clips = clips.clone()
            clips[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
        else:
            clips = clips * lam + partner * (1.0 - lam)
        return clips, targets * lam + targets.flip(0) * (1.0 - lam)


def _beta(alpha: float, generator: torch.Generator) -> float:
    """A Beta(alpha, alpha) draw determined by `generator` (torch.distributions takes no generator, and
    drawing from the global RNG would shift drop-path's random stream)."""
    seed = int(torch.randint(2**62, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))
