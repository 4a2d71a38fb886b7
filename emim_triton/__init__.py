"""emim-triton: fused Triton kernels for EMIM attention, the EMIM module and a video model zoo."""

from .convert import ConversionReport, convert_to_emim
from .functional import emim_attention
from .module import EMIM
from .reference import emim_reference

__all__ = ["EMIM", "ConversionReport", "convert_to_emim", "emim_attention", "emim_reference"]
__version__ = "0.1.0"
