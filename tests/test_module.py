"""The EMIM module: layouts, taking over a standard attention module, its initialisation (pure local
next-frame attention), gradients, autocast and checkpoint names. Runs the reference backend except the one
test marked `fused`, since the Triton interpreter is slow."""

import pytest
import torch
import torch.nn as nn

from emim_triton import EMIM
from emim_triton.checks import (HEAD_DIM_RULE, MAX_HEAD_DIM, MAX_WINDOW, MIN_HEAD_DIM, SUPPORTED_HEAD_DIMS,
                                SUPPORTED_WINDOWS, WINDOW_RULE)
from helpers import FP32_KERNEL_RTOL, REFERENCE_RTOL, local_next_frame_attention, relative_error, switch_on_motion

DIM, HEADS, WINDOW = 32, 2, 3  # head_dim 16, the smallest the op supports
FRAMES = (3, 4, 5)  # T, H, W: H < W, H and W both > K so the window has inside and outside entries


def make_module(dtype=torch.float64, **kwargs) -> EMIM:
    torch.manual_seed(0)
    return EMIM(DIM, HEADS, window=WINDOW, backend="reference", **kwargs).to(dtype)


def tokens(B=2, dtype=torch.float64, seed=1):
    T, H, W = FRAMES
    return torch.randn(B, T * H * W, DIM, generator=torch.Generator().manual_seed(seed)).to(dtype)


class TimmStyleAttention(nn.Module):
    """The attention layout EMIM.from_attention takes over (timm's Attention, UniFormer's global blocks)."""

    def __init__(self, dim, num_heads, qkv_bias=True, qk_scale=None):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.1)


# ----------------------------------------------------------------------------------------------------
# Layouts and argument errors
# ----------------------------------------------------------------------------------------------------

def test_token_and_video_layouts_give_the_same_result_in_their_own_shape():
    module = make_module()
    x = tokens()
    out = module(x, frames=FRAMES)
    assert out.shape == x.shape
    video = x.view(2, *FRAMES, DIM)
    out_video = module(video)
    assert out_video.shape == video.shape
    assert torch.equal(out_video.view_as(out), out)


def test_non_contiguous_video_input():
    module = make_module()
    channels_first = torch.randn(2, DIM, *FRAMES, dtype=torch.float64)  # (B, C, T, H, W), as a conv stage gives
    video = channels_first.permute(0, 2, 3, 4, 1)
    # The qkv matmul may sum in another order for strided input: equal up to rounding, not bit for bit.
    assert relative_error(module(video), module(video.contiguous())) < REFERENCE_RTOL[torch.float64]


@pytest.mark.parametrize("call, message", [
    (lambda m: m(torch.randn(2, 60, DIM, dtype=torch.float64)), r"pass frames=\(T, H, W\)"),
    (lambda m: m(torch.randn(2, 61, DIM, dtype=torch.float64), frames=FRAMES), r"T\*H\*W = 60 tokens.*N = 61"),
    (lambda m: m(torch.randn(2, 60, DIM + 1, dtype=torch.float64), frames=FRAMES), r"expected dim = 32"),
    (lambda m: m(torch.randn(2, *FRAMES, DIM, dtype=torch.float64), frames=(3, 5, 4)), r"frames=\(3, 5, 4\)"),
    (lambda m: m(torch.randn(60, DIM, dtype=torch.float64), frames=FRAMES), r"got a 2-D tensor"),
    (lambda m: m(torch.randn(2, 60, DIM, dtype=torch.float64), frames=(-1, -3, 8)), r"frames must be .*positive ints"),
    (lambda m: m(torch.randn(2, 60, DIM, dtype=torch.float64), frames=(2.5, 4, 6)), r"frames must be .*positive ints"),
    (lambda m: m(torch.randn(2, 60, DIM, dtype=torch.float64), frames=(3, 20)), r"frames must be \(T, H, W\)"),
], ids=["tokens-without-frames", "frames-not-matching-N", "wrong-C", "frames-contradict-video", "2-D",
        "negative-frames", "fractional-frames", "two-frames-values"])
def test_bad_input_layout_is_explained(call, message):
    with pytest.raises(ValueError, match=message):
        call(make_module())


