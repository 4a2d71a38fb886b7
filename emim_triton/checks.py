"""Input checks for the EMIM op: one place, run before anything is computed or launched.

Every error names the argument, what it got and what was expected, so a user who wires the op into
their own model sees at once which tensor is wrong.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

MIN_WINDOW, MAX_WINDOW = 3, 15
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the kernels' q, k, v; float64 is reference-only
# The window / head-dim rule as one fact for every place that decides it (the op's input check, the module's
# constructor, the bench's --shape): membership tests, and the words for their error messages.
SUPPORTED_WINDOWS = tuple(range(MIN_WINDOW, MAX_WINDOW + 1, 2))  # K odd: the window has a centre
SUPPORTED_HEAD_DIMS = range(MIN_HEAD_DIM, MAX_HEAD_DIM + 1)
WINDOW_RULE = f"odd and in {MIN_WINDOW}..{MAX_WINDOW}"
HEAD_DIM_RULE = f"in {MIN_HEAD_DIM}..{MAX_HEAD_DIM}"


@dataclass(frozen=True)
class EMIMShape:
    """The sizes of one EMIM call, read off q and rpb."""

    batch: int
    frames: int
    height: int
    width: int
    heads: int
    head_dim: int
    window: int

    @classmethod
    def of(cls, q: torch.Tensor, rpb: torch.Tensor) -> "EMIMShape":
        """The sizes of a call whose inputs `check_inputs` has already accepted (no checks here)."""
        return cls(*q.shape, rpb.shape[-1])

    @property
    def radius(self) -> int:
        return self.window // 2

    @property
    def window_area(self) -> int:  # K², the length of one affinity row
        return self.window * self.window

    @property
    def hidden(self) -> int:  # width of the motion MLP's hidden layer, 4K²
        return 4 * self.window_area

    @property
    def rows(self) -> int:
        """Query rows actually computed: one per (batch, pair, y, x, head)."""
        return self.batch * self.pairs * self.height * self.width * self.heads

    @property
    def pairs(self) -> int:
        """Number of (query frame, key frame) pairs that are actually computed.

        Frames 0..T-2 pair with their successor and output frame T-1 copies frame T-2, so T-1 pairs;
        a single frame (T = 1) attends to itself, one pair.
        """
        return max(self.frames - 1, 1)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _require_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"emim_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(
            f"emim_attention: {name} must be a floating-point tensor (float32, float16, bfloat16), "
            f"got {t.dtype}"
        )
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"emim_attention: {name} has unsupported dtype {t.dtype}; "
                        f"expected one of float32, float16, bfloat16 (float64 on the reference path)")


def _require_shape(name: str, t: torch.Tensor, expected: tuple, meaning: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(
            f"emim_attention: {name} must have shape {meaning} = {tuple(expected)}, got {_describe(t)}"
        )


def check_inputs(q, k, v, rpb, w1, b1, w2, b2) -> EMIMShape:
    """Validate the eight inputs of `emim_attention` and return their sizes.

    q, k, v: (B, T, H, W, heads, D), any strides with stride(-1) == 1, one dtype among them.
    rpb: (heads, K, K) with K odd in 3..15.  w1: (4K², K²), b1: (4K²,), w2: (D, 4K²), b2: (D,).
    Parameters may be float32 or the activations' dtype (mixed precision keeps float32 master weights).
    """
    tensors = dict(q=q, k=k, v=v, rpb=rpb, w1=w1, b1=b1, w2=w2, b2=b2)
    for name, t in tensors.items():
        _require_tensor(name, t)

    if q.dim() != 6:
        raise ValueError(
            f"emim_attention: q must be 6-D (B, T, H, W, heads, D), got {q.dim()}-D {_describe(q)}"
        )
    B, T, H, W, heads, D = q.shape
    if min(B, T, H, W, heads) < 1:
        raise ValueError(f"emim_attention: q has an empty dimension: {_describe(q)}")
    for name in ("k", "v"):
        _require_shape(name, tensors[name], q.shape, "(B, T, H, W, heads, D) like q")
        if tensors[name].dtype != q.dtype:
            raise TypeError(
                f"emim_attention: q, k and v must share one dtype, got q {q.dtype} and {name} "
                f"{tensors[name].dtype}"
            )
    for name in ("q", "k", "v"):
        if tensors[name].stride(-1) != 1:
            raise ValueError(
                f"emim_attention: {name} must have stride 1 along its last (head_dim) axis, got strides "
                f"{tuple(tensors[name].stride())}; views such as qkv.view(B, T, H, W, 3, heads, D).unbind(4) "
                f"are fine, a transposed head_dim is not"
            )

    if rpb.dim() != 3 or rpb.shape[0] != heads or rpb.shape[1] != rpb.shape[2]:
        raise ValueError(
            f"emim_attention: rpb must have shape (heads, K, K) = ({heads}, K, K), got {_describe(rpb)}"
        )
    K = rpb.shape[1]
    if K not in SUPPORTED_WINDOWS:
        raise ValueError(
            f"emim_attention: the window K (from rpb of shape {tuple(rpb.shape)}) must be {WINDOW_RULE}, "
            f"got K = {K}"
        )
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"emim_attention: head_dim D (last axis of q) must be {HEAD_DIM_RULE}, got D = {D}"
        )

    area, hidden = K * K, 4 * K * K
    _require_shape("w1", w1, (hidden, area), "(4K², K²)")
    _require_shape("b1", b1, (hidden,), "(4K²,)")
    _require_shape("w2", w2, (D, hidden), "(D, 4K²)")
    _require_shape("b2", b2, (D,), "(D,)")

    for name, t in tensors.items():
        if t.device != q.device:
            raise ValueError(
                f"emim_attention: all inputs must be on one device; q is on {q.device} but {name} is on "
                f"{t.device}"
            )
    for name in ("rpb", "w1", "b1", "w2", "b2"):
        t = tensors[name]
        if t.dtype not in (torch.float32, q.dtype):
            raise TypeError(
                f"emim_attention: {name} must be float32 or q's dtype ({q.dtype}), got {t.dtype}"
            )
    return EMIMShape(B, T, H, W, heads, D, K)


def is_int(x) -> bool:
    """An integer (numpy integers too), not a bool and not a float such as 2.0, which int() would silently
    truncate."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def require_positive_int(value, name: str, owner: str, meaning: str = "") -> None:
    """TypeError unless `value` is an int (numpy integers too; not a bool, not a float such as 2.0, which
    int() would silently truncate), ValueError unless it is >= 1; both name `owner`'s argument `name`."""
    expected = f"an int >= 1{f' ({meaning})' if meaning else ''}"
    if not is_int(value):
        raise TypeError(f"{owner}: {name} must be {expected}, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{owner}: {name} must be {expected}, got {value!r}")


