"""Small real video files for the data and trainer tests: written with PyAV / Pillow, read back by the
library. Frame i of every video is a flat grey of brightness `frame_value(i)`, so a test can tell from the
decoded pixels which frames were read (codecs keep a flat frame's mean within a few levels)."""

from __future__ import annotations

import os

import numpy as np

from emim_triton.video_io import write_video as write_frames


def frame_value(i: int) -> int:
    return 20 + 10 * i


def frames(count: int, size: int = 32) -> np.ndarray:
    """(count, size, size, 3) uint8, frame i a flat grey of frame_value(i)."""
    return np.stack([np.full((size, size, 3), frame_value(i), np.uint8) for i in range(count)])


def write_video(path: str, count: int, size: int = 32, fps: int = 12) -> str:
    """WebM (VP9) or MP4 (H.264) depending on the extension, written by the library's writer."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_frames(path, frames(count, size), fps=fps, crf=10, realtime=True)
    return path


def write_jpeg_folder(folder: str, count: int, size: int = 32, template: str = "{:05d}.jpg", start: int = 1) -> str:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for i, frame in enumerate(frames(count, size)):
        Image.fromarray(frame).save(os.path.join(folder, template.format(start + i)), quality=95)
    return folder


def decoded_frame_numbers(clip: np.ndarray) -> list[int]:
    """Which frame each decoded (T, H, W, 3) frame was, from its mean brightness."""
    return [round((float(f.mean()) - frame_value(0)) / 10) for f in clip]
