"""The training loop: epochs of optimizer steps, evaluation, checkpoints, exact resumption, clean stops.

State between optimizer steps is all there is to save: model, optimizer, scaler, EMA, counters, RNG. A
checkpoint is only ever taken at such a boundary, so a run stopped at any point and resumed from its last
checkpoint repeats exactly what the uninterrupted run did from there (on CPU, bit for bit):

- data order is a function of (seed, epoch) and the position inside the epoch (`ShardedSampler`);
- augmentation is a function of (seed, epoch, sample) (`ClipDataset`), mixup of (seed, rank, step);
- drop-path draws from the global torch RNG, whose state is saved per rank;
- the learning rate is a function of the step.

SIGTERM / SIGINT (cluster pre-emption, Ctrl-C) only raise a flag; the loop checks it after every step (all
ranks agree through an all-reduce), writes a checkpoint and leaves with exit status 128 + signal. A second
Ctrl-C aborts at once.

A kill that no handler sees (SIGKILL, a node failure) can fall at any instant. The trainer holds the run
directory's lock for its whole life and writes every file whole or not at all (`rundir`); last.pt is the
state of the run and is written first, and what is derived from it (best.pt, bad_videos.txt) is restored
from it on resumption.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import time

import numpy as np
import torch
import torch.nn as nn

from emim_triton.data.seeding import derive_seed, generator

from . import checkpoint as ckpt
from . import rundir
from .config import ConfigError, TrainConfig, config_text, to_plain
from .distributed import Dist, all_gather_objects, any_true, barrier
from .ema import ModelEMA
from .evaluate import EvaluationInterrupted, evaluate
from .logger import Progress, RunLogger, Throughput
from .metrics import write_confusion
from .mixup import Mixer, soft_cross_entropy
from .optim import build_optimizer, lr_at, peak_lr, set_lr
from .plots import plot_run
from .setup import build_data, build_model, make_loader

# Options that only steer how a run is executed, not what it computes: changing them on resumption is
# expected and not worth a warning.
_RUN_CONTROL = {"resume", "auto_resume", "stop_after", "checkpoint_every", "num_workers", "progress",
                "log_every", "tensorboard", "test", "decode_threads", "device"}


class Stopped(Exception):
    """The run stopped early after writing a checkpoint; `exit_code` says why (0: stop_after)."""

    def __init__(self, exit_code: int):
        super().__init__(exit_code)
        self.exit_code = exit_code


class Trainer:
    def __init__(self, cfg: TrainConfig, dist: Dist):
        self.cfg, self.dist = cfg, dist
        self.device = dist.device
        self.started = time.time()
        self.stop_signal: int | None = None  # set by the SIGTERM/SIGINT handler during fit()
        self.lock = None  # rank 0's claim on the run directory, released by close()
        busy = None
        if dist.is_main:
            try:
                self.lock = rundir.claim(cfg.run_dir)
            except rundir.RunDirBusy as error:
                busy = error
        if any_true(busy is not None, self.device):  # all ranks leave, not only rank 0
            raise busy or rundir.RunDirBusy(f"run_dir = {cfg.run_dir!r}: in use by another emim-train process "
                                            f"(rank 0 could not lock it)")
        try:
            self._build()
        except BaseException:
            self.close()  # no Trainer to close() for the caller: the lock must not outlive this failure
            raise

    def _build(self) -> None:
        cfg, dist = self.cfg, self.dist
        # before the data and the model, which take time: a --test without weights fails at once
        self.test_weights = self._test_weights() if cfg.test else None
        self.log = RunLogger(cfg.run_dir, dist.is_main, cfg.tensorboard)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        splits = ("test",) if cfg.test else ("train", "val")
        self.classes, self.datasets = build_data(cfg, splits)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = build_model(cfg, len(self.classes), with_pretrained=True).to(self.device)
        self.params = sum(p.numel() for p in self.model.parameters())
        # from here on each rank draws its own drop-path masks; python's and numpy's global generators are
        # seeded too, for any library code that uses them (and so that checkpoints restore a known state)
        torch.manual_seed(derive_seed(cfg.seed, "train", dist.rank))
        random.seed(derive_seed(cfg.seed, "python", dist.rank))
        np.random.seed(derive_seed(cfg.seed, "numpy", dist.rank) % 2**32)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=dtype)) if dtype else contextlib.nullcontext
        if not cfg.test:
            self._setup_training()

    # ---------------------------------------------------------------------------------------- set-up
    def _setup_training(self) -> None:
        cfg, dist = self.cfg, self.dist
        train = self.datasets["train"]
        shard = math.ceil(len(train) / dist.world_size)
        self.steps_per_epoch = shard // cfg.batch_size // cfg.accum_steps
        if self.steps_per_epoch < 1:
            raise ValueError(f"the training set has {len(train)} clips, {shard} per process: not enough for one "
                             f"step of batch_size {cfg.batch_size} x accum_steps {cfg.accum_steps}")
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = round(cfg.warmup_epochs * self.steps_per_epoch)
        self.global_batch, self.peak_lr = peak_lr(cfg, dist.world_size)
        self.train_loader = make_loader(train, cfg, dist, train=True,
                                        length=self.steps_per_epoch * cfg.accum_steps * cfg.batch_size)
        self.val_loader = make_loader(self.datasets["val"], cfg, dist, train=False)

        if cfg.sync_bn and dist.enabled:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.optimizer = build_optimizer(self.model, lr=self.peak_lr, weight_decay=cfg.weight_decay,
                                         betas=cfg.betas, lr_mult=cfg.lr_mult)
        self.ema = ModelEMA(self.model, cfg.ema_decay) if cfg.ema else None
        self.scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
        self.net = (nn.parallel.DistributedDataParallel(self.model, device_ids=[self.device.index]
                                                        if self.device.type == "cuda" else None)
                    if dist.enabled else self.model)
        self.mixer = Mixer(len(self.classes), cfg.mixup, cfg.cutmix, cfg.mixup_prob, cfg.mixup_switch_prob,
                           cfg.label_smoothing)

        self.epoch = 0            # completed epochs
        self.step_in_epoch = 0    # optimizer steps done in the current epoch
        self.global_step = 0
        self.best_metric, self.best_epoch = -math.inf, 0
        self.bad_videos: set[str] = set()
        self.train_time = 0.0
        self.last_metrics: dict = {}

        resume = cfg.resume or (ckpt.find_resume(cfg.run_dir) if cfg.auto_resume else None)
        if resume:
            self._resume(resume)
        if dist.is_main:
            # Whole or not at all, like every file of the run directory (rundir.write_text).
            rundir.write_text(os.path.join(cfg.run_dir, "config.yaml"), config_text(cfg))
            missing = [p for d in self.datasets.values() for p in d.missing]
            if missing:
                rundir.write_text(os.path.join(cfg.run_dir, "missing_videos.txt"), "".join(p + "\n" for p in missing))

    def _resume(self, path: str) -> None:
        state = ckpt.load(path)
        saved = state["config"]
        if saved.get("model") != self.cfg.model:
            raise ckpt.CheckpointError(f"{path} is a checkpoint of {saved.get('model')!r}, not of {self.cfg.model!r}")
        changed = sorted(k for k, v in to_plain(self.cfg).items()
                         if k not in _RUN_CONTROL and k in saved and saved[k] != v)
        if changed:
            self.log.print(f"warning: resuming {path} with changed options: "
                           + ", ".join(f"{k} {saved[k]!r} -> {getattr(self.cfg, k)!r}" for k in changed))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step = state["global_step"]
        self.best_metric, self.best_epoch = state["best_metric"], state["best_epoch"]
        self.bad_videos = set(state["bad_videos"])
        self.train_time = state["train_time"]
        self.last_metrics = dict(state.get("last_metrics", {}))
        if len(state["rng"]) == self.dist.world_size:
            ckpt.set_rng_state(state["rng"][self.dist.rank])
        else:
            self.log.print(f"warning: {path} was written by {len(state['rng'])} processes, this run has "
                           f"{self.dist.world_size}: random streams restart, the run is not an exact continuation")
        self.log.truncate_after(self.global_step, self.epoch)
        self.log.print(f"resumed from {path}: epoch {self.epoch}, step {self.global_step}")
        if self.dist.is_main:
            self._restore_best(path, state)
            self._write_bad_videos()

    def _restore_best(self, path: str, state: dict) -> None:
        """Write best.pt again if a kill fell between the writes of last.pt and best.pt.

        The best checkpoint is the state at the end of its epoch, so a checkpoint taken at that very point
        (epoch == best_epoch, no step into the next) is the best one, whatever happened to best.pt since.
        """
        if not state["best_epoch"]:
            return  # no validation yet
        best = os.path.join(self.cfg.run_dir, ckpt.BEST)
        try:
            best_epoch = ckpt.load(best, mmap=True)["epoch"] if os.path.isfile(best) else None
        except ckpt.CheckpointError:
            best_epoch = None
        if best_epoch is not None and best_epoch >= state["best_epoch"]:
            return
        if (state["epoch"], state["step_in_epoch"]) == (state["best_epoch"], 0):
            ckpt.save(state, best)
            self.log.print(f"{best} restored from {path} (epoch {state['best_epoch']}, the best)")
        else:
            self.log.print(f"warning: {best} does not hold the best epoch {state['best_epoch']} that {path} "
                           f"records, and {path} (epoch {state['epoch']}) cannot replace it")

    # ------------------------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        """The checkpoint contents; collective (every rank's RNG and failed videos are gathered)."""
        rng = all_gather_objects(ckpt.rng_state())
        self.bad_videos = set().union(*all_gather_objects(self.bad_videos))
        return dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                    scaler=self.scaler.state_dict() if self.scaler else None,
                    ema=self.ema.state_dict() if self.ema else None,
                    epoch=self.epoch, step_in_epoch=self.step_in_epoch, global_step=self.global_step,
                    best_metric=self.best_metric, best_epoch=self.best_epoch, rng=rng,
                    bad_videos=sorted(self.bad_videos), train_time=self.train_time,
                    last_metrics=self.last_metrics, config=to_plain(self.cfg), world_size=self.dist.world_size)

    def save(self, best: bool = False) -> None:
        state = self._state()
        if self.dist.is_main:
            ckpt.save(state, os.path.join(self.cfg.run_dir, ckpt.LAST))
            if best:  # after last.pt, never before: see _restore_best
                ckpt.save(state, os.path.join(self.cfg.run_dir, ckpt.BEST))
            self._write_bad_videos()
        barrier()

    def _write_bad_videos(self) -> None:
        rundir.write_text(os.path.join(self.cfg.run_dir, "bad_videos.txt"),
                          "".join(p + "\n" for p in sorted(self.bad_videos)))

    # ----------------------------------------------------------------------------------------- signals
    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: leave now, without a checkpoint
        self.stop_signal = signum
        self.log.print(f"\n{signal.Signals(signum).name}: checkpointing at the end of this step, then stopping")

    def _should_stop(self) -> int | None:
        """Exit code if the run must stop now (agreed across ranks), else None."""
        limit = self.cfg.stop_after is not None and self.global_step >= self.cfg.stop_after
        if not any_true(self.stop_signal is not None or limit, self.device):
            return None
        return 128 + self.stop_signal if self.stop_signal is not None else 0

    def close(self) -> None:
        """Shut the data loaders' persistent worker processes down now, not at interpreter exit, then
        release the run directory.

        A stop leaves the training loader mid-epoch with batches in flight. Left to interpreter exit,
        persistent workers with pinned memory (the GPU setting) are known to shut down slowly, about 5 s per
        worker (pytorch/pytorch#81794). On an H200 machine, twice, a run stopped by --stop-after wrote its
        checkpoint and had not exited 15-60 s later, when its time limit ended it; this is the suspected
        cause, not yet re-checked on a GPU. The persistent iterator lives in the loader, so it is shut down
        there; calling this twice is harmless.
        """
        for loader in (getattr(self, "train_loader", None), getattr(self, "val_loader", None)):  # --test: none
            iterator = getattr(loader, "_iterator", None)  # DataLoader keeps its persistent iterator here
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
                loader._iterator = None
        rundir.release(self.lock)

    # -------------------------------------------------------------------------------------- training
    def fit(self) -> dict:
        cfg = self.cfg
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        self.log.print(f"{cfg.model}: {self.params / 1e6:.2f} M parameters | {len(self.datasets['train'])} training "
                       f"clips, {len(self.datasets['val'])} validation | {self.dist.world_size} process(es) on "
                       f"{self.device.type}, global batch {self.global_batch}, peak lr {self.peak_lr:.3g}, "
                       f"{self.steps_per_epoch} steps/epoch, {cfg.amp}")
        try:
            code = self._should_stop()  # e.g. stop_after already reached by the resumed checkpoint
            if code is not None:
                raise Stopped(code)
            while self.epoch < cfg.epochs:
                self._train_epoch()
                completed = self.epoch + 1
                improved = False
                if completed % cfg.eval_every == 0 or completed == cfg.epochs:
                    improved = self._validate(completed)
                self.epoch, self.step_in_epoch = completed, 0
                self.save(best=improved)
            return self._finish()
        except Stopped:
            self.log.print(f"stopped at step {self.global_step}; checkpoint {os.path.join(cfg.run_dir, ckpt.LAST)} "
                           f"(the same command resumes)")
            raise
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.log.close()

    def _stop_now(self) -> None:
        code = self._should_stop()
        if code is not None:
            self.save()
            raise Stopped(code)

    def _train_epoch(self) -> None:
        cfg = self.cfg
        remaining = self.steps_per_epoch - self.step_in_epoch
        if remaining <= 0:
            return
        samples_done = self.step_in_epoch * cfg.accum_steps * cfg.batch_size
        self.train_loader.sampler.set_epoch(self.epoch, start=samples_done)
        self.net.train()
        batches = iter(self.train_loader)
        progress = Progress(self.steps_per_epoch, self.step_in_epoch, f"epoch {self.epoch + 1}/{cfg.epochs}",
                            self.dist.is_main and cfg.progress, cfg.log_every)
        throughput, losses = Throughput(), []
        throughput.mark(0)
        try:
            while self.step_in_epoch < self.steps_per_epoch:
                tic = time.perf_counter()
                loss, grad_norm, bad = self._step(batches)
                self.train_time += time.perf_counter() - tic
                self.bad_videos.update(self.datasets["train"].records[i].path for i in bad)
                losses.append(loss)
                throughput.mark(self.global_batch)
                remaining = self.total_steps - self.global_step
                progress.update(f"loss {loss:.3f} lr {lr_at(self.global_step - 1, **self._schedule()):.2e} "
                                f"{throughput.clips_per_second():.1f} clips/s eta {throughput.eta(remaining)}")
                if self.global_step % cfg.log_every == 0 or self.step_in_epoch == self.steps_per_epoch:
                    self.log.log("train", self.epoch + 1, self.global_step, loss=sum(losses) / len(losses),
                                 lr=lr_at(self.global_step - 1, **self._schedule()), grad_norm=grad_norm,
                                 clips_per_s=round(throughput.clips_per_second(), 2), bad_videos=len(self.bad_videos))
                    losses = []
                if cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0:
                    self.save()
                self._stop_now()
        finally:
            progress.close()

    def _schedule(self) -> dict:
        return dict(peak=self.peak_lr, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                    warmup_lr=self.cfg.warmup_lr, min_lr=self.cfg.min_lr)

    def _step(self, batches) -> tuple[float, float, list[int]]:
        """One optimizer step over accum_steps micro-batches: (mean loss, gradient norm, failed videos)."""
        cfg = self.cfg
        set_lr(self.optimizer, lr_at(self.global_step, **self._schedule()))
        total, bad = 0.0, []
        for micro in range(cfg.accum_steps):
            batch = next(batches)
            bad += batch["bad"]
            clips = batch["clip"].to(self.device, non_blocking=True)
            labels = batch["label"].to(self.device, non_blocking=True)
            clips, targets = self.mixer(clips, labels, generator(cfg.seed, "mix", self.dist.rank, self.global_step, micro))
            # gradients are all-reduced once per optimizer step, on the last micro-batch
            last = micro == cfg.accum_steps - 1
            sync = self.net.no_sync() if self.dist.enabled and not last else contextlib.nullcontext()
            with sync:
                with self.autocast():
                    logits = self.net(clips)
                loss = soft_cross_entropy(logits, targets) / cfg.accum_steps
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.item()
        if not math.isfinite(total) and self.scaler is None:
            raise FloatingPointError(f"loss is {total} at step {self.global_step} (lr "
                                     f"{lr_at(self.global_step, **self._schedule()):.3g}); lower the lr or use fp32")
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad or math.inf)
        if self.scaler:
            self.scaler.step(self.optimizer)  # skipped when the fp16 gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.global_step += 1
        self.step_in_epoch += 1
        return total, float(grad_norm), bad

    # ------------------------------------------------------------------------------------ evaluation
    def _eval_stop_check(self, dataset):
        """Collective stop check for evaluation, asked only for batches every rank has (shards differ by one
        sample, so a rank may run one batch more, and a collective there would wait forever)."""
        common = (len(dataset) // self.dist.world_size) // self.cfg.batch_size

        def should_stop(number: int) -> bool:
            if number >= common:
                return False
            return any_true(self.stop_signal is not None, self.device)

        return should_stop

    def _run_eval(self, model, loader, dataset, description: str):
        progress = Progress(len(loader), 0, description, self.dist.is_main and self.cfg.progress, self.cfg.log_every)
        try:
            return evaluate(model, loader, dataset, self.dist, self.device, len(self.classes), self.autocast,
                            self._eval_stop_check(dataset), progress)
        finally:
            progress.close()

    def _validate(self, epoch: int) -> bool:
        """Clip-level validation (model, and EMA if any); True if the tracked metric improved."""
        dataset = self.datasets["val"]
        try:
            # the unwrapped model: DDP's forward broadcasts buffers, a collective that ranks with one batch
            # more than the others would wait on forever
            metrics, matrix, bad = self._run_eval(self.model, self.val_loader, dataset, f"val {epoch}")
            if self.ema is not None:
                ema_metrics, ema_matrix, _ = self._run_eval(self.ema.module, self.val_loader, dataset, f"val EMA {epoch}")
                metrics.update({f"ema_{k}": v for k, v in ema_metrics.items() if k in ("top1", "top5", "loss")})
                matrix = ema_matrix
        except EvaluationInterrupted:
            self._stop_now()
            raise
        self.bad_videos.update(dataset.records[i].path for i in bad)
        tracked = metrics["ema_top1"] if self.ema is not None else metrics["top1"]
        improved = tracked > self.best_metric
        if improved:
            self.best_metric, self.best_epoch = tracked, epoch
        self.last_metrics = metrics
        self.log.log("val", epoch, self.global_step, **metrics)
        self.log.print(f"epoch {epoch}: val top-1 {metrics['top1']:.2f} top-5 {metrics['top5']:.2f} loss "
                       f"{metrics['loss']:.3f}" + (f" | EMA top-1 {metrics['ema_top1']:.2f}" if self.ema else "")
                       + f" | best {self.best_metric:.2f} (epoch {self.best_epoch})")
        if self.dist.is_main:
            run = self.cfg.run_dir
            write_confusion(matrix, self.classes, os.path.join(run, "confusion_val.csv"),
                            os.path.join(run, "per_class_val.csv"))
        return improved

    def _finish(self) -> dict:
        results = dict(model=self.cfg.model, params=self.params, epochs=self.cfg.epochs, steps=self.global_step,
                       world_size=self.dist.world_size, global_batch=self.global_batch, device=self.device.type,
                       final=self.last_metrics, best_top1=self.best_metric, best_epoch=self.best_epoch,
                       train_time_s=round(self.train_time, 1),
                       clips_per_s=round(self.global_step * self.global_batch / max(self.train_time, 1e-9), 2),
                       bad_videos=len(self.bad_videos), wall_time_s=round(time.time() - self.started, 1))
        if self.dist.is_main:
            rundir.write_text(os.path.join(self.cfg.run_dir, "results.json"), json.dumps(results, indent=1))
            try:
                plot_run(self.cfg.run_dir)
            except ImportError:
                self.log.print("matplotlib is not installed: no curves.png")
        return results

    # ------------------------------------------------------------------------------------------ test
    def _test_weights(self) -> str | None:
        """The checkpoint --test evaluates: --resume, else the run's best.pt, else its last.pt; None: the
        --pretrained weights the model was built with."""
        cfg = self.cfg
        path = cfg.resume or next((p for p in (os.path.join(cfg.run_dir, ckpt.BEST), os.path.join(cfg.run_dir, ckpt.LAST))
                                   if os.path.isfile(p)), None)
        if path is None and not cfg.pretrained:
            raise ConfigError(f"test = True: --test needs weights: --resume CHECKPOINT, a run directory with "
                              f"best.pt/last.pt (none in {cfg.run_dir}), or --pretrained")
        return path

    def test(self) -> dict:
        """Multi-view video-level accuracy on the test split with the chosen checkpoint."""
        cfg = self.cfg
        path = self.test_weights
        if path:
            state = ckpt.load(path)
            use_ema = bool(state.get("ema"))
            self.model.load_state_dict(state["ema"]["module"] if use_ema else state["model"])
            source = f"{path} ({'EMA' if use_ema else 'model'} weights)"
        else:
            source = cfg.pretrained
        dataset = self.datasets["test"]
        loader = make_loader(dataset, cfg, self.dist, train=False)
        metrics, matrix, bad = self._run_eval(self.model, loader, dataset, "test")
        metrics.update(checkpoint=source, clips=dataset.clips, crops=dataset.crops,
                       bad_videos=[dataset.records[i].path for i in bad])
        if self.dist.is_main:
            rundir.write_text(os.path.join(cfg.run_dir, "test_results.json"), json.dumps(metrics, indent=1))
            write_confusion(matrix, self.classes, os.path.join(cfg.run_dir, "confusion_test.csv"),
                            os.path.join(cfg.run_dir, "per_class_test.csv"))
        self.log.print(f"test ({dataset.clips} clips x {dataset.crops} crops, {metrics['videos']} videos, "
                       f"{metrics['skipped_videos']} unreadable): top-1 {metrics['top1']:.2f} top-5 {metrics['top5']:.2f}"
                       f" | {source}")
        return metrics
