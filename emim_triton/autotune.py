"""Per-GPU autotuning of the fused kernels, and the order in which the op finds its configurations.

`resolve_configs(shape, dtype)` is what the op asks (``emim_triton.ops``, before each launch):

1. under TRITON_INTERPRET=1: the interpreter's one configuration; nothing is timed;
2. without a CUDA device: the heuristic (``configs.default_configs``);
3. the user's tuning cache for this GPU (``tuning_cache``), if it has the shape's entry;
4. if ``EMIM_TRITON_AUTOTUNE=1``: tune now and cache it (once per shape bucket; at most
   ``EMIM_TRITON_AUTOTUNE_MAX_CONFIGS`` candidates per kernel, default 32, 0 for all: a few minutes);
5. the shipped defaults for this GPU model (package data), if they have the entry;
6. the heuristic.

So an untuned shape never stalls a training job unless the user opted in; ``emim-bench autotune`` tunes
ahead of time instead (also the way to go before capturing CUDA graphs: tuning launches and allocates).
A tuning that fails falls back to steps 5-6 with a warning. Answers are remembered per (device, dtype, shape) for the life of the process:
call `reset()` after changing the cache directory or the environment.

`tune` times every kernel separately on the GPU: each candidate of the kernel's pruned search space
(``configs.candidate_configs``) is launched on random device tensors of the real shapes (built from the
op's own launch descriptions, ``triton_backend.example_launches``), dropped if the compiled kernel does
not fit (shared memory beyond the device's limit, register spills), else timed with
``triton.testing.do_bench`` (median). The fastest wins per kernel; the winners together must then give
the heuristic's results on random inputs before they are returned. Then the strategy of each direction
(``strategies``): the tensor-core kernels, where they take the shape, are timed against the tuned offset-loop
kernels of that direction, and recorded as the configurations' strategy only where faster and giving the
offset loop's outputs and gradients (`choose_strategies`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import threading
import time
import warnings
from dataclasses import dataclass, field
from importlib import resources
from typing import Callable

import torch
import triton
import triton.testing  # not always imported by `import triton`

from .checks import EMIMShape
from .launch_configs import EMIMConfigs, KERNELS, candidate_configs, default_configs, interpreter_configs
from . import strategies, tensor_core_backward, tensor_core_forward, tensor_core_key_value, triton_backend
from .environment import interpreter_enabled
from .testing import INPUT_NAMES, SAME_FUNCTION_RTOL, make_inputs, relative_error
from .tuning_cache import (DeviceId, TuningCache, configs_from_json, dtype_name, entry_key,
                           read_shipped_defaults)

AUTOTUNE_ENV = "EMIM_TRITON_AUTOTUNE"
MAX_CONFIGS_ENV = "EMIM_TRITON_AUTOTUNE_MAX_CONFIGS"
# With EMIM_TRITON_AUTOTUNE=1 inside a training job, time at most this many candidates per kernel
# (~1-2 s of compile each): a couple of minutes per new shape bucket instead of ten.
DEFAULT_MAX_CONFIGS_IN_JOB = 32


def kernel_version(folder=None) -> str:
    """A digest of the kernels' source (`folder`: the installed kernels by default): editing any kernel
    invalidates every tuning cache."""
    folder = folder if folder is not None else resources.files("emim_triton.kernels")
    digest = hashlib.sha256()
    for source in sorted(folder.iterdir(), key=lambda p: p.name):
        if source.name.endswith(".py"):
            digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


KERNEL_VERSION = kernel_version()


@dataclass(frozen=True)
class Resolved:
    """The configurations the op will use for a shape, and where they came from."""

    configs: EMIMConfigs
    source: str  # "interpreter", "heuristic", "cache", "tuned" or "shipped"


_lock = threading.RLock()  # one tuning at a time; guards the module-level state below
_resolved: dict[tuple, Resolved] = {}
_caches: dict[DeviceId, TuningCache] = {}
_devices: dict[int, DeviceId] = {}
_shipped: dict | None = None


def reset() -> None:
    """Forget every remembered answer, cache file and the shipped defaults (they are re-read on demand)."""
    global _shipped
    with _lock:
        _resolved.clear()
        _caches.clear()
        _devices.clear()
        _shipped = None


def autotune_requested() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "0") not in ("", "0")


def current_device() -> DeviceId | None:
    """The current CUDA device's model, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device()
    if index not in _devices:
        _devices[index] = DeviceId.of_cuda_device(index)
    return _devices[index]


