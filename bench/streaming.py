"""Frame-by-frame EMIM: the time and memory of one streaming step, against the whole-clip call.

    python bench/streaming.py --json streaming.json                    # GPU: bf16, fused op
    python bench/streaming.py --device cpu --small                     # CPU smoke run (reference)

For each case (an EMIM layer at a shape), a stream (`EMIM.stream()`) is fed the clip's frames one at a time;
the per-frame step (qkv projection of one frame, the op on one frame pair, the output projection) is timed
after warm-up, and the peak memory of the stream (what it caches between frames) is recorded, next to the
whole clip in one call. Both directions: "prev" (causal: frame t's output when frame t arrives) and "next"
(frame t-1's output when frame t arrives). The first outputs are checked against the whole-clip call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from emim_triton import EMIM
from emim_triton.bench_cli.timing import synchronize
from emim_triton.testing import relative_error

# (name, dim, heads, T, H, W): UniFormer-S16 stage 3 at 224 px, and a 64 x 64 generation latent
CASES = (("s16-stage3", 320, 5, 16, 14, 14), ("generation-64x64", 512, 8, 16, 64, 64))
SMALL_CASES = (("small", 32, 2, 4, 5, 6),)


def _peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def measure(name, dim, heads, T, H, W, *, direction, device, dtype, batch, window, repeats) -> dict:
    layer = EMIM(dim, heads, window=window, direction=direction).to(device=device, dtype=dtype).eval()
    clip = torch.randn(batch, T, H, W, dim, device=device, dtype=dtype)
    with torch.no_grad():
        whole = layer(clip)
        step_ms, outputs = [], []
        for _ in range(repeats):
            stream = layer.stream()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            outputs = []
            for t in range(T):
                synchronize(device)
                start = time.perf_counter()
                y = stream(clip[:, t])
                synchronize(device)
                step_ms.append((time.perf_counter() - start) * 1e3)
                if y is not None:
                    outputs.append(y)
            last = stream.flush() if direction == "next" else None
            if last is not None:
                outputs.append(last)
            peak = _peak_bytes(device)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            layer(clip)
        synchronize(device)
        whole_ms = (time.perf_counter() - start) * 1e3 / repeats
    streamed = torch.stack(outputs, dim=1)
    warm = step_ms[T:] or step_ms  # the first pass compiles and allocates
    return dict(case=name, direction=direction, batch=batch, frames=T, height=H, width=W, dim=dim, heads=heads,
                window=window, dtype=str(dtype).removeprefix("torch."), device=str(device),
                step_ms_median=statistics.median(warm), step_ms_p80=sorted(warm)[int(0.8 * (len(warm) - 1))],
                whole_clip_ms=whole_ms, whole_clip_ms_per_frame=whole_ms / T,
                stream_peak_mib=None if peak is None else (peak - base) / 2 ** 20,
                cache_elements=(3 if direction == "next" else 2) * batch * H * W * dim,
                rel_err_vs_whole_clip=relative_error(streamed.float(), whole.float()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                        help="default bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--window", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3, help="passes over the clip (the first is warm-up)")
    parser.add_argument("--small", action="store_true", help="one tiny case (a CPU smoke run)")
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU here")
    if args.batch < 1 or args.repeats < 2:
        parser.error("--batch must be >= 1 and --repeats >= 2")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    rows = []
    for case in (SMALL_CASES if args.small else CASES):
        for direction in ("prev", "next"):
            row = measure(*case, direction=direction, device=device, dtype=dtype, batch=args.batch,
                          window=args.window, repeats=args.repeats)
            rows.append(row)
            print(f"{row['case']:18} {direction:4}  step {row['step_ms_median']:.3f} ms (p80 "
                  f"{row['step_ms_p80']:.3f})  whole clip {row['whole_clip_ms_per_frame']:.3f} ms/frame  "
                  f"stream peak {row['stream_peak_mib'] if row['stream_peak_mib'] is None else round(row['stream_peak_mib'], 1)} MiB  "
                  f"rel err {row['rel_err_vs_whole_clip']:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1)
    bad = [r for r in rows if not r["rel_err_vs_whole_clip"] <= (1e-5 if dtype == torch.float32 else 2e-2)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
