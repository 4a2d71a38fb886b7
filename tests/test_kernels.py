"""The fused Triton kernels against the float64 reference: forward and all eight gradients.

Without a GPU the kernels run in the Triton interpreter on CPU tensors (tests/conftest.py), so every
shape here is tiny. Kernel-written buffers are filled with NaN before each launch, so an element a
kernel forgets to write shows up as NaN and fails the comparison.
"""

import pytest
import torch

from emim_triton import emim_attention, emim_reference
from helpers import (FP32_KERNEL_RTOL, GRAD_NAMES, TINY_SHAPES, compile_for_hopper, low_precision_bound, make_inputs,
                     relative_error, test_device)

DEVICE = test_device()

SHAPES = [pytest.param(shape, id=name) for name, shape in TINY_SHAPES]


# Every buffer the kernels write starts as NaN (tests/conftest.py), so an unwritten element fails.
pytestmark = pytest.mark.usefixtures("nan_poisoned_buffers")


def _fused_and_reference(inputs, grad_seed=1):
    """Fused forward + backward, and the float64 reference forward + backward on the same values."""
    fused_in = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}
    out = emim_attention(**fused_in, backend="triton")
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out)
    fused_grads = torch.autograd.grad(out, list(fused_in.values()), grad_out)

    ref_in = {n: t.detach().double().requires_grad_() for n, t in inputs.items()}
    ref_out = emim_reference(**ref_in)
    ref_grads = torch.autograd.grad(ref_out, list(ref_in.values()), grad_out.double())
    return out, fused_grads, ref_out, ref_grads


@pytest.mark.parametrize("shape", SHAPES)
def test_float32_forward_and_gradients_match_float64_reference(shape):
    inputs = make_inputs(*shape, dtype=torch.float32, device=DEVICE, seed=sum(shape))
    out, grads, ref_out, ref_grads = _fused_and_reference(inputs)
    assert out.shape == ref_out.shape and out.dtype == torch.float32 and out.is_contiguous()
    assert relative_error(out, ref_out) < FP32_KERNEL_RTOL
    for name, grad, ref_grad in zip(GRAD_NAMES, grads, ref_grads):
        assert grad.dtype == inputs[name].dtype, name
        assert relative_error(grad, ref_grad) < FP32_KERNEL_RTOL, name


def test_strided_qkv_views_are_read_in_place():
    """q, k, v as the three strided views of one qkv projection output, no copies."""
    inputs = make_inputs(1, 3, 4, 3, 2, 16, 3, dtype=torch.float32, device=DEVICE, qkv_views=True, seed=3)
    assert not inputs["q"].is_contiguous() and inputs["q"].data_ptr() != inputs["k"].data_ptr()
    out, grads, ref_out, ref_grads = _fused_and_reference(inputs)
    assert relative_error(out, ref_out) < FP32_KERNEL_RTOL
    for name, grad, ref_grad in zip(GRAD_NAMES, grads, ref_grads):
        assert relative_error(grad, ref_grad) < FP32_KERNEL_RTOL, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_error_is_within_twice_the_references_own(dtype):
    """Mixed precision as autocast produces it: low-precision q, k, v; float32 parameters."""
    inputs = make_inputs(1, 3, 4, 5, 2, 16, 3, dtype=dtype, device=DEVICE, seed=11)
    out, grads, ref_out, ref_grads = _fused_and_reference(inputs)

    # The reference run in the same low precision: its error against float64 is the yardstick.
    lp_in = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}
    lp_out = emim_reference(**lp_in)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    lp_grads = torch.autograd.grad(lp_out, list(lp_in.values()), grad_out)

    assert out.dtype == dtype
    assert relative_error(out, ref_out) <= low_precision_bound(relative_error(lp_out, ref_out))
    for name, grad, lp_grad, ref_grad in zip(GRAD_NAMES, grads, lp_grads, ref_grads):
        assert grad.dtype == inputs[name].dtype, name
        assert relative_error(grad, ref_grad) <= low_precision_bound(relative_error(lp_grad, ref_grad)), name


def test_parameters_in_activation_dtype_are_accepted():
    inputs = make_inputs(1, 2, 3, 4, 1, 16, 3, dtype=torch.float16, device=DEVICE, seed=5)
    inputs = {n: t.half() for n, t in inputs.items()}
    out, grads, ref_out, _ = _fused_and_reference(inputs)
    assert out.dtype == torch.float16 and all(g.dtype == torch.float16 for g in grads)
    assert relative_error(out, ref_out) < 5e-3


def test_backward_is_deterministic():
    """The same inputs give bit-identical gradients run after run (no atomics anywhere)."""
    inputs = make_inputs(1, 3, 4, 5, 2, 16, 3, dtype=torch.float32, device=DEVICE, seed=7)
    first = _fused_and_reference(inputs)[1]
    second = _fused_and_reference(inputs)[1]
    for name, a, b in zip(GRAD_NAMES, first, second):
        assert torch.equal(a, b), name


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
def test_nan_in_the_input_propagates_without_a_crash():
    inputs = make_inputs(1, 2, 3, 3, 1, 16, 3, dtype=torch.float32, device=DEVICE, seed=9)
    inputs["q"] = inputs["q"].clone()
    inputs["q"][0, 0, 1, 1, 0, 0] = float("nan")
    out = emim_attention(**inputs, backend="triton")
    assert torch.isnan(out[0, 0, 1, 1, 0]).all()
    assert torch.isnan(out[0, 1, 1, 1, 0]).all()  # the copied last frame too
    assert not torch.isnan(out[0, 0, 0, 0, 0]).any()  # other queries are untouched


