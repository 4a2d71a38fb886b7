"""Accuracy from per-sample predictions: top-k, multi-view aggregation, confusion matrix and its summary."""

from __future__ import annotations

import csv

import torch


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, int]:
    """Number of samples whose label is among the k highest scores, for each k (k capped at the classes)."""
    ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    return {k: int(hits[:, :k].any(1).sum()) for k in ks}


def video_scores(view_scores: torch.Tensor, view_index: torch.Tensor, views: int,
                 num_videos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Average the softmax of each video's views: (V, classes) over view indices video * views + view.

    Returns (scores (num_videos, classes), mask of videos that had at least one valid view).
    """
    video = view_index // views
    probabilities = view_scores.float().softmax(1)
    summed = torch.zeros(num_videos, view_scores.shape[1]).index_add_(0, video, probabilities)
    counts = torch.zeros(num_videos).index_add_(0, video, torch.ones(len(video)))
    return summed / counts.clamp_min(1)[:, None], counts > 0


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(true class, predicted class) counts."""
    flat = labels * num_classes + predictions
    return torch.bincount(flat, minlength=num_classes ** 2).view(num_classes, num_classes)


def write_confusion(matrix: torch.Tensor, classes: list[str], matrix_path: str, summary_path: str) -> list[dict]:
    """Write the full matrix and a per-class summary (support, recall, precision, most frequent confusion),
    worst classes first. Returns the summary rows."""
    with open(matrix_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["true \\ predicted"] + classes)
        for name, row in zip(classes, matrix.tolist()):
            writer.writerow([name] + row)
    rows = []
    predicted_totals = matrix.sum(0)
    for i, name in enumerate(classes):
        support, correct = int(matrix[i].sum()), int(matrix[i, i])
        if support == 0:
            continue
        others = matrix[i].clone()
        others[i] = -1
        confused = int(others.argmax())
        rows.append(dict(class_index=i, name=name, support=support, correct=correct,
                         recall=round(correct / support, 4),
                         precision=round(correct / int(predicted_totals[i]), 4) if predicted_totals[i] else 0.0,
                         most_confused_with=classes[confused] if others[confused] > 0 else "",
                         confused_count=max(int(others[confused]), 0)))
    rows.sort(key=lambda r: (r["recall"], -r["support"]))
    with open(summary_path, "w", newline="") as handle:
        fields = ["class_index", "name", "support", "correct", "recall", "precision", "most_confused_with",
                  "confused_count"]
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return rows
