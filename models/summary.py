"""Print the README table of model sizes: ``python -m emim_triton.models.summary``.

Parameters (400 and 174 classes) and GMACs per view (one clip of the model's default frames at 224 px)
for every registered UniFormer-S/B model, next to the figures of PAPER-NOTES.md. Models are built on the
meta device, so this takes seconds and no memory. Rows with ``temporal_stride=2`` are original UniFormer,
a check of the counter against UniFormer's published figures.
"""

from __future__ import annotations

import argparse

import torch

from .flops import count_flops, count_params
from .registry import create_model, get_model_cfg, list_models

# Targets from PAPER-NOTES.md (counted from the authors' code, fvcore style). The tests import these.
# Parameters in millions, by model family, for 400 and 174 classes (the temporal stride changes no weight).
PARAMS_M = {
    "emim_uniformer_s": {400: 21.54, 174: 21.42},
    "emim_uniformer_b": {400: 50.13, 174: 50.02},
    "uniformer_s": {400: 21.40, 174: 21.28},
    "uniformer_b": {400: 49.81, 174: 49.70},
}
# GMACs per view at 224 px, by (model name, temporal stride of the stem).
GMACS = {
    ("emim_uniformer_s16", 1): 85.2, ("emim_uniformer_s32", 1): 221.9,
    ("emim_uniformer_b16", 1): 198.0, ("emim_uniformer_b32", 1): 525.6,
    ("uniformer_s16", 1): 109.5, ("uniformer_b16", 1): 258.3,
    ("uniformer_s16", 2): 41.8, ("uniformer_s32", 2): 109.6,
    ("uniformer_b16", 2): 96.7, ("uniformer_b32", 2): 259.0,
}
PARAMS_RTOL, GMACS_RTOL = 0.005, 0.02  # the bounds: 0.5% and 2%


def family(name: str) -> str:
    """'emim_uniformer_s16' -> 'emim_uniformer_s' (the key of PARAMS_M)."""
    return name.rstrip("0123456789")


def measure(name: str, temporal_stride: int = 1, img_size: int = 224) -> dict:
    """Parameters at 400 and 174 classes and GMACs per view of one registered model, on the meta device."""
    frames = get_model_cfg(name)["num_frames"]
    with torch.device("meta"):
        params = {classes: count_params(create_model(name, num_classes=classes)) for classes in (400, 174)}
        model = create_model(name, temporal_stride=temporal_stride, attn_backend="reference")
        clip = torch.empty(1, 3, frames, img_size, img_size)
    return dict(name=name, temporal_stride=temporal_stride, frames=frames, params=params,
                gmacs=count_flops(model, clip).gmacs)


def _with_target(value: float, target: float | None, digits: int) -> str:
    if target is None:
        return f"{value:.{digits}f}"
    difference = round(100 * (value / target - 1), 1) + 0.0  # + 0.0 turns -0.0 into 0.0
    return f"{value:.{digits}f} ({target:.{digits}f}, {difference:+.1f}%)"


def table(names: list[str], original_uniformer: bool = True) -> str:
    """A Markdown table; each cell: measured (PAPER-NOTES target, difference)."""
    # EMIM models first, then their twins; S before B; 16 before 32 frames.
    names = sorted(names, key=lambda n: (not n.startswith("emim_"), family(n)[-1] != "s", len(n), n))
    rows = [(name, 1) for name in names]
    if original_uniformer:
        rows += [(name, 2) for name in names if name.startswith("uniformer_")]
    lines = ["| model | temporal stride | frames | params (M), 400 classes | params (M), 174 classes "
             "| GMACs per view |",
             "|---|---|---|---|---|---|"]
    for name, stride in rows:
        m = measure(name, stride)
        target_params = PARAMS_M.get(family(name), {})
        cells = [f"`{name}`" + (" (original UniFormer)" if stride == 2 else ""), str(stride), str(m["frames"])]
        cells += [_with_target(m["params"][c] / 1e6, target_params.get(c), 2) for c in (400, 174)]
        cells.append(_with_target(m["gmacs"], GMACS.get((name, stride)), 1))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Print the README table of model sizes (params, GMACs).")
    parser.add_argument("--models", default="*uniformer_[sb]*", help="shell pattern over list_models()")
    parser.add_argument("--no-original", action="store_true", help="omit the temporal-stride-2 check rows")
    args = parser.parse_args(argv)
    print(table(list_models(args.models), original_uniformer=not args.no_original))
    print("\nGMACs: multiply-accumulates of convolutions, linear layers and attention products for one clip at "
          "224 px (fvcore convention; norms and elementwise ops not counted). In parentheses: PAPER-NOTES.md "
          "figure and difference.")


if __name__ == "__main__":
    main()
