"""Which kernels compute the fused op, call by call: the one home of that choice and of running it.

Each direction has two strategies behind the same launch interface:

- "offset_loop": the kernels of ``triton_backend`` (one window displacement per step, on CUDA cores; every dtype,
  shape and variant; measured on an H200);
- "tensor_core": the halo kernels (``tensor_core_forward``, ``tensor_core_backward``,
  ``tensor_core_key_value``): the products on tensor cores, for fp16/bf16, K <= 7, no dilation (the key/value
  side also needs one query frame per key frame). Modelled several times faster (README, Results).

Which one runs: ``EMIM_TRITON_FORWARD`` / ``EMIM_TRITON_BACKWARD`` when set (either value, to force it);
otherwise the strategy recorded with the shape's launch configurations (``EMIMConfigs.forward_strategy`` and
``backward_strategy``: the autotuner times both strategies on the GPU and records "tensor_core" only where it
is faster *and* gives the offset loop's results, ``autotune.choose_strategies``); otherwise the offset loop.
Where the chosen tensor-core kernel does not take the call, that side runs the offset loop. The backward's
weights kernel is the same for both.
"""

from __future__ import annotations

from . import tensor_core_backward, tensor_core_forward, tensor_core_key_value, triton_backend
from .environment import requested_backward_strategy, requested_forward_strategy
from .launch_configs import EMIMConfigs
from .triton_backend import DEFAULT_VARIANT, Variant


def forward_strategy(configs: EMIMConfigs) -> str:
    """The forward strategy asked for: EMIM_TRITON_FORWARD if set, else the configurations'."""
    return requested_forward_strategy() or configs.forward_strategy


def backward_strategy(configs: EMIMConfigs) -> str:
    """The backward strategy asked for: EMIM_TRITON_BACKWARD if set, else the configurations'."""
    return requested_backward_strategy() or configs.backward_strategy


def tensor_core_takes(kind: str, shape, dtype, variant: Variant = DEFAULT_VARIANT) -> bool:
    """Whether the tensor-core strategy of `kind` ("forward" or "backward": both of its sides) takes the call."""
    if kind == "forward":
        return tensor_core_forward.supports(shape, dtype, variant)
    return tensor_core_backward.supports(shape, dtype, variant) and tensor_core_key_value.supports(shape, dtype,
                                                                                                  variant)


def forward(q, k, v, rpb, w1, b1, w2, b2, shape, scale: float, pad_value: float, configs: EMIMConfigs,
            store_lse: bool, variant: Variant = DEFAULT_VARIANT, strategy: str | None = None):
    """(out, lse) by `strategy`, by default the one asked for (`forward_strategy`); both write the same lse, so
    either backward can follow either forward."""
    strategy = strategy or forward_strategy(configs)
    if strategy == "tensor_core" and tensor_core_forward.supports(shape, q.dtype, variant):
        return tensor_core_forward.forward_tensor_core(q, k, v, rpb, w1, b1, w2, b2, shape, scale, pad_value,
                                                       store_lse=store_lse, variant=variant)
    return triton_backend.forward(q, k, v, rpb, w1, b1, w2, b2, shape, scale, pad_value, configs,
                                  store_lse=store_lse, variant=variant)


def backward(grad_out, q, k, v, rpb, w1, b1, w2, b2, lse, shape, scale: float, pad_value: float,
             configs: EMIMConfigs, variant: Variant = DEFAULT_VARIANT, strategy: str | None = None):
    """The eight gradients by `strategy`, by default the one asked for (`backward_strategy`), each side where
    its tensor-core kernel takes the call."""
    query_launch = key_value_launch = None
    if (strategy or backward_strategy(configs)) == "tensor_core":
        if tensor_core_backward.supports(shape, q.dtype, variant):
            query_launch = tensor_core_backward.backward_query_tensor_core_launch
        if tensor_core_key_value.supports(shape, q.dtype, variant):
            key_value_launch = tensor_core_key_value.backward_key_value_tensor_core_launch
    return triton_backend.backward(grad_out, q, k, v, rpb, w1, b1, w2, b2, lse, shape, scale, pad_value, configs,
                                   variant=variant, query_launch=query_launch, key_value_launch=key_value_launch)