@pytest.mark.parametrize("kwargs, message", [
    (dict(dim=32, num_heads=3), r"divisible by num_heads"),
    (dict(dim=32, num_heads=4), r"head_dim .* got 32 // 4 = 8"),
    (dict(dim=32, num_heads=2, window=4), r"window must be odd"),
    (dict(dim=32, num_heads=2, window=17), r"window must be odd and in 3..15"),
    (dict(dim=32, num_heads=2, attn_drop=0.1), r"attn_drop must be 0"),
    (dict(dim=32, num_heads=2, backend="cuda"), r"backend must be one of"),
    (dict(dim=32, num_heads=0), r"num_heads must be a positive int, got 0"),
    (dict(dim=-32, num_heads=-2), r"dim must be a positive int, got -32"),
    (dict(dim=32, num_heads=2.0), r"num_heads must be a positive int, got 2.0"),
    (dict(dim=32, num_heads=2, window=7.0), r"window must be a positive int"),
    (dict(dim=32, num_heads=2, pad_value=None), r"pad_value must be a number"),
    (dict(dim=32, num_heads=2, qk_scale=float("nan")), r"scale must be a finite number"),
], ids=["heads-do-not-divide-dim", "head-dim-8", "even-window", "window-17", "attn-drop", "backend",
        "zero-heads", "negative-dim", "float-heads", "float-window", "pad-none", "scale-nan"])
