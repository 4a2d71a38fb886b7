"""Counting a model's multiply-accumulates with `torch.utils.flop_counter`, the fused EMIM op included.

Convention (the one video papers report, fvcore style): **GMACs per view** = multiply-accumulates of the
convolutions, linear layers and attention products of one clip, in units of 1e9; elementwise work
(activations, softmax, norms, residual adds) is not counted. `FlopCounterMode` counts the same operations
in FLOPs (2 per multiply-add), so MACs = FLOPs / 2. Papers that say "GFLOPs" for video models almost
always mean these GMACs.

The fused op ``torch.ops.emim_triton.emim_forward`` (and its backward) is opaque to the counter; the op
registers its own FLOP formula beside it (`emim_triton.ops`, from the cost model, docs/operation.md#cost).
One operation needs help from here: global attention on CPU dispatches to
``aten._scaled_dot_product_flash_attention_for_cpu``, which the counter does not know; it gets the usual
2 x (QK^T + PV) formula.
On the CPU reference path (and on the meta device) EMIM runs as einsums and linear layers, which the
counter sees one by one; for one EMIM call they add up exactly to `emim_forward_flops` (tested).

Counting on the meta device costs no memory and no time: ``with torch.device("meta"): model = ...``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from emim_triton.checks import EMIMShape
from emim_triton.cost_model import emim_cost


def emim_forward_flops(batch: int, frames: int, height: int, width: int, heads: int, head_dim: int,
                       window: int) -> int:
    """FLOPs of one EMIM forward: `emim_triton.cost_model`, the one home of the cost model
    (docs/operation.md#cost).

    The rows computed are B x (T - 1) frame pairs x H x W x heads: output frame T-1 is a copy of frame
    T-2 and costs nothing (T = 1: one pair, the frame with itself). This is the work the fused kernels and
    the reference both do; the paper's tables count T frames instead, 1/T more EMIM work (0.15% of
    EMIM-S16's total).
    """
    shape = EMIMShape(batch, frames, height, width, heads, head_dim, window)
    return emim_cost(shape).forward_flops


def _cpu_sdpa_formula(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    # q (B, heads, Nq, D) @ k^T -> (B, heads, Nq, Nk), then @ v (B, heads, Nk, Dv): 2 FLOPs per MAC.
    *batch, queries, head_dim = q_shape
    keys, value_dim = v_shape[-2], v_shape[-1]
    rows = 1
    for size in batch:
        rows *= size
    return 2 * rows * queries * keys * (head_dim + value_dim)


def register_flop_formulas() -> None:
    """Teach `torch.utils.flop_counter` CPU flash SDPA, and make sure the fused EMIM op's own formula (registered
    beside the op, in emim_triton.ops) is in place.

    Idempotent; called by `count_flops`. Call it yourself before building a plain ``FlopCounterMode``: the
    counter copies the formula registry when it is made, and the fused op's module is otherwise imported
    lazily, during the first forward, which would be too late for that counter.
    """
    from torch.utils.flop_counter import flop_registry

    sdpa_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if sdpa_cpu not in flop_registry:
        register_flop_formula(sdpa_cpu)(_cpu_sdpa_formula)
    try:
        import emim_triton.ops  # noqa: F401  (registers the fused op and its FLOP formulas; needs Triton)
    except ImportError:
        pass  # no Triton: the reference path needs no formula


@dataclass(frozen=True)
class FlopCount:
    """The result of `count_flops`: FLOPs of matmuls, convolutions and attention products (2 per MAC)."""

    flops: int
    by_op: dict  # operator name -> FLOPs

    @property
    def macs(self) -> int:
        return self.flops // 2

    @property
    def gmacs(self) -> float:
        """Billions of multiply-accumulates: the "GFLOPs" of video papers' tables."""
        return self.macs / 1e9

    def __str__(self) -> str:
        ops = ", ".join(f"{op} {f / 2e9:.2f}" for op, f in sorted(self.by_op.items(), key=lambda i: -i[1]))
        return f"{self.gmacs:.2f} GMACs ({ops})"


def count_flops(model: nn.Module, inputs) -> FlopCount:
    """Count one forward pass of `model` on `inputs` (a tensor or a tuple of positional arguments).

    The model runs in eval mode without gradients (restored afterwards). Pass a batch of one clip for
    the per-view figures of papers. Works on CPU, CUDA (fused op via its registered formula) and meta.
    """
    register_flop_formulas()
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*args)
    finally:
        model.train(was_training)
    by_op: dict[str, int] = defaultdict(int)
    for op, flops in counter.get_flop_counts().get("Global", {}).items():
        by_op[str(op).removeprefix("aten.")] += flops
    return FlopCount(flops=counter.get_total_flops(), by_op=dict(by_op))


def count_params(model: nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())
