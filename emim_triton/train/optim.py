"""AdamW with the usual exemptions from weight decay, and the per-step warm-up + cosine learning rate.

Weight decay shrinks weights toward zero; on biases, normalisation scales and shifts, EMIM's relative
position bias and other 1-D parameters it only fights the parameter's job, so they get none. Parameters a
model lists in ``no_weight_decay()`` are exempt too, whatever their shape.

The learning rate is a pure function of the optimizer step (`lr_at`), so the scheduler's whole state is
one integer, and a resumed run lands on exactly the same value.
"""

from __future__ import annotations

import fnmatch
import math

import torch
import torch.nn as nn


def scaled_lr(lr: float, global_batch: int, base_batch: int) -> float:
    """Linear scaling rule: `lr` is the peak at a global batch of `base_batch`."""
    return lr * global_batch / base_batch


def peak_lr(cfg, world_size: int) -> tuple[int, float]:
    """(global batch, peak learning rate) of a run: the batch over all processes and accumulation steps, and
    the lr scaled to it."""
    global_batch = cfg.batch_size * world_size * cfg.accum_steps
    return global_batch, scaled_lr(cfg.lr, global_batch, cfg.lr_base_batch)


def param_groups(model: nn.Module, weight_decay: float, lr_mult: dict[str, float] | None = None) -> list[dict]:
    """Parameter groups keyed by (weight decay, lr multiplier); each group carries ``lr_mult``.

    ``lr_mult`` maps fnmatch patterns of parameter names to multipliers (the first match wins), e.g.
    ``{"*motion_conv*": 10}`` to let EMIM's motion MLP, which starts at zero, move faster.
    """
    exempt = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        no_decay = parameter.ndim <= 1 or name.endswith(".bias") or name in exempt
        mult = next((m for pattern, m in (lr_mult or {}).items() if fnmatch.fnmatch(name, pattern)), 1.0)
        groups.setdefault((0.0 if no_decay else weight_decay, mult), []).append(parameter)
    return [dict(params=params, weight_decay=decay, lr_mult=mult) for (decay, mult), params in groups.items()]


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float, betas=(0.9, 0.999),
                    lr_mult: dict[str, float] | None = None) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay, lr_mult), lr=lr, betas=tuple(betas))


def lr_at(step: int, *, peak: float, total_steps: int, warmup_steps: int, warmup_lr: float, min_lr: float) -> float:
    """Linear warm-up from `warmup_lr` to `peak` over `warmup_steps`, then a cosine from `peak` to `min_lr`
    reached at `total_steps`."""
    if step < warmup_steps:
        return warmup_lr + (peak - warmup_lr) * step / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
