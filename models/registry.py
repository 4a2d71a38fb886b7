"""The model registry: `register_model`, `list_models`, `create_model` (the whole user surface, timm style).

A model is registered by decorating a small constructor function with its default configuration — the
input the model was designed for and the normalisation its weights expect:

    @register_model(num_frames=16, img_size=224)
    def emim_uniformer_s16(**kwargs):
        return UniFormer(depths=(3, 4, 8, 3), ..., **kwargs)

`create_model(name, num_classes=..., pretrained=path, **overrides)` builds it, attaches the configuration as
``model.default_cfg`` (the data pipeline reads frames, size, mean and std from there) and loads weights.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from .pretrained import load_pretrained

# Defaults every entry starts from. Mean 0.45 / std 0.225 per channel is the normalisation of the
# UniFormer and EMIM video checkpoints (PySlowFast convention); 400 classes = Kinetics-400.
BASE_CFG = dict(num_frames=16, img_size=224, mean=(0.45, 0.45, 0.45), std=(0.225, 0.225, 0.225),
                num_classes=400)

# Keys of the configuration that describe the input rather than the architecture: `create_model`
# accepts them as overrides and records them in `default_cfg` instead of passing them to the model.
_INPUT_KEYS = ("num_frames", "img_size", "mean", "std")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    constructor: Callable[..., nn.Module]
    default_cfg: dict


_MODELS: dict[str, ModelEntry] = {}


def _complete_cfg(cfg: dict) -> dict:
    """Fill in the derived `input_size` = (channels, frames, height, width) that loaders want."""
    size = cfg["img_size"]
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return {**cfg, "input_size": (3, cfg["num_frames"], height, width)}


def register_model(fn: Callable | None = None, **cfg):
    """Register a constructor under its function name, with default-config overrides.

    Usable bare (``@register_model``) or with configuration (``@register_model(num_frames=32)``).
    Unknown configuration keys are rejected so a typo does not silently fall back to a default.
    """
    unknown = set(cfg) - set(BASE_CFG)
    if unknown:
        raise TypeError(f"register_model: unknown default-config keys {sorted(unknown)}; "
                        f"expected some of {sorted(BASE_CFG)}")

    def register(constructor: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = constructor.__name__
        if name in _MODELS:
            raise RuntimeError(f"register_model: a model named {name!r} is already registered")
        _MODELS[name] = ModelEntry(name, constructor, _complete_cfg({**BASE_CFG, **cfg}))
        return constructor

    return register(fn) if fn is not None else register


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the registered models matching a shell-style pattern, e.g. ``"emim_*"``."""
    return sorted(name for name in _MODELS if fnmatch.fnmatch(name, pattern))


def _entry(name: str) -> ModelEntry:
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; registered: {', '.join(list_models())}"
        raise KeyError(f"unknown model {name!r}{hint}")
    return _MODELS[name]


def get_model_cfg(name: str) -> dict:
    """A copy of a registered model's default configuration."""
    return dict(_entry(name).default_cfg)


def create_model(name: str, num_classes: int | None = None, pretrained: str | os.PathLike | None = None,
                 **overrides) -> nn.Module:
    """Build a registered model.

    Args:
        name: a name from `list_models()`.
        num_classes: classifier size; default from the model's configuration (400).
        pretrained: None, or the path of a checkpoint to load with `load_pretrained` (plain or wrapped
            state dict; 2D ImageNet weights are inflated; a head of another class count is dropped).
        **overrides: constructor arguments (``drop_path_rate``, ``emim_placement``, ``window``,
            ``temporal_stride``, ``attn_backend``, ``grad_checkpointing``, the EMIM layers'
            ``direction``, ``dilation`` and ``authors_context_channels`` (32 for the EMIM authors'
            checkpoints), ...), and input defaults
            (``num_frames``, ``img_size``, ``mean``, ``std``) which only change ``model.default_cfg``.
    Returns:
        the model, with ``model.default_cfg`` describing its expected input.
    """
    entry = _entry(name)
    cfg = dict(entry.default_cfg)
    for key in _INPUT_KEYS:
        if key in overrides:
            cfg[key] = overrides.pop(key)
    cfg["num_classes"] = cfg["num_classes"] if num_classes is None else num_classes
    cfg = _complete_cfg({k: v for k, v in cfg.items() if k != "input_size"})
    cfg["architecture"] = name

    model = entry.constructor(num_classes=cfg["num_classes"], **overrides)
    model.default_cfg = cfg

    if pretrained is True:
        raise ValueError("create_model: no weights are hosted for download; pass pretrained=<path to a "
                         "checkpoint file> (UniFormer/EMIM video or ImageNet checkpoints load directly)")
    if pretrained:
        load_pretrained(model, pretrained)
    return model
