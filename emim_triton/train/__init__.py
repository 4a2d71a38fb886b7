"""The trainer: ``emim-train`` (``python -m emim_triton.train``), for every model of the zoo.

    config.py       the options (dataclass -> flags; YAML recipes; validation)
    setup.py        resolved options, datasets, loaders, model
    trainer.py      the loop: steps, evaluation, checkpoints, resumption, signals
    optim.py        AdamW parameter groups, learning-rate schedule
    mixup.py        mixup / cutmix on (B, C, T, H, W), label smoothing
    ema.py          weight EMA
    checkpoint.py   checkpoints, RNG states
    rundir.py       the run directory's lock, whole-or-nothing file writes
    evaluate.py     distributed evaluation counting each sample once
    metrics.py      top-k, multi-view averaging, confusion summary
    distributed.py  torchrun / DDP set-up and collectives
    logger.py       progress bar, JSON-lines log, TensorBoard
    plots.py        loss / accuracy curves
    emim_vs_twin.py the main job: EMIM vs its no-EMIM twin on the generated motion dataset
"""

from .cli import main
from .config import ConfigError, TrainConfig, parse_config

__all__ = ["ConfigError", "TrainConfig", "main", "parse_config"]
