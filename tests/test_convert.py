"""`convert_to_emim` on three kinds of model: a timm-layout video ViT written here, tiny randomly initialised
Hugging Face VideoMAE / ViViT classifiers (from a config, nothing downloaded), and this project's UniFormer.

Checks: which layers are converted, that their weights are taken over unchanged, that a converted layer
(motion MLP output at zero, as after conversion) is exactly local next-frame attention over the original
projections, that class tokens keep global attention, that converted models train and compile, that
layers EMIM cannot represent are refused before anything is replaced, that no parameter or buffer of a
replaced layer is dropped (separate q/k/v biases taken over; relative position biases, Swin window attention
and unknown parameters refused, on stand-ins for timm's layers), and how a converted model is saved and
reloaded. The reference backend runs everywhere except the one test marked `fused`.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from emim_triton import EMIM, convert_to_emim
from emim_triton.convert import GridEMIM, find_attention_layers
from emim_triton.models import create_model
from emim_triton.models.uniformer import GlobalAttention
from helpers import FP32_KERNEL_RTOL, REFERENCE_RTOL, local_next_frame_attention, relative_error, switch_on_motion

GRID = (4, 4, 4)  # T, H, W of the token grids below: 8 frames, tubelet 2; 32 px, patch 8
DIM, HEADS, WINDOW = 64, 2, 3


# ----------------------------------------------------------------------------------------------------
# A small video ViT in timm's layout
# ----------------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """timm's Attention: one qkv Linear, optional q/k norms, scaled-dot-product attention, proj."""

    def __init__(self, dim, num_heads, qk_norm=False, attn_drop=0.0):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x, attn_mask=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, attn_mask=attn_mask,
                                           dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, **attn_kwargs):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, **attn_kwargs)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VideoViT(nn.Module):
    """Tubelet embedding (2 x 8 x 8), learned positions, optional class token, blocks, linear head."""

    def __init__(self, depth=4, dim=DIM, num_heads=HEADS, class_token=False, num_classes=5, **attn_kwargs):
        super().__init__()
        self.num_prefix_tokens = int(class_token)  # timm's name; convert_to_emim reads it
        self.patch_embed = nn.Conv3d(3, dim, kernel_size=(2, 8, 8), stride=(2, 8, 8))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02) if class_token else None
        self.pos_embed = nn.Parameter(torch.randn(1, self.num_prefix_tokens + GRID[0] * GRID[1] * GRID[2], dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, num_heads, **attn_kwargs) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, clip):  # (B, 3, 8, 32, 32)
        x = self.patch_embed(clip).flatten(2).transpose(1, 2)  # tokens in (t, y, x) order
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return self.head(x[:, 0] if self.cls_token is not None else x.mean(1))


def clips(batch=2, seed=0):
    return torch.randn(batch, 3, 8, 32, 32, generator=torch.Generator().manual_seed(seed))


def token_input(n_tokens, batch=2, seed=1, dim=DIM):
    return torch.randn(batch, n_tokens, dim, generator=torch.Generator().manual_seed(seed))


