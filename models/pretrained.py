"""Loading UniFormer / EMIM checkpoints, including 2D ImageNet weights inflated into the video model.

What a user has on disk: the official UniFormer files (plain state dicts, or wrapped under ``model`` for
ImageNet and ``model_state`` for the PySlowFast video runs), EMIM checkpoints with the same names plus the
motion MLP and relative-position bias, and our trainer's checkpoints. All are read with
``torch.load(weights_only=True)``: a checkpoint is data, never code to execute.

Rules, tensor by tensor (checkpoint key -> model key of the same name):
- same shape: copied;
- the model's tensor has a time axis the checkpoint's lacks (a 2D kernel (O, I, kh, kw), or a 3D one with
  one frame, into (O, I, t, kh, kw)): average inflation, the kernel repeated over the t frames and divided
  by t, so a clip of identical frames gives the 2D network's activations (UniFormer's and the EMIM
  authors' choice);
- the classifier head with another class count: dropped, the model keeps its fresh head;
- any other shape: skipped and reported.
Missing EMIM parameters (motion MLP, rpb) are expected when starting from a UniFormer checkpoint: those
layers keep their init and start as pure local attention.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from emim_triton import EMIM
from emim_triton.checks import check_variant

# Wrappers under which training frameworks store the weights (timm / DeiT: "model"; PySlowFast:
# "model_state"; Lightning and many others: "state_dict"), tried in this order.
_WRAPPER_KEYS = ("model", "model_state", "state_dict")
_HEAD_PREFIX = "head."
# Parameters only EMIM blocks have: their absence from a UniFormer checkpoint is not an error.
_EMIM_ONLY = (".attn.motion_conv.", ".attn.rpb")


@dataclass
class LoadReport:
    """What `load_pretrained` did with each tensor."""

    loaded: list[str] = field(default_factory=list)       # copied unchanged
    inflated: list[str] = field(default_factory=list)     # 2D -> 3D average inflation
    skipped: dict[str, str] = field(default_factory=dict)  # in both, not loaded: key -> reason
    missing: list[str] = field(default_factory=list)      # in the model only: kept at init
    unexpected: list[str] = field(default_factory=list)   # in the checkpoint only: ignored

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors, inflated {len(self.inflated)} 2D -> 3D, "
                 f"skipped {len(self.skipped)}, missing {len(self.missing)}, unexpected {len(self.unexpected)}"]
        for key, reason in self.skipped.items():
            lines.append(f"  skipped {key}: {reason}")
        for title, keys in (("missing (kept at init)", self.missing), ("unexpected (ignored)", self.unexpected)):
            if keys:
                lines.append(f"  {title}: {_abbreviate(keys)}")
        return "\n".join(lines)


def _abbreviate(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file and unwrap it to a flat {name: tensor} dict (see `unwrap_state_dict`)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the message of torch.load alone rarely says which file
        raise ValueError(f"cannot read checkpoint {os.fspath(path)!r} with torch.load(weights_only=True): "
                         f"{error}") from error
    return unwrap_state_dict(obj, source=os.fspath(path))


def unwrap_state_dict(obj, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the state dict in a plain or wrapped checkpoint; strip ``module.`` / ``_orig_mod.`` prefixes."""
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        found = sorted(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(f"{source} holds no state dict: expected a {{name: tensor}} mapping, plain or under "
                         f"one of {_WRAPPER_KEYS}; found {found}")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    # Prefixes added by the wrapper the model was saved from: DistributedDataParallel, torch.compile.
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def inflate(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """Average-inflate a 2D (O, I, kh, kw) or single-frame 3D (O, I, 1, kh, kw) kernel to `shape`
    (O, I, t, kh, kw): repeat over time, divide by t. None when the shapes do not correspond."""
    if len(shape) != 5:
        return None
    if tensor.dim() == 4:
        tensor = tensor.unsqueeze(2)
    if tensor.dim() != 5 or tensor.shape[2] != 1 or tensor.shape[:2] + tensor.shape[3:] != shape[:2] + shape[3:]:
        return None
    frames = shape[2]
    return tensor.repeat(1, 1, frames, 1, 1) / frames


def load_pretrained(model: nn.Module, checkpoint: str | os.PathLike | Mapping, *, strict: bool = False,
                    verbose: bool = True, authors_context_channels: int | None = None) -> LoadReport:
    """Load a checkpoint into `model`, inflating 2D weights and dropping a mismatched head.

    Args:
        model: the model to fill (its state dict names the targets).
        checkpoint: a file path, or an already loaded (possibly wrapped) state dict.
        strict: also refuse skipped tensors (other than the head), missing keys (other than the EMIM-only
            motion MLP and rpb) and unexpected keys — for "this must be exactly my architecture".
        verbose: print the report.
        authors_context_channels: 32 switches every EMIM layer of the model to the authors' 32-channel
            context (docs/operation.md#authors-32-channel-quirk): for checkpoints trained with the EMIM
            authors' code, whose outputs it then reproduces. None leaves the layers as they were built.
    Returns:
        a `LoadReport`.
    Raises:
        ValueError when the file holds no state dict, when no tensor of it fits the model (wrong model or
        wrong file), or, with strict=True, when anything beyond the head and the new EMIM layers differs.
    """
    if authors_context_channels is not None:  # checked before anything is loaded
        check_variant("next", 1, authors_context_channels)
        emim_layers = [m for m in model.modules() if isinstance(m, EMIM)]
        if not emim_layers:
            raise ValueError(f"load_pretrained: authors_context_channels={authors_context_channels} configures "
                             f"EMIM layers, but this {type(model).__name__} has none")
    source = "checkpoint" if isinstance(checkpoint, Mapping) else os.fspath(checkpoint)
    if isinstance(checkpoint, Mapping):
        state = unwrap_state_dict(checkpoint, source)
    else:
        state = read_state_dict(checkpoint)
    target = model.state_dict()
    report = LoadReport()
    fitting: dict[str, torch.Tensor] = {}

    for key, tensor in state.items():
        if key not in target:
            if key.startswith(_HEAD_PREFIX):  # a feature extractor (num_classes=0) has no head to fill
                report.skipped[key] = "the model has no classifier head (num_classes=0)"
            else:
                report.unexpected.append(key)
            continue
        want = target[key].shape
        if tensor.shape == want:
            fitting[key] = tensor
            report.loaded.append(key)
        elif key.startswith(_HEAD_PREFIX):
            report.skipped[key] = (f"classifier head of another size ({tuple(tensor.shape)} in the checkpoint, "
                                   f"{tuple(want)} in the model): the model keeps its fresh head")
        elif (inflated := inflate(tensor, want)) is not None:
            fitting[key] = inflated
            report.inflated.append(key)
        else:
            report.skipped[key] = f"shape {tuple(tensor.shape)} in the checkpoint cannot fit {tuple(want)}"
    report.missing = [key for key in target if key not in fitting]

    if not fitting:
        raise ValueError(
            f"no tensor of {source} fits this {type(model).__name__}: {len(state)} tensors, none with a "
            f"model key and a compatible shape. Checkpoint keys: {_abbreviate(sorted(state), 5)}; model keys: "
            f"{_abbreviate(list(target), 5)}. Is it a checkpoint of this architecture (UniFormer/EMIM names)?")
    if strict:
        problems = [f"skipped {k}: {why}" for k, why in report.skipped.items() if not k.startswith(_HEAD_PREFIX)]
        problems += [f"missing {k}" for k in report.missing
                     if not k.startswith(_HEAD_PREFIX) and not any(tag in k for tag in _EMIM_ONLY)]
        problems += [f"unexpected {k}" for k in report.unexpected]
        if problems:
            more = f"\n  ... {len(problems) - 20} more" if len(problems) > 20 else ""
            raise ValueError(f"{source} does not fit the model exactly (strict=True):\n  "
                             + "\n  ".join(problems[:20]) + more)

    model.load_state_dict(fitting, strict=False)
    if authors_context_channels is not None:
        for layer in emim_layers:
            layer.authors_context_channels = authors_context_channels
    if verbose:
        print(f"load_pretrained({source}): {report}")
    return report
