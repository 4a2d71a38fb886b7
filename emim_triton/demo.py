"""A short tour of EMIM attention: ``python -m emim_triton.demo`` (the main job is ``bash scripts/demo.sh``, a different
program: emim_triton/train/emim_vs_twin.py).

1. An EMIM layer the size of UniFormer-S stage 3 runs on a random 16-frame clip: output shape, time, backend.
2. A freshly initialised layer (motion MLP output weights W2 = b2 = 0) equals plain local next-frame
   attention, computed a second, independent way (``emim_triton.testing.local_next_frame_attention``:
   the K x K window of the padded next frame, one window offset at a time).
3. The fused Triton kernels against the reference on a tiny shape: on a GPU if there is one, otherwise in
   Triton's CPU interpreter.
Runs in well under 30 s on two CPU cores.
"""

from __future__ import annotations

import importlib.util
import os
import time

import torch

# Triton reads TRITON_INTERPRET once, when it is first imported, so it must be set before anything imports
# triton. Importing torch (and the emim_triton package, which imports triton only on the fused path) does
# not; this line runs before the first import of triton in this process.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from emim_triton import EMIM, emim_attention, emim_reference  # noqa: E402  (after the interpreter switch)
from emim_triton.functional import resolve_backend  # noqa: E402
from emim_triton.testing import local_next_frame_attention, make_inputs  # noqa: E402

# UniFormer-S stage 3 at 224 px with the EMIM authors' temporal stride 1: 16 frames of 14 x 14 tokens,
# 320 channels in 5 heads of 64, window 7.
CLIP = dict(batch=1, frames=16, height=14, width=14, dim=320, heads=5, window=7)


def relative_max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: one number per comparison, robust to entries near zero."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def run_module_on_a_clip() -> None:
    c = CLIP
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    # "auto": the fused kernels on a GPU, the PyTorch reference on the CPU
    layer = EMIM(c["dim"], c["heads"], window=c["window"], backend="auto").to(device)
    T, H, W = c["frames"], c["height"], c["width"]
    x = torch.randn(c["batch"], T * H * W, c["dim"], device=device)

    print(f"1. EMIM({layer.extra_repr()})")
    with torch.no_grad():
        layer(x, frames=(T, H, W))  # warm-up: first-call allocations (and kernel compilation on a GPU)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = layer(x, frames=(T, H, W))
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    print(f"   input  {tuple(x.shape)} = (B, T*H*W, C) with frames (T, H, W) = {(T, H, W)}")
    print(f"   output {tuple(out.shape)}, {out.dtype}, forward {seconds * 1e3:.1f} ms on {device.type}, "
          f"backend that ran: {resolve_backend(layer.backend, device)}")

    # 2. The same layer, by hand: q, k, v from its qkv projection, local attention, its output projection.
    B, N, C = x.shape
    with torch.no_grad():
        q, k, v = layer.qkv(x).view(B, T, H, W, 3, layer.num_heads, layer.head_dim).unbind(4)
        context = local_next_frame_attention(q, k, v, layer.rpb, layer.scale, layer.pad_value)
        by_hand = layer.proj(context.reshape(B, N, C))
        print("2. a new layer (W2 = b2 = 0) vs local next-frame attention written out with shifted slices:")
        print(f"   max relative difference {relative_max_error(out, by_hand):.1e} (float32 rounding: they are equal)")
        layer.motion_conv[2].weight.normal_(std=0.05)
        with_motion = layer(x, frames=(T, H, W))
        print(f"   after setting W2 non-zero (as training does) the motion term moves the output by "
              f"{relative_max_error(with_motion, by_hand):.1e}")


def compare_fused_kernels_with_reference() -> None:
    on_gpu = torch.cuda.is_available()
    where = "on the GPU" if on_gpu else "in the Triton CPU interpreter"
    print(f"3. fused Triton kernels {where} vs the float64 reference, tiny shape:")
    if importlib.util.find_spec("triton") is None:
        print("   skipped: triton is not installed")
        return
    device = "cuda" if on_gpu else "cpu"
    shape = (1, 3, 4, 5, 2, 16, 3)  # (B, T, H, W, heads, D, K)
    inputs = {name: t.requires_grad_() for name, t in make_inputs(*shape, device=device, seed=1).items()}
    try:
        start = time.perf_counter()
        out = emim_attention(**inputs, backend="triton")
        grads = torch.autograd.grad(out.square().sum(), list(inputs.values()))
        seconds = time.perf_counter() - start
    except (NotImplementedError, ImportError) as error:
        print(f"   not available yet ({type(error).__name__}: {error}); skipped")
        return
    exact = {n: t.detach().double().requires_grad_() for n, t in inputs.items()}
    exact_out = emim_reference(**exact)
    exact_grads = torch.autograd.grad(exact_out.square().sum(), list(exact.values()))
    worst = max(zip(inputs, grads, exact_grads), key=lambda g: relative_max_error(g[1], g[2]))
    print(f"   shape (B, T, H, W, heads, D, K) = {shape}, forward + backward {seconds:.1f} s")
    print(f"   output: max relative error {relative_max_error(out, exact_out):.1e}")
    print(f"   gradients of all 8 inputs: worst max relative error {relative_max_error(worst[1], worst[2]):.1e} "
          f"(d{worst[0]})")


def main() -> None:
    start = time.perf_counter()
    run_module_on_a_clip()
    compare_fused_kernels_with_reference()
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
