"""The EMIM model zoo (installed as ``emim_triton.models``). Models use only the public op and module.

    from emim_triton.models import create_model, list_models
    model = create_model("emim_uniformer_s16", num_classes=174, pretrained="uniformer_small_k400_16x4.pth")
    model.default_cfg  # frames, size, mean, std the model expects
"""

from .pretrained import LoadReport, load_pretrained
from .flops import FlopCount, count_flops, count_params, emim_forward_flops, register_flop_formulas
from .registry import create_model, get_model_cfg, list_models, register_model
from .uniformer import UniFormer  # also registers the UniFormer / EMIM-UniFormer models

__all__ = [
    "FlopCount", "LoadReport", "UniFormer", "count_flops", "count_params", "create_model",
    "emim_forward_flops", "get_model_cfg", "list_models", "load_pretrained", "register_flop_formulas",
    "register_model",
]
