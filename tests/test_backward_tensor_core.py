"""The tensor-core query-side backward (emim_triton.tensor_core_backward, kernels/backward_query_tensor_core.py):
its three outputs (dq and the scratch rows a and dA) against today's offset-loop query kernel, and the whole
backward with it (plus today's key/value and weights kernels) against the float64 reference, on tiny shapes in
the interpreter (tests/conftest.py); and its compile for the GPU where the AOT compiler works.

Every buffer a kernel writes starts as NaN, so an element it forgets to write fails the comparison.
"""

import pytest
import torch

from emim_triton import emim_attention, emim_reference, triton_backend
from emim_triton.checks import EMIMShape
from emim_triton.launch_configs import default_configs
from emim_triton.tensor_core_backward import backward_query_tensor_core_launch, example_launch, supports
from emim_triton.tensor_core_forward import TensorCoreConfig
from helpers import (FP32_KERNEL_RTOL, GRAD_NAMES, TENSOR_CORE_BACKWARD_SHAPES, assert_same_kernel_result,
                     backward_case, compile_for_hopper, has_product, low_precision_bound, make_inputs, relative_error,
                     test_device)

DEVICE = test_device()
ON_GPU = DEVICE == "cuda"

SHAPES = TENSOR_CORE_BACKWARD_SHAPES


# Every buffer the kernels write starts as NaN (tests/conftest.py), so an unwritten element fails.
pytestmark = pytest.mark.usefixtures("nan_poisoned_buffers")


def _query_side(inputs, launch, pad_value=1e-6, variant=triton_backend.DEFAULT_VARIANT):
    """(dq of the computed pairs, a, dA) from one query-side launch builder, on the lse of today's forward and
    a random upstream gradient, every output buffer NaN-filled."""
    q = inputs["q"]
    B, T, H, W, heads, D = q.shape
    shape, (rpb, w1, b1, w2, b2), configs, scale, lse, grad_pairs = backward_case(inputs, pad_value, variant)
    pairs = variant.pairs(shape)
    dq = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)
    affinity, d_affinity = (torch.full((B, pairs, H, W, heads, shape.window_area), float("nan"), device=q.device)
                            for _ in range(2))
    cfg = configs.backward_query if launch is triton_backend.backward_query_launch else None
    launch(q, inputs["k"], inputs["v"], rpb, w1, b1, w2, grad_pairs, lse, dq, affinity, d_affinity, shape,
           scale, pad_value, cfg, variant)()
    return dq[:, :pairs], affinity, d_affinity


def _assert_matches_offset_loop(inputs, **kwargs):
    dq, a, da = _query_side(inputs, backward_query_tensor_core_launch, **kwargs)
    dq_ref, a_ref, da_ref = _query_side(inputs, triton_backend.backward_query_launch, **kwargs)
    assert relative_error(a, a_ref) < FP32_KERNEL_RTOL
    assert relative_error(da, da_ref) < FP32_KERNEL_RTOL
    assert_same_kernel_result(dq, dq_ref)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_dq_and_scratch_rows_match_the_offset_loop_kernel(shape, dtype):
    _assert_matches_offset_loop(make_inputs(*shape, dtype=dtype, device=DEVICE, seed=sum(shape)))


def test_strided_qkv_views_and_a_large_pad_value():
    """pad_value 0.5, so the padded keys' affinities and values weigh in every output (at 1e-6 a wrong padded
    value would hide in the rounding)."""
    inputs = make_inputs(1, 3, 4, 3, 2, 16, 5, dtype=torch.float32, device=DEVICE, qkv_views=True, seed=3)
    assert not inputs["q"].is_contiguous()
    _assert_matches_offset_loop(inputs, pad_value=0.5)


