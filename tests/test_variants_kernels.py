"""The fused kernels' variants (docs/operation.md#variants-beyond-the-paper, #context-channel-switch) against
the float64 reference: direction "prev", dilation, authors_context_channels=32; forward and all eight
gradients.

Interpreter-sized shapes (tests/conftest.py). As in tests/test_kernels.py, every buffer a kernel writes
starts as NaN, so an element a variant forgets to write (a frame "prev" computes and "next" copies, a key
frame only "prev" gives gradient to) fails the comparison. The default variant is tests/test_kernels.py's.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import emim_triton.ops  # noqa: F401  (registers torch.ops.emim_triton.*, which emim_attention imports lazily)
from emim_triton import emim_attention, emim_reference
from emim_triton.checks import EMIMShape
from emim_triton.cost_model import emim_cost
from helpers import FP32_KERNEL_RTOL, GRAD_NAMES, make_inputs, relative_error, test_device

DEVICE = test_device()

# (id, (B, T, H, W, heads, D, K), direction, dilation, authors_context_channels)
CASES = [
    ("prev-T3", (1, 3, 3, 4, 1, 16, 3), "prev", 1, None),
    ("prev-T2-d2-two-heads", (1, 2, 4, 5, 2, 16, 3), "prev", 2, None),
    ("prev-T3-d3-B2-window-wider-than-frame", (2, 3, 3, 4, 1, 16, 3), "prev", 3, None),
    ("prev-T1-d2-self-attention", (1, 1, 3, 2, 1, 16, 3), "prev", 2, None),
    ("next-T3-d2", (1, 3, 4, 5, 1, 16, 3), "next", 2, None),
    ("next-T2-d3-K5-D24-window-wider-than-frame", (1, 2, 3, 4, 1, 24, 5), "next", 3, None),
    ("next-T1-d3", (1, 1, 2, 3, 1, 16, 3), "next", 3, None),
    ("authors-next-D48", (1, 2, 3, 4, 1, 48, 3), "next", 1, 32),
    ("authors-prev-d2-D40-two-heads", (1, 3, 3, 4, 2, 40, 3), "prev", 2, 32),
]


# Every buffer the kernels write starts as NaN (tests/conftest.py), so an unwritten element fails.
pytestmark = pytest.mark.usefixtures("nan_poisoned_buffers")


def _fused(inputs, variant, grad_seed=1):
    """Fused output and the eight gradients for a fixed random upstream gradient."""
    fused_in = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}
    out = emim_attention(**fused_in, backend="triton", **variant)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out)
    return out, torch.autograd.grad(out, list(fused_in.values()), grad_out), grad_out


def _reference(inputs, variant, grad_out):
    ref_in = {n: t.detach().double().requires_grad_() for n, t in inputs.items()}
    ref_out = emim_reference(**ref_in, **variant)
    return ref_out, torch.autograd.grad(ref_out, list(ref_in.values()), grad_out.double())


@pytest.mark.parametrize("shape, direction, dilation, context", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_variant_forward_and_gradients_match_float64_reference(shape, direction, dilation, context):
    variant = dict(direction=direction, dilation=dilation, authors_context_channels=context)
    inputs = make_inputs(*shape, dtype=torch.float32, device=DEVICE, seed=sum(shape) + dilation)
    out, grads, grad_out = _fused(inputs, variant)
    ref_out, ref_grads = _reference(inputs, variant, grad_out)
    assert relative_error(out, ref_out) < FP32_KERNEL_RTOL
    for name, grad, ref_grad in zip(GRAD_NAMES, grads, ref_grads):
        assert relative_error(grad, ref_grad) < FP32_KERNEL_RTOL, name
    if context is not None:
        # What the switch is for, exactly: q, k, v get no gradient beyond channel 32 (a relative error over
        # the whole tensor could hide a small leak there).
        for name, grad in zip(GRAD_NAMES[:3], grads[:3]):
            assert torch.count_nonzero(grad[..., context:]) == 0, name
            assert torch.count_nonzero(grad[..., :context]) > 0, name


def test_variants_differ_from_the_default():
    """Each option changes the fused output (so the comparisons above cannot pass by ignoring it)."""
    inputs = make_inputs(1, 3, 4, 5, 1, 48, 3, dtype=torch.float32, device=DEVICE, seed=2)
    default = emim_attention(**inputs, backend="triton")
    for variant in (dict(direction="prev"), dict(dilation=2), dict(authors_context_channels=32)):
        changed = emim_attention(**inputs, backend="triton", **variant)
        assert relative_error(changed, default) > 1e-3, variant


def test_prev_is_causal_in_the_fused_kernels():
    """Output frame t of "prev" does not change, bit for bit, when frames > t change."""
    inputs = make_inputs(1, 3, 3, 4, 1, 16, 3, dtype=torch.float32, device=DEVICE, seed=4)
    out = emim_attention(**inputs, backend="triton", direction="prev")
    later = dict(inputs)
    for name in ("q", "k", "v"):
        later[name] = inputs[name].clone()
        later[name][:, 2] += 1.0
    changed = emim_attention(**later, backend="triton", direction="prev")
    assert torch.equal(changed[:, :2], out[:, :2])
    assert not torch.equal(changed[:, 2], out[:, 2])


def test_prev_backward_is_deterministic():
    """Key frame 0 of "prev" gathers from two query frames (1 and 0): in a fixed order, bit-identical."""
    inputs = make_inputs(1, 3, 4, 5, 2, 16, 3, dtype=torch.float32, device=DEVICE, seed=7)
    variant = dict(direction="prev", dilation=2)
    first, second = _fused(inputs, variant)[1], _fused(inputs, variant)[1]
    for name, a, b in zip(GRAD_NAMES, first, second):
        assert torch.equal(a, b), name


def test_fake_implementation_and_flops_follow_the_direction():
    """On meta tensors: "prev" saves and counts T frame pairs, "next" T-1; dilation changes no FLOP count."""
    B, T, H, W, heads, D, K = 1, 4, 5, 6, 2, 16, 3
    args = [torch.empty(s, device="meta") for s in ((B, T, H, W, heads, D),) * 3 + ((heads, K, K),
            (4 * K * K, K * K), (4 * K * K,), (D, 4 * K * K), (D,))]
    per_pair = emim_cost(EMIMShape(B, T, H, W, heads, D, K)).forward_flops // (T - 1)
    for options, pairs in (((), T - 1), (("prev",), T), (("prev", 3), T), (("next", 2, 32), T - 1)):
        with FlopCounterMode(display=False) as counter:
            out, lse = torch.ops.emim_triton.emim_forward(*args, 0.25, 1e-6, *options)
        assert out.shape == args[0].shape and lse.shape == (B, pairs, H, W, heads), options
        assert counter.get_total_flops() == pairs * per_pair, options
        with FlopCounterMode(display=False) as counter:
            torch.ops.emim_triton.emim_backward(out, *args, lse, 0.25, 1e-6, *options)
        assert counter.get_total_flops() == 2 * pairs * per_pair, options  # cost model: backward = 2x forward


def test_custom_op_refuses_an_unknown_variant():
    """The op checks its variant too, for callers of torch.ops.emim_triton.* that skip emim_attention."""
    inputs = make_inputs(1, 2, 3, 3, 1, 16, 3, dtype=torch.float32, device=DEVICE, seed=1)
    with pytest.raises(ValueError, match="direction"):
        torch.ops.emim_triton.emim_forward(*inputs.values(), 0.25, 1e-6, "both")
    with pytest.raises(ValueError, match="dilation"):
        torch.ops.emim_triton.emim_forward(*inputs.values(), 0.25, 1e-6, "next", 0)
    with pytest.raises(ValueError, match="context_channels"):
        torch.ops.emim_triton.emim_forward(*inputs.values(), 0.25, 1e-6, "next", 1, 16)


def test_variant_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) traces the op with its variant arguments, forward and backward."""
    inputs = make_inputs(1, 2, 3, 4, 1, 48, 3, dtype=torch.float32, device=DEVICE, seed=13)
    inputs = {n: t.requires_grad_() for n, t in inputs.items()}

    def attention_then_mean(q, k, v, rpb, w1, b1, w2, b2):
        out = emim_attention(q, k, v, rpb, w1, b1, w2, b2, backend="triton", direction="prev", dilation=2,
                             authors_context_channels=32)
        return (out * out).mean()

    compiled = torch.compile(attention_then_mean, fullgraph=True, backend="aot_eager")
    loss = compiled(**inputs)
    grads = torch.autograd.grad(loss, list(inputs.values()))
    eager_loss = attention_then_mean(**inputs)
    eager_grads = torch.autograd.grad(eager_loss, list(inputs.values()))
    assert torch.equal(loss, eager_loss)
    for name, a, b in zip(GRAD_NAMES, grads, eager_grads):
        assert torch.equal(a, b), name
