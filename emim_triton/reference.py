"""Plain-PyTorch EMIM: the oracle for the kernels and the CPU path of the library.

It follows docs/operation.md line by line, written for reading, not speed:

    for every query (b, t, y, x, head), with tq, tk from `frame_pairs`:
            direction "next": tq = min(t, T-2), tk = tq + 1   (tq = tk = 0 when T = 1)
            direction "prev": tq = t, tk = max(t - 1, 0)
        window  = the K x K positions of frame tk centred on (y, x), entry (i, j) at
                  (y + (i - r) * dilation, x + (j - r) * dilation); outside the frame k = v = pad_value
        a[o]    = scale * <q, k_o> + rpb[head, o]                     # the cost volume row, o = i*K + j
        context = sum_o softmax(a)[o] * v_o
        motion  = W2 @ QuickGELU(W1 @ a + b1) + b2                    # the MLP sees the raw affinities
        out     = context + motion

Everything is computed in float32 (float64 when the inputs are float64) whatever the input dtype, and
the result is returned in q's dtype.  Frame pairs are processed in chunks so that the K²-wide window
tensors of a whole clip never exist at once: a CPU forward of a full UniFormer-S16 clip stays within a
few hundred MB.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .checks import EMIMShape, check_inputs, check_options, check_variant, require_positive_int

# Upper bound on the elements of one chunk's gathered key (or value) windows: 2**24 float32 = 64 MB.
_WINDOW_ELEMENTS_PER_CHUNK = 1 << 24


def quick_gelu(z: torch.Tensor) -> torch.Tensor:
    """QuickGELU(z) = z * sigmoid(1.702 z), the activation of the motion MLP."""
    return z * torch.sigmoid(1.702 * z)


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Affinities, softmax and MLP accumulate in float32 (float64 for float64 inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def frame_pairs(frames: int, direction: str = "next") -> tuple[list[int], list[int]]:
    """Query frames and key frames of the computed pairs, in output-frame order: pair n gives output frame n.

    "next": ([0..T-2], [1..T-1]), and output frame T-1, which has no pair of its own, is a copy of output
    frame T-2. "prev": ([0..T-1], [0, 0..T-2]), every output frame computed (frame 0 attends to itself).
    T = 1: ([0], [0]) either way, the frame attends to itself.
    """
    if frames == 1:
        return [0], [0]
    if direction == "next":
        return list(range(frames - 1)), list(range(1, frames))
    return list(range(frames)), [0, *range(frames - 1)]


def gather_windows(frame: torch.Tensor, window: int, pad_value: float, dilation: int = 1) -> torch.Tensor:
    """All K x K windows of a key (or value) frame, centred on every position.

    frame: (N, H, W, heads, D) -> (N, H, W, heads, K², D), where entry o = i*K + j of position (y, x)
    is frame[y + (i - r) d, x + (j - r) d] (d = dilation), or pad_value in every channel outside the frame.

    Built as K² shifted slices of the padded frame, not with ``Tensor.unfold``: unfold's backward is a
    scatter-add, which Inductor (torch 2.13, CPU, more than one thread) compiles into a kernel that
    writes out of bounds and aborts the process (docs/upstream/inductor_cpu_scatter_add_oob.py). The
    backward of slicing is a sum of zero-padded gradients: no scatter, and tests/test_compile_cpu.py
    checks the compiled result against eager.
    """
    reach = (window // 2) * dilation  # the farthest window entry from the centre, in tokens
    h, w = frame.shape[1:3]
    padded = F.pad(frame, (0, 0, 0, 0, reach, reach, reach, reach), mode="constant", value=pad_value)  # W, then H
    shifted = [padded[:, i * dilation:i * dilation + h, j * dilation:j * dilation + w]
               for i in range(window) for j in range(window)]  # o = i*K + j
    return torch.stack(shifted, dim=4)


def affinities(q, k_windows, rpb, scale):
    """Raw affinity rows a = scale * <q, k_o> + rpb: (N, H, W, heads, K²)."""
    heads = rpb.shape[0]
    return torch.einsum("nyxhd,nyxhod->nyxho", q, k_windows) * scale + rpb.reshape(heads, -1)


def motion_mlp(a, w1, b1, w2, b2):
    """Motion features from raw affinity rows: W2 @ QuickGELU(W1 @ a + b1) + b2."""
    return F.linear(quick_gelu(F.linear(a, w1, b1)), w2, b2)


def autocast_disabled(device: torch.device):
    """A context that turns autocast off for `device`, so einsum and linear keep the float32 compute dtype.

    Under ``torch.autocast`` those ops would otherwise run in bf16/fp16 and break the precision contract
    (affinities, softmax and MLP in float32); devices without autocast (e.g. 'meta') need nothing.
    """
    if device.type in _AUTOCAST_DEVICE_TYPES:
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


# Looked up once, at import: torch.compile (dynamo, torch 2.11) cannot trace torch.amp.is_autocast_available,
# but a membership test in a constant set traces cleanly.
_AUTOCAST_DEVICE_TYPES = frozenset(t for t in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia")
                                   if torch.amp.is_autocast_available(t))


def _emim_pairs(q, k, v, rpb, w1, b1, w2, b2, scale, pad_value, dilation, context_channels):
    """EMIM for a chunk of frame pairs already flattened to (N, H, W, heads, D)."""
    window = rpb.shape[-1]
    a = affinities(q, gather_windows(k, window, pad_value, dilation), rpb, scale)
    p = torch.softmax(a, dim=-1)
    context = torch.einsum("nyxho,nyxhod->nyxhd", p, gather_windows(v, window, pad_value, dilation))
    if context_channels is not None:  # the authors' switch: context channels >= 32 of every head are zero
        context = F.pad(context[..., :context_channels], (0, context.shape[-1] - context_channels))
    return context + motion_mlp(a, w1, b1, w2, b2)


class _KeepGradientChannels(torch.autograd.Function):
    """Identity whose backward keeps only the gradient's first `channels` channels (the rest zero).

    The authors' switch: their q, k, v backward kernels covered channels 0..31 of each head only, so q, k
    and v got no gradient beyond them, from the context and the motion path alike (docs/operation.md: deliberately not
    the gradient of the forward). Applied to q, k and v, this leaves every other gradient as autograd
    computes it for the switch's forward. The backward is itself differentiable (a slice and a pad).
    """

    @staticmethod
    def forward(ctx, x, channels):
        ctx.channels = channels
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        kept = grad[..., :ctx.channels]
        return F.pad(kept, (0, grad.shape[-1] - ctx.channels)), None


def _check_chunk_pairs(chunk_pairs) -> None:
    """chunk_pairs must be None or a positive int: 0 or less would compute no chunk at all."""
    if chunk_pairs is not None:
        require_positive_int(chunk_pairs, "chunk_pairs", "emim_reference", "frame pairs per chunk, or None")


def _select_frames(x: torch.Tensor, frames: list[int]) -> torch.Tensor:
    """x[:, frames] for a list of frames: a view when they are consecutive, else a stack of single frames.

    Not x[:, frames] itself: indexing with a list that repeats a frame ("prev" pairs frame 0 twice) has a
    scatter-add backward, which Inductor's CPU code gets wrong (see gather_windows); the backward of
    slicing and stacking is plain slicing.
    """
    first = frames[0]
    if frames == list(range(first, first + len(frames))):
        return x[:, first:first + len(frames)]
    return torch.stack([x[:, t] for t in frames], dim=1)


def emim_reference(q, k, v, rpb, w1, b1, w2, b2, *, scale=None, pad_value=1e-6, chunk_pairs=None,
                   direction="next", dilation=1, authors_context_channels=None):
    """EMIM attention in plain PyTorch; differentiable in all eight tensors by ordinary autograd (with
    authors_context_channels, q, k and v get the authors' gradient instead: see below).

    Args:
        q, k, v: (B, T, H, W, heads, D), any strides.
        rpb: (heads, K, K) relative-position bias, K odd.
        w1 (4K², K²), b1 (4K²), w2 (D, 4K²), b2 (D): the motion MLP, nn.Linear convention.
        scale: attention scale, default D ** -0.5.
        pad_value: value of k and v outside the frame (the authors' constant padding, 1e-6).
        chunk_pairs: frame pairs per chunk (None or a positive int); default keeps each chunk's windows
            under 64 MB.
        direction: "next" (the paper: frame t attends to frame t+1, output frame T-1 copies T-2) or "prev"
            (causal: frame t attends to frame t-1, frame 0 to itself).
        dilation: int >= 1; window entry (i, j) is displacement ((i - r) * dilation, (j - r) * dilation).
        authors_context_channels: None, or 32: context channels >= 32 of each head are zero in the output
            and q, k, v get zero gradient there (the authors' kernels); the other five gradients are those
            of this forward. Nothing changes when D <= 32.
    Returns:
        (B, T, H, W, heads, D) contiguous, dtype of q.
    """
    check_inputs(q, k, v, rpb, w1, b1, w2, b2)
    check_options(scale, pad_value)
    _check_chunk_pairs(chunk_pairs)
    check_variant(direction, dilation, authors_context_channels)
    return emim_reference_checked(q, k, v, rpb, w1, b1, w2, b2, scale=scale, pad_value=pad_value,
                                  chunk_pairs=chunk_pairs, direction=direction, dilation=dilation,
                                  authors_context_channels=authors_context_channels)


def emim_reference_checked(q, k, v, rpb, w1, b1, w2, b2, *, scale, pad_value, chunk_pairs=None, direction="next",
                           dilation=1, authors_context_channels=None):
    """`emim_reference` on inputs its checks have already accepted (`emim_attention` checks once, then calls
    this): the same arguments and result."""
    shape = EMIMShape.of(q, rpb)
    B, T, H, W, heads, D = q.shape
    if scale is None:
        scale = D ** -0.5
    dtype = compute_dtype_for(q.dtype)
    q_frames, k_frames = frame_pairs(T, direction)
    P = len(q_frames)
    context_channels = None
    if authors_context_channels is not None and D > authors_context_channels:  # else it changes nothing
        context_channels = authors_context_channels
        q, k, v = (_KeepGradientChannels.apply(x, context_channels) for x in (q, k, v))

    def pairs_of(x, frames):  # (B, P, H, W, heads, D) -> (B*P, H, W, heads, D) in the compute dtype
        return _select_frames(x, frames).to(dtype).reshape(B * P, H, W, heads, D)

    qp, kp, vp = pairs_of(q, q_frames), pairs_of(k, k_frames), pairs_of(v, k_frames)
    params = [t.to(dtype) for t in (rpb, w1, b1, w2, b2)]

    if chunk_pairs is None:
        per_pair = H * W * heads * shape.window_area * D
        chunk_pairs = max(1, _WINDOW_ELEMENTS_PER_CHUNK // per_pair)
    with autocast_disabled(q.device):
        chunks = [
            _emim_pairs(qp[i:i + chunk_pairs], kp[i:i + chunk_pairs], vp[i:i + chunk_pairs],
                        *params, scale, pad_value, int(dilation), context_channels)
            for i in range(0, B * P, chunk_pairs)
        ]
    out = torch.cat(chunks).reshape(B, P, H, W, heads, D)
    if P < T:  # "next": output frame T-1 is a copy of output frame T-2 (the authors' rule)
        out = torch.cat([out, out[:, -1:]], dim=1)
    return out.to(q.dtype).contiguous()
