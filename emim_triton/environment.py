"""Facts about the environment the op runs in, with no dependency on the rest of the package.

A leaf module: the public op, the custom-op glue and the tuner all ask here, so none of them has to import
another to learn whether the Triton interpreter is on.
"""

from __future__ import annotations

import os

# What `emim_attention(..., backend=)` and `EMIM(backend=)` accept.
BACKENDS = ("auto", "triton", "reference")

# The fused forward's two strategies: the offset loop on CUDA cores (the default, measured on an H200), and the
# tensor-core halo kernel (kernels/forward_tensor_core.py: modelled 6x faster at S16 stage 3, not yet measured
# or validated in bf16 on a GPU, so it runs only when asked for).
FORWARD_STRATEGY_ENV = "EMIM_TRITON_FORWARD"
FORWARD_STRATEGIES = ("offset_loop", "tensor_core")
# The same choice for the query side of the backward (kernels/backward_query_tensor_core.py; the key/value and
# weights kernels are shared).
BACKWARD_STRATEGY_ENV = "EMIM_TRITON_BACKWARD"
BACKWARD_STRATEGIES = ("offset_loop", "tensor_core")


def _requested_strategy(variable: str, strategies: tuple[str, ...]) -> str:
    value = os.environ.get(variable, "") or strategies[0]
    if value not in strategies:
        raise ValueError(f"{variable} must be one of {strategies} (or unset), got {value!r}")
    return value


def requested_forward_strategy() -> str:
    """The forward strategy EMIM_TRITON_FORWARD asks for ("offset_loop" when unset)."""
    return _requested_strategy(FORWARD_STRATEGY_ENV, FORWARD_STRATEGIES)


def requested_backward_strategy() -> str:
    """The query-side backward strategy EMIM_TRITON_BACKWARD asks for ("offset_loop" when unset)."""
    return _requested_strategy(BACKWARD_STRATEGY_ENV, BACKWARD_STRATEGIES)


def interpreter_enabled() -> bool:
    """True when Triton runs its kernels in the CPU interpreter (TRITON_INTERPRET=1, read when triton is
    first imported). A switch for tests and tools that ask for backend="triton" on CPU tensors; it never
    changes what backend="auto" picks."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
