"""emim-triton: fused Triton kernels for EMIM attention, the EMIM module and a video model zoo."""

from .functional import emim_attention
from .module import EMIM
from .reference import emim_reference

__all__ = ["EMIM", "emim_attention", "emim_reference"]
__version__ = "0.1.0"
