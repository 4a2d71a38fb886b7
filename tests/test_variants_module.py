"""The variants through the module, the model zoo, the conversion and load_pretrained: each option reaches the op,
and a bad one is refused at construction, naming it."""

import pytest
import torch
import torch.nn as nn

from emim_triton import EMIM, convert_to_emim, emim_reference
from emim_triton.models import create_model, load_pretrained
from emim_triton.motion_field import motion_fields
from emim_triton.viz import build_parser, load_model
from helpers import switch_on_motion

OPTIONS = dict(direction="prev", dilation=2, authors_context_channels=32)


def test_module_passes_the_variant_to_the_op():
    torch.manual_seed(0)
    emim = EMIM(96, 2, window=3, backend="reference", **OPTIONS)  # head_dim 48: the switch has channels to zero
    switch_on_motion(emim, std=0.2)
    x = torch.randn(1, 3, 4, 5, 96)
    with torch.no_grad():
        q, k, v = emim.qkv_views(x)
        hidden, _, output = emim.motion_conv
        expected = emim.proj(emim_reference(q, k, v, emim.rpb, hidden.weight, hidden.bias, output.weight,
                                            output.bias, **OPTIONS).reshape(x.shape))
        plain = emim_reference(q, k, v, emim.rpb, hidden.weight, hidden.bias, output.weight, output.bias)
        torch.testing.assert_close(emim(x), expected, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(emim(x), emim.proj(plain.reshape(x.shape)))
    assert "direction='prev', dilation=2, authors_context_channels=32" in repr(emim)
    assert "direction" not in repr(EMIM(32, 1))  # a default layer reads as before


@pytest.mark.parametrize("options, error, message", [
    (dict(direction="forward"), ValueError, "direction must be one of"),
    (dict(dilation=1.5), TypeError, "dilation must be an int >= 1"),
    (dict(authors_context_channels=64), ValueError, "authors_context_channels must be None"),
])
def test_bad_options_are_refused_at_construction(options, error, message):
    with pytest.raises(error, match=message):
        EMIM(32, 1, **options)
    with pytest.raises(error, match=message):
        create_model("emim_uniformer_xt", **options)
    model = nn.Sequential(Attention())
    with pytest.raises(error, match="convert_to_emim: .*" + message):
        convert_to_emim(model, grid=(2, 2, 2), **options)
    assert isinstance(model[0], Attention)  # nothing was replaced


def test_zoo_models_take_the_options():
    model = create_model("emim_uniformer_xt", num_classes=3, **OPTIONS).eval()
    layers = [m for m in model.modules() if isinstance(m, EMIM)]
    assert layers and all((m.direction, m.dilation, m.authors_context_channels) == ("prev", 2, 32) for m in layers)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 2, 32, 32)).shape == (1, 3)
    with pytest.raises(ValueError, match="emim_placement='none' builds none"):
        create_model("uniformer_xt", direction="prev")


class Attention(nn.Module):
    """A minimal timm-style attention layer for the conversion."""

    def __init__(self, dim=64, num_heads=2):
        super().__init__()
        self.num_heads = num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)


def test_conversion_takes_the_options():
    model = nn.Sequential(Attention(), Attention())
    convert_to_emim(model, grid=(2, 2, 2), every=1, backend="reference", direction="prev", dilation=3)
    assert [(m.direction, m.dilation, m.authors_context_channels) for m in model] == [("prev", 3, None)] * 2
    assert model[0](torch.randn(1, 8, 64)).shape == (1, 8, 64)


def test_load_pretrained_switches_on_the_authors_context():
    model = create_model("emim_uniformer_xt", num_classes=3)
    state = model.state_dict()
    load_pretrained(model, state, verbose=False)
    assert all(m.authors_context_channels is None for m in model.modules() if isinstance(m, EMIM))
    load_pretrained(model, state, verbose=False, authors_context_channels=32)
    assert all(m.authors_context_channels == 32 for m in model.modules() if isinstance(m, EMIM))
    with pytest.raises(ValueError, match="authors_context_channels must be None"):
        load_pretrained(model, state, verbose=False, authors_context_channels=31)
    plain = create_model("uniformer_xt", num_classes=3)
    with pytest.raises(ValueError, match="has none"):
        load_pretrained(plain, plain.state_dict(), verbose=False, authors_context_channels=32)


# --- motion fields and emim-viz -----------------------------------------------------------------------------

def test_motion_field_of_a_causal_dilated_layer_recovers_a_translation():
    """A texture moving by (dy, dx) = (2, -4) tokens per frame, seen by a "prev" layer with dilation 2 whose
    q and k are (scaled) identities: each frame t >= 1 finds its tokens at (-2, +4) in frame t - 1 (window
    entry (1, 4) of a 5 x 5 window), frame 0 at (0, 0) in itself."""
    T, H, W, C, step = 3, 12, 14, 16, (2, -4)
    emim = EMIM(C, 1, window=5, backend="reference", direction="prev", dilation=2)
    with torch.no_grad():
        emim.qkv.weight.copy_(torch.cat([60 / (emim.scale * C) * torch.eye(C), torch.eye(C), torch.eye(C)]))
        emim.qkv.bias.zero_()
        emim.rpb.zero_()
    margin = T * max(map(abs, step))
    texture = torch.randn(H + 2 * margin, W + 2 * margin, C, generator=torch.Generator().manual_seed(0))
    texture = texture / texture.norm(dim=-1, keepdim=True) * C ** 0.5  # a perfect match has affinity 60
    video = torch.stack([texture[margin - t * step[0]:margin - t * step[0] + H,
                                 margin - t * step[1]:margin - t * step[1] + W] for t in range(T)])[None]
    field = motion_fields(nn.Sequential(emim), video)["0"]

    assert field.mean_displacement.shape == (1, T, H, W, 2) and (field.direction, field.dilation) == ("prev", 2)
    assert field.peak[:, 0].abs().max() == 0
    inside = field.peak[:, 1:, step[0]:, :W + step[1]]  # where the token's previous position is in the frame
    assert torch.equal(inside, torch.tensor([-2.0, 4.0]).expand_as(inside))


def test_emim_viz_takes_direction_and_dilation():
    args = build_parser().parse_args(["--model", "emim_uniformer_xt", "--video", "v.mp4", "--out", "o",
                                      "--direction", "prev", "--dilation", "2"])
    model = load_model(args.model, direction=args.direction, dilation=args.dilation)
    assert {(m.direction, m.dilation) for m in model.modules() if isinstance(m, EMIM)} == {("prev", 2)}
    for flags in (["--direction", "back"], ["--dilation", "0"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(flags)
