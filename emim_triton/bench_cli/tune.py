"""`emim-bench autotune`: tune every kernel for some shapes on this GPU, show the winners, write the cache."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Callable

import torch
import triton

from .. import autotune
from ..launch_configs import KERNELS, candidate_configs, default_configs
from ..tuning_cache import SHIPPED_DEFAULTS, add_to_shipped_defaults, configs_to_json, entry_key
from .cases import BenchCase
from .progress import ProgressBar


def shipped_defaults_path() -> Path:
    """The package's shipped-defaults file (in a source checkout: emim_triton/tuned/tuned_configs.json)."""
    return Path(str(resources.files("emim_triton.tuned").joinpath(SHIPPED_DEFAULTS)))


def describe(cfg) -> str:
    fields = cfg.as_dict()
    if "block_h" in fields:
        tile = f"{fields['block_h']}x{fields['block_w']}"
        return f"tile {tile} chunk {fields['hidden_chunk']} warps {fields['num_warps']} stages {fields['num_stages']}"
    return (f"rows {fields['block_rows']} chunk {fields['hidden_chunk']} programs {fields['programs']} "
            f"warps {fields['num_warps']} stages {fields['num_stages']}")


def list_candidates(cases: list[BenchCase], dtype: torch.dtype, out: Callable[[str], None] = print) -> None:
    """The pruned search space per kernel and the heuristic's choice (no GPU needed)."""
    for case in cases:
        s = case.shape
        out(f"{case.name} ({case.describe()}), {str(dtype).removeprefix('torch.')}: "
            f"cache key {entry_key(s, dtype)}")
        heuristic = default_configs(s.height, s.width, s.window, s.head_dim, dtype)
        for kernel in KERNELS:
            out(f"  {kernel:19} {len(candidate_configs(kernel, s, dtype)):4} candidates; heuristic: "
                f"{describe(getattr(heuristic, kernel))}")


def run_autotune(cases: list[BenchCase], dtype: torch.dtype, *, max_configs: int | None, warmup_ms: float,
                 rep_ms: float, write_defaults: Path | None, out: Callable[[str], None] = print) -> None:
    device = autotune.current_device()
    cache = autotune.user_cache(device)
    out(f"tuning on {device.name} (sm_{device.capability[0]}{device.capability[1]}), triton {triton.__version__}, "
        f"kernels {autotune.KERNEL_VERSION}; cache {cache.path}")
    bar = ProgressBar()
    tuned = {}
    for case in cases:
        def progress(kernel, done, total, trial, _name=case.name):
            shown = f"{trial.median_ms:.3f} ms" if trial.median_ms is not None else trial.note[:60]
            bar.update(f"{_name[:12]} {kernel[:7]}", done, total, f"{describe(trial.config)}: {shown}")

        result = autotune.tune_and_cache(case.shape, dtype, max_configs=max_configs, warmup_ms=warmup_ms,
                                         rep_ms=rep_ms, progress=progress)
        key = entry_key(case.shape, dtype)
        tuned[key] = {**configs_to_json(result.configs), "info": result.summary()}
        out(f"\n{case.name} ({case.describe()}) -> {key}")
        out(f"  {'kernel':19} {'winner':50} {'ms':>8} {'heuristic ms':>12} {'gain':>6} {'timed/tried':>11}")
        for kernel in KERNELS:
            best, base = result.best(kernel), result.heuristic_trial(kernel)
            trials = result.trials[kernel]
            timed = sum(t.median_ms is not None for t in trials)
            gain = f"{base.median_ms / best.median_ms:.2f}x" if base and base.median_ms else "-"
            base_ms = f"{base.median_ms:.3f}" if base and base.median_ms else "-"
            out(f"  {kernel:19} {describe(best.config):50} {best.median_ms:8.3f} {base_ms:>12} {gain:>6} "
                f"{timed:>5}/{len(trials):<5}")
        for kind, trial in result.strategy_trials.items():
            tensor_core = f"{trial.tensor_core_ms:.3f} ms" if trial.tensor_core_ms is not None else "-"
            out(f"  {kind} strategy: offset loop {trial.offset_loop_ms:.3f} ms, tensor core {tensor_core} -> "
                f"{trial.chosen} ({trial.note})")
    out(f"\nwrote {len(tuned)} entr{'y' if len(tuned) == 1 else 'ies'} to {cache.path}")
    if write_defaults is not None:
        add_to_shipped_defaults(write_defaults, device, tuned, triton.__version__, autotune.KERNEL_VERSION)
        out(f"added them to the shipped defaults {write_defaults}")
