"""The trainer's configuration: one dataclass, from which the command-line flags are generated.

Precedence: the field defaults here < a YAML file (``--config recipe.yaml``, or the name of a shipped
recipe) < flags given on the command line. Every value is checked (`validate`) before anything is built,
and errors name the option, the value, where it came from and what is allowed. The fully resolved
configuration (automatic choices filled in) is written to ``<run_dir>/config.yaml``, which can be passed
back with ``--config`` to repeat the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources

import yaml

from emim_triton.environment import BACKENDS


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the option and its source."""


def _opt(default, help: str, **extra):
    return field(default=default, metadata=dict(help=help, **extra))


@dataclass
class TrainConfig:
    # --- run ---------------------------------------------------------------------------------------
    run_dir: str = _opt("runs/train", "directory of the run: checkpoints, logs, curves, resolved config")
    seed: int = _opt(0, "seed of everything: init, data order, augmentation, mixup, drop-path")
    device: str = _opt("auto", "auto (cuda if available) | cpu | cuda", choices=("auto", "cpu", "cuda"))
    resume: str | None = _opt(None, "checkpoint to resume from (training) or to evaluate (--test)")
    auto_resume: bool = _opt(True, "resume from <run_dir>/last.pt when it exists")
    test: bool = _opt(False, "evaluate only: multi-view (test_clips x test_crops) video-level accuracy on the "
                             "test split, with the checkpoint of --resume, else <run_dir>/best.pt")
    checkpoint_every: int = _opt(0, "also checkpoint every N optimizer steps inside an epoch (0: epoch ends only)")
    stop_after: int | None = _opt(None, "checkpoint and stop after this many optimizer steps in total, as on "
                                        "SIGTERM (time-boxed jobs, tests)")
    # --- model -------------------------------------------------------------------------------------
    model: str = _opt("emim_uniformer_s16", "a name from emim_triton.models.list_models()")
    pretrained: str | None = _opt(None, "checkpoint to initialise from (UniFormer/EMIM video or ImageNet weights, "
                                        "or a checkpoint of this trainer); a head of another size is dropped")
    attn_backend: str = _opt("auto", "EMIM op backend: auto (fused Triton kernels on GPU, PyTorch reference on "
                                     "CPU) | triton | reference", choices=BACKENDS)
    drop_path: float = _opt(0.1, "stochastic depth rate of the last block (linear from 0)")
    dropout: float = _opt(0.0, "dropout in MLPs, projections and before the head")
    num_frames: int | None = _opt(None, "frames per clip (default: the model's)")
    img_size: int | None = _opt(None, "crop size in pixels (default: the model's)")
    mean: tuple[float, float, float] | None = _opt(None, "normalisation mean per channel (default: the model's)")
    std: tuple[float, float, float] | None = _opt(None, "normalisation std per channel (default: the model's)")
    sync_bn: bool = _opt(False, "synchronise BatchNorm statistics across processes")
    grad_checkpointing: bool = _opt(False, "recompute block activations in backward (saves memory)")
    # --- data --------------------------------------------------------------------------------------
    dataset: str = _opt("ssv2", "ssv2 | ssv2_frames | ssv1 | kinetics | diving48 | frames | videos | random",
                        choices=("ssv2", "ssv2_frames", "ssv1", "kinetics", "diving48", "frames", "videos", "random"))
    data_root: str | None = _opt(None, "where the videos / frame folders are (and the default annotation files)")
    train_list: str | None = _opt(None, "training annotation file (default: the format's file in data_root)")
    val_list: str | None = _opt(None, "validation annotation file")
    test_list: str | None = _opt(None, "test annotation file (default: the validation file)")
    labels_file: str | None = _opt(None, "class names file (SSv2 labels JSON, TSM category.txt)")
    video_ext: str | None = _opt(None, "video file extension for id-based formats (default: .webm SSv2, .mp4)")
    frame_template: str = _opt("{:05d}.jpg", "frame file names in frame folders")
    frame_start: int = _opt(1, "number of the first frame file")
    num_classes: int | None = _opt(None, "classes (default: from the annotations)")
    sampling: str | None = _opt(None, "segment | dense (default: segment for SS/Diving48, dense for Kinetics)",
                                choices=("segment", "dense"))
    frame_stride: int = _opt(4, "frame stride of dense sampling")
    test_clips: int = _opt(1, "temporal clips per video in --test")
    test_crops: int = _opt(3, "spatial crops per clip in --test (1 or 3)", choices=(1, 3))
    num_workers: int = _opt(4, "DataLoader worker processes per training process")
    max_missing_fraction: float = _opt(0.5, "stop when more than this fraction of listed videos is absent")
    decode_threads: int = _opt(1, "FFmpeg threads per decoded video")
    # --- augmentation ------------------------------------------------------------------------------
    crop_scale: tuple[float, float] = _opt((0.08, 1.0), "random resized crop: range of the area fraction")
    crop_ratio: tuple[float, float] = _opt((0.75, 4 / 3), "random resized crop: range of the aspect ratio")
    flip: bool | None = _opt(None, "random horizontal flip (default: off on Something-Something, else on)")
    random_erase: float = _opt(0.0, "probability of random erasing (one box, all frames)")
    mixup: float = _opt(0.8, "mixup Beta(alpha, alpha); 0 disables")
    cutmix: float = _opt(1.0, "cutmix Beta(alpha, alpha), boxes in H x W; 0 disables")
    mixup_prob: float = _opt(1.0, "probability of mixing a batch at all")
    mixup_switch_prob: float = _opt(0.5, "probability of cutmix rather than mixup when both are on")
    label_smoothing: float = _opt(0.1, "label smoothing")
    # --- optimisation ------------------------------------------------------------------------------
    epochs: int = _opt(30, "training epochs")
    batch_size: int = _opt(8, "clips per process per micro-batch")
    accum_steps: int = _opt(1, "micro-batches per optimizer step (gradient accumulation)")
    lr: float = _opt(1e-3, "peak learning rate at the global batch lr_base_batch; scaled linearly with the "
                           "global batch (batch_size x processes x accum_steps)")
    lr_base_batch: int = _opt(256, "the global batch at which lr applies unscaled")
    min_lr: float = _opt(1e-6, "learning rate at the end of the cosine")
    warmup_lr: float = _opt(1e-6, "learning rate at the start of the warm-up")
    warmup_epochs: float = _opt(5.0, "linear warm-up length in epochs (fractions allowed)")
    weight_decay: float = _opt(0.05, "AdamW weight decay; never on biases, norms, 1-D parameters, no_weight_decay()")
    betas: tuple[float, float] = _opt((0.9, 0.999), "AdamW betas")
    clip_grad: float | None = _opt(20.0, "clip the global gradient norm to this (none: off)")
    lr_mult: dict = _opt(None, "learning-rate multipliers by parameter-name pattern, e.g. '*motion_conv*=10'")
    amp: str = _opt("auto", "auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 (GPU, with a GradScaler) | fp32",
                    choices=("auto", "bf16", "fp16", "fp32"))
    ema: bool = _opt(False, "keep an exponential moving average of the weights (evaluated and checkpointed)")
    ema_decay: float = _opt(0.9998, "EMA decay (ramped up over the first steps)")
    # --- evaluation and logging -------------------------------------------------------------------
    eval_every: int = _opt(1, "validate every N epochs (and after the last)")
    log_every: int = _opt(10, "optimizer steps between log lines")
    progress: bool = _opt(True, "progress bar with throughput and ETA")
    tensorboard: bool = _opt(True, "write TensorBoard events when tensorboard is installed")

    def __post_init__(self):
        if self.lr_mult is None:
            self.lr_mult = {}


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# --help groups, by the first option of each section of TrainConfig
_SECTIONS = {"run_dir": "run", "model": "model", "dataset": "data", "crop_scale": "augmentation",
             "epochs": "optimisation", "eval_every": "evaluation and logging"}