def heads_view(x, grid=GRID, heads=HEADS):
    B, N, C = x.shape
    return x.view(B, *grid, heads, C // heads)


# ----------------------------------------------------------------------------------------------------
# timm layout
# ----------------------------------------------------------------------------------------------------

def test_every_other_layer_is_converted_and_takes_over_the_weights():
    torch.manual_seed(0)
    model = VideoViT()
    original = copy.deepcopy(model)
    report = convert_to_emim(model, GRID, window=WINDOW, backend="reference")

    assert [layer["name"] for layer in report.converted] == ["blocks.0.attn", "blocks.2.attn"]
    assert [(layer["name"], layer["reason"]) for layer in report.skipped] == [
        ("blocks.1.attn", "not selected by every=2"), ("blocks.3.attn", "not selected by every=2")]
    assert "blocks.0.attn (timm): -> EMIM, 2 heads x 32, grid (4, 4, 4)" in str(report)
    for i, block in enumerate(model.blocks):
        assert isinstance(block.attn, GridEMIM) == (i % 2 == 0)
    for name, tensor in original.state_dict().items():  # qkv and proj keep their names and values
        assert torch.equal(model.state_dict()[name], tensor), name
    emim = model.blocks[0].attn
    assert not emim.motion_conv[2].weight.any() and not emim.motion_conv[2].bias.any()
    assert (emim.window, emim.scale, emim.backend) == (WINDOW, original.blocks[0].attn.scale, "reference")


def test_converted_layer_is_local_next_frame_attention_over_the_original_projections():
    torch.manual_seed(0)
    original = Attention(DIM, HEADS).double()
    holder = nn.Sequential(copy.deepcopy(original))
    convert_to_emim(holder, GRID, window=WINDOW, backend="reference")
    emim = holder[0]
    x = token_input(64).double()

    q, k, v = original.qkv(x).chunk(3, dim=-1)
    context = local_next_frame_attention(heads_view(q), heads_view(k), heads_view(v), emim.rpb, original.scale,
                                         emim.pad_value)
    expected = original.proj(context.reshape(x.shape))
    assert relative_error(emim(x), expected) < REFERENCE_RTOL[torch.float64]


def test_class_token_keeps_global_attention():
    torch.manual_seed(0)
    model = VideoViT(class_token=True).double()
    original = copy.deepcopy(model.blocks[0].attn)
    report = convert_to_emim(model, GRID, window=WINDOW, backend="reference")  # prefix from num_prefix_tokens
    assert report.converted[0]["prefix_tokens"] == 1
    emim = model.blocks[0].attn
    x = token_input(1 + 64).double()
    out = emim(x)

    # The class token's row is what the original global attention gives it.
    assert relative_error(out[:, :1], original(x)[:, :1]) < REFERENCE_RTOL[torch.float64]
    # The patch tokens' rows are local next-frame attention among the patch tokens only.
    q, k, v = original.qkv(x[:, 1:]).chunk(3, dim=-1)
    context = local_next_frame_attention(heads_view(q), heads_view(k), heads_view(v), emim.rpb, original.scale,
                                         emim.pad_value)
    assert relative_error(out[:, 1:], original.proj(context.reshape(2, 64, DIM))) < REFERENCE_RTOL[torch.float64]
    assert model(clips().double()).shape == (2, 5)


def test_converted_model_trains_and_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = VideoViT(depth=2)  # one EMIM and one global block: compile time grows with the graph
    convert_to_emim(model, GRID, window=WINDOW, backend="reference")
    compiled = torch.compile(copy.deepcopy(model), backend="aot_eager", fullgraph=True)
    x, labels = clips(), torch.tensor([1, 3])

    F.cross_entropy(model(x), labels).backward()
    F.cross_entropy(compiled(x), labels).backward()
    for (name, p), q in zip(model.named_parameters(), compiled.parameters()):  # float32 in another order
        assert p.grad is not None and relative_error(q.grad, p.grad) < REFERENCE_RTOL[torch.float32], name
    # The zero motion output layer gets a gradient, so motion features can grow from zero.
    assert model.blocks[0].attn.motion_conv[2].weight.grad.abs().sum() > 0


def test_layers_by_index_and_name_and_a_grid_per_layer():
    torch.manual_seed(0)
    model = VideoViT()
    seen = []

    def grid(name):
        seen.append(name)
        return GRID

    report = convert_to_emim(model, grid, layers=[1, "blocks.3.attn"], window=WINDOW, backend="reference")
    assert [layer["name"] for layer in report.converted] == ["blocks.1.attn", "blocks.3.attn"] == seen
    assert {layer["reason"] for layer in report.skipped} == {"not in layers"}
    # Layers already converted are counted, but never converted twice.
    again = convert_to_emim(model, GRID, every=1, window=WINDOW)
    assert [layer["name"] for layer in again.converted] == ["blocks.0.attn", "blocks.2.attn"]
    assert [(layer["name"], layer["reason"]) for layer in again.skipped] == [
        ("blocks.1.attn", "already EMIM"), ("blocks.3.attn", "already EMIM")]


def refusal_cases():
    yield "q/k norm", lambda: VideoViT(qk_norm=True), {}, r"blocks\.0\.attn.*q_norm is LayerNorm"
    yield "attention dropout", lambda: VideoViT(attn_drop=0.1), {}, r"attention dropout attn_drop = 0.1"
    yield "head_dim 8", lambda: VideoViT(num_heads=8), {}, r"head_dim .* 64 // 8 = 8"
    yield "no grid", lambda: VideoViT(), dict(grid=None), r"the token grid must be given"
    yield "bad grid", lambda: VideoViT(), dict(grid=(4, 16)), r"three positive ints"
    yield "unknown layer", lambda: VideoViT(), dict(layers=["blocks.9.attn"]), r"found: \[0\] blocks\.0\.attn"
    yield "every 0", lambda: VideoViT(), dict(every=0), r"every must be an int >= 1"
    yield "no attention", lambda: nn.Sequential(nn.Linear(4, 4)), {}, r"found no attention layer in Sequential"
    yield "bare layer", lambda: Attention(DIM, HEADS), {}, r"Attention is itself an attention layer"


@pytest.mark.parametrize("make, kwargs, message", [case[1:] for case in refusal_cases()],
                         ids=[case[0] for case in refusal_cases()])
def test_unsupported_layers_and_bad_arguments_are_refused_and_nothing_is_replaced(make, kwargs, message):
    model = make()
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=message):
        convert_to_emim(model, **{"grid": GRID, **kwargs})
    assert [type(m) for m in model.modules()] == before


