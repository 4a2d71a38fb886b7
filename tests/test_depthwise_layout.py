"""UniFormer hands its depthwise Conv3d layers NCDHW-contiguous inputs (issue 13).

The layout of a depthwise convolution's input chooses its CUDA backend: with channels_last_3d strides
PyTorch always takes cuDNN, whose bf16 3-D grouped weight gradient ran per channel and took 95 % of an
S16 training step on an H200; a contiguous input takes PyTorch's own depthwise-3d kernels. The layout is
the same on CPU, so it is checked here, on the layer inputs, without a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from emim_triton.models import create_model


def depthwise_convs(model: nn.Module) -> dict[str, nn.Conv3d]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Conv3d) and m.groups == m.in_channels > 1}


@pytest.mark.parametrize("name", ["emim_uniformer_s16", "uniformer_s16"])
def test_every_depthwise_conv3d_gets_a_contiguous_ncdhw_input(name):
    model = create_model(name, attn_backend="reference", num_classes=10).eval()
    convs = depthwise_convs(model)
    # pos_embed in all 3 + 4 + 8 + 3 blocks, the local 5x5x5 convolution in the 3 + 4 convolutional ones
    assert len(convs) == 18 + 7
    seen = {}
    for conv_name, conv in convs.items():
        conv.register_forward_pre_hook(
            lambda module, args, conv_name=conv_name: seen.setdefault(conv_name, args[0]))
    with torch.no_grad():
        model(torch.randn(1, 3, 4, 64, 64))  # stage 4 still sees 4 x 2 x 2 maps, so a wrong layout shows
    assert seen.keys() == convs.keys(), "a depthwise convolution never ran"
    wrong = {conv_name: x.stride() for conv_name, x in seen.items()
             if not x.is_contiguous(memory_format=torch.contiguous_format)}
    assert not wrong, f"depthwise Conv3d inputs that are not NCDHW-contiguous (name: strides): {wrong}"
