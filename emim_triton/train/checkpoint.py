"""Training checkpoints: what a run needs to continue exactly where it stopped, written atomically.

A checkpoint holds the model (unwrapped from DDP), optimizer, learning-rate position, GradScaler, EMA,
epoch and step counters, best metric, the random-number states of every rank (python, numpy, torch CPU,
CUDA), the bad-video list and the resolved config. The data order needs no state of its own: it is a
function of (seed, epoch), and the position inside the epoch is ``step_in_epoch``.

Everything is stored as tensors or plain Python values, so `load` can use ``torch.load(weights_only=True)``
(a checkpoint is data; it must never run code). Files are written whole or not at all (`rundir.write_atomic`):
a crash mid-write leaves the previous checkpoint intact, never a truncated file.

``last.pt`` is the run's state; ``best.pt`` is a copy of it taken at the end of the best epoch. They are
two files, so a kill can fall between their writes: last.pt is always written first, and a resumed run
restores a best.pt that is missing or older than the best epoch last.pt records (`Trainer._resume`).
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from .rundir import write_atomic

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
    write_atomic(path, lambda file: torch.save({"format": FORMAT, **state}, file))


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint of this trainer (or not of the model asked for)."""


def load(path: str, mmap: bool = False) -> dict:
    """Read a checkpoint of this trainer (weights_only: no code runs), with a clear error otherwise.

    mmap=True reads tensors only when they are used: cheap when only the counters are wanted.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:
        raise CheckpointError(f"cannot read checkpoint {path!r} with torch.load(weights_only=True): {error}") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not a checkpoint of emim-train ({FORMAT}); to start from model weights "
                              f"use --pretrained instead of --resume")
    return state


def find_resume(run_dir: str) -> str | None:
    """The run directory's last checkpoint, if any (automatic resumption after pre-emption)."""
    path = os.path.join(run_dir, LAST)
    return path if os.path.isfile(path) else None
