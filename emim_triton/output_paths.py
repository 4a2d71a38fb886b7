"""Checking output paths before a command does its work (`emim-bench`, `emim-viz`).

A benchmark or a tuning run can take minutes; a typo in an output directory must stop it at the start,
not lose its results at the end. Each function returns what is wrong with a path, or None if it can be
written as far as can be told in advance (the file system may still change, or fill up, meanwhile).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Callable


def file_problem(path: str | os.PathLike) -> str | None:
    """What stops writing a file at ``path`` (its directory must already exist), or None."""
    path = os.fspath(path)
    if not path or path.endswith(("/", os.sep)) or os.path.isdir(path):
        return "is a directory, not a file name" if path else "is empty; expected a file name"
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        return (f"its directory {directory!r} is not a directory" if os.path.exists(directory)
                else f"its directory {directory!r} does not exist")
    if not os.access(directory, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        return "is not writable"
    return None


def directory_problem(path: str | os.PathLike) -> str | None:
    """What stops using ``path`` as an output directory, creating it (and its parents) if missing, or None."""
    path = os.fspath(path)
    if not path:
        return "is empty; expected a directory"
    existing = os.path.abspath(path)
    while not os.path.exists(existing):  # the nearest ancestor that exists is where creating starts
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return "is a file, not a directory" if existing == os.path.abspath(path) else f"{existing!r} is a file"
    if not os.access(existing, os.W_OK):
        return f"{existing!r} is not writable"
    return None


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None], prefix: str = ".tmp-") -> None:
    """Replace `path` with what `write` puts into a binary file, whole or not at all: a temporary file (named
    `prefix`...) in the same directory, flushed to disk, renamed over `path`, then the directory flushed,
    because the rename is a change of the directory and is not durable until the directory is. Readers see
    the old file or the new one, never a mix; an interrupted write leaves no temporary file behind, except
    after a kill, which the owner of the directory cleans up by `prefix`."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=prefix, suffix=os.path.splitext(path)[1], dir=directory)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise
    fsync_directory(directory)


def fsync_directory(directory: str) -> None:
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
