"""Evaluate a checkpoint on a held-out split: accuracy, top-5, confusion matrix, per-class lines, report.

python training/evaluate.py                                  # artifacts/runs/latest/best.pt, test split
python training/evaluate.py --checkpoint RUN/best.pt --split val --json out.json
python training/evaluate.py --data path/to/new_images        # any ImageFolder with the same classes
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import classification_report
from torch.utils.data import DataLoader

from core.checkpoint import load_model
from core.errors import UserError, run_cli
from core.transforms import eval_transform
from training.data import ImageDataset, Split, collate_skip, load_item, load_source
from training.engine import classification_metrics, predict
from training.plots import image_grid, plot_confusion
from training.report import format_report, most_confused
from training.runs import resolve_checkpoint, write_json


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="checkpoint or run folder (default artifacts/runs/latest/best.pt)")
    p.add_argument("--data", help="dataset (default: the one the checkpoint was trained on)")
    p.add_argument(
        "--split",
        choices=("test", "val", "train", "all"),
        default="test",
        help="which split; a plain class-folder dataset given with --data is used whole ('all')",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, help="folder for PNGs/JSON (default <run>/eval)")
    p.add_argument("--json", type=Path, help="also write the metrics JSON here")
    p.add_argument("--max-errors", type=int, default=24, help="misclassified images in the grid")
    return p


def pick_split(args: argparse.Namespace, train_args: dict, class_names: list[str]) -> tuple[str, Split, int]:
    """(split name, split, files dropped at scan time because they are not readable images)."""
    data = args.data or train_args.get("data", "elpv")
    if args.data and Path(args.data).is_dir() and not (Path(args.data) / "train").is_dir():
        from training.data import scan_folder

        classes, paths, labels, dropped = scan_folder(Path(args.data))
        _check_classes(classes, class_names)
        return "all", Split(paths, [class_names.index(classes[i]) for i in labels]), dropped
    src = load_source(
        data,
        train_args.get("val_split", 0.15),
        train_args.get("elpv_task", "4class"),
        Path(train_args.get("data_dir", "artifacts/data")),
    )
    _check_classes(src.class_names, class_names)
    if args.split == "all":
        parts = [s for s in (src.train, src.val, src.test) if s is not None]
        return "all", Split([i for s in parts for i in s.items], [y for s in parts for y in s.labels]), src.skipped
    if args.split == "test" and src.test is None:
        print("note: this dataset has no test split; evaluating on val")
        return "val", src.val, src.skipped
    return args.split, getattr(src, args.split), src.skipped


def _check_classes(data_classes: list[str], model_classes: list[str]) -> None:
    if list(data_classes) != list(model_classes) and not set(data_classes) <= set(model_classes):
        raise UserError(
            f"dataset classes {list(data_classes)[:8]} do not match the checkpoint's "
            f"{list(model_classes)[:8]}; evaluate with data of the same classes"
        )


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    path = resolve_checkpoint(args.checkpoint)
    model, ck = load_model(path)
    names = list(ck.spec.class_names)
    split_name, split, dropped = pick_split(args, ck.args, names)
    loader = DataLoader(
        ImageDataset(split, eval_transform(ck.spec)),
        batch_size=args.batch_size,
        num_workers=args.workers,
        collate_fn=collate_skip,
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    logits, labels, skipped = predict(model.to(device), loader, device, progress=True)
    if len(labels) == 0:
        raise UserError("no readable images to evaluate")
    m = classification_metrics(logits, labels, names)
    m.update(split=split_name, skipped=skipped, unreadable_files=dropped, checkpoint=str(path))
    out = args.out or path.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    print(format_report(m, names, split_name))
    present = sorted(set(labels.tolist()) | set(logits.argmax(1).tolist()))
    print(
        classification_report(
            labels,
            logits.argmax(1),
            labels=present,
            target_names=[names[i] for i in present],
            digits=4,
            zero_division=0,
        )
    )
    pairs = most_confused(m["confusion_matrix"], names)
    if pairs:
        print("Most confused (true -> predicted: count): " + "; ".join(f"{a} -> {b}: {n}" for a, b, n in pairs))
    if skipped or dropped:
        print(f"{skipped + dropped} unreadable files skipped ({dropped} at scan time, {skipped} at decode)")
    plot_confusion(m["confusion_matrix"], names, out / "confusion_matrix.png", f"{split_name}: {m['accuracy']:.2%}")
    _error_grid(split, logits, labels, names, out / "misclassified.png", args.max_errors)
    for target in filter(None, (out / "metrics.json", args.json)):
        write_json(target, m)
    print(f"wrote {out}/confusion_matrix.png, misclassified.png, metrics.json")
    return 0


def _error_grid(split: Split, logits: np.ndarray, labels: np.ndarray, names: list[str], path: Path, k: int) -> None:
    if len(labels) != len(split):
        return  # some files were unreadable: indices no longer line up with the split
    wrong = np.flatnonzero(logits.argmax(1) != labels)[:k]
    if len(wrong):
        probs = torch.from_numpy(logits[wrong]).softmax(1).numpy()
        caps = [
            f"true {names[labels[i]]}\npred {names[p.argmax()]} {p.max():.0%}"
            for i, p in zip(wrong, probs, strict=True)
        ]
        image_grid([load_item(split.items[i]) for i in wrong], caps, path, ["red"] * len(wrong))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
