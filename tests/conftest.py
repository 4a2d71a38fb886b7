"""Test-session setup: run the real Triton kernels in the CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, which is why it happens here, at
conftest import time, and not inside a fixture.
"""

import os
import shutil


def _nvidia_gpu_present() -> bool:
    return os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None


if "TRITON_INTERPRET" not in os.environ and not _nvidia_gpu_present():
    os.environ["TRITON_INTERPRET"] = "1"
