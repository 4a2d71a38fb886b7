"""The tensor-core key/value-side backward (emim_triton.tensor_core_key_value,
kernels/backward_key_value_tensor_core.py): dk and dv against today's key/value kernel on the same inputs (q, k,
the lse of today's forward, the dA rows of today's query kernel), on tiny shapes in the interpreter
(tests/conftest.py).

Every buffer a kernel writes starts as NaN, so an element it forgets to write fails the comparison.
"""

import pytest
import torch

from emim_triton import triton_backend
from emim_triton.checks import EMIMShape
from emim_triton.launch_configs import default_configs
from emim_triton.tensor_core_forward import TensorCoreConfig
from emim_triton.tensor_core_key_value import backward_key_value_tensor_core_launch, example_launch, supports
from helpers import (TENSOR_CORE_BACKWARD_SHAPES, assert_same_kernel_result, backward_case, compile_for_hopper,
                     has_product, make_inputs, test_device)

DEVICE = test_device()

SHAPES = TENSOR_CORE_BACKWARD_SHAPES

pytestmark = pytest.mark.usefixtures("nan_poisoned_buffers")


def _key_value_side(inputs, use_tensor_cores, pad_value=1e-6, variant=triton_backend.DEFAULT_VARIANT):
    """(dk, dv) of the key frames that receive gradient, from one key/value launch builder, on the lse of
    today's forward, the dA rows of today's query kernel for a random upstream gradient, NaN-filled outputs."""
    q, k = inputs["q"], inputs["k"]
    B, T, H, W, heads, D = q.shape
    shape, (rpb, w1, b1, w2, b2), configs, scale, lse, grad_pairs = backward_case(inputs, pad_value, variant)
    pairs = variant.pairs(shape)
    dq = torch.empty_like(q)
    affinity, d_affinity = (torch.empty((B, pairs, H, W, heads, shape.window_area), device=q.device) for _ in range(2))
    triton_backend.backward_query_launch(q, k, inputs["v"], rpb, w1, b1, w2, grad_pairs, lse, dq, affinity,
                                         d_affinity, shape, scale, pad_value, configs.backward_query, variant)()
    dk, dv = (torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device) for _ in range(2))
    if use_tensor_cores:
        launch = backward_key_value_tensor_core_launch(q, k, rpb, grad_pairs, lse, d_affinity, dk, dv, shape, scale,
                                                       None, variant)
    else:
        launch = triton_backend.backward_key_value_launch(q, k, rpb, grad_pairs, lse, d_affinity, dk, dv, shape,
                                                          scale, configs.backward_key_value, variant)
    launch()
    frames = variant.key_frames(shape)
    return dk[:, frames.start:frames.stop], dv[:, frames.start:frames.stop]


def _assert_matches_today(inputs, **kwargs):
    for grad, grad_ref in zip(_key_value_side(inputs, True, **kwargs), _key_value_side(inputs, False, **kwargs)):
        assert not grad.isnan().any()
        assert_same_kernel_result(grad, grad_ref)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_dk_and_dv_match_todays_kernel(shape, dtype):
    _assert_matches_today(make_inputs(*shape, dtype=dtype, device=DEVICE, seed=sum(shape)))


def test_strided_qkv_views_and_the_32_channel_context():
    """q, k as views of one qkv projection; D = 48 with the authors' 32-channel context (dk, dv zero above it)."""
    inputs = make_inputs(1, 3, 5, 4, 1, 48, 3, dtype=torch.float32, device=DEVICE, qkv_views=True, seed=5)
    assert not inputs["q"].is_contiguous()
    _assert_matches_today(inputs, variant=triton_backend.Variant(context_channels=32))


def test_supports_the_fast_cases_only():
    s16 = EMIMShape(32, 16, 14, 14, 5, 64, 7)
    assert supports(s16, torch.bfloat16) and supports(s16, torch.float16)
    assert supports(s16, torch.bfloat16, triton_backend.Variant(context_channels=32))
    assert not supports(s16, torch.bfloat16, triton_backend.Variant(direction="prev"))
    assert supports(EMIMShape(1, 1, 8, 8, 1, 64, 7), torch.bfloat16, triton_backend.Variant(direction="prev"))
    assert not supports(s16, torch.float32)
    assert not supports(s16, torch.bfloat16, triton_backend.Variant(dilation=2))
    assert not supports(EMIMShape(1, 2, 8, 8, 1, 64, 9), torch.bfloat16)


def test_bad_arguments_are_refused_by_name():
    shape = EMIMShape(1, 2, 8, 8, 1, 16, 3)
    with pytest.raises(ValueError, match="dilation"):
        example_launch(shape, torch.float16, variant=triton_backend.Variant(dilation=2))
    with pytest.raises(ValueError, match="direction"):
        example_launch(shape, torch.float16, variant=triton_backend.Variant(direction="prev"))
    with pytest.raises(TypeError, match="cfg must be a TensorCoreConfig"):
        example_launch(shape, torch.float16, cfg=default_configs(8, 8, 3, 16).backward_key_value)
    with pytest.raises(ValueError, match="halo_block_rows"):
        example_launch(shape, torch.float16, cfg=TensorCoreConfig(4, 4, halo_block_rows=1))


def test_compiles_for_sm90_with_tensor_core_products_and_no_spills():
    """At the S16 stage-3 shape (bf16) with its default configuration: no register spills, and S = K Q^T,
    dV = P^T G and dK = dA^T Q are warpgroup MMAs on sm_90; it also compiles for sm_80."""
    sm90, products = compile_for_hopper(example_launch(EMIMShape(32, 16, 14, 14, 5, 64, 7), torch.bfloat16))
    assert sm90.spills == 0, f"{sm90.spills} B of spills per thread"
    for product in (("s = tl.dot(k, tl.trans(q)",), ("dv = split_dot_16bit(p, g", "acc = tl.dot(a_head, b_head, acc)"),
                    ("dk = split_dot(da_head, da_tail, q", "acc = tl.dot(head, b, acc")):  # the call, or the helper's
        assert has_product(products, *product), (product, products)