def test_bad_configuration_is_refused_at_construction(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        EMIM(**kwargs)


def test_the_module_takes_exactly_the_windows_and_head_dims_of_the_op():
    """One rule (checks.py) for the module and the op: the module must not build a layer the op refuses."""
    for window in range(1, MAX_WINDOW + 3):
        if window in SUPPORTED_WINDOWS:
            assert EMIM(DIM, HEADS, window=window).window == window
        else:
            with pytest.raises(ValueError, match=f"window must be {WINDOW_RULE}, got {window}"):
                EMIM(DIM, HEADS, window=window)
    for head_dim in (MIN_HEAD_DIM - 1, MIN_HEAD_DIM, MAX_HEAD_DIM, MAX_HEAD_DIM + 1):
        if head_dim in SUPPORTED_HEAD_DIMS:
            assert EMIM(2 * head_dim, 2, window=3).head_dim == head_dim
        else:
            with pytest.raises(ValueError, match=f"must be {HEAD_DIM_RULE}"):
                EMIM(2 * head_dim, 2, window=3)


# ----------------------------------------------------------------------------------------------------
# Initialisation and taking over a standard attention module
# ----------------------------------------------------------------------------------------------------

def test_init_motion_output_layer_zero_hidden_layer_xavier_rpb_small():
    module = make_module(dtype=torch.float32)
    hidden_layer, _, output_layer = module.motion_conv
    xavier_bound = (6 / (9 + 36)) ** 0.5  # fan_in K² = 9, fan_out 4K² = 36
    assert hidden_layer.weight.abs().sum() > 0 and hidden_layer.weight.abs().max() <= xavier_bound
    assert not hidden_layer.bias.any() and not output_layer.weight.any() and not output_layer.bias.any()
    large = EMIM(128, 8, window=15)  # 1,800 rpb entries: enough for a tight bound on their spread
    assert 0.018 < large.rpb.std() < 0.022 and large.rpb.mean().abs() < 0.002


def test_default_init_is_local_next_frame_attention_over_the_projections():
    """W2 = b2 = 0: the module is proj(local attention(qkv(x))), the motion term contributes nothing."""
    module = make_module()
    x = tokens()
    B, N, C = x.shape
    q, k, v = module.qkv(x).view(B, *FRAMES, 3, HEADS, C // HEADS).unbind(4)
    context = local_next_frame_attention(q, k, v, module.rpb, module.scale, module.pad_value)
    expected = module.proj(context.reshape(B, N, C))
    assert relative_error(module(x, frames=FRAMES), expected) < REFERENCE_RTOL[torch.float64]


def test_from_attention_copies_the_weights_and_the_scale():
    source = TimmStyleAttention(DIM, HEADS, qk_scale=0.3).double()
    emim = EMIM.from_attention(source, window=WINDOW, backend="reference")
    assert (emim.dim, emim.num_heads, emim.scale, emim.proj_drop.p) == (DIM, HEADS, 0.3, 0.1)
    assert emim.rpb.dtype == torch.float64
    for name in ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias"):
        ours, theirs = emim.get_parameter(name), source.get_parameter(name)
        assert torch.equal(ours, theirs), name
        assert ours.data_ptr() != theirs.data_ptr(), f"{name} shares storage with the source"
    with torch.no_grad():
        source.qkv.weight.zero_()
    assert emim.qkv.weight.any()  # a copy, not a view

    x = tokens(B=1)
    assert emim.eval()(x, frames=FRAMES).shape == x.shape


def test_from_attention_without_biases():
    source = TimmStyleAttention(DIM, HEADS, qkv_bias=False)
    source.proj = nn.Linear(DIM, DIM, bias=False)
    emim = EMIM.from_attention(source, window=WINDOW)
    assert emim.qkv.bias is None and not emim.proj.bias.any()


def _without(attribute):
    def spoil(attn):
        delattr(attn, attribute)
    return spoil


@pytest.mark.parametrize("spoil, message", [
    (_without("qkv"), r"no nn.Linear `qkv`"),
    (_without("proj"), r"no nn.Linear `proj`"),
    (_without("num_heads"), r"num_heads"),
    (lambda a: setattr(a, "q_norm", nn.LayerNorm(16)), r"q_norm is LayerNorm"),
    (lambda a: setattr(a, "k_norm", nn.LayerNorm(16)), r"k_norm is LayerNorm"),
    (lambda a: setattr(a, "attn_drop", nn.Dropout(0.1)), r"attn_drop has p = 0.1"),
    (lambda a: setattr(a, "qkv", nn.Linear(DIM, 2 * DIM)), r"expected qkv = Linear\(32, 96\)"),
], ids=["no-qkv", "no-proj", "no-num_heads", "q_norm", "k_norm", "attn_drop", "qkv-not-3C"])
def test_from_attention_refuses_what_it_cannot_take(spoil, message):
    source = TimmStyleAttention(DIM, HEADS)
    spoil(source)
    with pytest.raises(ValueError, match=message):
        EMIM.from_attention(source, window=WINDOW)


# ----------------------------------------------------------------------------------------------------
# Training: gradients, weight decay, autocast, checkpoint names
# ----------------------------------------------------------------------------------------------------

def test_gradients_reach_every_parameter_once_motion_is_on():
    module = make_module()
    with torch.no_grad():  # with W2 = 0, W1 and b1 get no gradient: switch motion on first
        for p in module.motion_conv[2].parameters():
            p.normal_(std=0.1)
    module(tokens(), frames=FRAMES).square().sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_no_weight_decay_names_the_position_bias():
    module = make_module()
    assert module.no_weight_decay() == {"rpb"}
    assert module.no_weight_decay() <= dict(module.named_parameters()).keys()


def test_autocast_bf16_on_cpu():
    """Under autocast the projections run in bf16 while rpb and the motion MLP stay float32; the op takes
    both. Output bf16 (from proj), parameter gradients float32 (the master weights)."""
    module = make_module(dtype=torch.float32)
    switch_on_motion(module)
    x = tokens(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x, frames=FRAMES)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    out.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in module.parameters())
    # bf16 rounding of x, qkv, the op's output and proj (measured 3.6e-3): 2e-2 leaves room for that
    # and still fails on anything that is not the float32 module's result.
    assert relative_error(out, module(x, frames=FRAMES)) < 2e-2


def test_state_dict_names_match_the_authors_checkpoints():
    names = set(make_module().state_dict())
    assert names == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "rpb",
                     "motion_conv.0.weight", "motion_conv.0.bias", "motion_conv.2.weight", "motion_conv.2.bias"}
    shapes = {name: tuple(t.shape) for name, t in make_module().state_dict().items()}
    assert shapes["motion_conv.0.weight"] == (36, 9) and shapes["motion_conv.2.weight"] == (16, 36)
    assert shapes["rpb"] == (HEADS, WINDOW, WINDOW)


