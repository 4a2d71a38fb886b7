"""PNG plots from ``log.jsonl``: one run's loss and accuracy curves, and several runs side by side."""

from __future__ import annotations

import os

from .logger import read_log


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    return plt


def _series(records: list[dict], kind: str, key: str, x: str = "step") -> tuple[list, list]:
    points = [(r[x], r[key]) for r in records if r["kind"] == kind and r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _draw(axes, records: list[dict], label: str | None = None, colour=None) -> None:
    loss_axes, accuracy_axes = axes
    steps, losses = _series(records, "train", "loss")
    loss_axes.plot(steps, losses, label=label, color=colour, alpha=0.85)
    for key, style in (("top1", "-o"), ("ema_top1", "--")):
        epochs, accuracy = _series(records, "val", key, x="epoch")
        if accuracy:
            name = "val top-1" if key == "top1" else "val top-1 (EMA)"
            accuracy_axes.plot(epochs, accuracy, style, color=colour,
                               label=f"{label} {name}" if label else name, markersize=4)


def plot_run(run_dir: str, out: str | None = None, title: str | None = None) -> str:
    """loss vs step and validation accuracy vs epoch of one run -> ``<run_dir>/curves.png``."""
    plt = _pyplot()
    records = read_log(os.path.join(run_dir, "log.jsonl"))
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    _draw(axes, records)
    _decorate(axes, title or os.path.basename(os.path.normpath(run_dir)))
    out = out or os.path.join(run_dir, "curves.png")
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def plot_runs(run_dirs: dict[str, str], out: str, title: str, summary: dict[str, dict] | None = None) -> str:
    """Several runs (label -> run dir) on the same two panels; with `summary` (label -> dict of top1,
    params, wall time in s) a third panel of bars: final top-1, labelled with parameters and wall time."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 3 if summary else 2, figsize=(16 if summary else 11, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (label, run_dir), colour in zip(run_dirs.items(), colours):
        _draw(axes[:2], read_log(os.path.join(run_dir, "log.jsonl")), label, colour)
    _decorate(axes[:2], title)
    if summary:
        bars = axes[2]
        labels = list(summary)
        values = [summary[k]["top1"] for k in labels]
        bars.bar(range(len(labels)), values, color=colours[:len(labels)])
        for i, label in enumerate(labels):
            s = summary[label]
            bars.text(i, values[i] + 1, f"{values[i]:.1f}%\n{s['params'] / 1e6:.3f} M params\n{s['wall_s']:.0f} s",
                      ha="center", va="bottom", fontsize=8)
        bars.set_xticks(range(len(labels)), labels, fontsize=8)
        bars.set(ylabel="final val top-1 (%)", ylim=(0, 119), title="result")
        bars.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def _decorate(axes, title: str) -> None:
    loss_axes, accuracy_axes = axes
    loss_axes.set(xlabel="optimizer step", ylabel="training loss", title=title)
    accuracy_axes.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="validation")
    accuracy_axes.xaxis.get_major_locator().set_params(integer=True)
    for a in axes:
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
