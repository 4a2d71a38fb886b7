"""The trainer end to end on a tiny generated motion dataset (real WebM files): a short run, --test,
exact resumption after a stop hook and after SIGTERM, and a 2-process torchrun run on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from emim_triton.data import motion
from emim_triton.train import checkpoint as ckpt
from emim_triton.train.cli import main
from emim_triton.train.logger import read_log

pytest.importorskip("av")

TRAIN_CLIPS, VAL_CLIPS = 16, 5  # an odd validation set: 2 ranks get 3 + 2 clips


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("motion"))
    motion.generate(root, train=TRAIN_CLIPS, val=VAL_CLIPS, size=32, num_classes=4, workers=1)
    return root


def train_args(data: str, run_dir, *extra) -> list[str]:
    """Tiny but complete: EMA, mixup/cutmix, drop-path, accumulation, warm-up, evaluation every epoch.
    On the CPU also where a GPU is present: exact resumption is promised on the CPU, and gloo serves the
    2-process run on a one-GPU machine."""
    return ["--model", "emim_uniformer_xt", "--attn-backend", "reference", "--dataset", "ssv2", "--device", "cpu",
            "--data-root", os.path.join(data, "videos"),
            "--train-list", os.path.join(data, "something-something-v2-train.json"),
            "--val-list", os.path.join(data, "something-something-v2-validation.json"),
            "--labels-file", os.path.join(data, "something-something-v2-labels.json"),
            "--run-dir", str(run_dir), "--num-frames", "4", "--img-size", "32", "--crop-scale", "0.5", "1",
            "--epochs", "3", "--batch-size", "2", "--accum-steps", "2", "--lr", "2e-3", "--lr-base-batch", "4",
            "--warmup-epochs", "1", "--drop-path", "0.1", "--ema", "--mixup", "0.8", "--cutmix", "1.0",
            "--num-workers", "0", "--log-every", "1", "--no-progress", "--no-tensorboard", "--seed", "3", *extra]


def assert_same_state(path_a, path_b):
    """Bit-exact equality of two checkpoints: weights, optimizer, EMA, counters, RNG states."""
    a, b = ckpt.load(str(path_a)), ckpt.load(str(path_b))

    def compare(x, y, where):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), f"{where} differs"
        elif isinstance(x, dict):
            assert x.keys() == y.keys(), f"{where}: keys differ"
            for key in x:
                compare(x[key], y[key], f"{where}.{key}")
        elif isinstance(x, (list, tuple)):
            assert len(x) == len(y), f"{where}: lengths differ"
            for i, (u, v) in enumerate(zip(x, y)):
                compare(u, v, f"{where}[{i}]")
        else:
            assert x == y, f"{where}: {x!r} != {y!r}"

    for key in ("model", "optimizer", "ema", "epoch", "step_in_epoch", "global_step", "best_metric", "rng"):
        compare(a[key], b[key], key)


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory):
    """An uninterrupted run: the state every interrupted-and-resumed run must end in."""
    run_dir = tmp_path_factory.mktemp("reference")
    torch.set_num_threads(1)  # the subprocess runs below use one thread too: identical float reductions
    assert main(train_args(data, run_dir)) == 0
    return run_dir


def test_short_training_run(reference_run):
    for name in ("config.yaml", "log.jsonl", "results.json", "curves.png", "confusion_val.csv", "per_class_val.csv",
                 "last.pt", "best.pt", "bad_videos.txt"):
        assert os.path.isfile(reference_run / name), name
    records = read_log(str(reference_run / "log.jsonl"))
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in train] == list(range(1, 13))      # 16 clips / (2 x 2) = 4 steps, 3 epochs
    assert [r["epoch"] for r in val] == [1, 2, 3] and all(r["videos"] == VAL_CLIPS for r in val)
    assert all("ema_top1" in r for r in val)
    results = json.loads((reference_run / "results.json").read_text())
    assert results["steps"] == 12 and results["bad_videos"] == 0 and results["params"] > 0
    resolved = (reference_run / "config.yaml").read_text()
    assert "flip: false" in resolved and "sampling: segment" in resolved and "amp: fp32" in resolved


def test_test_mode_multi_view(data, reference_run):
    assert main(train_args(data, reference_run, "--test", "--test-clips", "2", "--test-crops", "3")) == 0
    results = json.loads((reference_run / "test_results.json").read_text())
    assert results["videos"] == VAL_CLIPS and results["views"] == 6 and results["skipped_videos"] == 0
    assert "EMA" in results["checkpoint"] and os.path.isfile(reference_run / "per_class_test.csv")


def test_stop_and_resume_is_exact(data, reference_run, tmp_path):
    # stop in the middle of epoch 2 (step 6 of 12), then the same command without the hook resumes
    assert main(train_args(data, tmp_path, "--stop-after", "6")) == 0
    stopped = ckpt.load(str(tmp_path / "last.pt"))
    assert (stopped["epoch"], stopped["step_in_epoch"], stopped["global_step"]) == (1, 2, 6)
    assert main(train_args(data, tmp_path)) == 0
    assert_same_state(tmp_path / "last.pt", reference_run / "last.pt")
    # the log of the resumed run reads like the uninterrupted one
    steps = [r["step"] for r in read_log(str(tmp_path / "log.jsonl")) if r["kind"] == "train"]
    assert steps == list(range(1, 13))


def test_close_shuts_down_the_workers_a_stop_leaves_running(data, tmp_path):
    """A stop leaves persistent loader workers mid-epoch; Trainer.close() (which the CLI calls on every
    exit path) shuts them down at once instead of leaving them to interpreter exit."""
    import multiprocessing

    from emim_triton.train.config import parse_config
    from emim_triton.train.distributed import init_distributed
    from emim_triton.train.setup import resolve
    from emim_triton.train.trainer import Stopped, Trainer

    cfg, _ = parse_config(train_args(data, tmp_path, "--num-workers", "1", "--stop-after", "2"))
    dist = init_distributed("cpu")
    trainer = Trainer(resolve(cfg, dist), dist)
    with pytest.raises(Stopped):
        trainer.fit()
    assert multiprocessing.active_children(), "the premise: a stopped run's persistent workers are still up"
    trainer.close()
    assert multiprocessing.active_children() == []
    trainer.close()  # twice is harmless


def test_sigterm_checkpoints_and_resume_is_exact(data, reference_run, tmp_path):
    # a real signal, at whatever point the run has reached, with a DataLoader worker process running
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "emim_triton.train", *train_args(data, tmp_path, "--num-workers", "1")]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "log.jsonl"
    deadline = time.time() + 120
    while process.poll() is None and time.time() < deadline:
        if log.exists() and any(r["kind"] == "train" and r["step"] >= 2 for r in read_log(str(log))):
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 128 + signal.SIGTERM, output
    assert "SIGTERM" in output and "Traceback" not in output
    assert 2 <= ckpt.load(str(tmp_path / "last.pt"))["global_step"] < 12
    assert main(train_args(data, tmp_path)) == 0
    assert_same_state(tmp_path / "last.pt", reference_run / "last.pt")


def test_torchrun_two_processes_evaluate_every_sample_once(data, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "emim_triton.train", *train_args(data, tmp_path, "--epochs", "1", "--accum-steps", "1")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["world_size"] == 2 and results["global_batch"] == 4 and results["steps"] == 4
    val = [r for r in read_log(str(tmp_path / "log.jsonl")) if r["kind"] == "val"]
    assert [r["videos"] for r in val] == [VAL_CLIPS]  # 3 + 2 over the ranks, none padded or repeated
    # multi-view test on 2 ranks: 5 videos x 2 clips x 3 crops = 30 views over the ranks, each once
    command += ["--test", "--test-clips", "2", "--test-crops", "3"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    test = json.loads((tmp_path / "test_results.json").read_text())
    assert test["videos"] == VAL_CLIPS and test["views"] == 6


def test_corrupt_training_video_is_listed_in_the_run_dir(data, tmp_path):
    # a copy of the dataset's annotations with one video replaced by garbage
    broken = tmp_path / "videos"
    broken.mkdir()
    for name in os.listdir(os.path.join(data, "videos")):
        os.symlink(os.path.join(data, "videos", name), broken / name)
    (broken / "t00003.webm").unlink()
    (broken / "t00003.webm").write_bytes(b"not a video" * 50)
    args = train_args(data, tmp_path / "run", "--epochs", "1", "--ema", "--no-ema")
    args[args.index("--data-root") + 1] = str(broken)
    with pytest.warns(UserWarning, match="t00003.webm"):
        assert main(args) == 0
    assert (tmp_path / "run" / "bad_videos.txt").read_text().strip().endswith("t00003.webm")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["bad_videos"] == 1 and results["final"]["skipped_videos"] == 0


def test_main_job_compare_end_to_end(tmp_path):
    """The main job's script at a toy size: data written, both models trained through the trainer, the
    table, plot and motion measurement written. The motion share is exactly 0 until training has moved
    the EMIM blocks' zero-initialised motion output layer, so it must come out positive."""
    from emim_triton.train import emim_vs_twin as compare

    out = tmp_path / "runs"
    compare.main(["--data", str(tmp_path / "motion"), "--out", str(out), "--train-clips", "8", "--val-clips", "4",
                  "--classes", "2", "--", "--epochs", "1", "--num-frames", "4", "--img-size", "32",
                  "--batch-size", "2", "--num-workers", "0", "--no-tensorboard", "--device", "cpu"])
    summary = json.loads((out / "comparison.json").read_text())["results"]
    emim, twin = summary["emim_uniformer_xt"], summary["uniformer_xt"]
    assert (emim["emim_blocks"], twin["emim_blocks"]) == (2, 0)
    assert emim["params"] > twin["params"]
    for run in (emim, twin):
        assert 0.0 <= run["final"]["top1"] <= 100.0
    assert len(emim["motion_share"]) == 2 and all(0.0 < s < float("inf") for s in emim["motion_share"])
    assert "emim_uniformer_xt" in (out / "comparison.md").read_text()
    assert (out / "comparison.png").stat().st_size > 10_000
