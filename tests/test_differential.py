"""A standing differential test: randomly drawn calls, fused kernels (interpreter) against the reference.

Each case is drawn from a seeded generator over what a user can pass: T 1..4, H and W 1..9 (frames smaller
than the window included), K 3..9 odd, D 16..48 (non-powers of two included), heads 1..3, the three dtypes,
float32 or activation-dtype parameters, q, k and v as views of one qkv projection or strided, a non-contiguous
parameter, and any non-empty subset of the inputs requiring a gradient. The output and every requested
gradient are compared with a float64 reference of the same values.

Reproducible: the cases are a function of EMIM_DIFF_SEED (default 0) and EMIM_DIFF_CASES (default 10), and a
failure prints the case as one line to paste into ``check_case(...)``. Set EMIM_DIFF_CASES=200 for a long
hunt; the default keeps CI at well under a minute.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import pytest
import torch

from emim_triton import emim_attention, emim_reference
from helpers import (FP32_KERNEL_RTOL, GRAD_NAMES, low_precision_bound, make_inputs, relative_error,
                     test_device)
from layouts import relaid

SEED = int(os.environ.get("EMIM_DIFF_SEED", "0"))
CASES = int(os.environ.get("EMIM_DIFF_CASES", "10"))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    """One drawn call; its repr is the one-line reproduction."""

    B: int
    T: int
    H: int
    W: int
    heads: int
    D: int
    K: int
    dtype: str  # a key of DTYPES
    params_in_activation_dtype: bool
    qkv: str  # "separate", "qkv_views" (one projection's three views) or "strided" (q, k, v sliced)
    strided_param: str | None  # one of rpb, w1, b1, w2, b2 given non-contiguous, or None
    requires_grad: tuple[str, ...]
    seed: int

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__dataclass_fields__)
        return f"check_case(Case({fields}))"


# The interpreter runs one program at a time on the CPU: a case costs about (computed queries) x K² steps.
# Cases over this budget are drawn again (from the same generator, so the draw stays reproducible).
WORK_BUDGET = 2500


def draw_case(rng: random.Random) -> Case:
    while True:
        case = _draw_any_case(rng)
        if case.B * max(case.T - 1, 1) * case.H * case.W * case.heads * case.K ** 2 <= WORK_BUDGET:
            return case


def _draw_any_case(rng: random.Random) -> Case:
    K = rng.choice((3, 5, 7, 9))
    dtype = rng.choice(tuple(DTYPES))
    grads = tuple(n for n in GRAD_NAMES if rng.random() < 0.5) or (rng.choice(GRAD_NAMES),)
    return Case(B=rng.randint(1, 2), T=rng.randint(1, 4), H=rng.randint(1, 9), W=rng.randint(1, 9),
                heads=rng.randint(1, 3), D=rng.randint(16, 48), K=K, dtype=dtype,
                params_in_activation_dtype=dtype != "fp32" and rng.random() < 0.3,
                qkv=rng.choice(("separate", "qkv_views", "strided")),
                strided_param=rng.choice((None, "rpb", "w1", "b1", "w2", "b2")),
                requires_grad=grads, seed=rng.randrange(2 ** 31))


def drawn_cases() -> list[Case]:
    rng = random.Random(SEED)
    return [draw_case(rng) for _ in range(CASES)]


def _inputs(case: Case) -> dict[str, torch.Tensor]:
    dtype = DTYPES[case.dtype]
    inputs = make_inputs(case.B, case.T, case.H, case.W, case.heads, case.D, case.K, dtype=dtype,
                         device=test_device(), qkv_views=case.qkv == "qkv_views", seed=case.seed,
                         param_dtype=dtype if case.params_in_activation_dtype else torch.float32)
    if case.qkv == "strided":
        inputs.update({n: relaid(inputs[n], "sliced") for n in ("q", "k", "v")})
    if case.strided_param is not None:
        inputs[case.strided_param] = relaid(inputs[case.strided_param], "transposed" if inputs[
            case.strided_param].dim() > 1 else "sliced")
    return inputs


def _run(fn, inputs, wanted, grad_out=None):
    leaves = {n: t.detach().requires_grad_(n in wanted) for n, t in inputs.items()}
    out = fn(**leaves)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, [leaves[n] for n in wanted], grad_out.to(out))
    return out, dict(zip(wanted, grads)), grad_out


def check_case(case: Case) -> None:
    """Fused vs float64 reference on one case: output and each requested gradient."""
    inputs = _inputs(case)
    wanted = case.requires_grad
    out, grads, grad_out = _run(lambda **t: emim_attention(**t, backend="triton"), inputs, wanted)
    exact_out, exact_grads, _ = _run(emim_reference, {n: t.double() for n, t in inputs.items()}, wanted, grad_out)
    if case.dtype == "fp32":
        bounds = dict.fromkeys(("out", *wanted), FP32_KERNEL_RTOL)
    else:  # the reference in the same precision against float64 is the yardstick (helpers.low_precision_bound)
        own_out, own_grads, _ = _run(emim_reference, inputs, wanted, grad_out)
        bounds = {"out": low_precision_bound(relative_error(own_out, exact_out))}
        bounds.update({n: low_precision_bound(relative_error(own_grads[n], exact_grads[n])) for n in wanted})
    errors = {"out": relative_error(out, exact_out)}
    errors.update({n: relative_error(grads[n], exact_grads[n]) for n in wanted})
    failed = {n: f"{errors[n]:.3g} > {bounds[n]:.3g}" for n in errors if not errors[n] <= bounds[n]}
    assert not failed, f"fused != reference for {failed}; reproduce with:\n{case!r}"
    for n in wanted:
        assert grads[n].dtype == inputs[n].dtype and grads[n].shape == inputs[n].shape, n


# Every buffer the kernels write starts as NaN (tests/conftest.py), so an unwritten element fails.
pytestmark = pytest.mark.usefixtures("nan_poisoned_buffers")


@pytest.mark.fused
@pytest.mark.parametrize("case", drawn_cases(), ids=lambda c: f"{c.B}x{c.T}x{c.H}x{c.W}-h{c.heads}-D{c.D}-K{c.K}-{c.dtype}")
def test_fused_matches_reference_on_drawn_case(case):
    check_case(case)


def test_drawing_is_reproducible_and_covers_the_space():
    """The same seed draws the same cases; and over many draws every axis reaches its extremes (so the
    generator, not only the default handful, covers what the docstring promises)."""
    assert drawn_cases() == drawn_cases()
    rng = random.Random(1234)
    many = [draw_case(rng) for _ in range(400)]
    assert {c.T for c in many} == {1, 2, 3, 4} and {c.K for c in many} == {3, 5, 7, 9}
    assert {1, 9} <= {c.H for c in many} and {16, 48} <= {c.D for c in many} and {c.heads for c in many} == {1, 2, 3}
    assert {c.qkv for c in many} == {"separate", "qkv_views", "strided"} and {c.dtype for c in many} == set(DTYPES)
    assert any(c.H < c.K and c.W < c.K for c in many)
    assert {c.strided_param for c in many} == {None, "rpb", "w1", "b1", "w2", "b2"}
    assert any(len(c.requires_grad) == 1 for c in many) and any(len(c.requires_grad) == 8 for c in many)
