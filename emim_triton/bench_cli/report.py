"""Writing a `compare` report: a terminal table, JSON and CSV files."""

from __future__ import annotations

import csv
import json
from dataclasses import fields
from pathlib import Path

from .backends import LABELS
from .compare import Report, Row


def _num(value, fmt: str, missing: str = "-") -> str:
    return missing if value is None else format(value, fmt)


def format_table(report: Report) -> str:
    meta = report.meta
    c = meta["ceilings"]
    lines = [f"emim-bench compare on {meta['device']}: torch {meta['torch']}, triton {meta['triton']}, "
             f"{meta['dtype']} activations, {meta['parameters']} parameters",
             f"ceilings: copy {c['bandwidth_GBps']:.1f} GB/s, matmul {c['matmul_TFLOPs']:.2f} TFLOP/s "
             f"({c['source']})",
             f"timing: {meta['timing']['method']}; {meta['timing']['input_sets']} input sets rotated"]
    lines += [f"NOTE: {note}" for note in meta["notes"]]
    header = (f"{'mode':17} {'backend':27} {'median ms':>10} {'p20-p80 ms':>15} {'TFLOP/s':>8} {'GB/s':>8} "
              f"{'roof %':>7} {'peak MiB':>9} {'vs eager':>8} {'fused x':>8}  status")
    for case in report.cases:
        name = case["name"]
        lines += ["", f"{name}: B={case['B']} T={case['T']} {case['H']}x{case['W']} heads={case['heads']} "
                      f"D={case['D']} K={case['K']}" + (f" ({case['layers']} layers)" if case["layers"] > 1 else "")]
        for mode in ("forward", "forward+backward"):
            if f"{mode}_flops" in case:
                lines.append(f"  {mode}: {case[f'{mode}_flops'] / 1e9:.4g} GFLOP, {case[f'{mode}_bytes'] / 1e6:.4g} MB; "
                             f"floors: memory {case[f'{mode}_memory_floor_ms']:.4g} ms, "
                             f"compute {case[f'{mode}_compute_floor_ms']:.4g} ms")
        lines.append("  " + header)
        for row in (r for r in report.rows if r.case == name):
            lines.append("  " + _format_row(row))
    return "\n".join(lines)


def _format_row(row: Row) -> str:
    spread = (f"{row.p20_ms:.3f}-{row.p80_ms:.3f}" if row.p20_ms is not None else "-")
    status = row.status if not row.note else f"{row.status}: {row.note}"
    return (f"{row.mode:17} {LABELS.get(row.backend, row.backend):27} {_num(row.median_ms, '.3f'):>10} "
            f"{spread:>15} {_num(row.tflops, '.3f'):>8} {_num(row.gbps, '.1f'):>8} "
            f"{_num(None if row.roofline_fraction is None else 100 * row.roofline_fraction, '.1f'):>7} "
            f"{_num(row.peak_mib, '.1f', 'n/a' if row.status == 'ok' else '-'):>9} "
            f"{_num(row.speedup_vs_reference, '.2f'):>8} {_num(row.fused_speedup, '.2f'):>8}  {status}")


def write_json(report: Report, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report.as_dict(), indent=1) + "\n")


def write_csv(report: Report, path: str | Path) -> None:
    """One line per row, with the case's shape columns in front."""
    shapes = {case["name"]: case for case in report.cases}
    shape_columns = ["B", "T", "H", "W", "heads", "D", "K"]
    row_columns = [f.name for f in fields(Row)]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(row_columns[:1] + shape_columns + row_columns[1:] + ["dtype", "device"])
        for row in report.rows:
            values = [getattr(row, name) for name in row_columns]
            case = shapes[row.case]
            writer.writerow(values[:1] + [case[c] for c in shape_columns] + values[1:]
                            + [report.meta["dtype"], report.meta["device"]])