def _is_real_number(x) -> bool:
    """A plain real number: int or float (numpy scalars included), but not bool and not a tensor."""
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, torch.Tensor))


def check_options(scale, pad_value) -> None:
    """Validate the op's scalar options, the same way for both backends.

    scale: None (D ** -0.5) or a finite number. A tensor is refused on both backends: the fused kernels
    take the scale as a plain float and return no gradient for it, so a learnable
    scale would silently stop learning there (fold a learnable temperature into q instead).
    pad_value: a finite number, the value of keys and values outside the frame.
    """
    if scale is not None:
        if isinstance(scale, torch.Tensor):
            raise TypeError(f"emim_attention: scale must be a Python number or None, got a tensor "
                            f"(shape {tuple(scale.shape)}); the op has no gradient for scale, so a tensor "
                            f"scale is refused rather than silently left untrained; pass float(scale)")
        if not _is_real_number(scale):
            raise TypeError(f"emim_attention: scale must be a number or None, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"emim_attention: scale must be a finite number, got {scale!r}")
    if not _is_real_number(pad_value):
        raise TypeError(f"emim_attention: pad_value must be a number (the authors use 1e-6), "
                        f"got {type(pad_value).__name__}")
    if not math.isfinite(pad_value):
        raise ValueError(f"emim_attention: pad_value must be finite, got {pad_value!r}")


DIRECTIONS = ("next", "prev")  # docs/operation.md#variants-beyond-the-paper: the paper's pairing, and the causal one
AUTHORS_CONTEXT_CHANNELS = 32  # the only restriction docs/operation.md defines: the authors' kernels' 32 channels per head


def check_variant(direction, dilation, authors_context_channels) -> None:
    """Validate the op's variant options, the same way for both backends (defaults: the paper's op).

    direction: "next" (frame t attends to frame t+1, the paper) or "prev" (frame t attends to frame t-1:
    causal). dilation: an int >= 1, the spacing of the window entries in tokens; a bool or a float such as
    2.0 is refused rather than truncated. authors_context_channels: None (off) or 32, the authors' context
    over channels 0..31 of each head (docs/operation.md#context-channel-switch).
    """
    if not isinstance(direction, str) or direction not in DIRECTIONS:
        raise ValueError(f"emim_attention: direction must be one of {DIRECTIONS} (\"next\": frame t attends to "
                         f"frame t+1, the paper; \"prev\": to frame t-1, causal), got {direction!r}")
    require_positive_int(dilation, "dilation", "emim_attention", "1: adjacent window entries, the paper")
    if authors_context_channels is not None and (not is_int(authors_context_channels)
                                                 or authors_context_channels != AUTHORS_CONTEXT_CHANNELS):
        raise ValueError(f"emim_attention: authors_context_channels must be None (off) or "
                         f"{AUTHORS_CONTEXT_CHANNELS} (the authors' kernels' context channels per head), "
                         f"got {authors_context_channels!r}")


def fused_kernels_run_on(device: torch.device, interpreter: bool) -> bool:
    """Whether the fused kernels run on `device`: CUDA, or the CPU when Triton's interpreter is on."""
    return device.type == "cuda" or (device.type == "cpu" and interpreter)


def check_fused_inputs(q: torch.Tensor, interpreter: bool) -> None:
    """What the fused kernels add to `check_inputs`: their dtypes, and a device they run on (CUDA, or the CPU
    when Triton's interpreter is on)."""
    if q.dtype not in FUSED_DTYPES:
        raise TypeError(f"emim_attention: the triton backend takes float32, float16 or bfloat16 q, k, v; "
                        f"got {q.dtype} (use backend='reference' for float64)")
    if not fused_kernels_run_on(q.device, interpreter):
        raise ValueError(f"emim_attention: backend='triton' needs CUDA tensors (or CPU tensors with "
                         f"TRITON_INTERPRET=1 set before triton is imported); q is on {q.device}")
