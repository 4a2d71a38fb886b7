"""Inputs past 2**31 elements through the fused EMIM op, forward and backward, checked on slices.

    python bench/large_inputs.py --json large.json    # GPU: B=8, T=32, 128 x 128, 16 heads, D=64, bf16
    python bench/large_inputs.py --small              # a tiny shape; on a CPU with TRITON_INTERPRET=1

At the default shape q, k and v have 4.3e9 elements each (and the backward's float32 scratch 3.2e9), so
any offset computed in int32 wraps. GPU memory: about 110 GB (estimated: q, k, v, output, upstream
gradient, q/k/v gradients and the backward's float32 scratch).

Why a slice is an exact check. EMIM is local in space, batch entries are independent, and output frame t
pairs query frame tq = min(t, T-2) with key frame tq + 1. So the op on q, k, v[b, t0:t0+2] gives the full
op's output frame t0 exactly (pair (t0, t0+1)), and frame t0+1 too when t0 = T-2 (both frames use the
pair (T-2, T-1)); the slice's other output frame belongs to a pair it does not hold. Gradients: the
upstream gradient is random on exactly those comparable output frames and zero everywhere else. Then only
q[b, t0] and k, v[b, t0+1] receive gradient, the slice's op computes exactly those (and zero on its other
frame), and the parameters' gradients are sums over the same non-zero terms. Everywhere outside the
slices the full op's q, k, v gradients must be exactly zero (a zero upstream gradient zeroes every term),
which also catches a write that lands in the wrong place.

Two slices: the first entries (b = 0, t0 = 0: small offsets) and the last (b = B-1, t0 = T-2: the largest
offsets, past 2**31 at the default shape). They are in different batch entries, so one backward serves
both (with B = 1, only the last). Errors are relative (Frobenius) to a float64 reference of the slices;
the bound is the tests' (emim_triton.testing.low_precision_bound): twice the reference's own error in the
run's dtype (2.5 times in the interpreter, which truncates where a GPU rounds), at least two units of tf32
rounding; float32: 1e-5. Exit status 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from emim_triton import emim_attention
from emim_triton.bench_cli.timing import synchronize
from emim_triton.environment import interpreter_enabled
from emim_triton.reference import emim_reference
from emim_triton.testing import FP32_KERNEL_RTOL, INPUT_NAMES, low_precision_bound, make_inputs, relative_error

DEFAULT_SHAPE = (8, 32, 128, 128, 16, 64, 7)  # B, T, H, W, heads, D, K
SMALL_SHAPE = (2, 3, 3, 4, 2, 16, 3)  # T = 3: the two slices are different frames; H != W; K < H
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", help="B,T,H,W,heads,D,K (default: %s)" % ",".join(map(str, DEFAULT_SHAPE)))
    parser.add_argument("--small", action="store_true",
                        help="the tiny shape %s instead (for a CPU: TRITON_INTERPRET=1, or --backend reference)"
                             % ",".join(map(str, SMALL_SHAPE)))
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="of q, k, v (parameters: float32)")
    parser.add_argument("--backend", choices=("triton", "reference"), default="triton",
                        help="the op under test; 'reference' only tests this script")
    parser.add_argument("--device", help="default: cuda when present, else cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.small and args.shape:
        parser.error("--small and --shape exclude each other")
    full_size = not args.small and not args.shape
    if args.shape:
        try:
            shape = tuple(int(n) for n in args.shape.split(","))
        except ValueError:
            parser.error(f"--shape must be 7 comma-separated integers B,T,H,W,heads,D,K, got {args.shape!r}")
        if len(shape) != 7 or min(shape) < 1:
            parser.error(f"--shape must be 7 positive integers B,T,H,W,heads,D,K, got {args.shape!r}")
    else:
        shape = SMALL_SHAPE if args.small else DEFAULT_SHAPE
    if shape[1] < 2:
        parser.error(f"--shape: T must be at least 2 (the check slices frame pairs), got T = {shape[1]}")
    args.shape = shape
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cpu" and full_size:
        parser.error("the default shape needs a GPU with about 110 GB of memory; use --small on a CPU")
    interpreted = interpreter_enabled()
    if args.device.type == "cpu" and args.backend == "triton" and not interpreted:
        parser.error("--backend triton on a CPU needs TRITON_INTERPRET=1 (the Triton interpreter)")
    args.interpreted = interpreted and args.device.type == "cpu"
    return args


def slices_of(B: int, T: int) -> list[tuple[int, int, list[int]]]:
    """(b, t0, comparable output frames) of each checked slice, in different batch entries."""
    last = (B - 1, T - 2, [T - 2, T - 1])
    first = (0, 0, [0] if T > 2 else [0, 1])
    return [first, last] if B > 1 else [last]


def random_inputs(shape, dtype, device, seed):
    """q, k, v of `dtype` and float32 parameters (`emim_triton.testing.make_inputs`), drawn on the device
    (the default shape is too large for the host), all requiring grad."""
    inputs = make_inputs(*shape, dtype=dtype, device=device, generator=torch.Generator(device).manual_seed(seed))
    q, k, v, *params = (t.requires_grad_() for t in inputs.values())
    return (q, k, v), tuple(params)


def reference_on_slices(slice_inputs, params, slice_grads, dtype):
    """Output and the eight gradients of the reference on every slice, inputs cast to `dtype` (None: keep
    the run's dtype; parameters stay float32 then). Parameter gradients are summed over the slices."""
    outs, qkv_grads, param_grads = [], [], None
    for (q, k, v), g in zip(slice_inputs, slice_grads):
        leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v, *params)]
        out = emim_reference(*leaves)
        grads = torch.autograd.grad(out, leaves, g.to(out.dtype))
        outs.append(out.detach())
        qkv_grads.append(grads[:3])
        param_grads = grads[3:] if param_grads is None else [a + b for a, b in zip(param_grads, grads[3:])]
    return outs, qkv_grads, param_grads


