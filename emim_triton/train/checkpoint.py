"""Training checkpoints: what a run needs to continue exactly where it stopped, written atomically.

A checkpoint holds the model (unwrapped from DDP), optimizer, learning-rate position, GradScaler, EMA,
epoch and step counters, best metric, the random-number states of every rank (python, numpy, torch CPU,
CUDA), the bad-video list and the resolved config. The data order needs no state of its own: it is a
function of (seed, epoch), and the position inside the epoch is ``step_in_epoch``.

Everything is stored as tensors or plain Python values, so `load` can use ``torch.load(weights_only=True)``
(a checkpoint is data; it must never run code). Files are written to a temporary name in the same
directory, flushed to disk, then renamed over the old one: a crash mid-write leaves the previous
checkpoint intact, never a truncated file.
"""

from __future__ import annotations

import os
import random
import tempfile

import numpy as np
import torch

FORMAT = "emim-train-checkpoint-v1"
LAST, BEST = "last.pt", "best.pt"


def rng_state() -> dict:
    """This process's random-number states, as tensors and plain values."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = dict(python=[version, list(mt_state), gauss], numpy=[kind, torch.from_numpy(keys.astype(np.int64)),
                                                                  pos, has_gauss, cached],
                 torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(state: dict, path: str) -> None:
    """Write atomically: temporary file in the same directory, fsync, rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save({"format": FORMAT, **state}, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def load(path: str) -> dict:
    """Read a checkpoint of this trainer (weights_only: no code runs), with a clear error otherwise."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"cannot read checkpoint {path!r} with torch.load(weights_only=True): {error}") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a checkpoint of emim-train ({FORMAT}); to start from model weights "
                         f"use --pretrained instead of --resume")
    return state


def find_resume(run_dir: str) -> str | None:
    """The run directory's last checkpoint, if any (automatic resumption after pre-emption)."""
    path = os.path.join(run_dir, LAST)
    return path if os.path.isfile(path) else None