def user_cache(device: DeviceId) -> TuningCache:
    """The user's tuning cache for `device` under this Triton and these kernels (one object per process)."""
    with _lock:
        if device not in _caches:
            _caches[device] = TuningCache(device, triton.__version__, KERNEL_VERSION)
        return _caches[device]


def shipped_defaults() -> dict:
    global _shipped
    with _lock:
        if _shipped is None:
            _shipped = read_shipped_defaults()
        return _shipped


def resolve_configs(shape: EMIMShape, dtype: torch.dtype) -> Resolved:
    """The launch configurations for a call of the op; see the module docstring for the order."""
    heuristic = lambda: default_configs(shape.height, shape.width, shape.window, shape.head_dim, dtype)  # noqa: E731
    if interpreter_enabled():
        return Resolved(interpreter_configs(shape.height, shape.width, shape.window, shape.head_dim, dtype),
                        "interpreter")
    device = current_device()
    if device is None or dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return Resolved(heuristic(), "heuristic")
    memo_key = (device, dtype, shape)
    found = _resolved.get(memo_key)
    if found is not None:
        return found
    with _lock:
        if memo_key not in _resolved:
            _resolved[memo_key] = _look_up(shape, dtype, device, heuristic)
        return _resolved[memo_key]


def _look_up(shape, dtype, device: DeviceId, heuristic) -> Resolved:
    key = entry_key(shape, dtype)
    cache = user_cache(device)
    cached = cache.get(key)
    if cached is not None:
        return Resolved(cached, "cache")
    if autotune_requested():
        try:
            result = tune(shape, dtype, max_configs=_max_configs_from_env())
        except Exception as e:  # a failed tuning must not stop the job: fall back, say why, once
            warnings.warn(f"emim_triton: autotuning {shape} ({dtype}) failed, using untuned configurations: "
                          f"{type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)
        else:
            cache.put(key, result.configs, result.summary())
            return Resolved(result.configs, "tuned")
    shipped = shipped_defaults().get(device.slug, {}).get(key)
    if shipped is not None:
        return Resolved(configs_from_json(shipped), "shipped")
    return Resolved(heuristic(), "heuristic")


def _max_configs_from_env() -> int | None:
    value = os.environ.get(MAX_CONFIGS_ENV, str(DEFAULT_MAX_CONFIGS_IN_JOB))
    try:
        limit = int(value)
    except ValueError:
        raise ValueError(f"{MAX_CONFIGS_ENV} must be an integer (0 = no limit), got {value!r}") from None
    return limit or None


# --- Tuning ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trial:
    """One candidate of one kernel: its median time, or why it was not timed."""

    kernel: str
    config: object  # TileConfig or RowConfig
    median_ms: float | None
    note: str = ""


@dataclass
class TuneResult:
    shape: EMIMShape
    dtype: torch.dtype
    configs: EMIMConfigs
    heuristic: EMIMConfigs
    trials: dict[str, list[Trial]] = field(default_factory=dict)
    strategy_trials: dict[str, "StrategyTrial"] = field(default_factory=dict)

    def best(self, kernel: str) -> Trial | None:
        timed = [t for t in self.trials.get(kernel, ()) if t.median_ms is not None]
        return min(timed, key=lambda t: t.median_ms) if timed else None

    def heuristic_trial(self, kernel: str) -> Trial | None:
        wanted = getattr(self.heuristic, kernel)
        return next((t for t in self.trials.get(kernel, ()) if t.config == wanted), None)

    def summary(self) -> dict:
        """What the cache records with the winners: where and when they were measured, and their times."""
        s = self.shape
        kernels = {}
        for kernel in self.trials:
            best, base = self.best(kernel), self.heuristic_trial(kernel)
            kernels[kernel] = {"ms": best.median_ms if best else None,
                               "heuristic_ms": base.median_ms if base else None,
                               "candidates": len(self.trials[kernel])}
        return {"shape": [s.batch, s.frames, s.height, s.width, s.heads, s.head_dim, s.window],
                "dtype": dtype_name(self.dtype), "tuned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "kernels": kernels,
                "strategies": {kind: dataclasses.asdict(trial) for kind, trial in self.strategy_trials.items()}}


Progress = Callable[[str, int, int, Trial], None]


def tune(shape: EMIMShape, dtype: torch.dtype, *, max_configs: int | None = None, warmup_ms: float = 25,
         rep_ms: float = 100, progress: Progress | None = None) -> TuneResult:
    """Time each kernel's candidates at `shape` on the current CUDA device and return the fastest.

    max_configs: time at most this many candidates per kernel (the heuristic's and a seeded random
    sample of the rest); None times them all. Under TRITON_INTERPRET=1 nothing is timed and the
    interpreter's configuration is returned.
    """
    heuristic = default_configs(shape.height, shape.width, shape.window, shape.head_dim, dtype)
    if interpreter_enabled():
        configs = interpreter_configs(shape.height, shape.width, shape.window, shape.head_dim, dtype)
        return TuneResult(shape, dtype, configs, heuristic)
    if not torch.cuda.is_available():
        raise RuntimeError("autotuning times the kernels on a CUDA GPU, and torch sees none here "
                           "(torch.cuda.is_available() is False)")
    dtype_name(dtype)  # refuses dtypes the fused kernels do not take
    tensors = _DeviceTensors(torch.device("cuda", torch.cuda.current_device()))
    result = TuneResult(shape, dtype, heuristic, heuristic)
    winners = {}
    for kernel in KERNELS:
        candidates = sample_candidates(candidate_configs(kernel, shape, dtype), max_configs)
        trials = result.trials[kernel] = []
        for done, cfg in enumerate(candidates, 1):
            trials.append(_time_candidate(kernel, cfg, shape, dtype, heuristic, tensors, warmup_ms, rep_ms))
            if progress is not None:
                progress(kernel, done, len(candidates), trials[-1])
        best = result.best(kernel)
        if best is None:
            notes = "; ".join(f"{t.config}: {t.note}" for t in trials[:5])
            raise RuntimeError(f"autotune: no candidate of the {kernel} kernel ran at {shape} ({notes})")
        winners[kernel] = best.config
    result.configs = EMIMConfigs(**winners)
    result.strategy_trials = time_strategies(result, tensors, warmup_ms, rep_ms)
    del tensors  # free the stand-in tensors before checking the winners
    check_same_results(shape, dtype, result.configs, heuristic)
    result.configs = choose_strategies(shape, dtype, result.configs, result.strategy_trials)
    return result


def tune_and_cache(shape: EMIMShape, dtype: torch.dtype, **tune_options) -> TuneResult:
    """`tune` on the current CUDA device, record the winners in the user's cache, and forget the answers
    this process remembered, so that the op's next call finds the new entry."""
    result = tune(shape, dtype, **tune_options)
    user_cache(current_device()).put(entry_key(shape, dtype), result.configs, result.summary())
    reset()
    return result


def sample_candidates(candidates: list, max_configs: int | None) -> list:
    """The first candidate (the heuristic's) and at most max_configs - 1 others, a seeded random sample."""
    if max_configs is None or len(candidates) <= max_configs:
        return list(candidates)
    if max_configs < 1:
        raise ValueError(f"max_configs must be >= 1, got {max_configs}")
    rest = candidates[1:]
    keep = set(random.Random(0).sample(range(len(rest)), max_configs - 1))
    return [candidates[0]] + [cfg for i, cfg in enumerate(rest) if i in keep]


class _DeviceTensors:
    """Device tensors standing in for a launch's meta tensors, made once per (name, shape, strides, dtype).

    Filled with random normal values: timing on zeros (or on whatever memory held) can flatter a kernel.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.tensors: dict[tuple, torch.Tensor] = {}
        self.generator = torch.Generator(device).manual_seed(0)

    def materialize(self, launch):
        """`launch` with its meta tensors replaced by random device tensors; tensors with values (the
        tensor-core key/value kernel's geometry table, whose indices must be real) are moved to the device."""
        args = {name: (self._real(name, value) if value.is_meta else value.to(self.device))
                if isinstance(value, torch.Tensor) else value for name, value in launch.args.items()}
        return dataclasses.replace(launch, args=args)

    def _real(self, name: str, meta: torch.Tensor) -> torch.Tensor:
        key = (name, tuple(meta.shape), meta.stride(), meta.dtype)
        if key not in self.tensors:
            t = torch.empty_strided(meta.shape, meta.stride(), dtype=meta.dtype, device=self.device)
            self.tensors[key] = t.normal_(generator=self.generator)
        return self.tensors[key]


def _time_candidate(kernel, cfg, shape, dtype, heuristic, tensors: _DeviceTensors, warmup_ms, rep_ms) -> Trial:
    from triton.runtime.errors import OutOfResources

    configs = dataclasses.replace(heuristic, **{kernel: cfg})
    launch = tensors.materialize(triton_backend.example_launches(shape, dtype, configs)[kernel])
    try:
        # Launched by hand, not with launch(), because the first launch compiles and returns the compiled
        # kernel, which knows its spills; a config needing more shared memory than the device has raises.
        compiled = launch.kernel[launch.grid](**launch.args, **launch.constexprs, num_warps=launch.num_warps,
                                              num_stages=launch.num_stages)
        torch.cuda.synchronize()
    except OutOfResources as e:
        return Trial(kernel, cfg, None, f"does not fit: {e}")
    except Exception as e:  # a compile error: report it, try the next candidate
        return Trial(kernel, cfg, None, _failed(e))
    spills = getattr(compiled, "n_spills", 0) or 0
    if spills and cfg != getattr(heuristic, kernel):  # spilling configs are slow; the heuristic is timed as the baseline
        return Trial(kernel, cfg, None, f"spills {spills} B of registers")
    ms = triton.testing.do_bench(launch, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    return Trial(kernel, cfg, float(ms), f"spills {spills} B" if spills else "")


@dataclass
class StrategyTrial:
    """One direction's two strategies at the tuned shape: the offset loop's time (its tuned kernels; the
    backward's query and key/value sides, the weights kernel being shared), the tensor-core kernels' (their
    default configurations), and what was chosen and why."""

    offset_loop_ms: float
    tensor_core_ms: float | None
    chosen: str = "offset_loop"
    note: str = ""


def _tensor_core_launches(kind: str, shape: EMIMShape, dtype: torch.dtype) -> list:
    if kind == "forward":
        return [tensor_core_forward.example_launch(shape, dtype)]
    return [tensor_core_backward.example_launch(shape, dtype), tensor_core_key_value.example_launch(shape, dtype)]


def time_strategies(result: TuneResult, tensors: "_DeviceTensors", warmup_ms: float, rep_ms: float
                    ) -> dict[str, StrategyTrial]:
    """Time the tensor-core kernels of each direction that takes the shape, next to the tuned offset loop."""
    trials = {}
    offset_kernels = {"forward": ("forward",), "backward": ("backward_query", "backward_key_value")}
    for kind, kernels in offset_kernels.items():
        offset_ms = sum(result.best(kernel).median_ms for kernel in kernels)
        if not strategies.tensor_core_takes(kind, result.shape, result.dtype):
            trials[kind] = StrategyTrial(offset_ms, None, note="the tensor-core kernels do not take this case")
            continue
        try:
            launches = [tensors.materialize(launch) for launch in _tensor_core_launches(kind, result.shape,
                                                                                        result.dtype)]
            tensor_core_ms = sum(float(triton.testing.do_bench(launch, warmup=warmup_ms, rep=rep_ms,
                                                               return_mode="median")) for launch in launches)
        except Exception as e:  # a kernel that does not compile or fit here: keep the offset loop, say why
            trials[kind] = StrategyTrial(offset_ms, None, note=_failed(e))
            continue
        trials[kind] = StrategyTrial(offset_ms, tensor_core_ms)
    return trials


def choose_strategies(shape: EMIMShape, dtype: torch.dtype, configs: EMIMConfigs,
                      trials: dict[str, StrategyTrial], device: torch.device | None = None) -> EMIMConfigs:
    """`configs` with the tensor-core strategy of each direction whose kernels were timed faster, if the op then
    gives the offset loop's outputs and gradients (`check_same_results`); otherwise unchanged (with a warning
    naming the difference). Records the outcome in `trials`."""
    faster = [kind for kind, trial in trials.items()
              if trial.tensor_core_ms is not None and trial.tensor_core_ms < trial.offset_loop_ms]
    for kind, trial in trials.items():
        if trial.tensor_core_ms is not None and kind not in faster:
            trial.note = "the offset loop is faster"
    if not faster:
        return configs
    chosen = dataclasses.replace(configs, **{f"{kind}_strategy": "tensor_core" for kind in faster})
    try:
        check_same_results(shape, dtype, chosen, configs, device=device, against="the offset loop's")
    except RuntimeError as e:
        warnings.warn(f"emim_triton: the tensor-core kernels are faster at {shape} ({dtype}) but not used: {e}",
                      RuntimeWarning, stacklevel=2)
        for kind in faster:
            trials[kind].note = f"faster, but rejected: {e}"
        return configs
    for kind in faster:
        trials[kind].chosen = "tensor_core"
        trials[kind].note = "faster, and the same results"
    return chosen


def _failed(e: Exception) -> str:
    """A trial's note for a launch that raised: the exception's type and first line."""
    first_line = (str(e).splitlines() or [""])[0]
    return f"failed: {type(e).__name__}: {first_line[:200]}"


def check_same_results(shape: EMIMShape, dtype: torch.dtype, configs: EMIMConfigs, reference: EMIMConfigs,
                       seed: int = 0, device: torch.device | None = None, against: str = "the heuristic's") -> None:
    """Raise if `configs` and `reference` give different outputs or gradients on random inputs
    (`testing.SAME_FUNCTION_RTOL` apart).

    device: the current CUDA device by default (a CPU device runs the kernels in the interpreter).
    """
    device = device or torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(device).manual_seed(seed)  # drawn on the device: tuned shapes can be large
    inputs = make_inputs(shape.batch, shape.frames, shape.height, shape.width, shape.heads, shape.head_dim,
                         shape.window, dtype=dtype, device=device, qkv_views=True, generator=gen)
    grad_out = torch.randn(inputs["q"].shape, device=device, generator=gen).to(dtype)
    scale, pad = shape.head_dim ** -0.5, 1e-6

    def run(cfgs):  # each with the strategies its configurations record, whatever the environment forces
        out, lse = strategies.forward(*inputs.values(), shape, scale, pad, cfgs, store_lse=True,
                                      strategy=cfgs.forward_strategy)
        return (out, *strategies.backward(grad_out, *inputs.values(), lse, shape, scale, pad, cfgs,
                                          strategy=cfgs.backward_strategy))

    names = ("out", *(f"d{name}" for name in INPUT_NAMES))
    for name, got, want in zip(names, run(configs), run(reference)):
        err = relative_error(got, want)
        if not err <= SAME_FUNCTION_RTOL[dtype]:  # NaN fails too
            raise RuntimeError(f"autotune: the tuned configurations {configs} change {name} by a relative "
                               f"{err:.2e} against {against} at {shape}, {dtype}; not using them")
