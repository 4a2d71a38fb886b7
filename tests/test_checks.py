"""Bad inputs to `emim_attention` raise ValueError/TypeError whose message names the argument at fault."""

import pytest
import torch

from emim_triton import emim_attention
from helpers import make_inputs

SHAPE = (1, 2, 3, 4, 2, 16, 3)  # (B, T, H, W, heads, D, K)


def _head_dim_transposed(t):
    """Same shape and values, but stored (..., D, heads): stride(-1) == heads, not 1."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _with_head_dim(D):
    """Inputs whose q, k, v, w2, b2 all agree on an unsupported head_dim D."""
    return make_inputs(*SHAPE[:5], D, SHAPE[6])


def _with_window(K):
    """Inputs whose rpb, w1, b1, w2 all agree on window K (so only K itself can be at fault)."""
    return make_inputs(*SHAPE[:6], K)


# (id, how to spoil valid inputs, expected exception, regex that must name the argument)
BAD_INPUTS = [
    ("q-5d", lambda i: {**i, "q": i["q"][..., 0]}, ValueError, r"q must be 6-D"),
    ("q-empty", lambda i: {**i, "q": i["q"][:, :, :0], "k": i["k"][:, :, :0], "v": i["v"][:, :, :0]},
     ValueError, r"q has an empty dimension"),
    ("k-shape", lambda i: {**i, "k": i["k"][:, :1]}, ValueError, r"k must have shape"),
    ("v-shape", lambda i: {**i, "v": i["v"][..., :1, :]}, ValueError, r"v must have shape"),
    ("rpb-heads", lambda i: {**i, "rpb": torch.zeros(3, 3, 3)}, ValueError, r"rpb must have shape"),
    ("rpb-not-square", lambda i: {**i, "rpb": torch.zeros(2, 3, 5)}, ValueError, r"rpb must have shape"),
    ("rpb-2d", lambda i: {**i, "rpb": torch.zeros(3, 3)}, ValueError, r"rpb must have shape"),
    ("K-even", lambda i: _with_window(4), ValueError, r"window K \(from rpb .*odd"),
    ("K-17", lambda i: _with_window(17), ValueError, r"window K \(from rpb"),
    ("K-1", lambda i: _with_window(1), ValueError, r"window K \(from rpb"),
    ("D-8", lambda i: _with_head_dim(8), ValueError, r"head_dim D \(last axis of q\)"),
    ("D-130", lambda i: _with_head_dim(130), ValueError, r"head_dim D \(last axis of q\)"),
    ("w1-shape", lambda i: {**i, "w1": i["w1"].t()}, ValueError, r"w1 must have shape"),
    ("b1-shape", lambda i: {**i, "b1": i["b1"][:-1]}, ValueError, r"b1 must have shape"),
    ("w2-shape", lambda i: {**i, "w2": i["w2"][:, :-1]}, ValueError, r"w2 must have shape"),
    ("b2-shape", lambda i: {**i, "b2": i["b2"][None]}, ValueError, r"b2 must have shape"),
    ("k-dtype", lambda i: {**i, "k": i["k"].double()}, TypeError, r"q, k and v must share one dtype.*k"),
    ("v-dtype", lambda i: {**i, "v": i["v"].half()}, TypeError, r"q, k and v must share one dtype.*v"),
    ("q-integer", lambda i: {**i, "q": i["q"].to(torch.int32)}, TypeError, r"q must be a floating-point"),
    ("rpb-integer", lambda i: {**i, "rpb": i["rpb"].to(torch.int64)}, TypeError, r"rpb must be a floating-point"),
    ("q-list", lambda i: {**i, "q": i["q"].tolist()}, TypeError, r"q must be a torch.Tensor"),
    ("b2-float", lambda i: {**i, "b2": 0.5}, TypeError, r"b2 must be a torch.Tensor"),
    ("q-head-dim-stride", lambda i: {**i, "q": _head_dim_transposed(i["q"])}, ValueError,
     r"q must have stride 1 along its last"),
    ("v-head-dim-stride", lambda i: {**i, "v": _head_dim_transposed(i["v"])}, ValueError,
     r"v must have stride 1 along its last"),
    ("rpb-third-dtype", lambda i: {**{n: t.bfloat16() for n, t in i.items()}, "rpb": i["rpb"].half()},
     TypeError, r"rpb must be float32 or q's dtype"),
    ("w2-third-dtype", lambda i: {**{n: t.bfloat16() for n, t in i.items()}, "w2": i["w2"].half()},
     TypeError, r"w2 must be float32 or q's dtype"),
    # Without a GPU the 'meta' device is the other device at hand; the check compares devices, not types.
    ("q-on-meta", lambda i: {**i, "q": i["q"].to("meta")}, ValueError, r"q is on meta but k is on cpu"),
    ("w1-on-meta", lambda i: {**i, "w1": i["w1"].to("meta")}, ValueError, r"w1 is on meta"),
]


@pytest.mark.parametrize("spoil, error, names_the_argument",
                         [pytest.param(*case[1:], id=case[0]) for case in BAD_INPUTS])
def test_bad_input_raises_an_error_naming_the_argument(spoil, error, names_the_argument):
    inputs = spoil(make_inputs(*SHAPE))
    with pytest.raises(error, match=names_the_argument):
        emim_attention(**inputs, backend="reference")


def test_bad_backend_is_named():
    with pytest.raises(ValueError, match=r"backend must be one of .*'cuda'"):
        emim_attention(**make_inputs(*SHAPE), backend="cuda")


def test_valid_inputs_pass():
    """The spoilers above start from inputs that are fine: the errors come from the one spoiled argument."""
    out = emim_attention(**make_inputs(*SHAPE), backend="reference")
    assert out.shape == SHAPE[:6]


BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.fused)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options, error, message", [
    (dict(scale=torch.tensor(0.25, requires_grad=True)), TypeError, r"scale must be a Python number or None, got a tensor"),
    (dict(scale=torch.tensor(0.25)), TypeError, r"scale must be a Python number"),
    (dict(scale="0.25"), TypeError, r"scale must be a number or None, got str"),
    (dict(scale=float("inf")), ValueError, r"scale must be a finite number"),
    (dict(pad_value=None), TypeError, r"pad_value must be a number"),
    (dict(pad_value=True), TypeError, r"pad_value must be a number"),
    (dict(pad_value=float("nan")), ValueError, r"pad_value must be finite"),
], ids=["scale-tensor-with-grad", "scale-tensor", "scale-str", "scale-inf", "pad-none", "pad-bool", "pad-nan"])
def test_bad_options_are_refused_alike_on_both_backends(backend, options, error, message):
    """A tensor scale was differentiable on the reference and its gradient silently dropped on the fused path;
    pad_value=None was silently 0 on one and a TypeError deep in the other. Now both refuse the same way."""
    with pytest.raises(error, match=message):
        emim_attention(**make_inputs(*SHAPE), **options, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_numeric_options_are_accepted_on_both_backends(backend):
    import numpy as np

    outs = [emim_attention(**make_inputs(*SHAPE), scale=scale, pad_value=pad, backend=backend)
            for scale, pad in ((0.25, 0), (np.float32(0.25), np.float64(0.0)))]
    assert torch.allclose(outs[0], outs[1])


@pytest.mark.fused
def test_double_backward_on_the_fused_path_is_refused_by_name():
    inputs = {n: t.requires_grad_() for n, t in make_inputs(*SHAPE).items()}
    out = emim_attention(**inputs, backend="triton")
    (grad_q,) = torch.autograd.grad(out.square().sum(), inputs["q"], create_graph=True)
    with pytest.raises(RuntimeError, match=r"triton backend has no double backward.*backend='reference'"):
        grad_q.sum().backward()


def test_double_backward_works_on_the_reference():
    inputs = {n: t.double().requires_grad_() for n, t in make_inputs(*SHAPE).items()}
    out = emim_attention(**inputs, backend="reference")
    (grad_q,) = torch.autograd.grad(out.square().sum(), inputs["q"], create_graph=True)
    grad_q.sum().backward()
    assert inputs["w1"].grad is not None and torch.isfinite(inputs["w1"].grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_are_checked_once_per_call(backend, monkeypatch):
    """emim_attention checks once and hands checked inputs down; nothing below it checks again."""
    import emim_triton.checks as checks
    import emim_triton.functional as functional
    import emim_triton.reference as reference

    calls = []

    def counting(*args):
        calls.append(1)
        return checks.check_inputs(*args)

    for module in (functional, reference):
        monkeypatch.setattr(module, "check_inputs", counting)
    emim_attention(**make_inputs(*SHAPE), backend=backend)
    assert len(calls) == 1