def test_prefix_tokens_keep_global_attention_and_the_patches_get_emim():
    """A class token (or any prefix token) attends to all tokens as in global attention; the patch tokens
    get EMIM over the patch tokens alone, exactly as in a module without prefix tokens."""
    module, plain = make_module(num_prefix_tokens=2), make_module()  # same seed: same weights
    patches = tokens()
    x = torch.cat([torch.randn(2, 2, DIM, dtype=torch.float64), patches], dim=1)
    out = module(x, frames=FRAMES)
    assert relative_error(out[:, 2:], plain(patches, frames=FRAMES)) < REFERENCE_RTOL[torch.float64]

    B, N, C = x.shape
    q, k, v = module.qkv(x).view(B, N, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(module.scale * q[:, :, :2] @ k.transpose(-1, -2), dim=-1)
    expected = module.proj((weights @ v).transpose(1, 2).reshape(B, 2, C))
    assert relative_error(out[:, :2], expected) < REFERENCE_RTOL[torch.float64]

    with pytest.raises(ValueError, match=r"60 tokens plus 2 prefix tokens = 62.*N = 60"):
        module(patches, frames=FRAMES)
    with pytest.raises(ValueError, match=r"only \(B, N, C\) token input"):
        module(patches.view(2, *FRAMES, DIM))
    assert "num_prefix_tokens=2" in repr(module)


def test_extra_repr_shows_the_configuration():
    assert "num_heads=2, head_dim=16, window=3" in repr(make_module())


# ----------------------------------------------------------------------------------------------------
# The fused kernels through the module (slow in the interpreter: one tiny shape)
# ----------------------------------------------------------------------------------------------------

def test_auto_backend_is_the_fused_kernels_on_cuda_and_the_reference_elsewhere(monkeypatch):
    """TRITON_INTERPRET=1 (a test harness's switch) does not steer a user's model onto the CPU interpreter."""
    from emim_triton.functional import resolve_backend

    for interpret in ("0", "1"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        assert resolve_backend("auto", torch.device("cpu")) == "reference"
        assert resolve_backend("auto", torch.device("cuda")) == "triton"
        assert resolve_backend("triton", torch.device("cpu")) == "triton"


@pytest.mark.fused
def test_fused_backend_matches_the_reference():
    """The module on the fused kernels (CUDA, or the interpreter on the CPU): forward and parameter
    gradients match the reference backend's."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fused = EMIM(DIM, HEADS, window=WINDOW, backend="triton")
    switch_on_motion(fused)
    fused = fused.to(device)
    reference = EMIM(DIM, HEADS, window=WINDOW, backend="reference").to(device)
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(1, 2 * 3 * 4, DIM, device=device)

    out_fused, out_reference = fused(x, frames=(2, 3, 4)), reference(x, frames=(2, 3, 4))
    assert relative_error(out_fused, out_reference) < FP32_KERNEL_RTOL
    out_fused.square().sum().backward()
    out_reference.square().sum().backward()
    for (name, p), q in zip(fused.named_parameters(), reference.parameters()):
        assert relative_error(p.grad, q.grad) < FP32_KERNEL_RTOL, name


def test_qkv_views_are_what_the_op_receives():
    module = make_module()
    x = torch.randn(2, 60, DIM, dtype=torch.float64)
    q, k, v = module.qkv_views(x, frames=FRAMES)
    assert q.shape == (2, *FRAMES, HEADS, DIM // HEADS)
    projected = module.qkv(x).view(2, *FRAMES, 3, HEADS, DIM // HEADS)
    for i, t in enumerate((q, k, v)):
        assert torch.equal(t, projected[..., i, :, :])
    with pytest.raises(ValueError, match=r"T\*H\*W = 60 tokens.*N = 61"):
        module.qkv_views(torch.randn(2, 61, DIM, dtype=torch.float64), frames=FRAMES)


def test_context_and_motion_add_up_to_the_layer_and_motion_starts_at_zero():
    module = make_module()
    x = torch.randn(2, 60, DIM, dtype=torch.float64)
    context, motion = module.context_and_motion(x, frames=FRAMES)
    assert torch.equal(motion, torch.zeros_like(motion))  # W2 = b2 = 0 at initialisation
    switch_on_motion(module)
    context_after, motion = module.context_and_motion(x, frames=FRAMES)
    assert torch.allclose(context_after, context) and motion.abs().max() > 1e-3  # the context has no motion in it
    out = module.proj((context + motion).reshape(2, 60, DIM))
    assert relative_error(out, module(x, frames=FRAMES)) < REFERENCE_RTOL[torch.float64]
