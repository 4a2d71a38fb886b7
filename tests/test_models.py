"""The model zoo on CPU: builds, shapes, sizes, FLOPs, EMIM semantics inside the model, checkpoints.

The models run with the default ``attn_backend="auto"``, which on the CPU is the op's PyTorch reference
(the Triton interpreter that conftest.py turns on is only used where a test asks for backend="triton").
Sizes and FLOPs are measured on the meta device (no memory, no compute).
"""

from __future__ import annotations

import copy
import os
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from emim_triton import EMIM, emim_attention
from emim_triton.models import (UniFormer, count_flops, count_params, create_model, emim_forward_flops,
                                get_model_cfg, list_models, load_pretrained)
from emim_triton.models.summary import GMACS, GMACS_RTOL, PARAMS_M, PARAMS_RTOL, family
from helpers import local_next_frame_attention, make_inputs, switch_on_motion

SB_MODELS = [f"{prefix}uniformer_{size}{frames}"
             for prefix in ("emim_", "") for size in "sb" for frames in (16, 32)]
TINY_MODELS = ["emim_uniformer_xt", "uniformer_xt"]


def make(name: str, **kwargs) -> UniFormer:
    return create_model(name, **kwargs)


def emim_modules(model: nn.Module) -> list[EMIM]:
    return [m for m in model.modules() if isinstance(m, EMIM)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------------------------------
# Registry and construction
# ----------------------------------------------------------------------------------------------------

def test_registry_names_and_default_cfgs():
    names = list_models()
    for name in SB_MODELS + TINY_MODELS:
        assert name in names
    assert list_models("emim_*") == [n for n in names if n.startswith("emim_")]
    cfg = get_model_cfg("emim_uniformer_s32")
    assert (cfg["num_frames"], cfg["img_size"], cfg["num_classes"]) == (32, 224, 400)
    assert cfg["mean"] == (0.45,) * 3 and cfg["std"] == (0.225,) * 3 and cfg["input_size"] == (3, 32, 224, 224)
    tiny = get_model_cfg("emim_uniformer_xt")
    assert tiny["input_size"] == (3, 8, 64, 64)

    with torch.device("meta"):
        model = create_model("uniformer_xt", num_classes=5, num_frames=4, img_size=(48, 32))
    assert model.default_cfg["input_size"] == (3, 4, 48, 32) and model.default_cfg["num_classes"] == 5
    assert model.default_cfg["architecture"] == "uniformer_xt"

    with pytest.raises(KeyError, match="did you mean"):
        create_model("emim_uniformer_s61")
    with pytest.raises(ValueError, match="no weights are hosted"):
        create_model("uniformer_xt", pretrained=True)
    with pytest.raises(ValueError, match="emim_placement"):
        create_model("uniformer_xt", emim_placement="alternate")


@pytest.mark.parametrize("name", SB_MODELS + TINY_MODELS)
def test_every_model_runs_a_forward(name):
    # S/B at 4 x 32 px, the smallest they take: maps of 8, 4, 2, 1 per side (EMIM at 2 x 2 and 1 x 1).
    # Tiny: odd T and non-square frames.
    shape = (2, 3, 3, 48, 32) if name in TINY_MODELS else (1, 3, 4, 32, 32)
    model = make(name, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(shape))
    assert out.shape == (shape[0], 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("placement, emim_blocks", [("lg", 2), ("all", 4), ("none", 0)])
def test_emim_placement_and_temporal_stride(placement, emim_blocks):
    model = make("uniformer_xt", emim_placement=placement, temporal_stride=2, num_classes=3).eval()
    assert len(emim_modules(model)) == emim_blocks
    if placement == "lg":  # even-indexed attention blocks of stages 3 and 4
        assert [isinstance(b.attn, EMIM) for b in (*model.blocks3, *model.blocks4)] == [True, False, True, False]
    x = torch.randn(1, 3, 4, 32, 32)
    assert model.forward_features(x).shape == (1, 128, 2, 2, 2)  # stride 2 halves T
    with pytest.raises(ValueError, match="smaller than the total spatial stride 16"):
        model(torch.randn(1, 3, 4, 8, 32))


def test_state_dict_names_follow_the_checkpoints():
    with torch.device("meta"):
        model = create_model("emim_uniformer_s16", num_classes=174)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "patch_embed1.proj.weight": (64, 3, 3, 4, 4), "patch_embed1.norm.weight": (64,),
        "patch_embed4.proj.weight": (512, 320, 1, 2, 2),
        "blocks1.0.pos_embed.weight": (64, 1, 3, 3, 3), "blocks1.0.norm1.running_mean": (64,),
        "blocks1.0.conv1.weight": (64, 64, 1, 1, 1), "blocks1.0.attn.weight": (64, 1, 5, 5, 5),
        "blocks1.0.conv2.weight": (64, 64, 1, 1, 1), "blocks1.2.mlp.fc1.weight": (256, 64, 1, 1, 1),
        "blocks2.3.mlp.fc2.weight": (128, 512, 1, 1, 1),
        "blocks3.0.attn.qkv.weight": (960, 320), "blocks3.0.attn.proj.weight": (320, 320),
        "blocks3.0.attn.motion_conv.0.weight": (196, 49), "blocks3.0.attn.motion_conv.0.bias": (196,),
        "blocks3.0.attn.motion_conv.2.weight": (64, 196), "blocks3.0.attn.motion_conv.2.bias": (64,),
        "blocks3.0.attn.rpb": (5, 7, 7), "blocks4.2.attn.rpb": (8, 7, 7),
        "blocks3.1.attn.qkv.bias": (960,), "blocks3.7.mlp.fc2.weight": (320, 1280),
        "blocks4.1.norm2.weight": (512,), "norm.running_var": (512,), "head.weight": (174, 512),
    }
    for key, shape in expected.items():
        assert shapes.get(key) == shape, key
    assert "blocks3.1.attn.rpb" not in shapes and "blocks4.1.attn.motion_conv.0.weight" not in shapes
    assert model.no_weight_decay() == {f"blocks3.{i}.attn.rpb" for i in (0, 2, 4, 6)} | {
        f"blocks4.{i}.attn.rpb" for i in (0, 2)}


# ----------------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("classes", [400, 174])
@pytest.mark.parametrize("name", SB_MODELS)
def test_parameter_counts_match_the_paper(name, classes):
    with torch.device("meta"):
        model = create_model(name, num_classes=classes)
    target = PARAMS_M[family(name)][classes] * 1e6
    assert abs(count_params(model) / target - 1) < PARAMS_RTOL


@pytest.mark.parametrize("name", ["emim_uniformer_s16", "emim_uniformer_b16"])
def test_gmacs_per_view_match_the_paper(name):
    with torch.device("meta"):
        model = make(name)
        clip = torch.empty(1, 3, 16, 224, 224)
    gmacs = count_flops(model, clip).gmacs
    assert abs(gmacs / GMACS[(name, 1)] - 1) < GMACS_RTOL, gmacs


def test_emim_flop_formula_matches_the_counted_reference():
    """The cost model registered for the fused op equals what the counter sees on the reference path."""
    args = tuple(make_inputs(2, 3, 5, 6, 2, 16, 7, device="meta").values())
    expected = emim_forward_flops(2, 3, 5, 6, 2, 16, 7)
    with FlopCounterMode(display=False) as counter:
        emim_attention(*args, backend="reference")
    assert counter.get_total_flops() == expected

    import emim_triton.ops  # noqa: F401  (defines the fused op, and its FLOP formula beside it)

    with FlopCounterMode(display=False) as counter:
        torch.ops.emim_triton.emim_forward(*args, 0.25, 1e-6)  # the op's fake (meta) implementation
    assert counter.get_total_flops() == expected


def test_cpu_attention_is_counted_like_on_meta():
    model = make("uniformer_xt").eval()
    on_cpu = count_flops(model, torch.randn(1, 3, 4, 32, 32)).flops
    with torch.device("meta"):
        on_meta = count_flops(make("uniformer_xt"), torch.empty(1, 3, 4, 32, 32)).flops
    assert on_cpu == on_meta


# ----------------------------------------------------------------------------------------------------
# EMIM inside the model
# ----------------------------------------------------------------------------------------------------

class LocalAttention(nn.Module):
    """Stands in for an EMIM module, with its qkv, proj and rpb, computing only local attention."""

    def __init__(self, emim: EMIM):
        super().__init__()
        self.emim = emim

    def forward(self, x, frames):
        (T, H, W), (B, N, C) = frames, x.shape
        heads = self.emim.rpb.shape[0]
        q, k, v = self.emim.qkv(x).view(B, T, H, W, 3, heads, C // heads).unbind(4)
        out = local_next_frame_attention(q, k, v, self.emim.rpb, (C // heads) ** -0.5, 1e-6)
        return self.emim.proj(out.reshape(B, N, C))


def test_zero_motion_mlp_is_local_next_frame_attention():
    model = make("emim_uniformer_xt", emim_placement="all", num_classes=5).eval()
    for attn in emim_modules(model):  # the model's init must leave EMIM's zero output layer alone
        assert not attn.motion_conv[2].weight.any() and not attn.motion_conv[2].bias.any()
    local = copy.deepcopy(model)
    for block in (*local.blocks3, *local.blocks4):
        block.attn = LocalAttention(block.attn)
    x = torch.randn(2, 3, 4, 48, 32)
    with torch.no_grad():
        expected = local(x)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        switch_on_motion(model, std=0.05)  # and the comparison is not vacuous: motion changes the output
        assert (model(x) - expected).abs().max() > 1e-3


def test_gradients_reach_every_parameter_with_and_without_checkpointing():
    x = torch.randn(2, 3, 4, 32, 32)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = make("emim_uniformer_xt", num_classes=5, grad_checkpointing=checkpointing).train()
        switch_on_motion(model, std=0.05)
        model(x).logsumexp(-1).sum().backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_torch_compile_without_graph_breaks():
    """fullgraph=True fails on any graph break; aot_eager traces forward and backward in ~10 s. The
    inductor variant below takes ~55 s cold / ~30 s with a warm cache on 2 CPU cores, too long for CI."""
    model = make("emim_uniformer_xt", num_classes=5).train()
    switch_on_motion(model, std=0.05)
    x = torch.randn(2, 3, 4, 32, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(x).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(x).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.skipif(not os.environ.get("EMIM_SLOW_TESTS"),
                    reason="inductor on CPU: 30-55 s; set EMIM_SLOW_TESTS=1")
def test_torch_compile_inductor():
    model = make("emim_uniformer_xt", num_classes=5).eval()
    x = torch.randn(2, 3, 4, 32, 32)
    start = time.perf_counter()
    with torch.no_grad():
        out = torch.compile(model, fullgraph=True)(x)
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)
    print(f"inductor compile + run: {time.perf_counter() - start:.1f} s")


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("wrapper", [None, "model", "model_state", "compiled"])
def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, wrapper):
    model = make("emim_uniformer_xt", num_classes=5).eval()
    switch_on_motion(model, std=0.05)
    state = model.state_dict()
    path = tmp_path / "ckpt.pth"
    if wrapper == "compiled":  # saved from torch.compile(model): every key starts with "_orig_mod."
        torch.save({"model": {f"_orig_mod.{k}": v for k, v in state.items()}}, path)
    else:
        torch.save(state if wrapper is None else {wrapper: state, "epoch": 3}, path)

    torch.manual_seed(1)  # a differently initialised model...
    restored = make("emim_uniformer_xt", num_classes=5, pretrained=path).eval()
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))  # ...becomes the same model
    make("emim_uniformer_xt", num_classes=5).load_state_dict(state, strict=True)  # names are stable

    features = make("emim_uniformer_xt", num_classes=0)  # no head: the checkpoint's head is dropped
    report = load_pretrained(features, path, strict=True, verbose=False)
    assert set(report.skipped) == {"head.weight", "head.bias"} and not report.missing


def _as_2d_imagenet(model: nn.Module, classes: int = 1000) -> dict[str, torch.Tensor]:
    """A synthetic 2D UniFormer ImageNet state dict for `model`: same names, Conv2d kernels, BatchNorm2d
    statistics, no EMIM parameters, a 1000-class head."""
    state = {}
    for key, value in model.state_dict().items():
        if ".motion_conv." in key or key.endswith(".rpb"):
            continue
        if value.dim() == 5:
            value = torch.randn(value.shape[:2] + value.shape[3:])  # (O, I, kh, kw)
        elif key.startswith("head."):
            value = torch.randn((classes,) + value.shape[1:])
        else:
            value = torch.randn_like(value.float()).to(value.dtype) if value.is_floating_point() else value
        state[key] = value
    return state


def test_inflation_of_2d_imagenet_weights(tmp_path):
    model = make("emim_uniformer_xt", num_classes=5)
    state_2d = _as_2d_imagenet(model)
    torch.save({"model": state_2d}, tmp_path / "in1k.pth")
    report = load_pretrained(model, tmp_path / "in1k.pth", strict=True, verbose=False)

    kernels = [k for k, v in model.state_dict().items() if v.dim() == 5]
    assert sorted(report.inflated) == sorted(kernels)
    assert set(report.skipped) == {"head.weight", "head.bias"}  # 1000 classes vs 5: dropped
    assert {k for k in report.missing if not k.startswith("head.")} == {
        k for k in model.state_dict() if ".motion_conv." in k or k.endswith(".rpb")}
    assert not report.unexpected
    loaded = model.state_dict()
    for key in kernels:  # average inflation: the 2D kernel repeated over time, divided by its length
        w2d, w3d = state_2d[key], loaded[key]
        for t in range(w3d.shape[2]):
            torch.testing.assert_close(w3d[:, :, t], w2d / w3d.shape[2])
    torch.testing.assert_close(loaded["blocks3.1.attn.qkv.weight"], state_2d["blocks3.1.attn.qkv.weight"])

    # The point of averaging: on a clip of identical frames, the inflated stem gives the 2D stem's
    # output (away from the zero-padded first and last frame).
    frame = torch.randn(1, 3, 32, 32)
    clip = frame[:, :, None].expand(1, 3, 5, 32, 32)
    stem = model.patch_embed1.proj
    out_3d = F.conv3d(clip, stem.weight, stem.bias, stem.stride, stem.padding)
    out_2d = F.conv2d(frame, state_2d["patch_embed1.proj.weight"], stem.bias, stem.stride[1:])
    torch.testing.assert_close(out_3d[:, :, 2], out_2d, rtol=1e-5, atol=1e-5)


def test_load_pretrained_refuses_what_cannot_fit(tmp_path):
    model = make("emim_uniformer_xt", num_classes=5)
    with pytest.raises(ValueError, match="no tensor of checkpoint fits"):
        load_pretrained(model, {"backbone.conv.weight": torch.zeros(3, 3)}, verbose=False)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="holds no state dict"):
        load_pretrained(model, tmp_path / "list.pth")

    # A B-sized checkpoint into the tiny model: names match, shapes mostly do not.
    with torch.device("meta"):
        base = create_model("uniformer_b16").state_dict()
    other = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in base.items() if k.startswith("blocks1.0.")}
    with pytest.raises(ValueError, match="strict=True"):
        load_pretrained(model, {**other, "patch_embed1.norm.bias": torch.zeros(16)}, strict=True, verbose=False)
    report = load_pretrained(model, {**other, "patch_embed1.norm.bias": torch.zeros(16)}, verbose=False)
    assert "patch_embed1.norm.bias" in report.loaded and len(report.skipped) > 5
    assert all("cannot fit" in reason for reason in report.skipped.values())


def test_the_first_count_in_a_process_includes_the_fused_op():
    """FlopCounterMode copies the formula registry when it is made, and the fused op's module (which registers
    the op's formula) is imported lazily at the first fused forward: count_flops must import it first."""
    import subprocess
    import sys

    code = ("import torch\nfrom emim_triton import EMIM\nfrom emim_triton.models import count_flops\n"
            "count = count_flops(EMIM(32, 2, window=3, backend='triton'), (torch.randn(1, 24, 32), (2, 3, 4)))\n"
            "print(sorted(count.by_op))")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "emim_triton.emim_forward" in done.stdout, done.stdout
