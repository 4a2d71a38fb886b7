"""`EMIM`: the attention module around the op, a drop-in replacement for a ViT-style attention block.

    x (tokens) --qkv--> q, k, v --emim_attention--> context + motion --proj--> out

Parameter names follow the EMIM authors' checkpoints (``qkv``, ``proj``, ``rpb``, ``motion_conv.0``,
``motion_conv.2``; see PAPER-NOTES.md "Checkpoints"), so their state dicts load with ``load_state_dict``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import (HEAD_DIM_RULE, SUPPORTED_HEAD_DIMS, SUPPORTED_WINDOWS, WINDOW_RULE, check_options,
                     check_variant, is_int)
from .environment import BACKENDS
from .functional import emim_attention
from .reference import quick_gelu
from .takeover import combined_qkv_bias, refuse_what_is_not_taken_over


def _is_positive_int(x) -> bool:
    """An int >= 1 (numpy integers too), not a bool or a float like 2.5 (which int() would silently truncate).
    A SymInt (a size traced by torch.compile with dynamic shapes) passes: it came from a real tensor's shape."""
    if isinstance(x, torch.SymInt):
        return True
    return is_int(x) and x >= 1


class QuickGELU(nn.Module):
    """z * sigmoid(1.702 z): the motion MLP's activation (a module so that ``motion_conv`` is a Sequential
    whose Linear layers sit at indices 0 and 2, as in the authors' checkpoints)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return quick_gelu(z)


class EMIM(nn.Module):
    """EMIM attention over a video's tokens: local next-frame attention plus motion features.

    Each query of frame t attends to the K x K window centred on its own position in frame t + 1 (frame
    t - 1 with direction="prev"; entries ``dilation`` tokens apart); the raw affinity row of that window
    (a cost volume) is also mapped by a small MLP into motion features that are added to the attention
    output. See docs/operation.md for the exact definition.

    Args:
        dim: channels C of the tokens; split into ``num_heads`` heads of ``dim // num_heads`` channels,
            which must be in 16..128.
        num_heads: attention heads.
        window: K, the side of the local window (odd, 3..15; the authors use 7).
        qkv_bias: whether the qkv projection has a bias.
        qk_scale: attention scale; default head_dim ** -0.5.
        attn_drop: must be 0. EMIM has no attention dropout: the fused kernels never materialise the
            softmax probabilities, so there is nothing to drop. Accepted only so that EMIM takes the same
            arguments as a standard attention module.
        proj_drop: dropout after the output projection.
        pad_value: value of keys and values outside the frame (the authors' constant padding, 1e-6).
        backend: the op's backend, "auto" (fused Triton kernels on CUDA, the PyTorch reference on CPU),
            "triton" or "reference".
        num_prefix_tokens: tokens before the video's T*H*W patch tokens that belong to no frame (a ViT's
            class token, register tokens). Their queries keep global attention over all tokens, with the
            same projections, so a class token still gathers the whole clip; the patch tokens get EMIM
            (which reads only patch tokens: they no longer see the prefix tokens).
        direction: "next" (frame t attends to frame t + 1, the paper) or "prev" (to frame t - 1: causal,
            output frame t depends on frames <= t only; see `stream` for frame-by-frame use).
        dilation: spacing of the window entries in tokens (int >= 1): the window spans (K - 1) * dilation + 1
            tokens at the cost of K x K.
        authors_context_channels: None, or 32 to reproduce the authors' CUDA kernels for their checkpoints
            (context over channels 0..31 of each head only; see `emim_attention`). An attribute: it may be
            switched after construction (`load_pretrained(..., authors_context_channels=32)` does).

    ``forward(x, frames)`` takes tokens (B, num_prefix_tokens + T*H*W, C), the patch tokens in (t, y, x)
    order, with ``frames=(T, H, W)``, or a (B, T, H, W, C) tensor (no prefix tokens), and returns the same
    layout.
    """

    def __init__(self, dim: int, num_heads: int, window: int = 7, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 pad_value: float = 1e-6, backend: str = "auto", num_prefix_tokens: int = 0,
                 direction: str = "next", dilation: int = 1, authors_context_channels: int | None = None):
        super().__init__()
        # Refuse bad configurations here, when the model is built, rather than at its first forward.
        for name, value in (("dim", dim), ("num_heads", num_heads), ("window", window)):
            if not _is_positive_int(value):
                raise ValueError(f"EMIM: {name} must be a positive int, got {value!r}")
        if dim % num_heads != 0:
            raise ValueError(f"EMIM: dim ({dim}) must be divisible by num_heads ({num_heads})")
        head_dim = dim // num_heads
        if head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"EMIM: head_dim = dim // num_heads must be {HEAD_DIM_RULE}, "
                             f"got {dim} // {num_heads} = {head_dim}")
        if window not in SUPPORTED_WINDOWS:
            raise ValueError(f"EMIM: window must be {WINDOW_RULE}, got {window}")
        if attn_drop != 0:
            raise ValueError(f"EMIM: attn_drop must be 0 (EMIM has no attention dropout: the fused kernels "
                             f"never materialise the attention probabilities), got {attn_drop}")
        if backend not in BACKENDS:
            raise ValueError(f"EMIM: backend must be one of {BACKENDS}, got {backend!r}")
        check_options(qk_scale, pad_value)  # the op's own rules, checked now rather than at the first forward
        check_variant(direction, dilation, authors_context_channels)
        if not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
            raise ValueError(f"EMIM: num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}")

        self.dim, self.num_heads, self.head_dim, self.window = dim, num_heads, head_dim, window
        self.scale = qk_scale if qk_scale is not None else head_dim ** -0.5
        self.pad_value = pad_value
        self.backend = backend
        self.num_prefix_tokens = num_prefix_tokens
        self.direction, self.dilation = direction, int(dilation)
        self.authors_context_channels = authors_context_channels

        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rpb = nn.Parameter(torch.empty(num_heads, window, window))
        area = window * window
        # One MLP shared by all heads: a K²-wide affinity row -> 4K² hidden -> head_dim motion features.
        self.motion_conv = nn.Sequential(nn.Linear(area, 4 * area), QuickGELU(), nn.Linear(4 * area, head_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise EMIM's own parameters; qkv and proj keep nn.Linear's default (a model's init, or
        `from_attention`, sets them).

        - rpb: truncated normal, std 0.02, with nn.init's default cut at +-2 (absolute, as in timm and the
          authors' code), so at this std it is in effect a plain normal.
        - motion MLP: W1 xavier-uniform, b1 zero; W2 and b2 zero, so the motion features start at exactly
          zero and a new (or converted) layer is pure local attention; motion grows from there during
          training (the authors' recommendation for fine-tuning). W1 must not be zero too, or W2's gradient
          (which flows through QuickGELU(W1 a + b1)) would vanish and motion could never start.
        """
        nn.init.trunc_normal_(self.rpb, std=0.02)
        hidden_layer, _, output_layer = self.motion_conv
        nn.init.xavier_uniform_(hidden_layer.weight)
        nn.init.zeros_(hidden_layer.bias)
        nn.init.zeros_(output_layer.weight)
        nn.init.zeros_(output_layer.bias)

    def forward(self, x: torch.Tensor, frames: tuple[int, int, int] | None = None) -> torch.Tensor:
        B, T, H, W = self._layout(x, frames)
        qkv = self.qkv(x)
        out = self._attention(*self._split_heads(qkv, (B, T, H, W)), *self._motion_mlp())
        # The op's output is contiguous (B, T, H, W, heads, D), so merging the heads is a free view.
        if self.num_prefix_tokens:
            out = torch.cat([self._prefix_attention(qkv), out.view(B, T * H * W, self.dim)], dim=1)
        else:
            out = out.view(*x.shape[:-1], self.dim)
        return self.proj_drop(self.proj(out))

    def qkv_views(self, x: torch.Tensor, frames: tuple[int, int, int] | None = None):
        """q, k, v of x's video tokens, (B, T, H, W, heads, D) each: what this layer hands the op (three
        strided views of one qkv projection; prefix tokens left out). Same ``x`` and ``frames`` as forward."""
        layout = self._layout(x, frames)
        return self._split_heads(self.qkv(x), layout)

    def context_and_motion(self, x: torch.Tensor, frames: tuple[int, int, int] | None = None):
        """The two terms of the op's output before the output projection, (B, T, H, W, heads, D) each:
        the attention context and the motion features (their sum is what forward projects).

        The op fuses the two, so the context is computed by a second call of the op with the motion MLP's
        output layer at zero (which makes the motion term exactly zero), and the motion is the difference:
        exact up to the rounding of one subtraction. For analysis (how much a layer relies on motion), not
        for training: it costs two calls of the op.
        """
        q, k, v = self.qkv_views(x, frames)
        w1, b1, w2, b2 = self._motion_mlp()
        total = self._attention(q, k, v, w1, b1, w2, b2)
        context = self._attention(q, k, v, w1, b1, torch.zeros_like(w2), torch.zeros_like(b2))
        return context, total - context

    def stream(self) -> "EMIMStream":
        """A stepper that runs this layer one frame at a time, for online video: ``y = stream(x_t)``.

        Each call takes one frame, (B, H, W, C) or (B, H*W, C) tokens with ``frames=(H, W)``, and returns
        an output frame in the same layout, equal to the frame of the whole-clip ``forward`` it stands for:
        - direction "prev": frame t's output at once (it needs frames t - 1 and t only);
        - direction "next": frame t - 1's output when frame t arrives (None for the first frame), and
          ``stream.flush()`` returns the last frame's (a copy of the one before, as in the whole clip; a
          one-frame stream's frame attends to itself).
        The stream holds at most 3·B·H·W·C elements between calls: "prev" keeps the previous frame's k and
        v (2·B·H·W·C); "next" keeps the pending frame's q and the last output returned (2·B·H·W·C), or
        after the first frame only, that frame's q, k and v (3·B·H·W·C). It reads the layer's current
        parameters at every call. Run it under ``torch.no_grad()`` (or inference mode) for online use:
        with gradients on, the autograd graph of every frame so far stays alive.
        Prefix tokens (a class token) attend to the whole clip, which a stream never has: refused.
        """
        if self.num_prefix_tokens:
            raise ValueError(f"EMIM.stream: this layer has num_prefix_tokens = {self.num_prefix_tokens}; "
                             f"prefix tokens attend to the whole clip, so they cannot be computed frame by "
                             f"frame")
        return EMIMStream(self)

    def _motion_mlp(self):
        hidden_layer, _, output_layer = self.motion_conv
        return hidden_layer.weight, hidden_layer.bias, output_layer.weight, output_layer.bias

    def _attention(self, q, k, v, w1, b1, w2, b2) -> torch.Tensor:
        return emim_attention(q, k, v, self.rpb, w1, b1, w2, b2, scale=self.scale, pad_value=self.pad_value,
                              backend=self.backend, direction=self.direction, dilation=self.dilation,
                              authors_context_channels=self.authors_context_channels)

    def _split_heads(self, qkv: torch.Tensor, layout: tuple[int, int, int, int]):
        """q, k, v as views of the qkv projection of a (B, T, H, W) video (one Linear for the three: no copies)."""
        B, T, H, W = layout
        patches = qkv[:, self.num_prefix_tokens:] if self.num_prefix_tokens else qkv
        return patches.view(B, T, H, W, 3, self.num_heads, self.head_dim).unbind(4)

    def _prefix_attention(self, qkv: torch.Tensor) -> torch.Tensor:
        """The prefix tokens' outputs (B, n, C): their queries attend to all N tokens, as in the global
        attention EMIM replaced, from the qkv projection already computed for the patches."""
        B, N, _ = qkv.shape
        q, k, v = qkv.view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q[:, :, :self.num_prefix_tokens], k, v, scale=self.scale)
        return out.transpose(1, 2).reshape(B, self.num_prefix_tokens, self.dim)

    def _layout(self, x: torch.Tensor, frames) -> tuple[int, int, int, int]:
        """(B, T, H, W) of the input, after checking x and frames agree with each other and with dim."""
        if x.dim() == 5:
            B, T, H, W, C = x.shape
            if self.num_prefix_tokens:
                raise ValueError(f"EMIM: this module has num_prefix_tokens = {self.num_prefix_tokens}, which "
                                 f"only (B, N, C) token input can carry; got x of shape {tuple(x.shape)}")
            if frames is not None and tuple(frames) != (T, H, W):
                raise ValueError(f"EMIM: frames={tuple(frames)} does not match x of shape {tuple(x.shape)} "
                                 f"(B, T, H, W, C); leave frames out for 5-D input")
        elif x.dim() == 3:
            B, N, C = x.shape
            if frames is None:
                raise ValueError(f"EMIM: x of shape {tuple(x.shape)} is (B, N, C) tokens; pass "
                                 f"frames=(T, H, W) with T*H*W = N to say how they form a video")
            if not isinstance(frames, (tuple, list)) or len(frames) != 3 or not all(map(_is_positive_int, frames)):
                raise ValueError(f"EMIM: frames must be (T, H, W), three positive ints, got {frames!r}")
            T, H, W = (int(f) for f in frames)
            prefix = self.num_prefix_tokens
            if T * H * W + prefix != N:
                expected = f" plus {prefix} prefix tokens = {T * H * W + prefix}" if prefix else ""
                raise ValueError(f"EMIM: frames=(T, H, W)={(T, H, W)} gives T*H*W = {T * H * W} tokens{expected}, "
                                 f"but x of shape {tuple(x.shape)} has N = {N}")
        else:
            raise ValueError(f"EMIM: x must be (B, T*H*W, C) tokens with frames=(T, H, W), or (B, T, H, W, C); "
                             f"got a {x.dim()}-D tensor of shape {tuple(x.shape)}")
        if C != self.dim:
            raise ValueError(f"EMIM: x has {C} channels in its last axis, expected dim = {self.dim}")
        return B, T, H, W

    @classmethod
    def from_attention(cls, attn: nn.Module, window: int = 7, **kwargs) -> "EMIM":
        """An EMIM module that takes over a standard (timm-style) attention module's weights.

        ``attn`` must have ``qkv`` (Linear(C, 3C)), ``proj`` (Linear(C, C)) and ``num_heads``; its ``scale``
        (if any) becomes ``qk_scale`` and its ``proj_drop`` rate carries over, unless given in ``kwargs``.
        qkv and proj weights are copied (the new module shares no storage with ``attn``), and the new
        module takes ``attn``'s device and dtype. Separate ``q_bias`` / ``k_bias`` / ``v_bias`` beside the
        qkv Linear (timm's BEiT and EVA) are added into the qkv bias. The motion MLP starts at zero, so the
        result is pure local next-frame attention over the same projections. Modules with parts EMIM has no
        place for (a q/k normalisation, a norm before proj, attention dropout, Swin window attention, any
        other parameter or buffer, such as a relative position bias) are refused rather than silently changed.
        """
        name = type(attn).__name__
        for part in ("qkv", "proj"):
            if not isinstance(getattr(attn, part, None), nn.Linear):
                raise ValueError(f"EMIM.from_attention: {name} has no nn.Linear `{part}`; expected a timm-style "
                                 f"attention module with qkv = Linear(C, 3C) and proj = Linear(C, C)")
        if not isinstance(getattr(attn, "num_heads", None), int):
            raise ValueError(f"EMIM.from_attention: {name} has no integer `num_heads` attribute")
        for part in ("q_norm", "k_norm", "norm"):
            module = getattr(attn, part, None)
            if module is not None and not isinstance(module, nn.Identity):
                raise ValueError(f"EMIM.from_attention: {name}.{part} is {type(module).__name__}; EMIM has no "
                                 f"place for it, only nn.Identity (or no such attribute) can be taken over")
        dropout = getattr(attn, "attn_drop", None)
        if isinstance(dropout, nn.Dropout) and dropout.p != 0:
            raise ValueError(f"EMIM.from_attention: {name}.attn_drop has p = {dropout.p}; EMIM has no attention "
                             f"dropout (set it to 0 first)")

        qkv, proj = attn.qkv, attn.proj
        dim = qkv.in_features
        if qkv.out_features != 3 * dim or (proj.in_features, proj.out_features) != (dim, dim):
            raise ValueError(f"EMIM.from_attention: expected qkv = Linear({dim}, {3 * dim}) and proj = "
                             f"Linear({dim}, {dim}), got qkv = Linear({qkv.in_features}, {qkv.out_features}) "
                             f"and proj = Linear({proj.in_features}, {proj.out_features})")
        try:
            refuse_what_is_not_taken_over(attn, "timm")
            bias = combined_qkv_bias(attn)
        except ValueError as error:
            raise ValueError(f"EMIM.from_attention: {error}") from error
        qkv_bias = bias is not None
        if kwargs.pop("qkv_bias", qkv_bias) != qkv_bias:
            raise ValueError(f"EMIM.from_attention: qkv_bias is taken from {name} (qkv.bias, q_bias, k_bias, "
                             f"v_bias: {'a bias' if qkv_bias else 'none'} present) and cannot be overridden")
        if getattr(attn, "scale", None) is not None:
            kwargs.setdefault("qk_scale", float(attn.scale))
        if isinstance(getattr(attn, "proj_drop", None), nn.Dropout):
            kwargs.setdefault("proj_drop", attn.proj_drop.p)

        emim = cls(dim, attn.num_heads, window=window, qkv_bias=qkv_bias, **kwargs)
        emim.to(device=qkv.weight.device, dtype=qkv.weight.dtype)
        with torch.no_grad():
            emim.qkv.weight.copy_(qkv.weight)
            if qkv_bias:
                emim.qkv.bias.copy_(bias)
            emim.proj.weight.copy_(proj.weight)
            if proj.bias is not None:
                emim.proj.bias.copy_(proj.bias)
            else:  # a proj without bias is the same function as ours with a zero bias
                emim.proj.bias.zero_()
        return emim

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this module) the optimiser must not decay: the position bias."""
        return {"rpb"}

    def extra_repr(self) -> str:
        extra = f", num_prefix_tokens={self.num_prefix_tokens}" if self.num_prefix_tokens else ""
        # The variant options only when they differ from the paper's op, so a default layer reads as before.
        if self.direction != "next":
            extra += f", direction={self.direction!r}"
        if self.dilation != 1:
            extra += f", dilation={self.dilation}"
        if self.authors_context_channels is not None:
            extra += f", authors_context_channels={self.authors_context_channels}"
        return (f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, window={self.window}, "
                f"scale={self.scale:.4g}, pad_value={self.pad_value:g}, backend={self.backend!r}{extra}")


class EMIMStream:
    """One frame at a time through an `EMIM` layer; made by `EMIM.stream` (see there for the contract).

    Each step is the op on a one-frame pair: the query frame with the key/value frame it pairs with under
    the layer's direction (for T = 1 the op pairs a frame with the key frame it is given), so every output
    frame is computed by the same op as in the whole clip and needs no state beyond one frame.
    """

    def __init__(self, emim: EMIM):
        self.emim = emim
        self.reset()

    def __call__(self, x: torch.Tensor, frames: tuple[int, int] | None = None) -> torch.Tensor | None:
        emim = self.emim
        B, H, W = self._layout(x, frames)
        q, k, v = emim._split_heads(emim.qkv(x), (B, 1, H, W))
        if emim.direction == "prev":
            # Frame 0 attends to itself; frame t to frame t - 1. Copies of k and v, so the frame's whole
            # qkv projection (q included) is not kept alive between calls.
            key, value = (k, v) if self._held_kv is None else self._held_kv
            self._held_kv = (k.contiguous(), v.contiguous())
            return self._output(q, key, value)
        if self._pending is None:  # "next", first frame: nothing to pair it with yet
            self._pending = (q, k, v)
            return None
        pending_q = self._pending[0]
        self._pending = (q.contiguous(),)
        self._last = self._output(pending_q, k, v)
        return self._last

    def flush(self) -> torch.Tensor | None:
        """The last frame's output with direction "next" (None when no frame came, or with "prev", whose
        outputs all came at once). It ends the stream: the state is cleared, the next call starts anew."""
        if self.emim.direction == "prev" or self._pending is None:
            out = None
        elif self._last is not None:  # output frame T-1 is an exact copy of output frame T-2
            out = self._last.clone()
        else:  # a one-frame stream: the frame attends to itself
            out = self._output(*self._pending)
        self.reset()
        return out

    def reset(self) -> None:
        """Forget every frame: the next call is the first frame of a new stream."""
        self._size = None        # (B, H, W) of the first frame; later frames must match
        self._held_kv = None     # "prev": k, v of the previous frame
        self._pending = None     # "next": q (and, after the first frame only, k and v) of the newest frame
        self._last = None        # "next": the last output returned, which is also the last frame's output
        self._flat = False       # the layout of the latest frame: outputs are returned in it

    def _output(self, q, k, v) -> torch.Tensor:
        emim = self.emim
        out = emim._attention(q, k, v, *emim._motion_mlp())  # (B, 1, H, W, heads, D), contiguous
        B, _, H, W = out.shape[:4]
        out = emim.proj_drop(emim.proj(out.view(B, H * W, emim.dim)))
        return out if self._flat else out.view(B, H, W, emim.dim)

    def _layout(self, x: torch.Tensor, frames) -> tuple[int, int, int]:
        """(B, H, W) of one frame, after checking it against the layer and the stream's earlier frames."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"EMIM stream: a frame must be a tensor, got {type(x).__name__}")
        if x.dim() == 4:
            B, H, W, C = x.shape
            if frames is not None and tuple(frames) != (H, W):
                raise ValueError(f"EMIM stream: frames={tuple(frames)} does not match the frame of shape "
                                 f"{tuple(x.shape)} (B, H, W, C); leave frames out for 4-D input")
        elif x.dim() == 3:
            B, N, C = x.shape
            if not isinstance(frames, (tuple, list)) or len(frames) != 2 or not all(map(_is_positive_int, frames)):
                raise ValueError(f"EMIM stream: a frame of shape {tuple(x.shape)} is (B, H*W, C) tokens; pass "
                                 f"frames=(H, W), two positive ints, got frames={frames!r}")
            H, W = (int(f) for f in frames)
            if H * W != N:
                raise ValueError(f"EMIM stream: frames=(H, W)={(H, W)} gives {H * W} tokens, but the frame of "
                                 f"shape {tuple(x.shape)} has {N}")
        else:
            raise ValueError(f"EMIM stream: a frame must be (B, H, W, C), or (B, H*W, C) tokens with "
                             f"frames=(H, W); got a {x.dim()}-D tensor of shape {tuple(x.shape)}")
        if C != self.emim.dim:
            raise ValueError(f"EMIM stream: the frame has {C} channels in its last axis, expected dim = "
                             f"{self.emim.dim}")
        if self._size is None:
            self._size = (B, H, W)
        elif self._size != (B, H, W):
            raise ValueError(f"EMIM stream: every frame of a stream must have one (B, H, W); the first had "
                             f"{self._size}, this one has {(B, H, W)} (call reset() or flush() to start anew)")
        self._flat = x.dim() == 3
        return B, H, W
