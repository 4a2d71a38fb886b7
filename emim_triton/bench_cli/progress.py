"""A one-line progress bar on stderr (redrawn in place on a terminal, a line per finished task otherwise)."""

from __future__ import annotations

import sys


class ProgressBar:
    def __init__(self, stream=None, width: int = 24):
        self.stream = stream or sys.stderr
        self.width = width
        self.live = getattr(self.stream, "isatty", lambda: False)()

    def update(self, label: str, done: int, total: int, detail: str = "") -> None:
        filled = self.width * done // max(total, 1)
        line = f"{label:20} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} {detail}"
        if self.live:
            self.stream.write("\r\033[K" + line[:160] + ("\n" if done == total else ""))
            self.stream.flush()
        elif done == total:  # logs and pipes: one line per finished task, no carriage returns
            self.stream.write(line + "\n")
