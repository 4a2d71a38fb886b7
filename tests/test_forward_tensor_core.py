"""The tensor-core forward (emim_triton.tensor_core_forward, kernels/forward_tensor_core.py) against the float64
reference: output and log-sum-exp, on tiny shapes in the interpreter (tests/conftest.py), and its compile for
the GPU (tensor-core instructions in the products, no spills) where the AOT compiler works.

Every buffer the kernel writes starts as NaN, so an element it forgets to write fails the comparison.
"""

import pytest
import torch

from emim_triton import triton_backend
from emim_triton.checks import EMIMShape
from emim_triton.reference import affinities, emim_reference, frame_pairs, gather_windows
from emim_triton.tensor_core_forward import (TensorCoreConfig, example_launch, forward_tensor_core,
                                             supports)
from emim_triton.testing import FP32_KERNEL_RTOL, low_precision_bound
from helpers import compile_for_hopper, make_inputs, relative_error, test_device

DEVICE = test_device()
ON_GPU = DEVICE == "cuda"

# (B, T, H, W, heads, D, K): T = 1, 2, 3; H or W < K; D = 24 (not a power of two); K = 3, 5, 7; a 9 x 10 frame
# (four 8 x 8 tiles, partly outside the frame) and a 14 x 4 one (a tile whose halo is cut on three sides).
SHAPES = {
    "T1-self-attention-W<K": (1, 1, 3, 2, 1, 16, 3),
    "T2-two-heads": (1, 2, 4, 5, 2, 16, 3),
    "T3-H<K": (1, 3, 3, 5, 1, 32, 5),
    "B2-D24-frame-smaller-than-window": (2, 2, 2, 3, 2, 24, 5),
    "K7": (1, 2, 5, 4, 1, 16, 7),
    "K7-four-tiles": (1, 2, 9, 10, 1, 16, 7),
}


# Every buffer the kernels write starts as NaN (tests/conftest.py), so an unwritten element fails.
pytestmark = pytest.mark.usefixtures("nan_poisoned_buffers")


def _run(inputs, pad_value=1e-6, direction="next", context_channels=None):
    B, T, H, W, heads, D = inputs["q"].shape
    shape = EMIMShape(B, T, H, W, heads, D, inputs["rpb"].shape[-1])
    variant = triton_backend.Variant(direction=direction, context_channels=context_channels or 0)
    return forward_tensor_core(**inputs, shape=shape, scale=D ** -0.5, pad_value=pad_value, store_lse=True,
                               variant=variant)


def _reference_lse(inputs, pad_value=1e-6, direction="next"):
    """log-sum-exp of each computed pair's affinity row (float64), (B, pairs, H, W, heads)."""
    d = {name: t.double() for name, t in inputs.items()}
    B, T, H, W, heads, D = d["q"].shape
    query_frames, key_frames = frame_pairs(T, direction)
    q = d["q"][:, query_frames].flatten(0, 1)
    k = gather_windows(d["k"][:, key_frames].flatten(0, 1), d["rpb"].shape[-1], pad_value)
    return torch.logsumexp(affinities(q, k, d["rpb"], D ** -0.5), dim=-1).reshape(B, len(query_frames), H, W, heads)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_float32_output_and_lse_match_float64_reference(shape):
    inputs = make_inputs(*shape, dtype=torch.float32, device=DEVICE, seed=sum(shape))
    out, lse = _run(inputs)
    ref = emim_reference(**{n: t.double() for n, t in inputs.items()})
    assert out.shape == ref.shape and out.dtype == torch.float32 and out.is_contiguous()
    assert relative_error(out, ref) < FP32_KERNEL_RTOL
    assert lse.dtype == torch.float32 and relative_error(lse, _reference_lse(inputs)) < FP32_KERNEL_RTOL


def test_strided_qkv_views_and_a_large_pad_value():
    """q, k, v as the views of one qkv projection; pad_value 0.5, so the padded keys' affinities and values
    weigh in the result (at 1e-6 a wrong padded value would hide in the rounding)."""
    inputs = make_inputs(1, 3, 4, 3, 2, 16, 5, dtype=torch.float32, device=DEVICE, qkv_views=True, seed=3)
    assert not inputs["q"].is_contiguous()
    out, lse = _run(inputs, pad_value=0.5)
    ref = emim_reference(**{n: t.double() for n, t in inputs.items()}, pad_value=0.5)
    assert relative_error(out, ref) < FP32_KERNEL_RTOL
    assert relative_error(lse, _reference_lse(inputs, pad_value=0.5)) < FP32_KERNEL_RTOL


@pytest.mark.parametrize("direction, context_channels", [("prev", None), ("next", 32)])
def test_variants_match_the_reference(direction, context_channels):
    inputs = make_inputs(1, 3, 5, 4, 1, 48, 3, dtype=torch.float32, device=DEVICE, seed=5)
    out, lse = _run(inputs, direction=direction, context_channels=context_channels)
    ref = emim_reference(**{n: t.double() for n, t in inputs.items()}, direction=direction,
                         authors_context_channels=context_channels)
    assert relative_error(out, ref) < FP32_KERNEL_RTOL
    assert relative_error(lse, _reference_lse(inputs, direction=direction)) < FP32_KERNEL_RTOL