RECIPES_PACKAGE = "emim_triton.recipes"


_HINTS = typing.get_type_hints(TrainConfig)


def _base_type(name: str) -> tuple[type, int | None, bool]:
    """(element type, tuple length or None, optional?) of a field's annotation."""
    hint = _HINTS[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional and (typing.get_origin(hint) in (typing.Union, types.UnionType)):
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is tuple:
        return typing.get_args(hint)[0], len(typing.get_args(hint)), optional
    return hint, None, optional


def coerce(name: str, value, source: str):
    """Convert a YAML or flag value to the field's type, or raise a ConfigError naming the option."""
    if name not in FIELDS:
        hint = difflib.get_close_matches(name, FIELDS, n=1)
        raise ConfigError(f"unknown option {name!r} ({source})" + (f"; did you mean {hint[0]!r}?" if hint else ""))
    kind, length, optional = _base_type(name)
    where = f"{name} = {value!r} ({source})"
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and kind is not str):
        if optional or name == "lr_mult":
            return {} if name == "lr_mult" else None
        raise ConfigError(f"{where}: a value is required")
    if kind is dict:
        return _coerce_lr_mult(value, where)
    if length is not None:
        if isinstance(value, str):
            value = value.replace(",", " ").split()
        if not isinstance(value, (list, tuple)) or len(value) != length:
            raise ConfigError(f"{where}: expected {length} numbers")
        return tuple(_scalar(kind, v, where) for v in value)
    return _scalar(kind, value, where)


