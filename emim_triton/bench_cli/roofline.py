"""The two floors of a call: its bytes over the copy bandwidth, its FLOPs over the matrix rate.

No implementation runs much faster than the larger floor. The ceilings are measured in the same run as
the timings they judge (`measure_ceilings`): a large device-to-device copy (bytes read plus bytes
written) and a large matrix product in the benchmark's dtype, both on random data. Without a GPU the
`roofline` command uses a datasheet's numbers instead, and says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cost_model import EMIMCost
from .gpus import GPUS
from .timing import time_call


@dataclass(frozen=True)
class Ceilings:
    bandwidth: float  # bytes / s
    matmul_flops: float  # FLOP / s, dense matrix products in the benchmark dtype
    source: str  # where the numbers come from, printed beside them


# Vendor datasheet rates (dense, no sparsity), for `roofline` without a GPU. Leads, not measurements:
# the ceilings of a real run are measured (a workplace H200 copied at ~4.3 TB/s and multiplied bf16 at
# ~770-800 TFLOP/s, bench/ROOFLINE.md).
# The GPUs' names and HBM bandwidth are the static model's table (gpus.py); the matrix rates here include
# float32 CUDA-core rates, which that table (tensor-core rates) has no place for.
_MATMUL_RATES = {
    "h200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "h100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "a100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
}
DATASHEETS = {gpu: dict(name=GPUS[gpu].name, bandwidth=GPUS[gpu].hbm_bytes_per_s, matmul=rates)
              for gpu, rates in _MATMUL_RATES.items()}


def datasheet_ceilings(gpu: str, dtype_name: str) -> Ceilings:
    sheet = DATASHEETS[gpu]
    return Ceilings(sheet["bandwidth"], sheet["matmul"][dtype_name],
                    f"datasheet of the {sheet['name']} ({dtype_name} dense), not measured")


@dataclass(frozen=True)
class Floors:
    memory_s: float
    compute_s: float

    @property
    def bound_s(self) -> float:
        return max(self.memory_s, self.compute_s)

    @property
    def limiter(self) -> str:
        return "memory" if self.memory_s >= self.compute_s else "compute"


def floors(cost: EMIMCost, mode: str, ceilings: Ceilings) -> Floors:
    return Floors(cost.bytes(mode) / ceilings.bandwidth, cost.flops(mode) / ceilings.matmul_flops)


def measure_ceilings(device: torch.device, dtype: torch.dtype, warmup_ms: float = 25,
                     rep_ms: float = 200) -> Ceilings:
    """Copy bandwidth and matrix rate of `device`, measured now (sizes well past the caches)."""
    cuda = device.type == "cuda"
    gen = torch.Generator(device).manual_seed(0)
    copy_bytes = (1 << 30) if cuda else (128 << 20)
    src = torch.randn(copy_bytes // 4, device=device, generator=gen)
    dst = torch.empty_like(src)
    copy = time_call(lambda: dst.copy_(src), device, warmup_ms, rep_ms)
    bandwidth = 2 * copy_bytes / (copy.median_ms / 1e3)  # read + write
    del src, dst

    n = 8192 if cuda else 1024
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    matmul = time_call(lambda: torch.matmul(a, b), device, warmup_ms, rep_ms)
    rate = 2 * n ** 3 / (matmul.median_ms / 1e3)
    name = torch.cuda.get_device_name(device) if cuda else "this CPU"
    return Ceilings(bandwidth, rate, f"measured on {name} in this run: {copy_bytes >> 20} MiB copy, "
                                     f"{n}x{n}x{n} {str(dtype).removeprefix('torch.')} matmul, random data")


def roofline_entries(cases, dtype: torch.dtype, ceilings: Ceilings) -> list[dict]:
    """FLOPs, bytes and both floors per case and mode: what `emim-bench roofline` prints."""
    from ..cost_model import MODES, emim_cost, flops_per_query

    entries = []
    for case in cases:
        s = case.shape
        cost = emim_cost(s, dtype)
        per_query = flops_per_query(s.window, s.head_dim)
        modes = {}
        for mode in MODES:
            f = floors(cost, mode, ceilings)
            modes[mode] = {"flops": cost.flops(mode), "bytes": cost.bytes(mode), "intensity": cost.intensity(mode),
                           "memory_floor_ms": f.memory_s * 1e3, "compute_floor_ms": f.compute_s * 1e3,
                           "bound": f.limiter}
        entries.append({**case.as_dict(), "rows_computed": s.rows, "flops_per_query": per_query, "modes": modes})
    return entries


def format_roofline(entries: list[dict], dtype: torch.dtype, ceilings: Ceilings) -> str:
    lines = [f"EMIM cost model ({str(dtype).removeprefix('torch.')} activations, float32 parameters; "
             f"conventions in emim_triton/cost_model.py)",
             f"ceilings: copy {ceilings.bandwidth / 1e12:.2f} TB/s, matmul {ceilings.matmul_flops / 1e12:.1f} "
             f"TFLOP/s ({ceilings.source})"]
    for e in entries:
        per = e["flops_per_query"]
        lines += ["", f"{e['name']}: B={e['B']} T={e['T']} {e['H']}x{e['W']} heads={e['heads']} D={e['D']} K={e['K']}",
                  f"  per query row: QK {per['qk']:,} + AV {per['av']:,} + MLP {per['mlp_hidden']:,} + "
                  f"{per['mlp_out']:,} = "
                  f"{sum(per.values()):,} FLOPs; {e['rows_computed']:,} rows (T-1 frame pairs computed)",
                  f"  {'mode':17} {'GFLOP':>10} {'MB':>10} {'FLOP/B':>7} {'memory floor':>13} "
                  f"{'compute floor':>14}  bound"]
        for mode, m in e["modes"].items():
            lines.append(f"  {mode:17} {m['flops'] / 1e9:10.4g} {m['bytes'] / 1e6:10.4g} {m['intensity']:7.1f} "
                         f"{m['memory_floor_ms']:10.4g} ms {m['compute_floor_ms']:11.4g} ms  {m['bound']}")
    return "\n".join(lines)
