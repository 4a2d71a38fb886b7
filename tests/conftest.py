"""Test-session setup: run the real Triton kernels in the CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, which is why it happens here, at
conftest import time, and not inside a fixture.
"""

import os
import shutil

import pytest


def _nvidia_gpu_present() -> bool:
    return os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None


if "TRITON_INTERPRET" not in os.environ and not _nvidia_gpu_present():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_terminal_summary(terminalreporter):
    """Shared memory, registers and spills of every kernel configuration the AOT test compiled."""
    from helpers import AOT_REPORT

    if not AOT_REPORT:
        return
    terminalreporter.section("GPU compile report (AOT, no GPU needed)")
    terminalreporter.write_line(f"{'kernel':34} {'sm':>3} {'warps':>5} {'stages':>6} {'shared B':>9} "
                                f"{'regs':>5} {'spill B':>7}  constexprs")
    for info, constexprs in AOT_REPORT:
        shown = {k: v for k, v in constexprs.items() if k != "DOT_PRECISION"}
        terminalreporter.write_line(f"{info.name:34} {info.arch:>3} {info.num_warps:>5} {info.num_stages:>6} "
                                    f"{info.shared_bytes:>9} {str(info.registers):>5} {str(info.spills):>7}  {shown}")


@pytest.fixture
def nan_poisoned_buffers(monkeypatch):
    """Every buffer the fused kernels write starts as NaN (they are all floating point), so an element a
    kernel forgets to write shows up as NaN and fails the comparison. Kernel test modules use it with
    ``pytestmark = pytest.mark.usefixtures("nan_poisoned_buffers")``."""
    import torch

    from emim_triton import triton_backend

    monkeypatch.setattr(triton_backend, "new_buffer",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))