def test_fused_op_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True), default Inductor backend, traces through the custom op forward and
    backward (the op is opaque to Inductor: its fake implementation gives the output shapes)."""
    inputs = make_inputs(1, 2, 3, 4, 1, 16, 3, dtype=torch.float32, device=DEVICE, seed=13)
    inputs = {n: t.requires_grad_() for n, t in inputs.items()}

    def attention_then_mean(q, k, v, rpb, w1, b1, w2, b2):
        out = emim_attention(q, k, v, rpb, w1, b1, w2, b2, backend="triton")
        return (out * out).mean()

    compiled = torch.compile(attention_then_mean, fullgraph=True)
    loss = compiled(**inputs)
    grads = torch.autograd.grad(loss, list(inputs.values()))
    eager_loss = attention_then_mean(**inputs)
    eager_grads = torch.autograd.grad(eager_loss, list(inputs.values()))
    assert torch.allclose(loss, eager_loss)
    for name, a, b in zip(GRAD_NAMES, grads, eager_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name


def test_weights_kernel_operands_follow_the_activation_dtype():
    """The weights kernel multiplies fp16 operands for fp16 activations, tf32 for bf16 (bf16 operands are too
    coarse for its sums: 3.5e-3 from float64 against the op's 1e-3 bound) and exact float32 for float32."""
    from emim_triton.checks import EMIMShape
    from emim_triton.launch_configs import default_configs
    from emim_triton.triton_backend import example_launches

    shape = EMIMShape(2, 3, 6, 6, 2, 16, 3)
    for dtype, operand in ((torch.float32, "float32"), (torch.float16, "float16"), (torch.bfloat16, "tf32")):
        configs = default_configs(6, 6, 3, 16, dtype)
        launch = example_launches(shape, dtype, configs)["backward_weights"]
        assert launch.constexprs["OPERAND"] == operand


def test_weights_kernel_compiles_for_sm90_to_tensor_core_products_without_spills():
    """At the S16 stage-3 shape (bf16) with the shipped H200 configuration: no register spills, and each of the
    four products (z, dz, dW1, dW2) is a tf32 warpgroup MMA."""
    from emim_triton.checks import EMIMShape
    from emim_triton.triton_backend import example_launches
    from emim_triton.tuning_cache import DeviceId, configs_from_json, entry_key, read_shipped_defaults

    shape = EMIMShape(32, 16, 14, 14, 5, 64, 7)
    entry = read_shipped_defaults()[DeviceId("NVIDIA H200", (9, 0)).slug][entry_key(shape, torch.bfloat16)]
    launch = example_launches(shape, torch.bfloat16, configs_from_json(entry))["backward_weights"]
    sm90, products = compile_for_hopper(launch, also_sm80=False, operand="TF32")
    assert sm90.spills == 0, f"{sm90.spills} B of spills per thread"
    for product in ("tl.dot(w1c, tl.trans(a)", "tl.dot(w2ct, tl.trans(g)", "dw1 = tl.dot(", "dw2t = tl.dot("):
        assert any(product in text for text in products), (product, products)


def _weights_kernel_sums(a, g, w1, b1, w2, operand):
    """dW1, db1, dW2 as the weights kernel forms them (kernels/backward_weights.py), in float64 arithmetic, after
    rounding its operands as `operand` says ("exact": no rounding)."""
    from emim_triton.tensor_core_backward import round_to_tf32

    rounded = {"exact": lambda x: x, "float16": lambda x: x.half().double(), "bfloat16": lambda x: x.bfloat16().double(),
               "tf32": lambda x: round_to_tf32(x.float()).double()}[operand]
    z = rounded(a) @ rounded(w1).T + b1
    s = torch.sigmoid(1.702 * z)
    dz = (rounded(g) @ rounded(w2)) * (s + 1.702 * z * s * (1 - s))
    return rounded(dz).T @ rounded(a), dz.sum(0), rounded(g).T @ rounded(z * s)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_weights_kernel_operands_keep_its_sums_within_the_bound(dtype):
    """The weights kernel's operands (triton_backend.mlp_operand), their rounding emulated in float64 on affinity
    rows and upstream gradients like the op's: dW1, db1, dW2 stay within the floor of the op's 16-bit bound
    (2^-10) of the exact sums. bf16 operands would not, which is why bf16 inputs take tf32 (this is what caught
    it, without a GPU: the interpreter cannot multiply bf16)."""
    from emim_triton.reference import affinities, gather_windows
    from emim_triton.testing import TF32_ALLOWANCE
    from emim_triton.triton_backend import mlp_operand

    B, T, H, W, heads, D, K = 1, 3, 6, 6, 2, 32, 5
    x = {n: t.double() for n, t in make_inputs(B, T, H, W, heads, D, K, dtype=dtype, device="cpu", seed=3).items()}
    q, k = (x[n].reshape(B * T, H, W, heads, D) for n in ("q", "k"))
    a = affinities(q[:-1], gather_windows(k[1:], K, 1e-6), x["rpb"], D ** -0.5).reshape(-1, K * K)
    g = torch.randn(a.shape[0], D, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(dtype).double()
    exact = _weights_kernel_sums(a, g, x["w1"], x["b1"], x["w2"], "exact")
    for name, got, want in zip(("dW1", "db1", "dW2"), _weights_kernel_sums(a, g, x["w1"], x["b1"], x["w2"],
                                                                          mlp_operand(dtype)), exact):
        assert relative_error(got, want) <= TF32_ALLOWANCE, name
    if dtype == torch.bfloat16:
        coarse = _weights_kernel_sums(a, g, x["w1"], x["b1"], x["w2"], "bfloat16")
        assert relative_error(coarse[0], exact[0]) > TF32_ALLOWANCE
