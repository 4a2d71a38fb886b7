"""The main job: EMIM vs its no-EMIM twin on the generated motion dataset, on a CPU, in about ten minutes.

    python -m emim_triton.train.emim_vs_twin            (what scripts/demo.sh runs)

1. Generate the motion-sensitive dataset (`emim_triton.data.motion`: classes that differ only in how an
   object moves) as real WebM files with SSv2-style annotations, unless it is already on disk.
2. Train `emim_uniformer_xt` and `uniformer_xt` — the same backbone, except that EMIM replaces global
   attention in every other attention block — with the same recipe (``motion_xt``), budget and seed, each
   through the ordinary trainer (``python -m emim_triton.train``) in its own process. With two or more CPU
   cores they run side by side, one thread each (on small models one thread per run wastes far less
   than two runs sharing threads).
3. Print and plot the comparison: validation top-1, parameters, training and wall time.

Each run's full output is in ``<out>/<model>/`` (log, curves, confusion summary, checkpoints, stdout.log).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from emim_triton.data import motion

from .logger import read_log
from .plots import plot_runs

MODELS = ("emim_uniformer_xt", "uniformer_xt")
DEMO_CLASSES = 4  # left/right and clockwise/counterclockwise; measured: 6 or more stay near chance in budget
DEMO_TRAIN, DEMO_VAL = 800, 200  # 100 steps of 8 per epoch: both runs fit in about 9 minutes on 2 cores


def _emim_blocks(model_name: str) -> int:
    import torch

    from emim_triton import EMIM
    from emim_triton.models import create_model

    with torch.device("meta"):  # no memory, no time: only the structure is needed
        model = create_model(model_name, num_classes=2, attn_backend="reference")
    return sum(isinstance(m, EMIM) for m in model.modules())


def _train_command(model: str, data: str, run_dir: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "emim_triton.train", "--config", "motion_xt", "--model", model,
            "--data-root", os.path.join(data, "videos"),
            "--train-list", os.path.join(data, "something-something-v2-train.json"),
            "--val-list", os.path.join(data, "something-something-v2-validation.json"),
            "--labels-file", os.path.join(data, "something-something-v2-labels.json"),
            "--run-dir", run_dir, "--no-progress", *extra]


def _status(run_dir: str) -> str:
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(path):
        return "starting"
    records = read_log(path)
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    text = f"epoch {train[-1]['epoch']} step {train[-1]['step']} loss {train[-1]['loss']:.3f}" if train else "starting"
    return text + (f" val top-1 {val[-1]['top1']:.1f}" if val else "")


def run_all(models, data: str, out: str, extra: list[str], parallel: bool) -> dict[str, dict]:
    """Train every model (side by side when `parallel`); returns model -> results.json plus timing."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1") if parallel else dict(os.environ)
    pending = list(models)
    running: dict[str, tuple[subprocess.Popen, float, object]] = {}
    timing: dict[str, float] = {}
    last_report = time.time()
    while pending or running:
        while pending and (parallel or not running):
            model = pending.pop(0)
            run_dir = os.path.join(out, model)
            os.makedirs(run_dir, exist_ok=True)
            log = open(os.path.join(run_dir, "stdout.log"), "w")
            command = _train_command(model, data, run_dir, extra)
            print(f"[{model}] " + " ".join(command[1:]), flush=True)
            running[model] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env),
                              time.time(), log)
        time.sleep(1.0)
        for model, (process, started, log) in list(running.items()):
            if process.poll() is not None:
                log.close()
                timing[model] = time.time() - started
                del running[model]
                if process.returncode != 0:
                    tail = open(os.path.join(out, model, "stdout.log")).read()[-3000:]
                    raise RuntimeError(f"training {model} failed (exit {process.returncode}):\n{tail}")
                print(f"[{model}] done in {timing[model]:.0f} s", flush=True)
        if time.time() - last_report > 20 and running:
            last_report = time.time()
            print(" | ".join(f"[{m}] {_status(os.path.join(out, m))}" for m in running), flush=True)
    results = {}
    for model in models:
        with open(os.path.join(out, model, "results.json")) as handle:
            results[model] = dict(json.load(handle), process_time_s=round(timing[model], 1))
    return results


def motion_share(run_dir: str, clips: int = 16) -> list[float]:
    """How much each EMIM block's output comes from its motion features, on validation clips.

    EMIM's output is proj(context + motion); the motion MLP starts at exactly zero, so this says whether
    training made the motion branch matter: ||proj(c + m) - proj(c)|| / ||proj(c) - proj bias|| per block,
    i.e. the ratio of the projected motion and context terms (`EMIM.context_and_motion`).
    """
    import torch

    from emim_triton import EMIM

    from . import checkpoint as ckpt
    from .config import from_plain
    from .setup import build_data, build_model

    state = ckpt.load(os.path.join(run_dir, ckpt.BEST))
    cfg = from_plain(state["config"])
    cfg.attn_backend = "reference"  # measured on the CPU, whatever the run trained with
    classes, datasets = build_data(cfg, ("val",))
    model = build_model(cfg, len(classes), with_pretrained=False)
    model.load_state_dict(state["ema"]["module"] if state.get("ema") else state["model"])
    model.eval()
    inputs: dict[EMIM, tuple] = {}

    def keep_inputs(module, args, kwargs, output):
        inputs[module] = (args, kwargs)  # returns None: the output is left as it is

    hooks = [m.register_forward_hook(keep_inputs, with_kwargs=True) for m in model.modules() if isinstance(m, EMIM)]
    dataset = datasets["val"]
    batch = torch.stack([dataset[i]["clip"] for i in range(min(clips, len(dataset)))])
    shares = []
    with torch.no_grad():
        model(batch)
        for hook in hooks:
            hook.remove()
        for module, (args, kwargs) in inputs.items():
            context, motion = module.context_and_motion(*args, **kwargs)
            projected = [torch.nn.functional.linear(part.flatten(-2), module.proj.weight) for part in (context, motion)]
            shares.append(float(projected[1].norm() / projected[0].norm()))
    return shares


