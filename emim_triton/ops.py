"""The fused EMIM op as a `torch.library` custom op with registered autograd.

Two opaque ops: ``emim_triton::emim_forward`` -> (out, lse) and ``emim_triton::emim_backward`` -> the
eight gradients. Each has a fake (meta) implementation, so `torch.compile(fullgraph=True)` traces
models through the op without a graph break, and AOTAutograd sees the backward as one node too.

Both take the op's variant options as trailing scalars with the paper's defaults (direction "next",
dilation 1, context_channels 0 = all channels; `triton_backend.Variant`). The inputs arrive checked
(`emim_attention` checks them once). Each op asks the tuner for the shape's launch
configurations (`autotune.resolve_configs`) and hands them to `strategies`, which runs the kernels of the
strategy asked for through the launchers (`triton_backend` and the tensor-core modules); none of them depends
on anything above it.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import autotune, strategies, triton_backend
from .checks import EMIMShape
from .cost_model import emim_cost


@torch.library.custom_op("emim_triton::emim_forward", mutates_args=())
def emim_forward_op(q: Tensor, k: Tensor, v: Tensor, rpb: Tensor, w1: Tensor, b1: Tensor, w2: Tensor,
                    b2: Tensor, scale: float, pad_value: float, direction: str = "next", dilation: int = 1,
                    context_channels: int = 0) -> tuple[Tensor, Tensor]:
    """Fused forward. Returns out (B, T, H, W, heads, D) and the softmax log-sum-exp
    (B, pairs, H, W, heads) float32, the only thing the backward keeps besides the inputs."""
    shape = EMIMShape.of(q, rpb)
    variant = triton_backend.Variant(direction, dilation, context_channels)
    configs = autotune.resolve_configs(shape, q.dtype).configs
    # Either strategy writes the same out and lse (the backward's input), so the two directions choose freely.
    return strategies.forward(q, k, v, rpb, w1, b1, w2, b2, shape, scale, pad_value, configs, store_lse=True,
                              variant=variant)


@emim_forward_op.register_fake
def _(q, k, v, rpb, w1, b1, w2, b2, scale, pad_value, direction="next", dilation=1, context_channels=0):
    B, T, H, W, heads, D = q.shape
    pairs = triton_backend.Variant(direction, dilation, context_channels).pairs(EMIMShape.of(q, rpb))
    out = q.new_empty((B, T, H, W, heads, D))
    lse = q.new_empty((B, pairs, H, W, heads), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("emim_triton::emim_backward", mutates_args=())
def emim_backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, rpb: Tensor, w1: Tensor, b1: Tensor,
                     w2: Tensor, b2: Tensor, lse: Tensor, scale: float, pad_value: float, direction: str = "next",
                     dilation: int = 1, context_channels: int = 0
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused backward: gradients of (q, k, v, rpb, w1, b1, w2, b2), each in its input's dtype."""
    shape = EMIMShape.of(q, rpb)
    variant = triton_backend.Variant(direction, dilation, context_channels)
    configs = autotune.resolve_configs(shape, q.dtype).configs
    return strategies.backward(grad_out, q, k, v, rpb, w1, b1, w2, b2, lse, shape, scale, pad_value, configs,
                               variant=variant)


@emim_backward_op.register_fake
def _(grad_out, q, k, v, rpb, w1, b1, w2, b2, lse, scale, pad_value, direction="next", dilation=1,
      context_channels=0):
    # Every gradient comes back contiguous (triton_backend.backward), whatever its input's strides.
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v, rpb, w1, b1, w2, b2))


_OPTIONS = ("scale", "pad_value", "direction", "dilation", "context_channels")


def _setup_context(ctx, inputs, output):
    q, k, v, rpb, w1, b1, w2, b2, *options = inputs
    _, lse = output
    ctx.save_for_backward(q, k, v, rpb, w1, b1, w2, b2, lse)
    ctx.options = options  # scale, pad_value and the variant, as the forward got them


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, rpb, w1, b1, w2, b2, lse = ctx.saved_tensors
    grads = emim_backward_op(grad_out, q, k, v, rpb, w1, b1, w2, b2, lse, *ctx.options)
    return (*grads, *(None for _ in ctx.options))


torch.library.register_autograd("emim_triton::emim_forward", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("emim_attention: the triton backend has no double backward (gradients of its gradients, "
                       "e.g. torch.autograd.grad(..., create_graph=True) followed by another backward); use "
                       "backend='reference', which is differentiable to any order")


def _setup_nothing(ctx, inputs, output):
    pass


# Registered so that a second-order backward fails with a message naming the limitation instead of torch's
# generic "derivative not implemented" for an internal op name.
torch.library.register_autograd("emim_triton::emim_backward", _no_double_backward, setup_context=_setup_nothing)


# The ops are opaque to torch.utils.flop_counter; their cost is the cost model's (emim_triton/cost_model.py,
# docs/operation.md#cost), so a FlopCounterMode (a model's GMACs, a training step's MFU) counts the fused path
# exactly as it counts the reference path's einsums and linear layers (tested in tests/test_models.py).
def _computed_pairs_share(shape: EMIMShape, args: tuple, kwargs: dict, first_option: int) -> tuple[int, int]:
    """(pairs computed, pairs the cost model counts) for the call's direction: the cost model counts the
    paper's T-1 pairs; "prev" computes T. Dilation and the authors' context change no FLOP count."""
    options = dict(zip(_OPTIONS, args[first_option:]), **kwargs)
    variant = triton_backend.Variant(direction=options.get("direction", "next"))
    return variant.pairs(shape), shape.pairs


@register_flop_formula(torch.ops.emim_triton.emim_forward)
def _forward_flops(q_shape, k_shape, v_shape, rpb_shape, *args, out_shape=None, **kwargs) -> int:
    shape = EMIMShape(*q_shape, rpb_shape[-1])
    computed, counted = _computed_pairs_share(shape, args, kwargs, first_option=4)  # after w1, b1, w2, b2
    return emim_cost(shape).forward_flops // counted * computed  # FLOPs are per computed pair


@register_flop_formula(torch.ops.emim_triton.emim_backward)
def _backward_flops(grad_shape, q_shape, k_shape, v_shape, rpb_shape, *args, out_shape=None, **kwargs) -> int:
    # Every product of the forward has two gradient products (w.r.t. each operand), as autograd's matmul
    # backward counts on the reference path; the kernels' recomputation is not counted.
    shape = EMIMShape(*q_shape, rpb_shape[-1])
    computed, counted = _computed_pairs_share(shape, args, kwargs, first_option=5)  # after w1, b1, w2, b2, lse
    return emim_cost(shape).backward_flops // counted * computed


def emim_fused(q, k, v, rpb, w1, b1, w2, b2, *, scale: float, pad_value: float, direction: str = "next",
               dilation: int = 1, context_channels: int = 0) -> Tensor:
    """The Triton path of `emim_attention` (inputs already checked, `checks.check_fused_inputs` included).

    context_channels: 0 (the context over all D channels) or 32 (the authors' switch)."""
    out, _ = emim_forward_op(q, k, v, rpb, w1, b1, w2, b2, scale, pad_value, direction, dilation,
                             context_channels)
    return out
