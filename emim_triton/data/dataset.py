"""`ClipDataset`: annotated videos -> normalised (C, T, H, W) clips, with unreadable videos skipped.

Samples are addressed by ``(index, epoch)`` keys (what `ShardedSampler` yields), and every random choice for
a sample comes from a generator seeded by (seed, epoch, index): see `seeding.py`.

Unreadable videos (corrupt, empty, vanished since the start) never stop an epoch:
- training: a warning, and another video, chosen by the same seeded generator, takes the slot (so the
  batch keeps its size and the replacement is the same on a re-run); after `max_retries` failures in a
  row the dataset is broken and an error says so;
- evaluation: the view comes back with ``valid=False`` and a zero clip, and metrics leave it out (another
  video in its place would count the wrong video).
Either way the sample reports the failed video indices under ``bad``, which the trainer collects from
every worker and rank, counts and lists in the run directory.
"""

from __future__ import annotations

import warnings

import torch
from torch.utils.data import Dataset

from .readers import ReadError, VideoRecord
from .frame_sampling import dense_indices, segment_indices
from .seeding import derive_seed, generator
from .transforms import EvalTransform, TrainTransform


class UnreadableVideoWarning(UserWarning):
    """A video was skipped because it could not be read."""


class ClipDataset(Dataset):
    """Clips from annotated videos.

    Args:
        records: the videos (path, label, frame range).
        reader: ``reader(record, choose) -> (T, H, W, 3) uint8``, a `VideoFileReader` or `FrameFolderReader`.
        num_frames: T, frames per clip.
        sampling: "segment" (TSN) or "dense"; ``frame_stride`` is the dense stride.
        transform: `TrainTransform` (training) or `EvalTransform` (evaluation).
        seed: run seed; training randomness is a function of (seed, epoch, index).
        clips, crops: test views per video (evaluation only); sample ``i`` is view ``i % (clips * crops)`` of
            video ``i // (clips * crops)``, clip-major.
        max_retries: consecutive unreadable videos tolerated for one training slot.
    """

    def __init__(self, records: list[VideoRecord], reader, *, num_frames: int, sampling: str, transform,
                 frame_stride: int = 1, seed: int = 0, clips: int = 1, crops: int = 1, max_retries: int = 10):
        if not records:
            raise ValueError("ClipDataset: no videos")
        self.records, self.reader = records, reader
        self.num_frames, self.sampling, self.frame_stride = num_frames, sampling, frame_stride
        self.transform, self.seed, self.max_retries = transform, seed, max_retries
        self.train = isinstance(transform, TrainTransform)
        if self.train and (clips, crops) != (1, 1):
            raise ValueError("ClipDataset: test views (clips, crops) are for evaluation; training takes one "
                             "random clip per video")
        if not self.train and crops != transform.crops:
            raise ValueError(f"ClipDataset: crops={crops} but the EvalTransform makes {transform.crops}")
        self.clips, self.crops = clips, crops

    @property
    def views(self) -> int:
        return self.clips * self.crops

    @property
    def labels(self) -> list[int]:
        return [r.label for r in self.records]

    def __len__(self) -> int:
        return len(self.records) * self.views

    def _indices(self, num_frames: int, gen: torch.Generator | None, clip: int) -> list[int]:
        if self.sampling == "segment":
            return segment_indices(num_frames, self.num_frames, gen, clip, self.clips)
        return dense_indices(num_frames, self.num_frames, self.frame_stride, gen, clip, self.clips)

    def __getitem__(self, key) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        return self._train_item(index, epoch) if self.train else self._test_item(index)

    def _train_item(self, index: int, epoch: int) -> dict:
        bad = []
        video = index
        for attempt in range(self.max_retries):
            if attempt:  # a replacement drawn from the slot's own seed: the same one on every run
                video = derive_seed(self.seed, epoch, index, attempt) % len(self.records)
            gen = generator(self.seed, epoch, index, attempt)
            record = self.records[video]
            try:
                frames = self.reader(record, lambda n: self._indices(n, gen, 0))
            except ReadError as error:
                warnings.warn(f"skipping unreadable video: {error}", UnreadableVideoWarning, stacklevel=2)
                bad.append(video)
                continue
            return dict(clip=self.transform(frames, gen), label=record.label, index=index, valid=True, bad=bad)
        raise RuntimeError(f"{self.max_retries} unreadable videos in a row for training sample {index} (videos "
                           f"{bad}); is the dataset readable? See the warnings above for the reasons")

    def _test_item(self, index: int) -> dict:
        video, view = divmod(index, self.views)
        clip, crop = divmod(view, self.crops)
        record = self.records[video]
        try:
            frames = self.reader(record, lambda n: self._indices(n, None, clip))
        except ReadError as error:
            warnings.warn(f"skipping unreadable video: {error}", UnreadableVideoWarning, stacklevel=2)
            size = self.transform.size
            empty = torch.zeros(3, self.num_frames, size, size)
            return dict(clip=empty, label=record.label, index=index, valid=False, bad=[video])
        return dict(clip=self.transform(frames, crop), label=record.label, index=index, valid=True, bad=[])


class RandomClipDataset(Dataset):
    """Random clips and labels, a function of (seed, index): measures training throughput without any I/O."""

    def __init__(self, num_samples: int, num_classes: int, num_frames: int, size: int, seed: int = 0):
        self.num_samples, self.num_classes = num_samples, num_classes
        self.shape = (3, num_frames, size, size)
        self.seed = seed
        self.views = 1

    @property
    def labels(self) -> list[int]:
        return [derive_seed(self.seed, "label", i) % self.num_classes for i in range(self.num_samples)]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, key) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        clip = torch.randn(self.shape, generator=generator(self.seed, epoch, index))
        label = derive_seed(self.seed, "label", index) % self.num_classes
        return dict(clip=clip, label=label, index=index, valid=True, bad=[])


def collate(samples: list[dict]) -> dict:
    """Stack clips and labels; concatenate the lists of failed videos (they vary in length)."""
    return dict(clip=torch.stack([s["clip"] for s in samples]),
                label=torch.tensor([s["label"] for s in samples]),
                index=torch.tensor([s["index"] for s in samples]),
                valid=torch.tensor([s["valid"] for s in samples]),
                bad=[video for s in samples for video in s["bad"]])
