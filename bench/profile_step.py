"""Where the time of one training step of a model-zoo model goes on a GPU: the top CUDA kernels.

    python bench/profile_step.py uniformer_s16 --batch 8

The step of bench/models_gpu.py (bf16 autocast, forward + loss + backward + AdamW) with the trainer's
backend flags (cuDNN's autotuner on), two warm-up steps, then one profiled step; prints the cuDNN version
and those flags, then torch.profiler's table sorted by CUDA time.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from emim_triton.models import create_model
from models_gpu import set_up_like_the_trainer, training_step  # bench/ is on sys.path when this script runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args(argv)
    print("backends:", set_up_like_the_trainer(), flush=True)
    model = create_model(args.model, num_classes=174).cuda()
    x = torch.randn(args.batch, 3, args.frames, args.size, args.size, device="cuda")
    y = torch.randint(0, 174, (args.batch,), device="cuda")
    step = training_step(model, lambda m, inputs, labels: F.cross_entropy(m(inputs), labels), x, y)
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        step()
        torch.cuda.synchronize()
    print(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