@pytest.mark.parametrize("direction, context_channels", [("prev", 0), ("next", 32)])
def test_variants_match_the_offset_loop_kernel(direction, context_channels):
    inputs = make_inputs(1, 3, 5, 4, 1, 48, 3, dtype=torch.float32, device=DEVICE, seed=5)
    _assert_matches_offset_loop(inputs, variant=triton_backend.Variant(direction=direction,
                                                                       context_channels=context_channels))


@pytest.fixture
def tensor_core_query_side(monkeypatch):
    """triton_backend.backward with this query kernel in place of today's; counts the launches built, so a
    test sees that the swap took effect."""
    built = []

    def launch(q, k, v, rpb, w1, b1, w2, grad_pairs, lse, dq, affinity, d_affinity, shape, scale, pad_value, cfg,
               variant=triton_backend.DEFAULT_VARIANT):
        built.append(shape)
        return backward_query_tensor_core_launch(q, k, v, rpb, w1, b1, w2, grad_pairs, lse, dq, affinity, d_affinity,
                                                 shape, scale, pad_value, None, variant)

    monkeypatch.setattr(triton_backend, "backward_query_launch", launch)
    return built


def _gradients(inputs, grad_out, reference=False, dtype=None):
    """The eight gradients for `grad_out` of the fused op, or of the reference; inputs cast to `dtype` if given."""
    leaves = {n: (t.detach().to(dtype) if dtype else t.detach().clone()).requires_grad_() for n, t in inputs.items()}
    out = emim_reference(**leaves) if reference else emim_attention(**leaves, backend="triton")
    return torch.autograd.grad(out, list(leaves.values()), grad_out.to(out.dtype))


def _upstream(inputs):
    return torch.randn(inputs["q"].shape, generator=torch.Generator().manual_seed(1)).to(inputs["q"])


@pytest.mark.parametrize("shape", [SHAPES["K7-four-tiles"], SHAPES["B2-D24-frame-smaller-than-window"]],
                         ids=["K7-four-tiles", "B2-D24"])
def test_float32_gradients_match_float64_reference(shape, tensor_core_query_side):
    inputs = make_inputs(*shape, dtype=torch.float32, device=DEVICE, seed=sum(shape))
    grad_out = _upstream(inputs)
    grads, ref_grads = _gradients(inputs, grad_out), _gradients(inputs, grad_out, reference=True, dtype=torch.float64)
    assert len(tensor_core_query_side) == 1
    for name, grad, ref_grad in zip(GRAD_NAMES, grads, ref_grads):
        assert grad.dtype == torch.float32, name
        assert relative_error(grad, ref_grad) < FP32_KERNEL_RTOL, name


# bf16 only on a GPU: the interpreter's bf16 tl.dot multiplies raw bit patterns (shared/KERNEL-NOTES.md).
LOW_PRECISION = [pytest.param(torch.float16, id="fp16"),
                 pytest.param(torch.bfloat16, id="bf16",
                              marks=pytest.mark.skipif(not ON_GPU, reason="interpreter bf16 tl.dot is wrong"))]


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_gradients_are_within_the_bound_of_the_references_own(dtype, tensor_core_query_side):
    """Mixed precision as autocast produces it: fp16/bf16 q, k, v; float32 parameters."""
    inputs = make_inputs(*SHAPES["K7-four-tiles"], dtype=dtype, device=DEVICE, seed=11)
    grad_out = _upstream(inputs)
    grads, ref_grads = _gradients(inputs, grad_out), _gradients(inputs, grad_out, reference=True, dtype=torch.float64)
    own_grads = _gradients(inputs, grad_out, reference=True)  # the reference run in the inputs' own dtypes
    assert len(tensor_core_query_side) == 1
    for name, grad, own, ref_grad in zip(GRAD_NAMES, grads, own_grads, ref_grads):
        assert grad.dtype == inputs[name].dtype, name
        assert relative_error(grad, ref_grad) <= low_precision_bound(relative_error(own, ref_grad)), name


