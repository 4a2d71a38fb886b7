"""Plain-PyTorch EMIM: the oracle for the kernels and the CPU path of the library.

It follows ../SPEC (see README "The operation") line by line, written for reading, not speed:

    for every query (b, t, y, x, head), with tq = min(t, T-2), tk = tq + 1   (tq = tk = 0 when T = 1)
        window  = the K x K positions of frame tk centred on (y, x); outside the frame k = v = pad_value
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
import numbers

import torch
import torch.nn.functional as F

from .checks import check_inputs, check_options

# Upper bound on the elements of one chunk's gathered key (or value) windows: 2**24 float32 = 64 MB.
_WINDOW_ELEMENTS_PER_CHUNK = 1 << 24


def quick_gelu(z: torch.Tensor) -> torch.Tensor:
    """QuickGELU(z) = z * sigmoid(1.702 z), the activation of the motion MLP."""
    return z * torch.sigmoid(1.702 * z)


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Affinities, softmax and MLP accumulate in float32 (float64 for float64 inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def frame_pairs(frames: int) -> tuple[slice, slice]:
    """Query- and key-frame slices of the computed pairs: (0..T-2, 1..T-1), or (0, 0) when T = 1."""
    if frames == 1:
        return slice(0, 1), slice(0, 1)
    return slice(0, frames - 1), slice(1, frames)


def gather_windows(frame: torch.Tensor, window: int, pad_value: float) -> torch.Tensor:
    """All K x K windows of a key (or value) frame, centred on every position.

    frame: (N, H, W, heads, D) -> (N, H, W, heads, K², D), where entry o = i*K + j of position (y, x)
    is frame[y + i - r, x + j - r], or pad_value in every channel outside the frame.

    Built as K² shifted slices of the padded frame, not with ``Tensor.unfold``: unfold's backward is a
    scatter-add, which Inductor (torch 2.13, CPU, more than one thread) compiles into a kernel that
    writes out of bounds and aborts the process (docs/upstream/inductor_cpu_scatter_add_oob.py). The
    backward of slicing is a sum of zero-padded gradients: no scatter, and tests/test_compile_cpu.py
    checks the compiled result against eager.
    """
    r = window // 2
    n, h, w, heads, d = frame.shape
    padded = F.pad(frame, (0, 0, 0, 0, r, r, r, r), mode="constant", value=pad_value)  # pads W, then H
    shifted = [padded[:, i:i + h, j:j + w] for i in range(window) for j in range(window)]  # o = i*K + j
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


def _emim_pairs(q, k, v, rpb, w1, b1, w2, b2, scale, pad_value):
    """EMIM for a chunk of frame pairs already flattened to (N, H, W, heads, D)."""
    window = rpb.shape[-1]
    a = affinities(q, gather_windows(k, window, pad_value), rpb, scale)
    p = torch.softmax(a, dim=-1)
    context = torch.einsum("nyxho,nyxhod->nyxhd", p, gather_windows(v, window, pad_value))
    return context + motion_mlp(a, w1, b1, w2, b2)


def _check_chunk_pairs(chunk_pairs) -> None:
    """chunk_pairs must be None or a positive int: 0 or less would compute no chunk at all."""
    if chunk_pairs is None:
        return
    if isinstance(chunk_pairs, bool) or not isinstance(chunk_pairs, numbers.Integral):
        raise TypeError(f"emim_reference: chunk_pairs must be None or a positive int (frame pairs per chunk), "
                        f"got {type(chunk_pairs).__name__} {chunk_pairs!r}")
    if chunk_pairs < 1:
        raise ValueError(f"emim_reference: chunk_pairs must be None or a positive int (frame pairs per chunk), "
                         f"got {chunk_pairs}")


def emim_reference(q, k, v, rpb, w1, b1, w2, b2, *, scale=None, pad_value=1e-6, chunk_pairs=None):
    """EMIM attention in plain PyTorch; differentiable in all eight tensors by ordinary autograd.

    Args:
        q, k, v: (B, T, H, W, heads, D), any strides.
        rpb: (heads, K, K) relative-position bias, K odd.
        w1 (4K², K²), b1 (4K²), w2 (D, 4K²), b2 (D): the motion MLP, nn.Linear convention.
        scale: attention scale, default D ** -0.5.
        pad_value: value of k and v outside the frame (the authors' constant padding, 1e-6).
        chunk_pairs: frame pairs per chunk (None or a positive int); default keeps each chunk's windows
            under 64 MB.
    Returns:
        (B, T, H, W, heads, D) contiguous, dtype of q.
    """
    shape = check_inputs(q, k, v, rpb, w1, b1, w2, b2)
    check_options(scale, pad_value)
    _check_chunk_pairs(chunk_pairs)
    B, T, H, W, heads, D = q.shape
    if scale is None:
        scale = D ** -0.5
    dtype = compute_dtype_for(q.dtype)
    q_frames, k_frames = frame_pairs(T)
    P = shape.pairs

    def pairs_of(x, frames):  # (B, P, H, W, heads, D) -> (B*P, H, W, heads, D) in the compute dtype
        return x[:, frames].to(dtype).reshape(B * P, H, W, heads, D)

    qp, kp, vp = pairs_of(q, q_frames), pairs_of(k, k_frames), pairs_of(v, k_frames)
    params = [t.to(dtype) for t in (rpb, w1, b1, w2, b2)]

    if chunk_pairs is None:
        per_pair = H * W * heads * shape.window_area * D
        chunk_pairs = max(1, _WINDOW_ELEMENTS_PER_CHUNK // per_pair)
    with autocast_disabled(q.device):
        chunks = [
            _emim_pairs(qp[i:i + chunk_pairs], kp[i:i + chunk_pairs], vp[i:i + chunk_pairs],
                        *params, scale, pad_value)
            for i in range(0, B * P, chunk_pairs)
        ]
    out = torch.cat(chunks).reshape(B, P, H, W, heads, D)
    if T > 1:  # output frame T-1 is a copy of output frame T-2 (the authors' "next frame" rule)
        out = torch.cat([out, out[:, -1:]], dim=1)
    return out.to(q.dtype).contiguous()
