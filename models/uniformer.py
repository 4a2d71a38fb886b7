"""UniFormer for video, with EMIM attention in chosen blocks (the EMIM paper's recognizers).

Reading order: small layers, the two kinds of block, the `UniFormer` model, then the registered
constructors. The architecture follows UniFormer's video backbone:

    stem (patch_embed1)   Conv3d (3, p, p) / (ts, p, p) + LayerNorm          T/ts x H/4 x W/4 at p = 4
    stage 1, 2            convolutional blocks: depthwise 5x5x5 "local MHRA" + 1x1x1 MLP, BatchNorm
    patch_embed2..4       Conv3d (1, 2, 2) / (1, 2, 2) + LayerNorm           halve H and W, keep T
    stage 3, 4            attention blocks over T*H*W tokens, LayerNorm; the attention of a block is
                          either global multi-head self-attention or EMIM (next-frame local attention
                          plus motion features from its cost volume)
    head                  BatchNorm3d -> mean over T, H, W -> Linear

Every block starts with a depthwise 3x3x3 convolution added to its input (UniFormer's "dynamic position
embedding"), so the model has no position table and takes any T, H, W the strides allow.

Memory layout: feature maps pass between blocks NCDHW-contiguous, because every block starts with a
depthwise Conv3d and the layout picks its backend. PyTorch sends a depthwise convolution whose input has
channels_last_3d strides to cuDNN, whose bf16 3-D grouped weight gradient works channel by channel (95 % of
the CUDA time of an S16 training step on an H200, bench/results/h200-2026-11-25/profile-s16.log); a
contiguous input goes to PyTorch's own depthwise-3d kernels. PatchEmbed and AttentionBlock compute in
channels-last (token) order, so each copies its result back to NCDHW once, where it makes it, rather than
every convolution copying its input.

Parameter names are those of the UniFormer and EMIM checkpoints (see PAPER-NOTES.md), so their state
dicts load with ``load_state_dict(strict=True)`` when the architecture matches.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from emim_triton import EMIM
from emim_triton.checks import check_variant

from .registry import register_model

EMIM_PLACEMENTS = ("lg", "all", "none")
_EMIM_DEFAULTS = dict(direction="next", dilation=1, authors_context_channels=None)  # the paper's op


# ----------------------------------------------------------------------------------------------------
# Small layers
# ----------------------------------------------------------------------------------------------------

class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for whole samples, rescaling the kept ones by 1 / keep."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class Mlp(nn.Module):
    """Token MLP of the attention blocks: Linear -> GELU -> Linear on (B, N, C)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class ConvMlp(nn.Module):
    """The same MLP for the convolutional stages, as 1x1x1 convolutions on (B, C, T, H, W)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Conv3d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv3d(hidden, dim, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class PatchEmbed(nn.Module):
    """Strided Conv3d that cuts the clip (or feature map) into patches, then LayerNorm over channels.

    The stem uses a temporal kernel of 3 (padding 1) and the model's temporal stride; the later
    embeddings only shrink H and W.
    """

    def __init__(self, in_chans: int, dim: int, patch: int, temporal_kernel: int = 1, temporal_stride: int = 1):
        super().__init__()
        self.proj = nn.Conv3d(in_chans, dim, kernel_size=(temporal_kernel, patch, patch),
                              stride=(temporal_stride, patch, patch), padding=(temporal_kernel // 2, 0, 0))
        self.norm = nn.LayerNorm(dim)  # eps 1e-5, as UniFormer's patch embeddings

    def forward(self, x):
        x = self.proj(x)
        # the norm's output is channels-last; the blocks' depthwise convolutions want NCDHW (module docstring)
        return self.norm(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3).contiguous()


class GlobalAttention(nn.Module):
    """Multi-head self-attention over all T*H*W tokens of a clip (timm's layout: ``qkv``, ``proj``).

    Runs on `F.scaled_dot_product_attention`, which picks a flash / memory-efficient kernel where one
    exists. ``frames`` is accepted and ignored so the block calls both attentions the same way.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"GlobalAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, frames: tuple[int, int, int] | None = None) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


# ----------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------

class ConvBlock(nn.Module):
    """Stages 1-2 (UniFormer's CBlock), on (B, C, T, H, W):

        x = x + pos_embed(x)                               depthwise 3x3x3: position information
        x = x + conv2(attn(conv1(norm1(x))))               "local MHRA": 1x1x1, depthwise 5x5x5, 1x1x1
        x = x + mlp(norm2(x))                              1x1x1 MLP, ratio 4
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.pos_embed = nn.Conv3d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.BatchNorm3d(dim)
        self.conv1 = nn.Conv3d(dim, dim, 1)
        self.attn = nn.Conv3d(dim, dim, 5, padding=2, groups=dim)
        self.conv2 = nn.Conv3d(dim, dim, 1)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.BatchNorm3d(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x):
        x = x + self.pos_embed(x)
        x = x + self.drop_path(self.conv2(self.attn(self.conv1(self.norm1(x)))))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class AttentionBlock(nn.Module):
    """Stages 3-4 (UniFormer's SABlock), on (B, C, T, H, W):

        x = x + pos_embed(x)                               depthwise 3x3x3
        tokens = x as (B, T*H*W, C), in (t, y, x) order    the order EMIM reads frames in
        tokens = tokens + attn(norm1(tokens))              EMIM or global self-attention
        tokens = tokens + mlp(norm2(tokens))
    """

    def __init__(self, dim: int, num_heads: int, use_emim: bool, window: int = 7, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 attn_backend: str = "auto", emim_options: dict | None = None):
        super().__init__()
        self.pos_embed = nn.Conv3d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if use_emim:  # EMIM has no attention dropout (the fused kernels never hold the probabilities)
            self.attn = EMIM(dim, num_heads, window=window, qkv_bias=qkv_bias, proj_drop=drop,
                             backend=attn_backend, **(emim_options or {}))
        else:
            self.attn = GlobalAttention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x):
        x = x + self.pos_embed(x)  # x is NCDHW-contiguous (module docstring: memory layout)
        B, C, T, H, W = x.shape
        # One copy into token order, whose rows of C are what LayerNorm, Linear and EMIM read (norm1 would
        # make this copy itself; making it here keeps the residual sums in token order as well) ...
        tokens = x.flatten(2).transpose(1, 2).contiguous()
        tokens = tokens + self.drop_path(self.attn(self.norm1(tokens), frames=(T, H, W)))
        tokens = tokens + self.drop_path(self.mlp(self.norm2(tokens)))
        # ... and one back to NCDHW for the next block's depthwise pos_embed.
        return tokens.transpose(1, 2).reshape(B, C, T, H, W).contiguous()


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------

def uses_emim(placement: str, block_index: int) -> bool:
    """Whether attention block `block_index` of stage 3 or 4 is an EMIM block.

    "lg" is the EMIM authors' local/global alternation: blocks 0, 2, 4, ... of each attention stage use
    EMIM, the others keep global attention (motion from the local blocks, long-range context from the
    global ones). "all" makes every attention block EMIM; "none" is plain UniFormer.
    """
    if placement not in EMIM_PLACEMENTS:
        raise ValueError(f"emim_placement must be one of {EMIM_PLACEMENTS}, got {placement!r}")
    return placement == "all" or (placement == "lg" and block_index % 2 == 0)


class UniFormer(nn.Module):
    """UniFormer video backbone and classifier, with EMIM in the attention stages.

    Args:
        depths: blocks per stage; stages 1-2 are convolutional, 3-4 attention.
        dims: channels per stage.
        head_dim: channels per attention head (heads = dim // head_dim). EMIM needs 16 <= head_dim <= 128.
        mlp_ratio: hidden width of every MLP relative to its stage's dim.
        qkv_bias: bias in the qkv projections.
        num_classes: classifier size; 0 gives a feature extractor (``head`` is Identity).
        in_chans: input channels.
        patch_sizes: spatial stride of the stem and of patch_embed2..4; (4, 2, 2, 2) as UniFormer,
            smaller for small inputs (the tiny models use 2 so 64 px frames give 8 x 8 maps at stage 3).
        temporal_stride: of the stem. 1 keeps every frame through the network (the EMIM authors:
            next-frame attention needs adjacent frames); 2 halves T (original UniFormer).
        emim_placement: "lg" (EMIM in even-indexed attention blocks, the authors' default), "all", "none".
        window: EMIM window K (odd, 3..15).
        drop_rate: dropout after the stem, in MLPs and projections, and before the head.
        attn_drop_rate: dropout on the attention probabilities of the global-attention blocks (EMIM has none).
        drop_path_rate: stochastic depth, rising linearly from 0 at the first block to this at the last.
        attn_backend: the EMIM op's backend, "auto" (fused Triton kernels on CUDA, the PyTorch reference
            on CPU), "triton" or "reference".
        direction: the EMIM layers' frame pairing, "next" (the paper) or "prev" (each EMIM layer causal;
            the network as a whole is not: its 3D convolutions and global attention see later frames).
        dilation: the EMIM layers' window dilation (int >= 1).
        authors_context_channels: None, or 32 to reproduce the authors' CUDA kernels when running their
            EMIM checkpoints (context over channels 0..31 of each head; README "The authors' checkpoints").
        grad_checkpointing: activation checkpointing per block (torch.utils.checkpoint, non-reentrant):
            only block inputs are kept, each block's activations are recomputed in backward; one extra
            forward pass buys the memory for B16 or 32-frame training on one GPU.
    Input (B, in_chans, T, H, W); output (B, num_classes) logits.
    """

    def __init__(self, depths=(3, 4, 8, 3), dims=(64, 128, 320, 512), head_dim: int = 64, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, num_classes: int = 400, in_chans: int = 3, patch_sizes=(4, 2, 2, 2),
                 temporal_stride: int = 1, emim_placement: str = "lg", window: int = 7, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, attn_backend: str = "auto",
                 grad_checkpointing: bool = False, direction: str = "next", dilation: int = 1,
                 authors_context_channels: int | None = None):
        super().__init__()
        if len(depths) != 4 or len(dims) != 4 or len(patch_sizes) != 4:
            raise ValueError(f"UniFormer has four stages: got depths {depths}, dims {dims}, "
                             f"patch_sizes {patch_sizes}")
        for dim in dims[2:]:
            if dim % head_dim:
                raise ValueError(f"attention-stage dim {dim} is not a multiple of head_dim {head_dim}")
        uses_emim(emim_placement, 0)  # validates the name before anything is built
        check_variant(direction, dilation, authors_context_channels)
        emim_options = dict(direction=direction, dilation=dilation, authors_context_channels=authors_context_channels)
        changed = {name: value for name, value in emim_options.items() if value != _EMIM_DEFAULTS[name]}
        if emim_placement == "none" and changed:  # options for layers that do not exist: refused, not dropped
            raise ValueError(f"UniFormer: {changed} configure EMIM layers, but emim_placement='none' builds "
                             f"none")
        self.in_chans, self.num_classes, self.num_features = in_chans, num_classes, dims[-1]
        self.min_size = patch_sizes[0] * patch_sizes[1] * patch_sizes[2] * patch_sizes[3]
        self.grad_checkpointing = grad_checkpointing

        self.patch_embed1 = PatchEmbed(in_chans, dims[0], patch_sizes[0], temporal_kernel=3,
                                       temporal_stride=temporal_stride)
        self.patch_embed2 = PatchEmbed(dims[0], dims[1], patch_sizes[1])
        self.patch_embed3 = PatchEmbed(dims[1], dims[2], patch_sizes[2])
        self.patch_embed4 = PatchEmbed(dims[2], dims[3], patch_sizes[3])
        self.pos_drop = nn.Dropout(drop_rate)

        total = sum(depths)  # plain Python, so the model also builds under torch.device("meta")
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        first = [sum(depths[:s]) for s in range(4)]  # global index of each stage's first block

        def conv_stage(s: int) -> nn.ModuleList:
            return nn.ModuleList(ConvBlock(dims[s], mlp_ratio, drop_rate, rates[first[s] + i])
                                 for i in range(depths[s]))

        def attention_stage(s: int) -> nn.ModuleList:
            return nn.ModuleList(
                AttentionBlock(dims[s], dims[s] // head_dim, uses_emim(emim_placement, i), window, mlp_ratio,
                               qkv_bias, drop_rate, attn_drop_rate, rates[first[s] + i], attn_backend,
                               emim_options)
                for i in range(depths[s]))

        self.blocks1, self.blocks2 = conv_stage(0), conv_stage(1)
        self.blocks3, self.blocks4 = attention_stage(2), attention_stage(3)

        self.norm = nn.BatchNorm3d(dims[-1])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """UniFormer's initialisation: linear layers truncated-normal (std 0.02), norms identity.

        Convolutions keep PyTorch's default. EMIM's own parameters (motion MLP, rpb) then get EMIM's init
        back: the MLP's output layer is zero, so every EMIM block starts as pure local next-frame attention
        and motion features grow from zero during training (the authors' recommendation).
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm3d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():  # the loop above also reached the motion MLP's Linear layers
            if isinstance(m, EMIM):
                m.reset_parameters()

    def no_weight_decay(self) -> set[str]:
        """Full names of the parameters the optimiser must not decay: the relative-position biases of the
        EMIM blocks (whatever each attention module declares). 1-D parameters (biases, norm scales) are
        left to the usual ``ndim <= 1`` rule of the optimiser; the position embeddings here are depthwise
        convolutions, decayed like every other convolution as in UniFormer."""
        names = set()
        for prefix, module in self.named_modules():
            if module is not self and hasattr(module, "no_weight_decay"):
                names.update(f"{prefix}.{name}" for name in module.no_weight_decay())
        return names

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head, e.g. to fine-tune a Kinetics model on Something-Something."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 5 or x.shape[1] != self.in_chans:
            raise ValueError(f"UniFormer expects clips of shape (B, {self.in_chans}, T, H, W), "
                             f"got {tuple(x.shape)}")
        if x.shape[3] < self.min_size or x.shape[4] < self.min_size:
            raise ValueError(f"UniFormer: frames of {x.shape[3]} x {x.shape[4]} are smaller than the total "
                             f"spatial stride {self.min_size}; use at least {self.min_size} x {self.min_size}")

    def _run_stage(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, T, H, W) -> the final feature map (B, dims[-1], T', H', W'), normalised."""
        self._check_input(x)
        x = self.pos_drop(self.patch_embed1(x))
        x = self._run_stage(self.blocks1, x)
        x = self._run_stage(self.blocks2, self.patch_embed2(x))
        x = self._run_stage(self.blocks3, self.patch_embed3(x))
        x = self._run_stage(self.blocks4, self.patch_embed4(x))
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x.mean(dim=(2, 3, 4)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ----------------------------------------------------------------------------------------------------
# Registered models
#
# emim_uniformer_*: the EMIM paper's models (stem temporal stride 1, "lg" placement, K = 7).
# uniformer_*: their no-EMIM twins, the same backbone with temporal stride 1 and global attention in
#   every attention block: the comparison that isolates what EMIM adds (the GPU benchmark of the
#   issue uses this twin). Original UniFormer (temporal stride 2) is ``temporal_stride=2``.
# *_xt: a tiny model for CPU training, demos and tests (64 px, 8 frames; stage 3 sees 8 x 8 maps).
# The suffix 16 / 32 is the default clip length; the weights are the same for both.
# ----------------------------------------------------------------------------------------------------

_SMALL = dict(depths=(3, 4, 8, 3), dims=(64, 128, 320, 512), head_dim=64)
_BASE = dict(depths=(5, 8, 20, 7), dims=(64, 128, 320, 512), head_dim=64)
# Tiny: one block in each conv stage and two in each attention stage (so "lg" has one EMIM and one
# global block per stage), head_dim 32 (the op needs >= 16), stride 2 everywhere: 64 px -> 32, 16, 8, 4.
_TINY = dict(depths=(1, 1, 2, 2), dims=(16, 32, 64, 128), head_dim=32, patch_sizes=(2, 2, 2, 2))


def _build(arch: dict, emim: bool, **kwargs) -> UniFormer:
    defaults = dict(temporal_stride=1, emim_placement="lg" if emim else "none")
    return UniFormer(**{**arch, **defaults, **kwargs})


@register_model(num_frames=16)
def emim_uniformer_s16(**kwargs) -> UniFormer:
    return _build(_SMALL, emim=True, **kwargs)


@register_model(num_frames=32)
def emim_uniformer_s32(**kwargs) -> UniFormer:
    return _build(_SMALL, emim=True, **kwargs)


@register_model(num_frames=16)
def emim_uniformer_b16(**kwargs) -> UniFormer:
    return _build(_BASE, emim=True, **kwargs)


@register_model(num_frames=32)
def emim_uniformer_b32(**kwargs) -> UniFormer:
    return _build(_BASE, emim=True, **kwargs)


@register_model(num_frames=8, img_size=64)
def emim_uniformer_xt(**kwargs) -> UniFormer:
    return _build(_TINY, emim=True, **kwargs)


@register_model(num_frames=16)
def uniformer_s16(**kwargs) -> UniFormer:
    return _build(_SMALL, emim=False, **kwargs)


@register_model(num_frames=32)
def uniformer_s32(**kwargs) -> UniFormer:
    return _build(_SMALL, emim=False, **kwargs)


@register_model(num_frames=16)
def uniformer_b16(**kwargs) -> UniFormer:
    return _build(_BASE, emim=False, **kwargs)


@register_model(num_frames=32)
def uniformer_b32(**kwargs) -> UniFormer:
    return _build(_BASE, emim=False, **kwargs)


@register_model(num_frames=8, img_size=64)
def uniformer_xt(**kwargs) -> UniFormer:
    return _build(_TINY, emim=False, **kwargs)