def test_supports_the_fast_cases_only():
    s16 = EMIMShape(32, 16, 14, 14, 5, 64, 7)
    assert supports(s16, torch.bfloat16) and supports(s16, torch.float16)
    assert supports(s16, torch.bfloat16, triton_backend.Variant(direction="prev", context_channels=32))
    assert not supports(s16, torch.float32)
    assert not supports(s16, torch.bfloat16, triton_backend.Variant(dilation=2))
    assert not supports(EMIMShape(1, 2, 8, 8, 1, 64, 9), torch.bfloat16)


def test_bad_arguments_are_refused_by_name():
    shape = EMIMShape(1, 2, 8, 8, 1, 16, 3)
    with pytest.raises(ValueError, match="dilation"):
        example_launch(shape, torch.float16, variant=triton_backend.Variant(dilation=2))
    with pytest.raises(TypeError, match="cfg must be a TensorCoreConfig"):
        example_launch(shape, torch.float16, cfg=default_configs(8, 8, 3, 16).backward_query)
    with pytest.raises(ValueError, match="halo_block_rows"):
        example_launch(shape, torch.float16, cfg=TensorCoreConfig(4, 4, halo_block_rows=1))


def test_compiles_for_sm90_with_tensor_core_products_and_next_to_no_spills():
    """At the S16 stage-3 shape (bf16): S = Q K^T, both dP = G V^T products and dq = dA K are warpgroup MMAs on
    sm_90, and spills stay at most 16 B a thread (8 B with triton 3.9: two per-query values stored and reloaded
    once, outside the loops; the kernel sits at 255 registers; before its live ranges were shortened it spilled
    168 B); it also compiles for sm_80."""
    sm90, products = compile_for_hopper(example_launch(EMIMShape(32, 16, 14, 14, 5, 64, 7), torch.bfloat16))
    assert sm90.spills <= 16, f"{sm90.spills} B of spills per thread"
    for product in (("s = tl.dot(q, tl.trans(k)",), ("dp = tl.dot(g_head, tl.trans(v)",),
                    ("dp += tl.dot(g_tail, tl.trans(v)",),
                    ("dq = split_dot(da_head, da_tail, k", "acc = tl.dot(head, b, acc")):  # the call, or split_dot's
        assert has_product(products, *product), (product, products)


def test_the_op_runs_the_tensor_core_backward_only_when_asked(monkeypatch):
    """EMIM_TRITON_BACKWARD=tensor_core routes the fused backward's query and key/value sides (fp16/bf16,
    K <= 7) to the tensor-core kernels; the weights kernel is shared; all eight gradients stay within the
    bound."""
    from emim_triton import tensor_core_backward, tensor_core_key_value

    calls = []
    for module, name in ((tensor_core_backward, "backward_query_tensor_core_launch"),
                         (tensor_core_key_value, "backward_key_value_tensor_core_launch")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    inputs = make_inputs(1, 3, 4, 5, 2, 16, 3, dtype=torch.float16, device=test_device(), seed=23)

    def gradients():
        leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}
        out = emim_attention(**leaves, backend="triton")
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
        return grad_out, torch.autograd.grad(out, list(leaves.values()), grad_out)

    monkeypatch.delenv("EMIM_TRITON_BACKWARD", raising=False)
    gradients()
    assert calls == []
    monkeypatch.setenv("EMIM_TRITON_BACKWARD", "tensor_core")
    grad_out, grads = gradients()
    assert calls == ["backward_query_tensor_core_launch", "backward_key_value_tensor_core_launch"]
    exact = {n: t.detach().double().requires_grad_() for n, t in inputs.items()}
    exact_grads = torch.autograd.grad(emim_reference(**exact), list(exact.values()), grad_out.double())
    own = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}
    own_grads = torch.autograd.grad(emim_reference(**own), list(own.values()), grad_out)
    for g, e, o in zip(grads, exact_grads, own_grads):
        assert relative_error(g, e) <= low_precision_bound(relative_error(o, e))
