"""Checking output paths before a command does its work (`emim-bench`, `emim-viz`).

A benchmark or a tuning run can take minutes; a typo in an output directory must stop it at the start,
not lose its results at the end. Each function returns what is wrong with a path, or None if it can be
written as far as can be told in advance (the file system may still change, or fill up, meanwhile).
"""

from __future__ import annotations

import os


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
