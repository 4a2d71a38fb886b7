"""Training-step time of whole models on a GPU: EMIM models against the same model without EMIM.

Two comparisons (GPU only; nothing here runs in the test suite):

* ``uniformer``: emim_uniformer_s16 against uniformer_s16 (model zoo), and
* ``videomae``: a randomly initialised VideoMAE-B (Hugging Face config defaults: 12 layers, 768 wide,
  12 heads, 16 x 224 x 224, tubelet 2, patch 16 -> token grid (8, 14, 14)) before and after
  ``convert_to_emim(model, (8, 14, 14), every=2, window=7)``: six of its twelve attention layers become
  EMIM (fused kernels); the others keep Hugging Face's attention (SDPA).

One training step = forward + loss + backward + AdamW step under bf16 autocast, the way `emim-train`
runs, with the trainer's backend flags (`set_up_like_the_trainer`: cuDNN's autotuner on); the cuDNN
version and those flags go into the JSON, since they decide which convolution kernels run. Median over
`--steps` timed steps after `--warmup` untimed ones (CUDA events), plus the peak memory of a step. Usage::

    python bench/models_gpu.py --json bench/results/models-h200.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def set_up_like_the_trainer() -> dict:
    """Set the global backend flags as `emim-train` does on a GPU (emim_triton/train/trainer.py: cuDNN's
    autotuner on; the TF32 switches left at PyTorch's defaults) and return them with the cuDNN version.

    cudnn.benchmark matters here: without it cuDNN takes its heuristic's first algorithm, and a benchmark
    would time convolution kernels the trainer never runs."""
    torch.backends.cudnn.benchmark = True
    return dict(cudnn=torch.backends.cudnn.version(), cudnn_benchmark=torch.backends.cudnn.benchmark,
                cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)


def training_step(model, loss_fn, inputs, labels):
    """A callable running one training step as emim-train does: bf16 autocast forward and loss, backward,
    fused AdamW; returns the loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model, inputs, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step


def time_training_step(model, inputs, labels, loss_fn, steps: int, warmup: int) -> dict:
    step = training_step(model, loss_fn, inputs, labels)
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    batch = inputs.shape[0]
    median = statistics.median(times)
    return dict(step_ms=round(median, 2), step_ms_min=round(min(times), 2), clips_per_s=round(batch * 1e3 / median, 1),
                peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), final_loss=float(loss.detach()),
                batch=batch)


def uniformer(batch: int, steps: int, warmup: int) -> dict:
    from emim_triton.models import create_model

    results = {}
    for name in ("emim_uniformer_s16", "uniformer_s16"):
        torch.manual_seed(0)
        model = create_model(name, num_classes=174).cuda()
        params = sum(p.numel() for p in model.parameters())
        clips = torch.randn(batch, 3, 16, 224, 224, device="cuda")
        labels = torch.randint(0, 174, (batch,), device="cuda")
        results[name] = dict(params=params, **time_training_step(
            model, clips, labels, lambda m, x, y: F.cross_entropy(m(x), y), steps, warmup))
        print(name, results[name], flush=True)
        del model
        torch.cuda.empty_cache()
    return results


def videomae(batch: int, steps: int, warmup: int) -> dict:
    import transformers

    from emim_triton import convert_to_emim

    results = {}
    for converted in (False, True):
        torch.manual_seed(0)
        config = transformers.VideoMAEConfig(num_labels=174)  # ViT-B defaults, 16 x 224 x 224
        model = transformers.VideoMAEForVideoClassification(config)
        if converted:
            report = convert_to_emim(model, (8, 14, 14), every=2, window=7, backend="triton")
            print(report, flush=True)
        model = model.cuda()
        params = sum(p.numel() for p in model.parameters())
        clips = torch.randn(batch, 16, 3, 224, 224, device="cuda")  # VideoMAE takes (B, T, C, H, W)
        labels = torch.randint(0, 174, (batch,), device="cuda")
        name = "videomae_b_emim_every2" if converted else "videomae_b"
        results[name] = dict(params=params, attn_implementation=str(model.config._attn_implementation),
                             **time_training_step(model, clips, labels,
                                                  lambda m, x, y: m(pixel_values=x, labels=y).loss, steps, warmup))
        print(name, results[name], flush=True)
        del model
        torch.cuda.empty_cache()
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--which", default="uniformer,videomae", help="comma-separated: uniformer, videomae")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("models_gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    backends = set_up_like_the_trainer()
    print("backends:", backends, flush=True)
    out = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               **backends, date=time.strftime("%Y-%m-%d"), batch=args.batch, steps=args.steps, warmup=args.warmup,
               amp="bf16 autocast", command=" ".join(["python bench/models_gpu.py", *(argv or sys.argv[1:])]))
    for which in args.which.split(","):
        out[which] = {"uniformer": uniformer, "videomae": videomae}[which](args.batch, args.steps, args.warmup)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(out, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
