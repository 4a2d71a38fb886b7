"""The data pipeline on small real files: every annotation format, both readers, sampling, transforms,
unreadable and missing videos."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from emim_triton.data import annotations as ann
from emim_triton.data.build import DataOptions, DatasetError, build_dataset, read_classes
from emim_triton.data.dataset import ClipDataset, UnreadableVideoWarning, collate
from emim_triton.data.readers import FrameFolderReader, ReadError, VideoFileReader, VideoRecord
from emim_triton.data.sharded_sampler import ShardedSampler
from emim_triton.data.frame_sampling import dense_indices, segment_indices
from emim_triton.data.seeding import generator
from emim_triton.data.transforms import EvalTransform, TrainTransform, random_resized_box, eval_crop_boxes
from video_helpers import decoded_frame_numbers, write_jpeg_folder, write_video

pytest.importorskip("av")

MEAN, STD = (0.45,) * 3, (0.225,) * 3


# ------------------------------------------------------------------------------------------- readers

@pytest.mark.parametrize("extension", [".webm", ".mp4"])
def test_video_reader_returns_the_chosen_frames(tmp_path, extension):
    # webm states no frame count (every frame is decoded and counted); mp4 does (decoding stops early)
    path = write_video(str(tmp_path / f"clip{extension}"), count=10)
    seen = []

    def choose(n):
        seen.append(n)
        return [0, 3, 9, 4]

    clip = VideoFileReader()(VideoRecord(path, 0), choose)
    assert seen == [10]
    assert clip.shape == (4, 32, 32, 3) and clip.dtype.name == "uint8"
    assert decoded_frame_numbers(clip) == [0, 3, 9, 4]


def test_video_reader_frame_range(tmp_path):
    path = write_video(str(tmp_path / "clip.mp4"), count=10)
    clip = VideoFileReader()(VideoRecord(path, 0, start=2, end=6), lambda n: list(range(n)))
    assert decoded_frame_numbers(clip) == [2, 3, 4, 5]


def test_frame_folder_reader(tmp_path):
    folder = write_jpeg_folder(str(tmp_path / "v1"), count=6)
    clip = FrameFolderReader()(VideoRecord(folder, 0, num_frames=6), lambda n: [5, 0, 2])
    assert decoded_frame_numbers(clip) == [5, 0, 2]
    counted = FrameFolderReader()(VideoRecord(folder, 0), lambda n: [n - 1])  # count from the folder
    assert decoded_frame_numbers(counted) == [5]


@pytest.mark.parametrize("content", [b"", b"\x1aE\xdf\xa3 this is not a video" * 10])
def test_unreadable_video_raises_read_error(tmp_path, content):
    path = tmp_path / "broken.webm"
    path.write_bytes(content)
    with pytest.raises(ReadError, match="broken.webm"):
        VideoFileReader()(VideoRecord(str(path), 0), lambda n: [0])
    with pytest.raises(ReadError, match="no such file"):
        VideoFileReader()(VideoRecord(str(tmp_path / "absent.mp4"), 0), lambda n: [0])


# ---------------------------------------------------------------------------------------- annotations

def test_ssv2_json(tmp_path):
    labels = {"Moving something up": "1", "Pushing something from left to right": "0"}
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    entries = [{"id": "42", "label": "pushing a pen from left to right", "template":
                "Pushing [something] from left to right", "placeholders": ["a pen"]},
               {"id": "7", "label": "moving a cup up", "template": "Moving [something] up", "placeholders": ["a cup"]}]
    (tmp_path / "train.json").write_text(json.dumps(entries))
    records = ann.read_ssv2_json(str(tmp_path / "train.json"), str(tmp_path / "labels.json"), "/videos")
    assert [(r.path, r.label) for r in records] == [("/videos/42.webm", 0), ("/videos/7.webm", 1)]
    assert ann.ssv2_classes(str(tmp_path / "labels.json")) == ["Pushing something from left to right",
                                                               "Moving something up"]
    (tmp_path / "test.json").write_text(json.dumps([{"id": "3"}]))
    with pytest.raises(ann.AnnotationError, match="no 'template'"):
        ann.read_ssv2_json(str(tmp_path / "test.json"), str(tmp_path / "labels.json"), "/videos")


def test_kinetics_csv_and_path_list(tmp_path):
    rows = [("riding a bike", "abc", 10, 20, "train"), ("abseiling", "xyz", 0, 10, "train")]
    with open(tmp_path / "train.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label", "youtube_id", "time_start", "time_end", "split"])
        writer.writerows(rows)
    (tmp_path / "riding a bike").mkdir()
    classes = ann.kinetics_classes(str(tmp_path / "train.csv"))
    assert classes == ["abseiling", "riding a bike"]
    records = ann.read_kinetics_csv(str(tmp_path / "train.csv"), str(tmp_path), classes)
    assert records[0] == VideoRecord(str(tmp_path / "riding a bike" / "abc_000010_000020.mp4"), 1)
    assert records[1] == VideoRecord(str(tmp_path / "xyz_000000_000010.mp4"), 0)  # flat layout fallback

    (tmp_path / "list.txt").write_text("a/b c.mp4 3\n# a comment\n/abs/d.mp4 0\n")
    records = ann.read_path_list(str(tmp_path / "list.txt"), "/root")
    assert [(r.path, r.label) for r in records] == [("/root/a/b c.mp4", 3), ("/abs/d.mp4", 0)]
    (tmp_path / "bad.txt").write_text("a.mp4 3\nb.mp4 three\n")
    with pytest.raises(ann.AnnotationError, match=r"bad.txt:2: label must be an integer"):
        ann.read_path_list(str(tmp_path / "bad.txt"), "/root")


def test_frame_list_and_diving48(tmp_path):
    (tmp_path / "list.txt").write_text("folder one 12 4\nf2 7 0\n")
    records = ann.read_frame_list(str(tmp_path / "list.txt"), "/frames")
    assert records == [VideoRecord("/frames/folder one", 4, num_frames=12), VideoRecord("/frames/f2", 0, num_frames=7)]
    (tmp_path / "d48.json").write_text(json.dumps([{"vid_name": "_8Vy3dlHg2w_00000", "label": 12,
                                                    "start_frame": 0, "end_frame": 31}]))
    records = ann.read_diving48_json(str(tmp_path / "d48.json"), "/d48/rgb")
    assert records == [VideoRecord("/d48/rgb/_8Vy3dlHg2w_00000.mp4", 12, start=0, end=31)]


# -------------------------------------------------------------------------------------------- sampling

def test_segment_sampling():
    # training: one random frame inside each of the T equal segments
    for seed in range(20):
        indices = segment_indices(40, 8, generator(seed))
        assert all(5 * i <= index < 5 * (i + 1) for i, index in enumerate(indices))
    assert segment_indices(40, 8) == [2, 7, 12, 17, 22, 27, 32, 37]               # test: segment centres
    assert segment_indices(40, 8, view=0, num_views=2) == [1, 6, 11, 16, 21, 26, 31, 36]
    assert segment_indices(40, 8, view=1, num_views=2) == [3, 8, 13, 18, 23, 28, 33, 38]
    assert segment_indices(3, 8) == [0, 0, 0, 1, 1, 2, 2, 2]                      # short video: repeats
    assert segment_indices(40, 8, generator(1)) == segment_indices(40, 8, generator(1))


def test_dense_sampling():
    for seed in range(20):
        indices = dense_indices(100, 8, 4, generator(seed))
        assert indices == list(range(indices[0], indices[0] + 29, 4)) and 0 <= indices[0] <= 71
    assert dense_indices(100, 8, 4) == [35 + 4 * i for i in range(8)]               # test: the middle window
    assert [dense_indices(100, 8, 4, view=v, num_views=3)[0] for v in range(3)] == [0, 36, 71]
    assert dense_indices(10, 8, 4) == [0, 4, 8, 9, 9, 9, 9, 9]                      # short video: clamped


def test_sharded_sampler_train_and_eval():
    # training: same order for the same (seed, epoch), another order next epoch, resumable mid-epoch
    sampler = ShardedSampler(10, rank=1, world_size=3, shuffle=True, seed=5, length=3)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start=1)
    assert list(sampler) == full[1:] and len(sampler) == 2
    assert all(epoch == 2 for _, epoch in full)
    sampler.set_epoch(3)
    assert list(sampler) != full
    # evaluation: the ranks' shards partition the samples, nothing repeated or padded
    shards = [list(ShardedSampler(10, rank=r, world_size=3, shuffle=False)) for r in range(3)]
    assert sorted(i for shard in shards for i, _ in shard) == list(range(10))


# ------------------------------------------------------------------------------------------- transforms

def test_transforms():
    import numpy as np

    frames = np.random.default_rng(0).integers(0, 256, (6, 40, 60, 3), dtype=np.uint8)
    train = TrainTransform(32, (0.3, 1.0), (0.75, 1.33), flip=False, mean=MEAN, std=STD)
    clip = train(frames, generator(0))
    assert clip.shape == (3, 6, 32, 32) and clip.dtype == torch.float32
    assert torch.equal(clip, train(frames, generator(0)))  # a function of the generator's seed
    test = EvalTransform(32, crops=3, mean=MEAN, std=STD)
    views = [test(frames, c) for c in range(3)]
    assert all(v.shape == (3, 6, 32, 32) for v in views) and not torch.equal(views[0], views[2])
    assert eval_crop_boxes(32, 48, 32, 3) == [(0, 0, 32, 32), (0, 8, 32, 32), (0, 16, 32, 32)]
    flat = np.full((2, 8, 8, 3), 255 * 0.45, np.float32).round().astype(np.uint8)
    assert EvalTransform(8, 1, MEAN, STD)(flat, 0).abs().max() < 0.01  # (x/255 - mean) / std
    for seed in range(10):
        top, left, h, w = random_resized_box(40, 60, (0.08, 1.0), (0.75, 1.33), generator(seed))
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 60


# ------------------------------------------------------------------------------ datasets, bad videos

def _ssv2_tree(root, videos: dict[str, int], broken=(), missing=()):
    """An SSv2-layout dataset: <root>/v/<id>.webm, annotation and labels JSON in root."""
    templates = ["Moving [something] up", "Moving [something] down"]
    (root / "v").mkdir(parents=True, exist_ok=True)
    entries = []
    for video_id, label in videos.items():
        path = root / "v" / f"{video_id}.webm"
        if video_id in broken:
            path.write_bytes(b"corrupt" * 20)
        elif video_id not in missing:
            write_video(str(path), count=6 + label)
        entries.append({"id": video_id, "template": templates[label], "placeholders": ["x"]})
    (root / "train.json").write_text(json.dumps(entries))
    (root / "labels.json").write_text(json.dumps({t.replace("[", "").replace("]", ""): str(i)
                                                  for i, t in enumerate(templates)}))
    return DataOptions(dataset="ssv2", data_root=str(root / "v"), num_frames=4, img_size=16, mean=MEAN, std=STD,
                       train_list=str(root / "train.json"), val_list=str(root / "train.json"),
                       labels_file=str(root / "labels.json"), crop_scale=(0.5, 1.0))


def test_ssv2_dataset_end_to_end(tmp_path):
    options = _ssv2_tree(tmp_path, {"a": 0, "b": 1, "c": 0})
    classes = read_classes(options)
    train = build_dataset(options, "train", classes, train=True)
    assert train.transform.flip is False and train.sampling == "segment"  # Something-Something rules
    batch = collate([train[(i, 0)] for i in range(3)])
    assert batch["clip"].shape == (3, 3, 4, 16, 16) and batch["label"].tolist() == [0, 1, 0]
    assert torch.equal(train[(1, 0)]["clip"], train[(1, 0)]["clip"])      # same (epoch, index): same clip
    assert not torch.equal(train[(1, 0)]["clip"], train[(1, 1)]["clip"])  # next epoch: new augmentation
    options = DataOptions(**{**options.__dict__, "test_clips": 2, "test_crops": 3})
    test = build_dataset(options, "test", classes, train=False)
    assert len(test) == 3 * 6 and test[7]["index"] == 7


def test_corrupt_video_is_skipped_and_counted(tmp_path):
    options = _ssv2_tree(tmp_path, {"a": 0, "b": 1, "c": 0, "d": 1}, broken={"b"})
    classes = read_classes(options)
    train = build_dataset(options, "train", classes, train=True)
    with pytest.warns(UnreadableVideoWarning, match="b.webm"):
        sample = train[(1, 0)]
    assert sample["valid"] and sample["bad"] == [1]        # another video took the slot...
    with pytest.warns(UnreadableVideoWarning):
        again = train[(1, 0)]
    assert torch.equal(again["clip"], sample["clip"])      # ...the same one every time
    val = build_dataset(options, "val", classes, train=False)
    with pytest.warns(UnreadableVideoWarning):
        sample = val[1]
    assert not sample["valid"] and sample["bad"] == [1]    # evaluation leaves it out instead


def test_missing_videos(tmp_path):
    options = _ssv2_tree(tmp_path, {"a": 0, "b": 1, "c": 0}, missing={"c"})
    with pytest.warns(UserWarning, match="1 of 3 listed videos do not exist"):
        dataset = build_dataset(options, "train", read_classes(options), train=True)
    assert len(dataset) == 2 and dataset.missing[0].endswith("c.webm")
    options = _ssv2_tree(tmp_path / "mostly", {"a": 0, "b": 1, "c": 0}, missing={"b", "c"})
    with pytest.raises(DatasetError, match=r"2 of 3 listed videos \(67%\) do not exist"):
        build_dataset(options, "train", read_classes(options), train=True)


def test_training_gives_up_on_a_dataset_of_broken_files(tmp_path):
    options = _ssv2_tree(tmp_path, {"a": 0, "b": 1}, broken={"a", "b"})
    dataset = build_dataset(options, "train", read_classes(options), train=True)
    with pytest.warns(UnreadableVideoWarning), pytest.raises(RuntimeError, match="unreadable videos in a row"):
        dataset[(0, 0)]


def test_frame_folder_dataset(tmp_path):
    for name, count in (("x", 8), ("y", 5)):
        write_jpeg_folder(str(tmp_path / "frames" / name), count)
    (tmp_path / "frames" / "train_videofolder.txt").write_text("x 8 1\ny 5 0\n")
    (tmp_path / "frames" / "category.txt").write_text("Pushing something\nPulling something\n")
    options = DataOptions(dataset="ssv1", data_root=str(tmp_path / "frames"), num_frames=4, img_size=16,
                          mean=MEAN, std=STD, val_list=str(tmp_path / "frames" / "train_videofolder.txt"))
    classes = read_classes(options)
    assert classes == ["Pushing something", "Pulling something"]
    dataset = build_dataset(options, "val", classes, train=False)
    sample = dataset[0]
    assert sample["clip"].shape == (3, 4, 16, 16) and sample["label"] == 1
    # centres of 4 segments of 8 frames: 1, 3, 5, 7 -> brightness rises frame to frame
    means = sample["clip"].mean(dim=(0, 2, 3))
    assert torch.all(means[1:] > means[:-1])


def test_clip_dataset_rejects_views_in_training():
    transform = TrainTransform(16, (0.5, 1), (0.75, 1.33), False, MEAN, STD)
    with pytest.raises(ValueError, match="test views"):
        ClipDataset([VideoRecord("x", 0)], VideoFileReader(), num_frames=4, sampling="segment",
                    transform=transform, clips=2)
