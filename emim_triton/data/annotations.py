"""Annotation files of the usual video datasets, read into `VideoRecord` lists (layouts: PAPER-NOTES.md).

    frame list     ``<dir> <num_frames> <label>`` per line        SSv1, SSv2 frames, any frame folders
    path list      ``<path> <label>`` per line                    Kinetics lists, any video files
    Kinetics CSV   ``label,youtube_id,time_start,time_end,split``  videos <label>/<id>_<start>_<end>.mp4
    SSv2 JSON      ``[{"id", "template", ...}]`` + labels JSON    videos <id>.webm
    Diving48 JSON  ``[{"vid_name", "label", "start_frame", "end_frame"}]``, videos <vid_name>.mp4

Relative paths in list files are taken relative to the data root. Errors name the file and the line.
"""

from __future__ import annotations

import csv
import json
import os

from .readers import VideoRecord


class AnnotationError(ValueError):
    """An annotation file that cannot be read as the format it was given as."""


def _join(root: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(root, path)


def _lines(list_file: str):
    try:
        with open(list_file) as handle:
            for number, line in enumerate(handle, 1):
                if line.strip() and not line.lstrip().startswith("#"):
                    yield number, line.strip()
    except OSError as error:
        raise AnnotationError(f"cannot read annotation file {list_file!r}: {error}") from error


def _int(value: str, what: str, where: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise AnnotationError(f"{where}: {what} must be an integer, got {value!r}") from None


def read_frame_list(list_file: str, root: str) -> list[VideoRecord]:
    """``<dir> <num_frames> <label>`` lines (the folder name may contain spaces: split from the right)."""
    records = []
    for number, line in _lines(list_file):
        where = f"{list_file}:{number}"
        parts = line.rsplit(maxsplit=2)
        if len(parts) != 3:
            raise AnnotationError(f"{where}: expected '<dir> <num_frames> <label>', got {line!r}")
        folder, frames, label = parts
        records.append(VideoRecord(_join(root, folder), _int(label, "label", where),
                                   num_frames=_int(frames, "num_frames", where)))
    return records


def read_path_list(list_file: str, root: str) -> list[VideoRecord]:
    """``<path> <label>`` lines (Kinetics-style lists, generic video lists)."""
    records = []
    for number, line in _lines(list_file):
        where = f"{list_file}:{number}"
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise AnnotationError(f"{where}: expected '<path> <label>', got {line!r}")
        records.append(VideoRecord(_join(root, parts[0]), _int(parts[1], "label", where)))
    return records


def kinetics_classes(csv_file: str) -> list[str]:
    """Class names of a Kinetics CSV, sorted alphabetically: index i is class i (the usual convention)."""
    return sorted({row["label"] for row in _csv_rows(csv_file)})


def read_kinetics_csv(csv_file: str, root: str, classes: list[str]) -> list[VideoRecord]:
    """Kinetics CSV rows -> records. The video of a row is ``<root>/<label>/<id>_<start>_<end>.mp4`` (the
    layout of the official download scripts) or, when that folder does not exist, ``<root>/<id>_...mp4``.
    `classes` is the training set's sorted class list, so that every split uses the same indices."""
    index = {name: i for i, name in enumerate(classes)}
    records = []
    for number, row in enumerate(_csv_rows(csv_file), 2):
        where = f"{csv_file}:{number}"
        if row["label"] not in index:
            raise AnnotationError(f"{where}: class {row['label']!r} is not among the {len(classes)} classes of "
                                  f"the training CSV")
        start, end = (_int(row[k], k, where) for k in ("time_start", "time_end"))
        name = f"{row['youtube_id']}_{start:06d}_{end:06d}.mp4"
        folder = os.path.join(root, row["label"])
        path = os.path.join(folder, name) if os.path.isdir(folder) else os.path.join(root, name)
        records.append(VideoRecord(path, index[row["label"]]))
    return records


def _csv_rows(csv_file: str) -> list[dict]:
    try:
        with open(csv_file, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as error:
        raise AnnotationError(f"cannot read annotation file {csv_file!r}: {error}") from error
    needed = {"label", "youtube_id", "time_start", "time_end"}
    if rows and not needed <= set(rows[0]):
        raise AnnotationError(f"{csv_file}: a Kinetics CSV needs the columns {sorted(needed)}, "
                              f"found {sorted(rows[0])}")
    return rows


def _json(path: str):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise AnnotationError(f"cannot read JSON annotation file {path!r}: {error}") from error


def ssv2_classes(labels_file: str) -> list[str]:
    """Class names of ``something-something-v2-labels.json`` ({template: "index"}) in index order."""
    labels = _json(labels_file)
    if not isinstance(labels, dict):
        raise AnnotationError(f"{labels_file}: expected a {{template: index}} object, got {type(labels).__name__}")
    names = [None] * len(labels)
    for name, value in labels.items():
        i = _int(str(value), f"index of {name!r}", labels_file)
        if not 0 <= i < len(names) or names[i] is not None:
            raise AnnotationError(f"{labels_file}: indices must be 0..{len(names) - 1}, each once; "
                                  f"{name!r} has {value!r}")
        names[i] = name
    return names


def ssv2_template_label(template: str) -> str:
    """SSv2's class name of an annotation: the template without its placeholder brackets."""
    return template.replace("[", "").replace("]", "")


def read_ssv2_json(annotation_file: str, labels_file: str, root: str, extension: str = ".webm",
                   frame_folders: bool = False) -> list[VideoRecord]:
    """SSv2 annotation entries -> records: videos ``<root>/<id>.webm``, or frame folders ``<root>/<id>``."""
    index = {name: i for i, name in enumerate(ssv2_classes(labels_file))}
    entries = _json(annotation_file)
    if not isinstance(entries, list):
        raise AnnotationError(f"{annotation_file}: expected a list of annotation objects")
    records = []
    for number, entry in enumerate(entries):
        where = f"{annotation_file}[{number}]"
        if not isinstance(entry, dict) or "id" not in entry:
            raise AnnotationError(f"{where}: expected an object with an 'id', got {entry!r:.80}")
        if "template" not in entry:
            raise AnnotationError(f"{where}: no 'template', so no label (the SSv2 test set has none: "
                                  f"evaluate on the validation set)")
        name = ssv2_template_label(entry["template"])
        if name not in index:
            raise AnnotationError(f"{where}: template {name!r} is not in {labels_file}")
        path = os.path.join(root, str(entry["id"]) + ("" if frame_folders else extension))
        records.append(VideoRecord(path, index[name]))
    return records


def read_diving48_json(annotation_file: str, root: str, extension: str = ".mp4") -> list[VideoRecord]:
    """Diving48 V2 entries -> records restricted to [start_frame, end_frame)."""
    entries = _json(annotation_file)
    if not isinstance(entries, list):
        raise AnnotationError(f"{annotation_file}: expected a list of annotation objects")
    records = []
    for number, entry in enumerate(entries):
        where = f"{annotation_file}[{number}]"
        try:
            name, label = entry["vid_name"], entry["label"]
        except (TypeError, KeyError):
            raise AnnotationError(f"{where}: expected an object with 'vid_name' and 'label', got "
                                  f"{entry!r:.80}") from None
        start, end = entry.get("start_frame", 0), entry.get("end_frame")
        records.append(VideoRecord(os.path.join(root, name + extension), int(label), start=int(start),
                                   end=None if end is None else int(end)))
    return records