def _scalar(kind: type, value, where: str):
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "yes", "1", "on"):
            return True
        if str(value).lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false")
    if kind in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got a boolean")
        try:
            number = float(value)  # YAML reads "1e-3" as a string; float() does not mind
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number") from None
        if kind is int:
            if number != int(number):
                raise ConfigError(f"{where}: expected an integer")
            return int(number)
        return number
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string")
    return value


def _coerce_lr_mult(value, where: str) -> dict:
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (list, tuple)):
        pairs = {}
        for item in value:
            pattern, sep, mult = str(item).partition("=")
            if not sep:
                raise ConfigError(f"{where}: expected PATTERN=MULTIPLIER items, got {item!r}")
            pairs[pattern] = mult
        value = pairs
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping from name patterns to multipliers")
    return {str(k): _scalar(float, v, where) for k, v in value.items()}


def recipe_names() -> list[str]:
    """Names of the shipped recipes (emim_triton/recipes/*.yaml)."""
    return sorted(p.name[:-5] for p in resources.files(RECIPES_PACKAGE).iterdir() if p.name.endswith(".yaml"))


def load_yaml(path: str) -> dict:
    """Read a YAML config: a file path, or the name of a shipped recipe (``ssv2_s16``)."""
    if not os.path.isfile(path):
        if path.removesuffix(".yaml") in recipe_names():
            text = resources.files(RECIPES_PACKAGE).joinpath(path.removesuffix(".yaml") + ".yaml").read_text()
        else:
            raise ConfigError(f"config {path!r}: no such file, and not a shipped recipe ({', '.join(recipe_names())})")
    else:
        with open(path) as handle:
            text = handle.read()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config {path!r} is not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"config {path!r} must be a mapping of option: value, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_parser() -> argparse.ArgumentParser:
    """Flags generated from the dataclass; they default to 'not given' so that YAML values survive."""
    parser = argparse.ArgumentParser(
        prog="emim-train", argument_default=argparse.SUPPRESS,
        description="Train or evaluate a video model of the EMIM model zoo. Values: defaults < --config YAML "
                    "< flags. Multi-GPU / multi-node: torchrun --nproc_per_node N -m emim_triton.train ...")
    parser.add_argument("--config", help="YAML file, or a shipped recipe name: " + ", ".join(recipe_names()))
    group = parser
    for name, f in FIELDS.items():
        if name in _SECTIONS:
            group = parser.add_argument_group(_SECTIONS[name])
        kind, length, _ = _base_type(name)
        flag = "--" + name.replace("_", "-")
        default = f.default if f.default is not None else "none"
        help_text = f"{f.metadata['help']} [default: {default}]"
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif kind is dict:
            group.add_argument(flag, nargs="+", metavar="PATTERN=MULT", help=help_text)
        else:
            group.add_argument(flag, nargs=length, metavar="X" if length else None, help=help_text)
    return parser


def parse_config(argv: list[str] | None = None) -> tuple[TrainConfig, dict[str, str]]:
    """Defaults < YAML < flags -> a validated TrainConfig, and where each non-default value came from."""
    args = vars(build_parser().parse_args(argv))
    values, sources = {}, {}
    if "config" in args:
        for name, value in load_yaml(args.pop("config")).items():
            values[name] = coerce(name, value, "from the config file")
            sources[name] = "config file"
    for name, value in args.items():
        values[name] = coerce(name, value, f"from --{name.replace('_', '-')}")
        sources[name] = "command line"
    cfg = TrainConfig(**values)
    validate(cfg, sources)
    return cfg, sources