# ----------------------------------------------------------------------------------------------------
# Nothing dropped: stand-ins for timm layers with more than qkv and proj (timm is not a dependency; each
# stand-in has the parameters, buffers and attributes of the timm module it names, not its forward)
# ----------------------------------------------------------------------------------------------------

class BeitAttention(nn.Module):
    """Stand-in for timm.models.beit.Attention (qkv_bias=True), whose q/k/v biases timm.models.eva.EvaAttention
    keeps the same way: qkv without bias, q_bias and v_bias parameters, k_bias a non-persistent buffer of
    zeros (absent in older timm); with ``window_size`` BEiT's relative_position_bias_table (the 3 extra rows
    are the class token's) and relative_position_index. timm's forward adds cat(q_bias, k_bias, v_bias) to
    qkv(x)."""

    def __init__(self, dim, num_heads, window_size=None, k_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        # timm starts these at zero; random here, so that a dropped bias changes the output.
        self.q_bias = nn.Parameter(torch.randn(dim))
        if k_bias:
            self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        self.v_bias = nn.Parameter(torch.randn(dim))
        if window_size:
            self.window_size = window_size
            rows = (2 * window_size[0] - 1) * (2 * window_size[1] - 1) + 3
            self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, num_heads))
            self.register_buffer("relative_position_index", torch.zeros(rows, dtype=torch.long), persistent=False)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)


class RelPosBias(nn.Module):
    """Stand-in for timm.layers.pos_embed_rel.RelPosBias: a bias table and its index buffer."""

    def __init__(self, num_heads, window_size=(4, 4)):
        super().__init__()
        rows = (2 * window_size[0] - 1) * (2 * window_size[1] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, num_heads))
        self.register_buffer("relative_position_index", torch.zeros(rows, dtype=torch.long), persistent=False)


class RelPosAttention(Attention):
    """Stand-in for timm.models.vision_transformer_relpos.RelPosAttention: timm's Attention plus a rel_pos
    module adding a relative position bias to the logits."""

    def __init__(self, dim, num_heads):
        super().__init__(dim, num_heads)
        self.rel_pos = RelPosBias(num_heads)


class WindowAttention(nn.Module):
    """Stand-in for timm.models.swin_transformer.WindowAttention: qkv and proj over the tokens of one
    window_size window (the block partitions the feature map), with a relative position bias table."""

    def __init__(self, dim, num_heads, window_size=(4, 4)):
        super().__init__()
        self.window_size = window_size
        self.window_area = window_size[0] * window_size[1]
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        rows = (2 * window_size[0] - 1) * (2 * window_size[1] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, num_heads))
        self.register_buffer("relative_position_index", torch.zeros(self.window_area ** 2, dtype=torch.long),
                             persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)
        self.softmax = nn.Softmax(dim=-1)


