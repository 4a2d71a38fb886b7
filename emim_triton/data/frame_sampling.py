"""Which frames of a video make a clip: segment (TSN) sampling and dense sampling, for training and test.

Indices are 0-based positions in the video's frame range (the reader adds a record's start frame). Both
samplers accept videos shorter than the clip: indices then repeat, which is what every video codebase does
for the odd 1-second video.

- Segment sampling (Something-Something, Diving48): the video is cut into T equal segments and one frame is
  taken from each, so the clip spans the whole action whatever its length. Training takes a random frame
  per segment (temporal jitter); test takes the centre, or for clip c of C views the point (c + 0.5) / C
  of the way through each segment, so several test clips interleave rather than repeat.
- Dense sampling (Kinetics): T frames at a fixed stride, a window of (T - 1) * stride + 1 frames placed at
  random in training; at test the C windows are spread evenly from the first possible start to the last.
"""

from __future__ import annotations

import torch

SAMPLINGS = ("segment", "dense")


def segment_indices(num_frames: int, length: int, generator: torch.Generator | None = None,
                    view: int = 0, num_views: int = 1) -> list[int]:
    """T = `length` indices in [0, num_frames), one per equal segment.

    With a generator: a uniformly random frame of each segment (training). Without: the deterministic
    test view `view` of `num_views` (view 0 of 1 is the segment centre).
    """
    _check(num_frames, length)
    segment = num_frames / length
    if generator is not None:
        offsets = torch.rand(length, generator=generator).tolist()
    else:
        offsets = [(view + 0.5) / num_views] * length
    return [min(int(segment * (i + offset)), num_frames - 1) for i, offset in enumerate(offsets)]


def dense_indices(num_frames: int, length: int, stride: int, generator: torch.Generator | None = None,
                  view: int = 0, num_views: int = 1) -> list[int]:
    """T = `length` indices `stride` apart in [0, num_frames), clamped to the last frame when the video is
    shorter than the window. Random window start with a generator; evenly spread test views without."""
    _check(num_frames, length)
    if stride < 1:
        raise ValueError(f"dense sampling: stride must be >= 1, got {stride}")
    last_start = max(num_frames - ((length - 1) * stride + 1), 0)
    if generator is not None:
        start = int(torch.randint(last_start + 1, (1,), generator=generator))
    elif num_views == 1:
        start = last_start // 2
    else:
        start = round(last_start * view / (num_views - 1))
    return [min(start + i * stride, num_frames - 1) for i in range(length)]


def _check(num_frames: int, length: int) -> None:
    if num_frames < 1:
        raise ValueError(f"cannot sample frames from a video with {num_frames} frames")
    if length < 1:
        raise ValueError(f"clip length must be >= 1, got {length}")
