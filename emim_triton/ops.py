"""The fused EMIM op as a `torch.library` custom op with registered autograd.

Two opaque ops: ``emim_triton::emim_forward`` -> (out, lse) and ``emim_triton::emim_backward`` -> the
eight gradients. Each has a fake (meta) implementation, so `torch.compile(fullgraph=True)` traces
models through the op without a graph break, and AOTAutograd sees the backward as one node too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import triton_backend
from .checks import check_inputs
from .functional import interpreter_enabled


@torch.library.custom_op("emim_triton::emim_forward", mutates_args=())
def emim_forward_op(q: Tensor, k: Tensor, v: Tensor, rpb: Tensor, w1: Tensor, b1: Tensor, w2: Tensor,
                    b2: Tensor, scale: float, pad_value: float) -> tuple[Tensor, Tensor]:
    """Fused forward. Returns out (B, T, H, W, heads, D) and the softmax log-sum-exp
    (B, pairs, H, W, heads) float32, the only thing the backward keeps besides the inputs."""
    shape = check_inputs(q, k, v, rpb, w1, b1, w2, b2)
    return triton_backend.forward(q, k, v, rpb, w1, b1, w2, b2, shape, scale, pad_value, store_lse=True)


@emim_forward_op.register_fake
def _(q, k, v, rpb, w1, b1, w2, b2, scale, pad_value):
    B, T, H, W, heads, D = q.shape
    out = q.new_empty((B, T, H, W, heads, D))
    lse = q.new_empty((B, max(T - 1, 1), H, W, heads), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("emim_triton::emim_backward", mutates_args=())
def emim_backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, rpb: Tensor, w1: Tensor, b1: Tensor,
                     w2: Tensor, b2: Tensor, lse: Tensor, scale: float, pad_value: float
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused backward: gradients of (q, k, v, rpb, w1, b1, w2, b2), each in its input's dtype."""
    shape = check_inputs(q, k, v, rpb, w1, b1, w2, b2)
    return triton_backend.backward(grad_out, q, k, v, rpb, w1, b1, w2, b2, lse, shape, scale, pad_value)


@emim_backward_op.register_fake
def _(grad_out, q, k, v, rpb, w1, b1, w2, b2, lse, scale, pad_value):
    # Every gradient comes back contiguous (triton_backend.backward), whatever its input's strides.
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v, rpb, w1, b1, w2, b2))


def _setup_context(ctx, inputs, output):
    q, k, v, rpb, w1, b1, w2, b2, scale, pad_value = inputs
    _, lse = output
    ctx.save_for_backward(q, k, v, rpb, w1, b1, w2, b2, lse)
    ctx.scale, ctx.pad_value = scale, pad_value


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, rpb, w1, b1, w2, b2, lse = ctx.saved_tensors
    grads = emim_backward_op(grad_out, q, k, v, rpb, w1, b1, w2, b2, lse, ctx.scale, ctx.pad_value)
    return (*grads, None, None)


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


def emim_fused(q, k, v, rpb, w1, b1, w2, b2, *, scale: float, pad_value: float) -> Tensor:
    """The Triton path of `emim_attention` (inputs already checked)."""
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"emim_attention: the triton backend takes float32, float16 or bfloat16 q, k, v; "
                        f"got {q.dtype} (use backend='reference' for float64)")
    if q.device.type != "cuda" and not (q.device.type == "cpu" and interpreter_enabled()):
        raise ValueError(f"emim_attention: backend='triton' needs CUDA tensors (or CPU tensors with "
                         f"TRITON_INTERPRET=1 set before triton is imported); q is on {q.device}")
    out, _ = emim_forward_op(q, k, v, rpb, w1, b1, w2, b2, scale, pad_value)
    return out
