"""Turning a validated config into the pieces of a run: resolved options, datasets, loaders, model.

"Resolved" means every automatic choice made explicit — the model's frames, size and normalisation, the
dataset format's sampling and flip, the device's precision and EMIM backend, the annotation files — so that
``<run_dir>/config.yaml`` says exactly what ran.
"""

from __future__ import annotations

import dataclasses
import signal

import torch
from torch.utils.data import DataLoader

from emim_triton.data.build import DataOptions, build_dataset, read_classes
from emim_triton.data.dataset import collate
from emim_triton.data.sharded_sampler import ShardedSampler
from emim_triton.data.seeding import derive_seed
from emim_triton.checks import fused_kernels_run_on
from emim_triton.environment import interpreter_enabled
from emim_triton.functional import resolve_backend

from .config import ConfigError, TrainConfig
from .distributed import Dist
from .optim import peak_lr


def resolve(cfg: TrainConfig, dist: Dist) -> TrainConfig:
    """A copy of `cfg` with the automatic values filled in for this model, dataset and device."""
    from emim_triton.models import get_model_cfg

    model_cfg = get_model_cfg(cfg.model)
    size = model_cfg["img_size"]
    updates = dict(
        num_frames=cfg.num_frames or model_cfg["num_frames"],
        img_size=cfg.img_size or (size if isinstance(size, int) else size[0]),
        mean=tuple(cfg.mean or model_cfg["mean"]), std=tuple(cfg.std or model_cfg["std"]),
        device=dist.device.type,
        attn_backend=resolve_backend(cfg.attn_backend, dist.device),  # written out, so config.yaml says what ran
        amp=cfg.amp if cfg.amp != "auto" else ("bf16" if dist.device.type == "cuda" else "fp32"),
    )
    if updates["amp"] == "fp16" and dist.device.type != "cuda":
        raise ConfigError(f"amp = 'fp16' needs a GPU (device is {dist.device.type}); use bf16 or fp32 on CPU")
    if updates["attn_backend"] == "triton" and not fused_kernels_run_on(dist.device, interpreter_enabled()):
        raise ConfigError("attn_backend = 'triton' on the CPU needs Triton's interpreter (TRITON_INTERPRET=1 in the "
                          "environment, which is slow); use --attn-backend reference (or auto) on CPU")
    # the peak is only known here, where the number of processes is: the cosine goes from it down to min_lr
    global_batch, peak = peak_lr(cfg, dist.world_size)
    if cfg.min_lr > peak and not cfg.test:
        raise ConfigError(f"min_lr = {cfg.min_lr:g} is above the peak learning rate {peak:g} (lr {cfg.lr:g} x global "
                          f"batch {global_batch} / lr_base_batch {cfg.lr_base_batch}): the schedule would rise over "
                          f"the run; lower min_lr")
    cfg = dataclasses.replace(cfg, **updates)
    options = data_options(cfg)
    updates = dict(sampling=options.resolved_sampling, flip=options.resolved_flip)
    if cfg.dataset != "random":
        updates.update(train_list=options.annotation_file("train"), val_list=options.annotation_file("val"),
                       test_list=options.annotation_file("test"))
        if "labels" in options.format.files:
            updates["labels_file"] = options.annotation_file("labels")
    return dataclasses.replace(cfg, **updates)


# DataOptions fields the trainer has no option for: their DataOptions defaults apply to every run.
DATA_FIELDS_WITHOUT_OPTION = ("random_samples",)


def data_fields_from_config(data_fields, config_fields, without_option=DATA_FIELDS_WITHOUT_OPTION) -> tuple[str, ...]:
    """The DataOptions fields that TrainConfig fills, by name. TypeError unless every other one is listed in
    `without_option`: renaming an option on one side only would otherwise send its value nowhere, and the
    run would quietly use DataOptions' default instead of what the user set."""
    unmatched = [name for name in data_fields if name not in config_fields]
    if sorted(unmatched) != sorted(without_option):
        raise TypeError(f"DataOptions fields without a TrainConfig option of the same name: {unmatched}; "
                        f"only {list(without_option)} may lack one (rename both sides, or list the field in "
                        f"DATA_FIELDS_WITHOUT_OPTION)")
    return tuple(name for name in data_fields if name in config_fields)


# checked at import: a mismatch stops every trainer command, and the tests, at once
DATA_OPTION_FIELDS = data_fields_from_config([f.name for f in dataclasses.fields(DataOptions)],
                                             [f.name for f in dataclasses.fields(TrainConfig)])


def data_options(cfg: TrainConfig) -> DataOptions:
    """The data-related fields of the config (`DATA_OPTION_FIELDS`: the two share field names)."""
    return DataOptions(**{name: getattr(cfg, name) for name in DATA_OPTION_FIELDS})


def build_data(cfg: TrainConfig, splits: tuple[str, ...]) -> tuple[list[str], dict]:
    """Class names and the datasets of the requested splits ("train" gets the training transform)."""
    options = data_options(cfg)
    classes = read_classes(options)
    datasets = {split: build_dataset(options, split, classes, train=split == "train") for split in splits}
    return classes, datasets


def _quiet_worker(worker_id: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the main process, which checkpoints and stops them in
    order (a Ctrl-C reaches the whole process group; killed workers would make the main process fail
    before it could save), and decode with one thread each."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)


def make_loader(dataset, cfg: TrainConfig, dist: Dist, train: bool, length: int | None = None) -> DataLoader:
    """A loader over this rank's shard. Training: `length` samples per epoch (whole optimizer steps).

    The loader gets its own generator: DataLoader draws its workers' base seed from it at every epoch,
    and drawing from the global RNG instead would shift drop-path's random stream on resumption.
    """
    sampler = ShardedSampler(len(dataset), rank=dist.rank, world_size=dist.world_size, shuffle=train,
                             seed=cfg.seed, length=length)
    workers = cfg.num_workers
    return DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate,
                      num_workers=workers, pin_memory=dist.device.type == "cuda", drop_last=False,
                      persistent_workers=workers > 0, worker_init_fn=_quiet_worker if workers else None,
                      generator=torch.Generator().manual_seed(derive_seed(cfg.seed, "loader", dist.rank)))


def build_model(cfg: TrainConfig, num_classes: int, with_pretrained: bool = True) -> torch.nn.Module:
    from emim_triton.models import create_model

    return create_model(cfg.model, num_classes=num_classes,
                        pretrained=cfg.pretrained if with_pretrained else None,
                        attn_backend=cfg.attn_backend, drop_path_rate=cfg.drop_path, drop_rate=cfg.dropout,
                        num_frames=cfg.num_frames, img_size=cfg.img_size, mean=cfg.mean, std=cfg.std,
                        grad_checkpointing=cfg.grad_checkpointing)
