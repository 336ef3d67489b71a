"""The INT8 accuracy budget: its default numbers and the comparison that judges a quantized model against its fp32
model. Shared by the export's gates (export/gates.py: flags, search, validation) and by training, whose INT8-aware
epoch selection (--int8-select) accepts an epoch only where the export's default budget would."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Budget:
    max_drop: float = 1.0  # top-1 points vs fp32
    min_agreement: float = 98.0  # % top-1 agreement with fp32
    max_class_drop: float = 5.0  # points, any single class


MIN_CLASS_SUPPORT = 10


def compare(ref_logits: np.ndarray, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy (vs labels where known, else vs fp32), agreement, and the worst per-class drop.

    The per-class drop only counts classes with >= MIN_CLASS_SUPPORT images: one image more or less
    in a class of three would otherwise move it by 33 points."""
    ref_pred, pred = ref_logits.argmax(1), logits.argmax(1)
    truth = np.where(labels >= 0, labels, ref_pred)
    acc_ref, acc = 100 * (ref_pred == truth).mean(), 100 * (pred == truth).mean()
    worst = 0.0
    for c in np.unique(truth):
        m = truth == c
        if m.sum() < MIN_CLASS_SUPPORT:
            continue
        worst = max(worst, 100 * ((ref_pred[m] == c).mean() - (pred[m] == c).mean()))
    return {
        "accuracy": float(acc),
        "fp32_accuracy": float(acc_ref),
        "drop": float(acc_ref - acc),
        "agreement": float(100 * (pred == ref_pred).mean()),
        "worst_class_drop": float(worst),
    }


def worst_of(*stats: dict[str, float]) -> dict[str, float]:
    """One model judged through several runtimes (the INT8 `.onnx` file as ONNX Runtime runs it on x86, and its
    `.ort` twin, saved without the x86 layout transforms, whose kernels round differently): every criterion at its
    worst, so that the result fits a budget only where each run does."""
    return {
        **min(stats, key=lambda s: s["accuracy"]),
        "drop": max(s["drop"] for s in stats),
        "agreement": min(s["agreement"] for s in stats),
        "worst_class_drop": max(s["worst_class_drop"] for s in stats),
    }


def fits(stats: dict[str, float], b: Budget) -> bool:
    return (
        stats["drop"] <= b.max_drop
        and stats["agreement"] >= b.min_agreement
        and stats["worst_class_drop"] <= b.max_class_drop
    )
