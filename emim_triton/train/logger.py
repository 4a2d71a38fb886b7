"""What people watch during a run: a progress bar, a JSON-lines log, TensorBoard if it is installed.

Only rank 0 creates a `RunLogger`; other ranks get a silent one. The JSON-lines file ``log.jsonl`` holds one
record per line, ``{"kind": "train"|"val"|..., "epoch", "step", ...}``; it is the source of the curves
plot. On resumption, records written after the checkpoint (work that is being redone) are dropped first, so
the log of a resumed run reads like that of an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import sys
import time

from .rundir import write_text


def _format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """tqdm on a terminal; a plain line every `every` updates elsewhere (CI logs, files)."""

    def __init__(self, total: int, initial: int, description: str, enabled: bool, every: int = 10):
        self.total, self.count, self.description = total, initial, description
        self.enabled, self.every = enabled, every
        self.postfix = ""
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=description, unit="step", dynamic_ncols=True,
                            leave=False)

    def update(self, postfix: str = "") -> None:
        self.count += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(1)
        elif self.count % self.every == 0 or self.count == self.total:
            print(f"{self.description} {self.count}/{self.total} {postfix}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Throughput:
    """Clips per second over a sliding window of steps, and the ETA of the remaining steps."""

    def __init__(self, window: int = 20):
        self.window, self.marks = window, []

    def mark(self, clips: int) -> None:
        self.marks = (self.marks + [(time.perf_counter(), clips)])[-self.window - 1:]

    def clips_per_second(self) -> float:
        if len(self.marks) < 2:
            return 0.0
        elapsed = self.marks[-1][0] - self.marks[0][0]
        return sum(c for _, c in self.marks[1:]) / elapsed if elapsed > 0 else 0.0

    def eta(self, remaining_steps: int) -> str:
        if len(self.marks) < 2:
            return "?"
        per_step = (self.marks[-1][0] - self.marks[0][0]) / (len(self.marks) - 1)
        return _format_seconds(per_step * remaining_steps)


class RunLogger:
    """JSON-lines + TensorBoard + console, for rank 0 (``enabled=False`` elsewhere: every call is a no-op)."""

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "log.jsonl")
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional; the JSON-lines log always exists
                pass
            else:
                self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def truncate_after(self, step: int, completed_epochs: int) -> None:
        """Drop records of work a resumed run is about to redo (training after `step`, evaluation of
        epochs not completed at the checkpoint)."""
        if not self.enabled or not os.path.isfile(self.path):
            return
        with open(self.path) as handle:
            records = [json.loads(line) for line in handle if line.strip()]
        kept = [r for r in records if (r["step"] <= step if r["kind"] == "train" else r["epoch"] <= completed_epochs)]
        # whole or not at all: a kill while rewriting in place would lose the log of the whole run
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, kind: str, epoch: int, step: int, **values) -> None:
        if not self.enabled:
            return
        record = dict(kind=kind, epoch=epoch, step=step, time=round(time.time(), 3), **values)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{kind}/{name}", value, step)

    def print(self, *args) -> None:
        if self.enabled:
            print(*args, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_log(path: str) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]
