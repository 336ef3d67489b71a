"""Matplotlib figures: training curves, confusion matrix, annotated image grids (Agg backend, files only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, loaded at the first figure: a run killed or refused
    before it plots never pays the import (~0.5-1 s per start). Every figure of the project draws through it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: list[dict], path: Path) -> None:
    plt = pyplot()
    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(ep, [h["train_loss"] for h in history], label="train")
    a1.plot(ep, [h["val_loss"] for h in history], label="val")
    a1.set(title="loss", xlabel="epoch")
    a2.plot(ep, [h["train_acc"] for h in history], label="train")
    a2.plot(ep, [h["val_acc"] for h in history], label="val")
    if all("val_bal_acc" in h for h in history):  # runs recorded before it was logged lack it
        a2.plot(ep, [h["val_bal_acc"] for h in history], label="val balanced", linestyle="--")
    a2.set(title="accuracy", xlabel="epoch", ylim=(0, 1))
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(cm: list[list[int]], class_names: list[str], path: Path, title: str = "") -> None:
    plt = pyplot()
    cm_a = np.asarray(cm)
    n = len(class_names)
    size = min(4 + 0.45 * n, 24)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm_a, cmap="Blues")
    if n <= 30:
        ax.set_xticks(range(n), class_names, rotation=60, ha="right")
        ax.set_yticks(range(n), class_names)
        thresh = cm_a.max() / 2 if cm_a.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    str(cm_a[i, j]),
                    ha="center",
                    va="center",
                    color="white" if cm_a[i, j] > thresh else "black",
                    fontsize=8,
                )
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def image_grid(
    images: list[Image.Image], captions: list[str], path: Path, colors: list[str] | None = None, cols: int = 6
) -> None:
    plt = pyplot()
    rows = max(1, -(-len(images) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.7 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(images):
            im = images[k]
            ax.imshow(im, cmap="gray" if im.mode == "L" else None)
            ax.set_title(captions[k], fontsize=8, color=(colors or ["black"] * len(images))[k])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