def table(results: dict[str, dict]) -> str:
    lines = ["| model | EMIM blocks | params | val top-1 (%) | best top-1 (%) | val top-5 (%) | train time (s) "
             "| run wall time (s) |", "|---|---|---|---|---|---|---|---|"]
    for model, r in results.items():
        final = r["final"]
        lines.append(f"| {model} | {r['emim_blocks']} | {r['params'] / 1e6:.3f} M | {final['top1']:.1f} | "
                     f"{r['best_top1']:.1f} | {final['top5']:.1f} | {r['train_time_s']:.0f} | "
                     f"{r['process_time_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Arguments after -- go to every training run, e.g. -- --epochs 4")
    parser.add_argument("--data", default="data/motion", help="dataset directory (generated if missing)")
    parser.add_argument("--out", default="runs/motion_compare", help="output directory (runs are redone)")
    parser.add_argument("--train-clips", type=int, default=DEMO_TRAIN)
    parser.add_argument("--val-clips", type=int, default=DEMO_VAL)
    parser.add_argument("--classes", type=int, default=DEMO_CLASSES,
                        help=f"use the first N of the {len(motion.CLASSES)} motion classes (default {DEMO_CLASSES}: "
                             f"what the tiny models learn within the ten-minute CPU budget)")
    parser.add_argument("--seed", type=int, default=0, help="seed of both runs")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the generated dataset")
    parser.add_argument("--sequential", action="store_true", help="one run after the other (all threads each)")
    parser.add_argument("--models", nargs=2, default=list(MODELS), metavar=("EMIM_MODEL", "TWIN_MODEL"))
    args, extra = parser.parse_known_args(argv)
    extra = [e for e in extra if e != "--"] + ["--seed", str(args.seed)]

    started = time.time()
    load_start = os.getloadavg()
    motion.generate(args.data, args.train_clips, args.val_clips, seed=args.data_seed, num_classes=args.classes)
    generated = time.time() - started
    for model in args.models:  # fresh runs: stale checkpoints would be resumed and distort the timing
        shutil.rmtree(os.path.join(args.out, model), ignore_errors=True)
    parallel = not args.sequential and (os.cpu_count() or 1) >= 2
    results = run_all(args.models, args.data, args.out, extra, parallel)
    for model, r in results.items():
        r["emim_blocks"] = _emim_blocks(model)
        if r["emim_blocks"]:
            r["motion_share"] = [round(x, 4) for x in motion_share(os.path.join(args.out, model))]
    total = time.time() - started
    load_end = os.getloadavg()

    summary = table(results)
    setting = (f"{args.classes} classes, {args.train_clips} training / {args.val_clips} validation clips; "
               f"{'both runs side by side, 1 thread each' if parallel else 'runs one after the other'} on "
               f"{os.cpu_count()} CPU cores; data generation {generated:.0f} s; total wall time {total:.0f} s; "
               f"load average (1 min) {load_start[0]:.2f} at start, {load_end[0]:.2f} at end")
    shares = {m: r["motion_share"] for m, r in results.items() if r.get("motion_share")}
    if shares:
        setting += "; EMIM motion features / attention context at the output of each EMIM block (best weights, " \
                   "validation clips; 0 at initialisation): " + "; ".join(
                       f"{m}: " + ", ".join(f"{x:.3f}" for x in v) for m, v in shares.items())
    print("\n" + summary + "\n\n" + setting)
    os.makedirs(args.out, exist_ok=True)
    plot = plot_runs({m: os.path.join(args.out, m) for m in args.models}, os.path.join(args.out, "comparison.png"),
                     "EMIM vs no-EMIM twin, motion dataset",
                     {m: dict(top1=r["final"]["top1"], params=r["params"], wall_s=r["process_time_s"])
                      for m, r in results.items()})
    with open(os.path.join(args.out, "comparison.md"), "w") as handle:
        handle.write(summary + "\n\n" + setting + "\n")
    with open(os.path.join(args.out, "comparison.json"), "w") as handle:
        json.dump(dict(results=results, setting=setting, total_wall_time_s=round(total, 1),
                       generation_s=round(generated, 1), load_average=[load_start, load_end]), handle, indent=1)
    print(f"curves: {plot}; table: {os.path.join(args.out, 'comparison.md')}")


if __name__ == "__main__":
    main()
