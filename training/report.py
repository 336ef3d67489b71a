"""Plain-text reports shared by train.py and evaluate.py (seed 001's confusion matrix + per-class lines)."""

from __future__ import annotations

from typing import Any

import numpy as np


def format_report(metrics: dict[str, Any], class_names: list[str], split: str) -> str:
    lines = [
        f"Accuracy on the {metrics['n']} {split} images: {100 * metrics['accuracy']:.2f} %"
        f" (balanced {100 * metrics['balanced_accuracy']:.2f} %)"
    ]
    if "top5_accuracy" in metrics:
        lines.append(f"Top-5 accuracy: {100 * metrics['top5_accuracy']:.2f} %")
    cm = np.asarray(metrics["confusion_matrix"])
    if len(class_names) <= 30:
        lines.append("Confusion matrix (rows = true, columns = predicted):")
        lines += ["  " + " ".join(f"{v:5d}" for v in row) for row in cm]
    width = max(len(c) for c in class_names)
    lines.append("Per-class accuracy:")
    for c, acc in metrics["per_class_accuracy"].items():
        lines.append(f"  {c:>{width}} : " + ("  n/a (no images)" if acc is None else f"{100 * acc:6.2f} %"))
    return "\n".join(lines)


def most_confused(cm: list[list[int]], class_names: list[str], k: int = 5) -> list[tuple[str, str, int]]:
    a = np.asarray(cm).copy()
    np.fill_diagonal(a, 0)
    flat = np.argsort(-a, axis=None)[:k]
    return [
        (class_names[i], class_names[j], int(a[i, j]))
        for i, j in zip(*np.unravel_index(flat, a.shape), strict=True)
        if a[i, j] > 0
    ]