def run(args) -> dict:
    B, T, H, W, heads, D, K = args.shape
    dtype, device = DTYPES[args.dtype], args.device
    slices = slices_of(B, T)
    (q, k, v), params = random_inputs(args.shape, dtype, device, args.seed)
    result = dict(shape=dict(zip("B T H W heads D K".split(), args.shape)), elements_per_qkv=q.numel(),
                  past_2_31=q.numel() > 2 ** 31, dtype=args.dtype, backend=args.backend, device=str(device),
                  slices=[dict(b=b, t0=t0, output_frames=frames) for b, t0, frames in slices])

    # Upstream gradient: random on the comparable output frames of each slice, zero elsewhere.
    grad_out = torch.zeros_like(q)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    for b, _, frames in slices:
        grad_out[b, frames] = torch.randn(grad_out[b, frames].shape, generator=gen, device=device, dtype=dtype)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    out = emim_attention(q, k, v, *params, backend=args.backend)
    synchronize(device)
    result["forward_s"] = round(time.perf_counter() - start, 3)
    result["output_finite"] = bool(torch.isfinite(out).all())
    window = [(slice(b, b + 1), slice(t0, t0 + 2)) for b, t0, _ in slices]  # (1, 2, H, W, heads, D) each
    fused_out = [out[b, ts].detach().clone() for b, ts in window]
    start = time.perf_counter()
    grads = torch.autograd.grad(out, (q, k, v, *params), grad_out)
    synchronize(device)
    result["backward_s"] = round(time.perf_counter() - start, 3)
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 1)
    del out

    # The slices of everything the references need, then the full-size tensors can go.
    slice_inputs = [tuple(t[b, ts].detach().clone() for t in (q, k, v)) for b, ts in window]
    slice_grads = [grad_out[b, ts].clone() for b, ts in window]
    fused_qkv_grads = [tuple(g[b, ts].clone() for g in grads[:3]) for b, ts in window]
    fused_param_grads = grads[3:]
    stray = {}
    for name, g in zip("qkv", grads[:3]):  # exactly zero outside the slices (in place: g is not needed now)
        for b, ts in window:
            g[b, ts] = 0
        stray[name] = int(torch.count_nonzero(g))
    result["nonzero_gradients_outside_slices"] = stray
    del q, k, v, grads, grad_out, g

    exact_out, exact_qkv, exact_params = reference_on_slices(slice_inputs, params, slice_grads, torch.float64)
    ref_out, ref_qkv, ref_params = reference_on_slices(slice_inputs, params, slice_grads, None)

    def local(outs):  # the comparable output frames of each two-frame slice, concatenated
        return torch.cat([o[:, [t - t0 for t in frames]].flatten() for o, (_, t0, frames) in zip(outs, slices)])

    def qkv(grads_per_slice, i):
        return torch.cat([g[i].flatten() for g in grads_per_slice])

    pairs = {"out": (local(fused_out), local(ref_out), local(exact_out))}
    for i, name in enumerate("qkv"):
        pairs["d" + name] = (qkv(fused_qkv_grads, i), qkv(ref_qkv, i), qkv(exact_qkv, i))
    for name, fused, ref, exact in zip(INPUT_NAMES[3:], fused_param_grads, ref_params, exact_params):
        pairs["d" + name] = (fused, ref, exact)

    errors = {}
    for name, (fused, ref, exact) in pairs.items():
        reference_error = relative_error(ref, exact)
        bound = (FP32_KERNEL_RTOL if dtype == torch.float32
                 else low_precision_bound(reference_error, interpreted=args.interpreted))
        error = relative_error(fused, exact)
        errors[name] = dict(error=error, reference_error=reference_error, bound=bound, ok=error <= bound)
    result["errors"] = errors
    result["ok"] = (result["output_finite"] and not any(stray.values())
                    and all(e["ok"] for e in errors.values()))
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    result = run(args)
    if args.device.type == "cuda":
        import triton

        result.update(gpu=torch.cuda.get_device_name(args.device), torch=torch.__version__,
                      triton=triton.__version__)
    print(f"shape {args.shape} {args.dtype}: {result['elements_per_qkv']:,} elements per q/k/v "
          f"({'past' if result['past_2_31'] else 'below'} 2**31); backend {args.backend} on {args.device}; "
          f"forward {result['forward_s']} s, backward {result['backward_s']} s (first calls: compilation included)"
          + (f", peak {result['peak_memory_gib']} GiB" if "peak_memory_gib" in result else ""))
    print(f"slices (b, t0, compared output frames): {[tuple(s.values()) for s in result['slices']]}")
    print(f"output finite everywhere: {result['output_finite']}; non-zero q/k/v gradients outside the slices: "
          f"{result['nonzero_gradients_outside_slices']}")
    for name, e in result["errors"].items():
        print(f"  {name:4} relative error {e['error']:.2e}  (reference in {args.dtype}: {e['reference_error']:.2e},"
              f" bound {e['bound']:.2e})  {'ok' if e['ok'] else 'FAIL'}")
    print("all checks pass" if result["ok"] else "FAILED")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
