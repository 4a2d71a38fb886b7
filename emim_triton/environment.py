"""Facts about the environment the op runs in, with no dependency on the rest of the package.

A leaf module: the public op, the custom-op glue and the tuner all ask here, so none of them has to import
another to learn whether the Triton interpreter is on.
"""

from __future__ import annotations

import os

# What `emim_attention(..., backend=)` and `EMIM(backend=)` accept.
BACKENDS = ("auto", "triton", "reference")

# The fused op's two kernel strategies per direction (emim_triton/strategies.py says which runs): the offset loop
# on CUDA cores (measured on an H200), and the tensor-core halo kernels (kernels/*_tensor_core.py: modelled
# several times faster). Unset, the op runs what the shape's tuned configurations record (the autotuner picks the
# tensor-core kernels where they are faster and give the same results), else the offset loop; set, it forces
# one. The backward's variable covers its query and key/value sides (the weights kernel is shared).
FORWARD_STRATEGY_ENV = "EMIM_TRITON_FORWARD"
BACKWARD_STRATEGY_ENV = "EMIM_TRITON_BACKWARD"
STRATEGIES = ("offset_loop", "tensor_core")


def _requested_strategy(variable: str) -> str | None:
    value = os.environ.get(variable, "")
    if value and value not in STRATEGIES:
        raise ValueError(f"{variable} must be one of {STRATEGIES} (or unset), got {value!r}")
    return value or None


def requested_forward_strategy() -> str | None:
    """The forward strategy EMIM_TRITON_FORWARD forces, or None when it is unset."""
    return _requested_strategy(FORWARD_STRATEGY_ENV)


def requested_backward_strategy() -> str | None:
    """The backward strategy EMIM_TRITON_BACKWARD forces, or None when it is unset."""
    return _requested_strategy(BACKWARD_STRATEGY_ENV)


def interpreter_enabled() -> bool:
    """True when Triton runs its kernels in the CPU interpreter (TRITON_INTERPRET=1, read when triton is
    first imported). A switch for tests and tools that ask for backend="triton" on CPU tensors; it never
    changes what backend="auto" picks."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
