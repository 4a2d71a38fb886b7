"""Facts about the environment the op runs in, with no dependency on the rest of the package.

A leaf module: the public op, the custom-op glue and the tuner all ask here, so none of them has to import
another to learn whether the Triton interpreter is on.
"""

from __future__ import annotations

import os

# What `emim_attention(..., backend=)` and `EMIM(backend=)` accept.
BACKENDS = ("auto", "triton", "reference")


def interpreter_enabled() -> bool:
    """True when Triton runs its kernels in the CPU interpreter (TRITON_INTERPRET=1, read when triton is
    first imported). A switch for tests and tools that ask for backend="triton" on CPU tensors; it never
    changes what backend="auto" picks."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