@pytest.mark.parametrize("k_bias", [True, False], ids=["k_bias-buffer", "no-k_bias"])
def test_separate_qkv_biases_are_taken_over_and_the_layer_is_local_attention_over_them(k_bias):
    torch.manual_seed(0)
    original = BeitAttention(DIM, HEADS, k_bias=k_bias).double()
    holder = nn.Sequential(copy.deepcopy(original))
    convert_to_emim(holder, GRID, window=WINDOW, backend="reference")
    emim = holder[0]
    zeros = torch.zeros(DIM, dtype=torch.float64)
    assert torch.equal(emim.qkv.bias, torch.cat([original.q_bias, zeros, original.v_bias]))

    x = token_input(64).double()
    # BEiT's and EVA's projection: the separate biases added to the bias-free qkv (k's part zero).
    qkv = F.linear(x, original.qkv.weight, torch.cat([original.q_bias, zeros, original.v_bias]))
    q, k, v = qkv.chunk(3, dim=-1)
    context = local_next_frame_attention(heads_view(q), heads_view(k), heads_view(v), emim.rpb, original.scale,
                                         emim.pad_value)
    assert relative_error(emim(x), original.proj(context.reshape(x.shape))) < REFERENCE_RTOL[torch.float64]


def test_qkv_bias_cannot_be_switched_off_when_separate_biases_exist():
    with pytest.raises(ValueError, match=r"qkv_bias is taken from BeitAttention .*a bias present"):
        EMIM.from_attention(BeitAttention(DIM, HEADS), window=WINDOW, qkv_bias=False)
    broken = BeitAttention(DIM, HEADS)
    broken.v_bias = nn.Parameter(torch.zeros(2 * DIM))
    with pytest.raises(ValueError, match=r"v_bias must be None or a tensor of shape \(64,\).*got \(128,\)"):
        EMIM.from_attention(broken, window=WINDOW)


def with_extra_parameter(layer):
    layer.gate = nn.Parameter(torch.ones(1))  # e.g. a learned gate on the attention output
    return layer


def not_taken_over_cases():
    """(id, make the layer, the refusal's message): each layer sits second in the model, after a convertible one."""
    yield "beit-relative-position-bias", lambda: BeitAttention(DIM, HEADS, window_size=(4, 4)), \
        r"relative_position_bias_table \(parameter\), relative_position_index \(buffer\);.* A relative position bias"
    yield "timm-relpos", lambda: RelPosAttention(DIM, HEADS), (
        r"rel_pos\.relative_position_bias_table \(parameter\), rel_pos\.relative_position_index \(buffer\);"
        r".* A relative position bias")
    yield "swin-window-attention", lambda: WindowAttention(DIM, HEADS), r"WindowAttention is window attention \(Swin\)"
    yield "extra-parameter-timm", lambda: with_extra_parameter(Attention(DIM, HEADS)), r"gate \(parameter\)"
    yield "extra-parameter-uniformer", lambda: with_extra_parameter(GlobalAttention(DIM, HEADS)), \
        r"gate \(parameter\)"


@pytest.mark.parametrize("make, message", [case[1:] for case in not_taken_over_cases()],
                         ids=[case[0] for case in not_taken_over_cases()])
def test_what_emim_cannot_take_over_is_named_in_a_refusal_before_anything_is_replaced(make, message):
    layer = make()
    model = nn.Sequential(Attention(DIM, HEADS), layer)
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"cannot convert '1' .*" + message):
        convert_to_emim(model, GRID, layers=[0, 1], window=WINDOW, backend="reference")
    # Layer 0 was convertible; it is not replaced either. Buffers, non-persistent ones included, are kept.
    assert [type(m) for m in model.modules()] == [type(m) for m in before.modules()]
    for (name, ours), theirs in zip([*model.named_parameters(), *model.named_buffers()],
                                    [*before.parameters(), *before.buffers()]):
        assert torch.equal(ours, theirs), name
    with pytest.raises(ValueError, match=r"EMIM\.from_attention: .*" + message):
        EMIM.from_attention(layer, window=WINDOW)


def test_the_way_out_the_refusal_offers_converts_the_layer():
    layer = BeitAttention(DIM, HEADS, window_size=(4, 4))
    model = nn.Sequential(layer)
    with pytest.raises(ValueError, match=r"to drop them on purpose, set those attributes of the layer to None"):
        convert_to_emim(model, GRID, window=WINDOW, backend="reference")
    layer.relative_position_bias_table = layer.relative_position_index = None
    report = convert_to_emim(model, GRID, window=WINDOW, backend="reference")
    assert [entry["name"] for entry in report.converted] == ["0"] and isinstance(model[0], GridEMIM)


