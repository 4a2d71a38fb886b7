"""Timing and peak memory, the same way for every backend.

On a GPU: ``triton.testing.do_bench`` (CUDA events around each call, the L2 cache flushed before each,
warm-up and repeat budgets in milliseconds), median and 20/80 % quantiles. On the CPU: a wall clock
around each call after the same warm-up budget. In both, `Rotating` cycles through several input sets
so that a call never finds its inputs still cached from the call before.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


class Rotating:
    """A no-argument callable that runs calls[0], calls[1], ... calls[n-1], calls[0], ... in turn."""

    def __init__(self, calls: list[Callable[[], object]]):
        if not calls:
            raise ValueError("Rotating needs at least one call")
        self.calls = calls
        self.next = 0

    def __call__(self) -> None:
        call = self.calls[self.next]
        self.next = (self.next + 1) % len(self.calls)
        call()


def time_call(fn: Callable[[], object], device: torch.device, warmup_ms: float, rep_ms: float) -> Timing:
    """Median (and 20/80 % quantiles) of fn's run time after warm-up."""
    if device.type == "cuda":
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return Timing(median, p20, p80)
    return _time_on_host(fn, warmup_ms, rep_ms)


def _time_on_host(fn, warmup_ms: float, rep_ms: float, min_reps: int = 5, max_reps: int = 10_000) -> Timing:
    deadline = time.perf_counter() + warmup_ms / 1e3
    fn()
    while time.perf_counter() < deadline:
        fn()
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < min_reps or (time.perf_counter() < deadline and len(times) < max_reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    pick = lambda q: times[min(len(times) - 1, round(q * (len(times) - 1)))]  # noqa: E731
    return Timing(pick(0.5), pick(0.2), pick(0.8))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_call_seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call, including whatever it compiles or tunes on first use."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Device memory fn allocates at its peak beyond what was allocated before it (None off CUDA).

    The inputs are already allocated, so this is the call's own working memory: outputs, saved
    activations, temporaries and gradients.
    """
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before