def validate(cfg: TrainConfig, sources: dict[str, str] | None = None) -> None:
    """Range and consistency checks; raises ConfigError for the first problem found."""
    sources = sources or {}

    def fail(name: str, why: str):
        source = sources.get(name, "default")
        raise ConfigError(f"{name} = {getattr(cfg, name)!r} ({source}): {why}")

    for name, f in FIELDS.items():
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, name) is not None and getattr(cfg, name) not in choices:
            fail(name, f"must be one of {', '.join(map(str, choices))}")
    positive = ("epochs", "batch_size", "accum_steps", "lr_base_batch", "frame_stride", "test_clips",
                "eval_every", "log_every", "decode_threads")
    for name in positive:
        if getattr(cfg, name) < 1:
            fail(name, "must be >= 1")
    for name in ("num_frames", "img_size", "num_classes", "stop_after"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            fail(name, "must be >= 1 (or none)")
    for name in ("num_workers", "checkpoint_every", "frame_start"):
        if getattr(cfg, name) < 0:
            fail(name, "must be >= 0")
    for name in ("lr", "ema_decay"):
        if not getattr(cfg, name) > 0:
            fail(name, "must be > 0")
    for name in ("min_lr", "warmup_lr", "weight_decay", "warmup_epochs", "mixup", "cutmix"):
        if getattr(cfg, name) < 0:
            fail(name, "must be >= 0")
    if cfg.warmup_epochs > cfg.epochs:
        fail("warmup_epochs", f"is longer than the run (epochs = {cfg.epochs})")
    for name in ("drop_path", "dropout", "random_erase", "mixup_prob", "mixup_switch_prob", "max_missing_fraction"):
        if not 0 <= getattr(cfg, name) <= 1:
            fail(name, "must be in [0, 1]")
    if not 0 <= cfg.label_smoothing < 1:
        fail("label_smoothing", "must be in [0, 1)")
    if not 0 < cfg.ema_decay < 1:
        fail("ema_decay", "must be in (0, 1)")
    if not 0 < cfg.crop_scale[0] <= cfg.crop_scale[1] <= 1:
        fail("crop_scale", "must be (low, high) with 0 < low <= high <= 1")
    if not 0 < cfg.crop_ratio[0] <= cfg.crop_ratio[1]:
        fail("crop_ratio", "must be (low, high) with 0 < low <= high")
    if not all(0 <= b < 1 for b in cfg.betas):
        fail("betas", "must be in [0, 1)")
    if cfg.clip_grad is not None and cfg.clip_grad <= 0:
        fail("clip_grad", "must be > 0 (or none to disable)")
    if cfg.std is not None and min(cfg.std) <= 0:
        fail("std", "must be > 0")
    if any(m < 0 for m in cfg.lr_mult.values()):
        fail("lr_mult", "multipliers must be >= 0")
    try:
        cfg.frame_template.format(1)
    except (IndexError, KeyError, ValueError):
        fail("frame_template", "must be a str.format template with one integer field, e.g. '{:05d}.jpg'")
    from emim_triton.models import list_models  # here: importing the zoo is slow-ish and needs the op

    if cfg.model not in list_models():
        close = difflib.get_close_matches(cfg.model, list_models(), n=3)
        fail("model", "unknown model" + (f"; did you mean {', '.join(close)}?" if close else
                                          f"; one of {', '.join(list_models())}"))
    if cfg.resume is not None and not os.path.isfile(cfg.resume):
        fail("resume", "no such file")
    if cfg.dataset != "random" and not (cfg.data_root or cfg.train_list):
        fail("data_root", f"dataset {cfg.dataset!r} needs --data-root (or explicit --train-list/--val-list)")


def to_plain(cfg: TrainConfig) -> dict:
    """The config as plain YAML/JSON types (tuples -> lists), for config.yaml and checkpoints."""
    return {k: list(v) if isinstance(v, tuple) else (dict(v) if isinstance(v, dict) else v)
            for k, v in dataclasses.asdict(cfg).items()}


def from_plain(data: dict) -> TrainConfig:
    """A TrainConfig from `to_plain` output (as stored in a checkpoint); unknown keys are ignored."""
    return TrainConfig(**{k: coerce(k, v, "from the checkpoint") for k, v in data.items() if k in FIELDS})


def config_text(cfg: TrainConfig) -> str:
    """The run's config.yaml: the resolved configuration, which `emim-train --config` reads back."""
    return ("# Resolved configuration of this run (emim-train --config <this file> repeats it)\n"
            + yaml.safe_dump(to_plain(cfg), sort_keys=False))
