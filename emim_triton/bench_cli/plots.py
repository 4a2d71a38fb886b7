"""`compare --plot`: one PNG with a bar chart per case and the time-vs-T*H*W scaling curve."""

from __future__ import annotations

from pathlib import Path

from ..cost_model import MODES
from .backends import BACKENDS, LABELS
from .compare import Report


def _color(backend: str) -> str:
    """The same colour for a backend in every panel."""
    return f"C{BACKENDS.index(backend)}"


def plot_report(report: Report, path: str | Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib (it is in the dev extra)") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    cases = report.cases
    timed = [r for r in report.rows if r.median_ms]
    backends = [b for b in BACKENDS if any(r.backend == b for r in timed)]
    fig, axes = plt.subplots(1, len(cases) + 1, figsize=(4.2 * (len(cases) + 1), 4.2), squeeze=False)
    axes = axes[0]
    width = 0.8 / max(1, len(backends))

    for ax, case in zip(axes, cases):  # one bar chart per case: modes on x, a bar per backend
        for i, backend in enumerate(backends):
            times = [next((r.median_ms for r in timed if r.case == case["name"] and r.mode == mode
                           and r.backend == backend), 0.0) for mode in MODES]
            ax.bar([m + (i - (len(backends) - 1) / 2) * width for m in range(len(MODES))], times, width,
                   label=LABELS[backend], color=_color(backend))
        ax.set_xticks(range(len(MODES)), MODES)
        ax.set_yscale("log")
        ax.set_ylabel("median time (ms), log scale")
        ax.set_title(f"{case['name']}\nB={case['B']} T={case['T']} {case['H']}x{case['W']} h={case['heads']}",
                     fontsize=9)

    scaling = axes[-1]  # time against tokens per clip, a line per backend and mode
    tokens = {case["name"]: case["T"] * case["H"] * case["W"] for case in cases}
    for backend in backends:
        for mode, style in zip(MODES, ("-o", "--s")):
            points = sorted((tokens[r.case], r.median_ms) for r in timed if r.backend == backend and r.mode == mode)
            if points:
                scaling.plot(*zip(*points), style, label=f"{LABELS[backend]}, {mode}", color=_color(backend))
    scaling.set_xscale("log")
    scaling.set_yscale("log")
    scaling.set_xlabel("tokens per clip, T*H*W")
    scaling.set_ylabel("median time (ms)")
    scaling.set_title("scaling (other sizes differ between cases)", fontsize=9)
    scaling.legend(fontsize=7)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"EMIM on {report.meta['device']}, {report.meta['dtype']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