# bf16 only on a GPU: the interpreter's bf16 tl.dot multiplies raw bit patterns (shared/KERNEL-NOTES.md).
LOW_PRECISION = [pytest.param(torch.float16, id="fp16"),
                 pytest.param(torch.bfloat16, id="bf16",
                              marks=pytest.mark.skipif(not ON_GPU, reason="interpreter bf16 tl.dot is wrong"))]


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("shape", [SHAPES["K7-four-tiles"], SHAPES["B2-D24-frame-smaller-than-window"]],
                         ids=["K7-four-tiles", "B2-D24"])
def test_low_precision_error_is_within_the_bound_of_the_references_own(dtype, shape):
    """fp16/bf16 q, k, v with float32 parameters (autocast's mix); the MLP's operands are fp16."""
    inputs = make_inputs(*shape, dtype=dtype, device=DEVICE, seed=11)
    out, lse = _run(inputs)
    ref = emim_reference(**{n: t.double() for n, t in inputs.items()})
    own = relative_error(emim_reference(**inputs), ref)  # the reference run in the same dtype
    assert out.dtype == dtype
    assert relative_error(out, ref) <= low_precision_bound(own)
    assert relative_error(lse, _reference_lse(inputs)) < FP32_KERNEL_RTOL  # exact products, float32 softmax


def test_supports_the_fast_cases_only():
    s16 = EMIMShape(32, 16, 14, 14, 5, 64, 7)
    assert supports(s16, torch.bfloat16) and supports(s16, torch.float16)
    assert not supports(s16, torch.float32)
    assert not supports(s16, torch.bfloat16, triton_backend.Variant(dilation=2))
    assert supports(EMIMShape(1, 2, 8, 8, 1, 128, 7), torch.bfloat16)
    assert not supports(EMIMShape(1, 2, 8, 8, 1, 64, 9), torch.bfloat16)
    # a frame whose rows pass int32 offsets stays on the offset loop
    assert supports(EMIMShape(1, 2, 1024, 1024, 16, 64, 7), torch.bfloat16)
    assert not supports(EMIMShape(1, 2, 2048, 2048, 16, 64, 7), torch.bfloat16)


def test_bad_configs_are_refused_by_name():
    with pytest.raises(ValueError, match="tile_h"):
        TensorCoreConfig(tile_h=6)
    with pytest.raises(ValueError, match="tile_h \\* tile_w"):
        TensorCoreConfig(tile_h=2, tile_w=4)
    with pytest.raises(ValueError, match="dilation"):
        example_launch(EMIMShape(1, 2, 8, 8, 1, 16, 3), torch.float16, variant=triton_backend.Variant(dilation=2))


def test_compiles_for_sm90_with_tensor_core_products_and_no_spills():
    """At the S16 stage-3 shape (bf16): no register spills, and the affinity and context products (and the
    MLP) are warpgroup MMAs on sm_90; it also compiles for sm_80 (no speed asked there)."""
    sm90, products = compile_for_hopper(example_launch(EMIMShape(32, 16, 14, 14, 5, 64, 7), torch.bfloat16))
    assert sm90.spills == 0, f"{sm90.spills} B of spills per thread"
    assert any("tl.trans(k)" in text for text in products), products  # S = Q K^T
    assert any("p.to(v.dtype), v" in text for text in products), products  # context = P V


def test_the_op_runs_the_tensor_core_forward_only_when_asked(monkeypatch):
    """EMIM_TRITON_FORWARD=tensor_core routes the fused op's forward (fp16/bf16, K <= 7) to this kernel, whose
    lse the shared backward consumes: outputs and gradients stay within the low-precision bound."""
    from emim_triton import emim_attention, ops, tensor_core_forward

    calls = []
    real = tensor_core_forward.forward_tensor_core
    monkeypatch.setattr(tensor_core_forward, "forward_tensor_core", lambda *a, **k: calls.append(1) or real(*a, **k))
    inputs = make_inputs(1, 3, 4, 5, 2, 16, 3, dtype=torch.float16, device=test_device(), seed=21)
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}

    monkeypatch.delenv("EMIM_TRITON_FORWARD", raising=False)
    emim_attention(**leaves, backend="triton")
    assert calls == []  # the offset loop by default

    monkeypatch.setenv("EMIM_TRITON_FORWARD", "tensor_core")
    out = emim_attention(**leaves, backend="triton")
    assert calls == [1]
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out)
    exact = {n: t.detach().double().requires_grad_() for n, t in inputs.items()}
    exact_out = emim_reference(**exact)
    exact_grads = torch.autograd.grad(exact_out, list(exact.values()), grad_out.double())
    own = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}
    own_out = emim_reference(**own)
    own_grads = torch.autograd.grad(own_out, list(own.values()), grad_out)
    assert relative_error(out, exact_out) <= low_precision_bound(relative_error(own_out, exact_out))
    for g, e, o in zip(grads, exact_grads, own_grads):
        assert relative_error(g, e) <= low_precision_bound(relative_error(o, e))

    monkeypatch.setenv("EMIM_TRITON_FORWARD", "wgmma")
    with pytest.raises(ValueError, match="EMIM_TRITON_FORWARD must be one of"):
        ops.emim_forward_op(*inputs.values(), 0.25, 1e-6)
