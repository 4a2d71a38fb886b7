"""The run directory's safety: one trainer at a time, and files that a kill at any instant leaves whole.

A run is killed whenever its cluster decides (pre-emption, time limits, OOM killer), so every file the
trainer rewrites is written whole or not at all: to a temporary ``.tmp-*`` file in the same directory,
flushed to disk, renamed over the old one, and then the directory itself is flushed, because the rename is
a change of the directory and is not durable until the directory is. A kill mid-write leaves the previous
file and an orphaned temporary file, which the next trainer to claim the directory removes.

Two trainers writing one directory would interleave their checkpoints and logs, so a trainer first takes
an exclusive ``flock`` on a lock file there. The operating system releases such a lock when its process
dies, however it dies, so a killed run never leaves the directory locked. A forked child (a DataLoader
worker) would share the lock and keep it for as long as it outlives a killed trainer, so children close
their copy at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import IO, Callable

from .. import output_paths
from .config import ConfigError

LOCK = ".emim-train.lock"
TEMPORARY_PREFIX = ".tmp-"

_held: list[IO] = []  # this process's claims, which its forked children must not keep


def _drop_in_child() -> None:
    for lock in _held:
        lock.close()  # the child's copy only: the parent's descriptor keeps the lock
    _held.clear()


os.register_at_fork(after_in_child=_drop_in_child)


class RunDirBusy(ConfigError):
    """Another trainer holds the run directory."""


def claim(run_dir: str) -> IO:
    """Lock `run_dir` for this process and remove the temporary files of interrupted writes.

    Returns the open lock file: the lock lasts until `release` (or the end of the process). Raises RunDirBusy
    when another process holds it.
    """
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK)
    lock = open(path, "a+")  # never truncated before the lock is ours: it names the holder
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip()
        lock.close()
        raise RunDirBusy(f"run_dir = {run_dir!r}: another emim-train process{f' (pid {holder})' if holder else ''} "
                         f"is using this run directory (it holds {path}); wait for it to end, stop it, or "
                         f"choose another --run-dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    _held.append(lock)
    # only now: a temporary file of a trainer that is still running is that trainer's write in progress
    for name in os.listdir(run_dir):
        if name.startswith(TEMPORARY_PREFIX):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(run_dir, name))
    return lock


def release(lock: IO | None) -> None:
    """Give the run directory back (closing the file releases the flock)."""
    if lock is not None and not lock.closed:
        _held.remove(lock)
        lock.close()


def write_atomic(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Replace `path` with what `write` puts into a binary file, whole or not at all; a killed write's
    temporary file carries TEMPORARY_PREFIX, which `claim` removes."""
    output_paths.write_atomic(path, write, prefix=TEMPORARY_PREFIX)


def write_text(path: str, text: str) -> None:
    write_atomic(path, lambda file: file.write(text.encode()))
