"""Distributed evaluation in which every sample counts exactly once.

Each rank evaluates the views ``r, r + W, r + 2W, ...`` (no padding, unlike training: DistributedSampler's
padding repeats samples, which would count them twice), keeps the scores with their view indices, and the
ranks exchange them. The merged predictions are checked to cover every view exactly once before any
number is computed. Views of unreadable videos are left out; a video counts if at least one of its views
was read, and its score is the mean softmax of those views (clips x crops test).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .distributed import Dist, all_gather_objects
from .metrics import confusion_matrix, topk_correct, video_scores


class EvaluationInterrupted(Exception):
    """A stop was requested (SIGTERM/SIGINT) during evaluation."""


@torch.no_grad()
def predict(model, loader, device: torch.device, autocast=contextlib.nullcontext, should_stop=None, progress=None):
    """This rank's (view indices, scores, labels, valid) as CPU tensors, and the failed video indices.

    ``should_stop(batch_number)`` is asked before each batch; raising EvaluationInterrupted when it says so.
    """
    model.eval()
    parts = dict(index=[], scores=[], label=[], valid=[])
    bad = []
    for number, batch in enumerate(loader):
        if should_stop is not None and should_stop(number):
            raise EvaluationInterrupted
        with autocast():
            scores = model(batch["clip"].to(device, non_blocking=True))
        parts["scores"].append(scores.float().cpu())
        for key in ("index", "label", "valid"):
            parts[key].append(batch[key])
        bad.extend(batch["bad"])
        if progress is not None:
            progress.update(1)
    merged = {k: torch.cat(v) if v else torch.empty(0) for k, v in parts.items()}
    return merged, bad


def gather(local: dict, bad: list, dist: Dist, expected: int) -> tuple[dict, list]:
    """Merge every rank's predictions, ordered by view index, after checking each view appears once."""
    everything = all_gather_objects((local, bad))
    merged = {k: torch.cat([part[k] for part, _ in everything if part[k].numel()]) for k in local}
    order = merged["index"].argsort()
    merged = {k: v[order] for k, v in merged.items()}
    if not torch.equal(merged["index"], torch.arange(expected)):
        seen = merged["index"].tolist()
        raise RuntimeError(f"distributed evaluation covered {len(seen)} views ({len(set(seen))} distinct) "
                           f"instead of each of the {expected} exactly once")
    return merged, sorted({v for _, rank_bad in everything for v in rank_bad})


def summarize(merged: dict, views: int, num_classes: int) -> tuple[dict, torch.Tensor]:
    """Video-level metrics and the confusion matrix from merged view predictions."""
    valid = merged["valid"].bool()
    num_videos = len(merged["index"]) // views
    scores, seen = video_scores(merged["scores"][valid], merged["index"][valid], views, num_videos)
    labels = merged["label"].view(num_videos, views)[:, 0]
    scores, labels = scores[seen], labels[seen]
    videos = int(seen.sum())
    if videos == 0:
        raise RuntimeError("evaluation: no video could be read")
    correct = topk_correct(scores, labels)
    loss = F.nll_loss(scores.clamp_min(1e-12).log(), labels).item()
    metrics = dict(top1=100.0 * correct[1] / videos, top5=100.0 * correct[5] / videos, loss=loss,
                   videos=videos, skipped_videos=num_videos - videos, views=views)
    return metrics, confusion_matrix(scores.argmax(1), labels, num_classes)


def evaluate(model, loader, dataset, dist: Dist, device, num_classes: int, autocast=contextlib.nullcontext,
             should_stop=None, progress=None) -> tuple[dict, torch.Tensor, list]:
    """Run, gather and summarise: (metrics, confusion matrix, failed video indices), the same on every rank."""
    local, bad = predict(model, loader, device, autocast, should_stop, progress)
    merged, bad = gather(local, bad, dist, len(dataset))
    metrics, matrix = summarize(merged, dataset.views, num_classes)
    return metrics, matrix, bad
