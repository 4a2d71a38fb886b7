"""Reading the chosen frames of one video from disk: video files with PyAV, frame folders with Pillow.

A reader is called with a record and a function ``choose(num_frames) -> indices``: the number of frames is
only known once the file is open (SSv2's webm files do not store it), so the sampling decision happens in
the middle of reading. Both readers return the frames as one (T, H, W, 3) uint8 RGB array and raise
`ReadError` for anything that makes a video unusable (missing, corrupt, empty, undecodable), which the
dataset turns into a skipped and counted sample.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Chooser = Callable[[int], list[int]]


class ReadError(Exception):
    """A video that cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class VideoRecord:
    """One annotated video. ``path`` is a video file or a frame folder. ``start``/``end`` restrict the usable
    frame range (Diving48 gives one); ``num_frames`` is known for frame-folder lists, else None."""

    path: str
    label: int
    num_frames: int | None = None
    start: int = 0
    end: int | None = None


def _usable_range(record: VideoRecord, available: int) -> tuple[int, int]:
    """First frame and frame count of the record's range inside a video with `available` frames."""
    start = min(max(record.start, 0), max(available - 1, 0))
    end = available if record.end is None else min(record.end, available)
    return start, max(end - start, 0)


class VideoFileReader:
    """Decodes video files with PyAV (FFmpeg bundled in its wheels; any container and codec FFmpeg reads).

    When the container states its frame count (mp4 usually does), decoding stops after the last frame the
    clip needs, which matters for dense sampling in long Kinetics videos. When it does not (webm, SSv2), every
    frame is decoded to count them exactly — these videos are a few seconds long — since a count estimated
    from duration x rate is often off by one or two, which would shift every segment.

    Args:
        threads: FFmpeg decoding threads per video. 1 by default: the DataLoader already runs one reader
            per worker process, and more threads per worker only oversubscribe the cores.
    """

    def __init__(self, threads: int = 1):
        self.threads = threads

    def __call__(self, record: VideoRecord, choose: Chooser) -> np.ndarray:
        import av  # imported here: frame-folder datasets and the model code do not need PyAV

        if not os.path.isfile(record.path):
            raise ReadError(f"{record.path}: no such file")
        try:
            with av.open(record.path) as container:
                if not container.streams.video:
                    raise ReadError(f"{record.path}: no video stream")
                stream = container.streams.video[0]
                stream.thread_count = self.threads
                stated = stream.frames or 0
                if stated > 0:
                    start, count = _usable_range(record, stated)
                    wanted = self._indices(record, choose, count, start)
                    frames = self._decode(container, stream, stop_after=max(wanted))
                else:
                    frames = self._decode(container, stream, stop_after=None)
                    start, count = _usable_range(record, len(frames))
                    wanted = self._indices(record, choose, count, start)
                if not frames:
                    raise ReadError(f"{record.path}: no frame could be decoded")
                # A container that states more frames than it holds: clamp to the last decoded frame.
                return np.stack([frames[min(i, len(frames) - 1)].to_ndarray(format="rgb24") for i in wanted])
        except ReadError:
            raise
        except (av.error.FFmpegError, OSError, ValueError, IndexError) as error:
            raise ReadError(f"{record.path}: {type(error).__name__}: {error}") from error

    @staticmethod
    def _indices(record: VideoRecord, choose: Chooser, count: int, start: int) -> list[int]:
        if count < 1:
            raise ReadError(f"{record.path}: no frames in the annotated range {record.start}..{record.end}")
        return [start + i for i in choose(count)]

    @staticmethod
    def _decode(container, stream, stop_after: int | None) -> list:
        """Decoded frames in order, up to index `stop_after`. A decoding error after some frames keeps
        those (a damaged tail is common in scraped videos); an error before any frame is a ReadError."""
        import av

        frames = []
        try:
            for frame in container.decode(stream):
                frames.append(frame)
                if stop_after is not None and len(frames) > stop_after:
                    break
        except av.error.FFmpegError:
            if not frames:
                raise
        return frames


class FrameFolderReader:
    """Reads JPEG (or PNG) frames ``<dir>/<template.format(start_index + i)>`` with Pillow.

    SSv1 and most extracted-frame datasets name frames 00001.jpg, 00002.jpg, ... (template "{:05d}.jpg",
    start_index 1). The frame count comes from the list file; when a record lacks it, the folder's files with
    the template's extension are counted.
    """

    def __init__(self, template: str = "{:05d}.jpg", start_index: int = 1):
        self.template, self.start_index = template, start_index

    def __call__(self, record: VideoRecord, choose: Chooser) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        if not os.path.isdir(record.path):
            raise ReadError(f"{record.path}: no such frame folder")
        available = record.num_frames if record.num_frames is not None else self._count(record.path)
        start, count = _usable_range(record, available)
        if count < 1:
            raise ReadError(f"{record.path}: no frames")
        frames = []
        for i in choose(count):
            path = os.path.join(record.path, self.template.format(self.start_index + start + i))
            try:
                with Image.open(path) as image:
                    frames.append(np.asarray(image.convert("RGB")))
            except (OSError, UnidentifiedImageError) as error:
                raise ReadError(f"{path}: {type(error).__name__}: {error}") from error
        if any(f.shape != frames[0].shape for f in frames):
            raise ReadError(f"{record.path}: frames of different sizes {sorted({f.shape for f in frames})}")
        return np.stack(frames)

    def _count(self, folder: str) -> int:
        extension = os.path.splitext(self.template)[1]
        return sum(1 for name in os.listdir(folder) if name.endswith(extension))
