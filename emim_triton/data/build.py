"""From "which dataset, where" to `ClipDataset`s: the dataset formats and their conventions in one table.

    format        annotations (defaults inside the data root)                       reader   sampling  flip
    ssv2          something-something-v2-{train,validation,labels}.json            webm     segment   no
    ssv2_frames   train/val_videofolder.txt (<dir> <n> <label>) or the SSv2 JSONs  frames   segment   no
    ssv1          train/val_videofolder.txt                                        frames   segment   no
    kinetics      {train,validate,test}.csv, or `<path> <label>` lists             video    dense     yes
    diving48      Diving48_V2_{train,test}.json                                    mp4      segment   yes
    frames        any `<dir> <n> <label>` list                                     frames   segment   yes
    videos        any `<path> <label>` list                                        video    segment   yes
    random        none: random clips (throughput measurements)                     -        -         -

Videos listed but absent are dropped at start-up with a warning (and reported); when more than
`max_missing_fraction` of a split is absent, that is a wrong path rather than a few lost files, and
building stops with an error saying so.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

from . import annotations as ann
from .dataset import ClipDataset, RandomClipDataset
from .readers import FrameFolderReader, VideoFileReader, VideoRecord
from .frame_sampling import SAMPLINGS
from .transforms import EvalTransform, TrainTransform


class DatasetError(ValueError):
    """A dataset that cannot be used as configured (wrong paths, mostly missing files, bad options)."""


@dataclass(frozen=True)
class Format:
    files: dict          # split -> default annotation file name inside the data root
    frames: bool         # frame folders (True) or video files
    sampling: str
    flip: bool
    extension: str = ".mp4"


FORMATS = {
    "ssv2": Format({"train": "something-something-v2-train.json", "val": "something-something-v2-validation.json",
                    "test": "something-something-v2-validation.json",
                    "labels": "something-something-v2-labels.json"}, False, "segment", False, ".webm"),
    "ssv2_frames": Format({"train": "train_videofolder.txt", "val": "val_videofolder.txt",
                           "test": "val_videofolder.txt", "labels": "category.txt"}, True, "segment", False),
    "ssv1": Format({"train": "train_videofolder.txt", "val": "val_videofolder.txt", "test": "val_videofolder.txt",
                    "labels": "category.txt"}, True, "segment", False),
    "kinetics": Format({"train": "train.csv", "val": "validate.csv", "test": "validate.csv"}, False, "dense", True),
    "diving48": Format({"train": "Diving48_V2_train.json", "val": "Diving48_V2_test.json",
                        "test": "Diving48_V2_test.json"}, False, "segment", True),
    "frames": Format({"train": "train.txt", "val": "val.txt", "test": "val.txt"}, True, "segment", True),
    "videos": Format({"train": "train.txt", "val": "val.txt", "test": "val.txt"}, False, "segment", True),
    "random": Format({}, False, "segment", True),
}
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DataOptions:
    """Everything that decides what the datasets contain. None means the format's default.

    The trainer fills each field from its option of the same name (emim_triton/train/setup.py refuses, at
    import, a field without one unless it is listed there): rename a field here and in TrainConfig together.
    """

    dataset: str
    data_root: str | None
    num_frames: int
    img_size: int
    mean: tuple
    std: tuple
    train_list: str | None = None
    val_list: str | None = None
    test_list: str | None = None
    labels_file: str | None = None
    video_ext: str | None = None
    frame_template: str = "{:05d}.jpg"
    frame_start: int = 1
    num_classes: int | None = None
    sampling: str | None = None
    frame_stride: int = 4
    flip: bool | None = None
    crop_scale: tuple = (0.08, 1.0)
    crop_ratio: tuple = (3 / 4, 4 / 3)
    random_erase: float = 0.0
    test_clips: int = 1
    test_crops: int = 3
    seed: int = 0
    max_missing_fraction: float = 0.5
    decode_threads: int = 1
    random_samples: int = 512  # size of each split of the "random" dataset

    @property
    def format(self) -> Format:
        if self.dataset not in FORMATS:
            raise DatasetError(f"unknown dataset format {self.dataset!r}; one of {sorted(FORMATS)}")
        return FORMATS[self.dataset]

    @property
    def resolved_sampling(self) -> str:
        sampling = self.sampling or self.format.sampling
        if sampling not in SAMPLINGS:
            raise DatasetError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        return sampling

    @property
    def resolved_flip(self) -> bool:
        return self.format.flip if self.flip is None else self.flip

    def annotation_file(self, split: str) -> str:
        given = {"train": self.train_list, "val": self.val_list, "test": self.test_list or self.val_list,
                 "labels": self.labels_file}[split]
        if given:
            return given
        if split not in self.format.files:
            raise DatasetError(f"dataset {self.dataset!r} needs --{split}-list (it has no default file name)")
        if not self.data_root:
            raise DatasetError(f"dataset {self.dataset!r} needs --data-root (or explicit annotation files)")
        return os.path.join(self.data_root, self.format.files[split])


def read_classes(options: DataOptions) -> list[str]:
    """Class names, index = label: from the labels file, the training CSV, or numbered by the largest label."""
    name = options.dataset
    if name == "random":
        return [f"class_{i}" for i in range(options.num_classes or 10)]
    if name == "ssv2" or (name == "ssv2_frames" and options.annotation_file("train").endswith(".json")):
        classes = ann.ssv2_classes(options.annotation_file("labels"))
    elif name == "kinetics" and options.annotation_file("train").endswith(".csv"):
        classes = ann.kinetics_classes(options.annotation_file("train"))
    else:
        labels_file = options.annotation_file("labels") if "labels" in options.format.files else None
        if labels_file and os.path.isfile(labels_file):  # TSM's category.txt: one class name per line
            with open(labels_file) as handle:
                classes = [line.strip() for line in handle if line.strip()]
        else:
            labels = [r.label for r in read_records(options, "train", None)]
            classes = [f"class_{i}" for i in range(max(labels) + 1)]
    if options.num_classes is not None:
        if options.num_classes < len(classes) and name != "random":
            raise DatasetError(f"num_classes={options.num_classes} but the annotations have {len(classes)} classes")
        classes += [f"class_{i}" for i in range(len(classes), options.num_classes)]
    return classes


def read_records(options: DataOptions, split: str, classes: list[str] | None) -> list[VideoRecord]:
    """The annotated videos of a split, with paths resolved against the data root."""
    path = options.annotation_file(split)
    root = options.data_root or os.path.dirname(path)
    fmt = options.format
    extension = options.video_ext or fmt.extension
    if options.dataset == "ssv2":
        return ann.read_ssv2_json(path, options.annotation_file("labels"), root, extension)
    if options.dataset == "ssv2_frames" and path.endswith(".json"):
        return ann.read_ssv2_json(path, options.annotation_file("labels"), root, frame_folders=True)
    if options.dataset == "kinetics" and path.endswith(".csv"):
        return ann.read_kinetics_csv(path, root, classes if classes is not None else ann.kinetics_classes(path))
    if options.dataset == "diving48":
        return ann.read_diving48_json(path, root, extension)
    return ann.read_frame_list(path, root) if fmt.frames else ann.read_path_list(path, root)


def drop_missing(records: list[VideoRecord], max_fraction: float, what: str) -> tuple[list[VideoRecord], list[str]]:
    """Remove records whose file or folder does not exist; error out when too many are gone."""
    missing = [r.path for r in records if not os.path.exists(r.path)]
    if not records:
        raise DatasetError(f"{what}: the annotation file lists no videos")
    fraction = len(missing) / len(records)
    if fraction > max_fraction:
        raise DatasetError(
            f"{what}: {len(missing)} of {len(records)} listed videos ({fraction:.0%}) do not exist, more than "
            f"max_missing_fraction={max_fraction:g}; is the data root right? First missing: {missing[:3]}")
    if missing:
        warnings.warn(f"{what}: {len(missing)} of {len(records)} listed videos do not exist and are skipped "
                      f"(first: {missing[0]})", stacklevel=2)
    present = set(missing)
    return [r for r in records if r.path not in present], missing


def build_dataset(options: DataOptions, split: str, classes: list[str], train: bool):
    """One split as a dataset: `ClipDataset` (training transform when `train`), or `RandomClipDataset`.
    The dataset gets ``classes`` and ``missing`` (absent paths) attributes."""
    if split not in SPLITS:
        raise DatasetError(f"split must be one of {SPLITS}, got {split!r}")
    if options.dataset == "random":
        dataset = RandomClipDataset(options.random_samples, len(classes), options.num_frames, options.img_size,
                                    seed=options.seed + SPLITS.index(split))
        dataset.classes, dataset.missing = classes, []
        return dataset
    records = read_records(options, split, classes)
    bad_labels = [r for r in records if not 0 <= r.label < len(classes)]
    if bad_labels:
        raise DatasetError(f"{options.annotation_file(split)}: label {bad_labels[0].label} of {bad_labels[0].path} "
                           f"is outside 0..{len(classes) - 1} (num_classes {len(classes)})")
    records, missing = drop_missing(records, options.max_missing_fraction, f"{split} split "
                                    f"({options.annotation_file(split)})")
    fmt = options.format
    reader = (FrameFolderReader(options.frame_template, options.frame_start) if fmt.frames
              else VideoFileReader(options.decode_threads))
    if train:
        transform = TrainTransform(options.img_size, tuple(options.crop_scale), tuple(options.crop_ratio),
                                   options.resolved_flip, tuple(options.mean), tuple(options.std),
                                   options.random_erase)
        clips, crops = 1, 1
    else:
        crops = options.test_crops if split == "test" else 1
        clips = options.test_clips if split == "test" else 1
        transform = EvalTransform(options.img_size, crops, tuple(options.mean), tuple(options.std))
    dataset = ClipDataset(records, reader, num_frames=options.num_frames, sampling=options.resolved_sampling,
                          transform=transform, frame_stride=options.frame_stride, seed=options.seed,
                          clips=clips, crops=crops)
    dataset.classes, dataset.missing = classes, missing
    return dataset
