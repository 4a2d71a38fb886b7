"""The run directory against kills at any instant and against a second trainer: best.pt restored after a
kill between the two checkpoint writes, leftovers of killed writes removed, renames made durable, one
trainer per directory with a lock that dies with its process."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys

import pytest

from emim_triton.data import motion
from emim_triton.train import checkpoint as ckpt
from emim_triton.train import rundir
from emim_triton.train.cli import main



@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> list[str]:
    """Options of a run of a few seconds: uniformer_xt, 2 steps and a validation of 2 clips."""
    pytest.importorskip("av")
    root = str(tmp_path_factory.mktemp("motion"))
    motion.generate(root, train=4, val=2, size=32, num_classes=2, workers=1)
    return ["--model", "uniformer_xt", "--dataset", "ssv2", "--device", "cpu", "--data-root",
            os.path.join(root, "videos"), "--train-list", os.path.join(root, "something-something-v2-train.json"),
            "--val-list", os.path.join(root, "something-something-v2-validation.json"),
            "--labels-file", os.path.join(root, "something-something-v2-labels.json"), "--num-frames", "2",
            "--img-size", "16", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "2", "--lr-base-batch", "2",
            "--num-workers", "0", "--no-progress", "--no-tensorboard"]


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the trainer catches it."""


def test_kill_between_last_and_best_is_repaired_on_resume(tiny, tmp_path, monkeypatch):
    run = tmp_path / "run"
    save = ckpt.save

    def killed_while_writing_best(state, path):
        if os.path.basename(path) == ckpt.BEST:
            (run / ".tmp-killed.pt").write_bytes(b"half a checkpoint")  # what a real kill mid-write leaves
            raise Killed
        save(state, path)

    with monkeypatch.context() as patch:
        patch.setattr(ckpt, "save", killed_while_writing_best)
        with pytest.raises(Killed):
            main(tiny + ["--run-dir", str(run)])
    assert ckpt.load(str(run / ckpt.LAST))["best_epoch"] == 1  # the premise: last.pt names a best epoch
    assert not (run / ckpt.BEST).exists() and not (run / "bad_videos.txt").exists()

    assert main(tiny + ["--run-dir", str(run)]) == 0  # the same command: resumes a finished run
    results = json.loads((run / "results.json").read_text())
    best = ckpt.load(str(run / ckpt.BEST))
    assert results["best_epoch"] == best["epoch"] == best["best_epoch"] == 1
    assert (run / "bad_videos.txt").read_text() == ""
    assert not [p.name for p in run.iterdir() if p.name.startswith(".tmp-")]


def test_claim_removes_leftovers_of_killed_writes_only(tmp_path):
    for name in (".tmp-abc.pt", ".tmp-def.json", "last.pt", "notes.tmp-1"):
        (tmp_path / name).write_text("x")
    lock = rundir.claim(str(tmp_path))
    try:
        assert sorted(p.name for p in tmp_path.iterdir()) == [rundir.LOCK, "last.pt", "notes.tmp-1"]
        assert (tmp_path / rundir.LOCK).read_text() == f"{os.getpid()}\n"
    finally:
        rundir.release(lock)


def test_rename_is_followed_by_a_directory_fsync(tmp_path, monkeypatch):
    """The rename lives in the directory: until the directory is flushed, a power cut can undo it."""
    events = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        events.append(("fsync", "directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        fsync(fd)

    def recording_replace(source, target):
        events.append(("replace", os.path.basename(target)))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    ckpt.save(dict(step=1), str(tmp_path / "last.pt"))
    assert events == [("fsync", "file"), ("replace", "last.pt"), ("fsync", "directory")]


def test_second_trainer_on_a_run_directory_is_refused(tiny, tmp_path, capsys):
    from emim_triton.train.config import parse_config
    from emim_triton.train.distributed import init_distributed
    from emim_triton.train.setup import resolve
    from emim_triton.train.trainer import Trainer

    argv = tiny + ["--run-dir", str(tmp_path)]
    cfg, _ = parse_config(argv)
    dist = init_distributed("cpu")
    first = Trainer(resolve(cfg, dist), dist)
    try:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"another emim-train process (pid {os.getpid()}) is using this run directory" in err
        assert "Traceback" not in err and not (tmp_path / "last.pt").exists()
    finally:
        first.close()
    rundir.release(rundir.claim(str(tmp_path)))  # close() gave the directory back


HOLDER = """
import os, sys, time
from emim_triton.train import rundir
lock = rundir.claim(sys.argv[1])
child = os.fork()  # as a DataLoader worker is forked
if child == 0:
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
time.sleep(120)
"""


def test_lock_of_a_killed_trainer_is_not_stuck(tmp_path):
    """Killed with SIGKILL, while a child it forked lives on (a worker has not noticed yet)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    child = None
    try:
        child = int(holder.stdout.readline())
        with pytest.raises(rundir.RunDirBusy, match=f"pid {holder.pid}"):
            rundir.claim(str(tmp_path))
        holder.kill()  # no handler, no clean-up; the lock file stays behind
        holder.wait()
        assert (tmp_path / rundir.LOCK).exists()
        rundir.release(rundir.claim(str(tmp_path)))
    finally:
        holder.kill()
        holder.wait()
        if child:
            os.kill(child, signal.SIGKILL)


def test_config_and_missing_video_list_are_written_whole(tiny, tmp_path, monkeypatch):
    """config.yaml and missing_videos.txt go through rundir.write_atomic like the checkpoints (a kill mid-write
    leaves the old file or none, never half of one), and config.yaml reads back as the run's configuration."""
    from emim_triton.train.config import load_yaml

    options = list(tiny)
    train_list = options[options.index("--train-list") + 1]
    with open(train_list) as handle:
        entries = json.load(handle)
    with_a_missing_video = tmp_path / "train-with-missing.json"
    with_a_missing_video.write_text(json.dumps(entries + [{**entries[0], "id": "not-on-disk"}]))
    options[options.index("--train-list") + 1] = str(with_a_missing_video)

    written = []
    real = rundir.write_atomic
    monkeypatch.setattr(rundir, "write_atomic", lambda path, write: written.append(os.path.basename(path))
                        or real(path, write))
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="1 of 5 listed videos do not exist"):
        assert main(options + ["--run-dir", str(run)]) == 0
    assert {"config.yaml", "missing_videos.txt"} <= set(written)
    assert (run / "missing_videos.txt").read_text().strip().endswith("not-on-disk.webm")
    assert load_yaml(str(run / "config.yaml"))["run_dir"] == str(run)