def test_hf_layouts_refuse_a_parameter_they_cannot_take_over():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.VivitForVideoClassification(
        tiny_hf_config(transformers.VivitConfig, tubelet_size=[2, 8, 8]))
    with_extra_parameter(find_attention_layers(model)[0].module)
    with pytest.raises(ValueError, match=r"cannot convert 'vivit\.layers\.0\.attention'.*gate \(parameter\)"):
        convert_to_emim(model, GRID, window=WINDOW, prefix_tokens=1)
    model = transformers.VideoMAEForVideoClassification(
        tiny_hf_config(transformers.VideoMAEConfig, patch_size=8, tubelet_size=2))
    with_extra_parameter(model.videomae.encoder.layer[0].attention.output)
    with pytest.raises(ValueError, match=r"cannot convert 'videomae\.encoder\.layer\.0\.attention'.*"
                                         r"output\.gate \(parameter\)"):
        convert_to_emim(model, GRID, window=WINDOW)


def test_wrong_token_count_at_run_time_suggests_prefix_tokens():
    torch.manual_seed(0)
    model = VideoViT(class_token=True)
    convert_to_emim(model, GRID, window=WINDOW, backend="reference", prefix_tokens=0)
    with pytest.raises(ValueError, match=r"65 tokens.*prefix_tokens"):
        model(clips())
    with pytest.raises(ValueError, match=r"extra tensor arguments"):
        model.blocks[0].attn(token_input(65), torch.zeros(65, 65, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------------
# This project's UniFormer
# ----------------------------------------------------------------------------------------------------

def test_converting_uniformer_gives_its_emim_twin():
    """uniformer_xt with every=2 has EMIM exactly where emim_uniformer_xt has it ("lg"), and the same
    parameters: its state dict loads strictly into the EMIM model, which then computes the same logits."""
    torch.manual_seed(0)
    model = create_model("uniformer_xt", num_classes=3, attn_backend="reference").eval()
    report = convert_to_emim(model, grid=None, backend="reference")
    assert [layer["name"] for layer in report.converted] == ["blocks3.0.attn", "blocks4.0.attn"]
    assert type(model.blocks3[0].attn) is EMIM  # the block passes its frames: no fixed grid needed
    twin = create_model("emim_uniformer_xt", num_classes=3, attn_backend="reference").eval()
    twin.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(1, 3, 4, 32, 32)
    assert torch.equal(model(x), twin(x))


# ----------------------------------------------------------------------------------------------------
# Hugging Face (tiny random models built from a config: nothing is downloaded)
# ----------------------------------------------------------------------------------------------------

def tiny_hf_config(config_class, **kwargs):
    return config_class(image_size=32, num_frames=8, hidden_size=DIM, num_hidden_layers=2,
                        num_attention_heads=HEADS, intermediate_size=2 * DIM, num_labels=3, **kwargs)


def test_videomae_converted_weights_equal_the_originals_and_the_layer_is_local_attention():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.VideoMAEForVideoClassification(
        tiny_hf_config(transformers.VideoMAEConfig, patch_size=8, tubelet_size=2)).double()
    original = copy.deepcopy(model.videomae.encoder.layer[0].attention)
    report = convert_to_emim(model, GRID, window=WINDOW, backend="reference")
    assert [(layer["name"], layer["layout"]) for layer in report.converted] == [
        ("videomae.encoder.layer.0.attention", "hf-split")]

    emim = model.videomae.encoder.layer[0].attention
    query, key, value = original.attention.query, original.attention.key, original.attention.value
    # VideoMAE's q and v have a bias; k has none (-> a zero block in qkv.bias), or, in some transformers
    # 5.x releases, a bias parameter held at zero
    key_bias = torch.zeros_like(query.bias) if key.bias is None else key.bias
    assert torch.equal(emim.qkv.weight, torch.cat([query.weight, key.weight, value.weight]))
    assert torch.equal(emim.qkv.bias, torch.cat([query.bias, key_bias, value.bias]))
    assert torch.equal(emim.proj.weight, original.output.dense.weight)
    assert torch.equal(emim.proj.bias, original.output.dense.bias)

    x = token_input(64).double()
    context = local_next_frame_attention(heads_view(query(x)), heads_view(key(x)), heads_view(value(x)),
                                         emim.rpb, original.attention.scaling, emim.pad_value)
    expected = original.output.dense(context.reshape(x.shape))
    assert relative_error(emim(x), expected) < REFERENCE_RTOL[torch.float64]


def test_videomae_converted_model_trains():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.VideoMAEForVideoClassification(
        tiny_hf_config(transformers.VideoMAEConfig, patch_size=8, tubelet_size=2))
    convert_to_emim(model, GRID, window=WINDOW, backend="reference")
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    pixels = clips().transpose(1, 2)  # VideoMAE takes (B, T, C, H, W)
    labels = torch.tensor([0, 2])

    losses = []
    for _ in range(5):
        loss = model(pixel_values=pixels, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert model.videomae.encoder.layer[0].attention.motion_conv[2].weight.any()  # motion grew from zero


def test_vivit_class_token_and_tuple_returning_attention():
    """ViViT (transformers 5 layout: q_proj/k_proj/v_proj/o_proj, returns (output, weights)) has a class
    token before its patch tokens: it keeps global attention, the patches get EMIM."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.VivitForVideoClassification(
        tiny_hf_config(transformers.VivitConfig, tubelet_size=[2, 8, 8])).double()
    layers = find_attention_layers(model)
    original = copy.deepcopy(layers[0].module)
    report = convert_to_emim(model, GRID, window=WINDOW, backend="reference", prefix_tokens=1)
    assert [(layer["layout"], layer["prefix_tokens"]) for layer in report.converted] == [("hf-proj", 1)]

    x = token_input(1 + 64).double()
    out, weights = model.get_submodule(layers[0].name)(x)
    assert weights is None
    assert relative_error(out[:, :1], original(x)[0][:, :1]) < REFERENCE_RTOL[torch.float64]
    assert model(pixel_values=clips().double().transpose(1, 2)).logits.shape == (2, 3)


def test_a_converted_hugging_face_model_is_saved_and_reloaded_through_its_state_dict(tmp_path):
    """The way convert.py documents: save the state dict; rebuild, convert with the same arguments, load it.
    (save_pretrained / from_pretrained would rebuild the original attention, with random weights.)"""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.VideoMAEForVideoClassification(
        tiny_hf_config(transformers.VideoMAEConfig, patch_size=8, tubelet_size=2)).eval()
    convert_to_emim(model, GRID, window=WINDOW, backend="reference")
    switch_on_motion(model.videomae.encoder.layer[0].attention, std=1.0)  # as after fine-tuning: motion
    # features, which only the saved weights can restore
    torch.save(model.state_dict(), tmp_path / "converted.pt")
    model.config.save_pretrained(tmp_path)

    reloaded = transformers.VideoMAEForVideoClassification(
        transformers.VideoMAEConfig.from_pretrained(tmp_path)).eval()
    convert_to_emim(reloaded, GRID, window=WINDOW, backend="reference")
    reloaded.load_state_dict(torch.load(tmp_path / "converted.pt"), strict=True)
    pixels = clips().transpose(1, 2)
    assert torch.equal(reloaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits)

    # What the documentation warns about: from_pretrained brings back the original attention layer.
    model.save_pretrained(tmp_path / "pretrained")
    plain = transformers.VideoMAEForVideoClassification.from_pretrained(tmp_path / "pretrained")
    assert type(plain.videomae.encoder.layer[0].attention).__name__ == "VideoMAEAttention"


# ----------------------------------------------------------------------------------------------------
# The fused kernels (slow in the interpreter: one tiny layer)
# ----------------------------------------------------------------------------------------------------

@pytest.mark.fused
def test_converted_layer_on_the_fused_kernels_matches_the_reference():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    holder = nn.Sequential(Attention(32, 2)).to(device)
    convert_to_emim(holder, (2, 3, 3), window=3, backend="triton")
    fused = holder[0]
    reference = copy.deepcopy(fused)
    reference.backend = "reference"
    x = token_input(18, batch=1, dim=32).to(device)

    out_fused, out_reference = fused(x), reference(x)
    assert relative_error(out_fused, out_reference) < FP32_KERNEL_RTOL
    out_fused.square().sum().backward()
    out_reference.square().sum().backward()
    assert relative_error(fused.qkv.weight.grad, reference.qkv.weight.grad) < FP32_KERNEL_RTOL
