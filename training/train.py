"""Train an image classifier and write a self-describing run under artifacts/runs/<name>/.

python training/train.py --mode transfer            # default: ELPV solar cells, EfficientNet-Lite0
python training/train.py --data path/to/folder --model resnet18 --mode finetune --weights DEFAULT
python training/train.py --data digits --model cnn_small --mode scratch --epochs 5
python training/train.py --resume                   # continue artifacts/runs/latest
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from core.checkpoint import Checkpoint, atomic_torch_save, safe_torch_load, save_checkpoint
from core.errors import UserError, run_cli
from core.models import ModelEntry, arch_kwargs_for_spec, create_model, get_entry
from core.models.classifier import init_weights
from core.spec import ModelSpec
from core.transforms import eval_transform, train_transform
from training import features
from training.cli import parse_args
from training.data import DataSource, ImageDataset, Split, collate_skip, load_source
from training.engine import (
    classification_metrics,
    make_optimizer,
    make_scheduler,
    predict,
    seed_everything,
    train_one_epoch,
)
from training.plots import plot_confusion, plot_curves
from training.report import format_report
from training.runs import ARTIFACTS, RUNS, new_run_dir, point_latest, write_json

LITE_TRANSFER_TAPS = (2, 4, 7, 10, 14)  # ends of stages 2-6: texture statistics at every scale
# Options that define the model or data; a resumed run must keep them.
RESUME_LOCKED = (
    "data",
    "elpv_task",
    "model",
    "mode",
    "weights",
    "head",
    "hidden",
    "taps",
    "pool",
    "image_size",
    "resize_size",
    "crop",
    "interpolation",
    "color",
    "val_split",
    "augment",
)


def build_spec(args: argparse.Namespace, source: DataSource, entry: ModelEntry, weights: str | None) -> ModelSpec:
    native = source.native_size if source.native_size and source.native_size >= entry.min_size else None
    size = args.image_size or native or entry.default_size
    crop = args.crop or ("squash" if source.native_size else "center")
    color = args.color or (("gray3" if weights else "gray") if source.gray else "rgb")
    mean, std = entry.mean, entry.std
    if color == "gray":
        mean, std = (float(np.mean(mean)),), (float(np.mean(std)),)
    lite = entry.family == "efficientnet_lite"
    taps = (
        (LITE_TRANSFER_TAPS if lite and args.mode == "transfer" else ())
        if args.taps == "auto"
        else ()
        if args.taps == "none"
        else tuple(int(t) for t in args.taps.split(","))
    )
    pool = args.pool if args.pool != "auto" else ("meanmax" if lite and args.mode == "transfer" else "mean")
    kw = arch_kwargs_for_spec(
        args.head, args.dropout, args.hidden, **({"taps": list(taps), "pool": pool} if lite else {})
    )
    resize = size if crop == "squash" else (args.resize_size or round(size / 0.875))
    return ModelSpec(
        args.model, tuple(source.class_names), size, resize, crop, args.interpolation, mean, std, color, kw
    )


def resolve_weights(args: argparse.Namespace, entry: ModelEntry) -> str | None:
    if args.mode == "scratch":
        if args.weights:
            raise UserError("--weights makes no sense with --mode scratch; use --mode finetune or transfer")
        return None
    weights = args.weights or entry.default_weights
    if not weights:
        raise UserError(
            f"{entry.name} has no pretrained weights available offline; use --mode scratch or pass --weights FILE.pth"
        )
    return weights


def image_loader(split: Split, transform, args: argparse.Namespace, shuffle: bool, epoch_seed: int = 0):
    g = torch.Generator().manual_seed(epoch_seed)
    return DataLoader(
        ImageDataset(split, transform),
        batch_size=args.batch_size,
        shuffle=shuffle,
        num_workers=args.workers,
        pin_memory=args.pin_memory,
        collate_fn=collate_skip,
        generator=g,
        persistent_workers=False,
        drop_last=False,
    )


class Batches:
    """Where batches come from: cached backbone features (transfer) or images through a DataLoader."""

    def __init__(self, args, source: DataSource, spec: ModelSpec, model, weights, device) -> None:
        self.args, self.source, self.spec, self.model, self.weights, self.device = (
            args,
            source,
            spec,
            model,
            weights,
            device,
        )
        self.use_features = args.mode == "transfer" and args.augment == "none" and not args.no_feature_cache
        self.trainee = model.head if self.use_features else model
        self._train_tf = train_transform(spec, args.augment)
        self._eval_tf = eval_transform(spec)

    def loader(self, name: str, split: Split, train: bool, epoch: int = 0):
        if self.use_features:
            x, y = features.cached_features(
                self.model.backbone,
                self.spec,
                self.weights,
                split,
                name,
                ARTIFACTS / "cache" / "features",
                self.device,
                progress=not self.args.no_progress,
            )
            fl = features.FeatureLoader(x, y, self.args.batch_size, shuffle=train, seed=self.args.seed)
            fl.epoch = epoch
            return fl
        tf = self._train_tf if train else self._eval_tf
        return image_loader(split, tf, self.args, shuffle=train, epoch_seed=self.args.seed * 100_003 + epoch)


def check_resume(args: argparse.Namespace) -> tuple[Path | None, dict | None]:
    if not args.resume:
        return None, None
    run = RUNS / args.resume if not Path(args.resume).is_dir() else Path(args.resume)
    if not (run / "resume.pt").is_file():
        raise UserError(f"nothing to resume in {run} (no resume.pt); start a new run without --resume")
    state = safe_torch_load(run / "resume.pt")
    old = state["args"]
    changed = [k for k in RESUME_LOCKED if k in old and old[k] != getattr(args, k)]
    if changed:
        was = ", ".join(f"{k}={old[k]!r}" for k in changed)
        raise UserError(f"--resume with changed options {changed}; they must match the original run ({was})")
    return run.resolve(), state


def fit(args, batches: Batches, spec: ModelSpec, run: Path, state: dict | None) -> dict:
    """The epoch loop: train, validate, checkpoint (last/best/resume), early stop."""
    model, trainee, device = batches.model, batches.trainee, batches.device
    source = batches.source
    steps = len(batches.loader("train", source.train, train=True))
    scale = args.backbone_lr_scale if args.mode == "finetune" else 1.0
    opt = make_optimizer(trainee, args.optimizer, args.lr, args.weight_decay, scale)
    sched = make_scheduler(opt, args.schedule, args.epochs, steps, args.warmup_epochs, args.step_size, args.gamma)
    scaler = torch.amp.GradScaler("cuda") if args.amp == "fp16" and device.type == "cuda" else None
    history, best, bad, start = [], {"val_acc": -1.0, "val_loss": float("inf"), "epoch": 0}, 0, 1
    if state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if scaler and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        history, best, bad, start = state["history"], state["best"], state["bad_epochs"], state["epoch"] + 1
        print(f"resuming {run.name} at epoch {start}/{args.epochs}")
    net = torch.compile(trainee) if args.compile else trainee
    crit = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    val_loader = batches.loader("val", source.val, train=False)
    tb = _tensorboard(run)
    for epoch in range(start, args.epochs + 1):
        torch.manual_seed(args.seed * 100_003 + epoch)  # dropout etc. identical whether resumed or not
        st = train_one_epoch(
            net,
            batches.loader("train", source.train, True, epoch),
            opt,
            sched,
            crit,
            device,
            f"epoch {epoch}/{args.epochs}",
            None if args.amp == "none" else args.amp,
            scaler,
            args.channels_last,
            not args.no_progress,
        )
        logits, labels, _ = predict(net, val_loader, device)
        val_loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)))
        val_acc = float((logits.argmax(1) == labels).mean())
        row = {
            "epoch": epoch,
            "lr": opt.param_groups[-1]["lr"],
            "train_loss": st.loss,
            "train_acc": st.acc,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "seconds": round(st.seconds, 2),
            "skipped": st.skipped,
        }
        history.append(row)
        improved = (val_acc, -val_loss) > (best["val_acc"], -best["val_loss"])
        if improved:
            best, bad = {"val_acc": val_acc, "val_loss": val_loss, "epoch": epoch}, 0
        else:
            bad += 1
        _save_epoch(args, model, spec, run, row, improved, opt, sched, scaler, history, best, bad, epoch)
        if tb:
            for k in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
                tb.add_scalar(k, row[k], epoch)
        print(
            f"epoch {epoch:3d}/{args.epochs}  train loss {st.loss:.4f} acc {st.acc:.4f} | val loss {val_loss:.4f}"
            f" acc {val_acc:.4f} | lr {row['lr']:.2e} | {st.seconds:.1f}s"
            + (f" | skipped {st.skipped}" if st.skipped else "")
            + ("  *best*" if improved else ""),
            flush=True,
        )
        if args.patience and bad >= args.patience:
            print(f"early stop: no validation gain for {bad} epochs")
            break
    if tb:
        tb.close()
    return {"history": history, "best": best}


def _tensorboard(run: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run / "tb"))


def _save_epoch(args, model, spec, run, row, improved, opt, sched, scaler, history, best, bad, epoch) -> None:
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ck = Checkpoint(spec, sd, {"epoch": epoch, **{k: row[k] for k in ("val_acc", "val_loss")}}, vars_json(args))
    save_checkpoint(ck, run / "last.pt")
    if improved:
        save_checkpoint(ck, run / "best.pt")
    atomic_torch_save(
        {
            "epoch": epoch,
            "model": sd,
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict() if scaler else None,
            "history": history,
            "best": best,
            "bad_epochs": bad,
            "args": vars_json(args),
        },
        run / "resume.pt",
    )
    with open(run / "history.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)


def vars_json(args: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def finish(args, batches: Batches, spec: ModelSpec, run: Path, result: dict, seconds: float) -> dict:
    """Reload best.pt, evaluate once on the held-out split, write metrics, plots and meta.json."""
    ck = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    batches.model.load_state_dict(ck["state_dict"])
    split_name, split = batches.source.eval_split
    logits, labels, skipped = predict(batches.trainee, batches.loader(split_name, split, train=False), batches.device)
    m = classification_metrics(logits, labels, list(spec.class_names))
    params = sum(p.numel() for p in batches.model.parameters())
    metrics = {
        "eval_split": split_name,
        **m,
        "skipped": skipped,
        "unreadable_files": batches.source.skipped,
        "best_epoch": result["best"]["epoch"],
        "val_accuracy": result["best"]["val_acc"],
        "training_seconds": round(seconds, 1),
        "params": params,
        "size_mb": round((run / "best.pt").stat().st_size / 2**20, 2),
        "dataset": batches.source.name,
        "train_images": len(batches.source.train),
        "val_images": len(batches.source.val),
    }
    write_json(run / "metrics.json", metrics)
    save_checkpoint(Checkpoint(spec, ck["state_dict"], metrics, vars_json(args)), run / "best.pt")
    write_json(
        run / "meta.json",
        {
            "spec": spec.to_dict(),
            "metrics": metrics,
            "args": vars_json(args),
            "class_to_idx": batches.source.class_to_idx,
        },
    )
    plot_curves(result["history"], run / "curves.png")
    plot_confusion(
        m["confusion_matrix"],
        list(spec.class_names),
        run / "confusion_matrix.png",
        f"{spec.arch} on {batches.source.name} ({split_name}): {100 * m['accuracy']:.2f} %",
    )
    print(format_report(m, list(spec.class_names), split_name))
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    resumed_run, state = check_resume(args)
    seed_everything(args.seed, args.deterministic)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    entry = get_entry(args.model)
    weights = resolve_weights(args, entry)
    source = load_source(args.data, args.val_split, args.elpv_task, args.data_dir)
    spec = build_spec(args, source, entry, weights)
    model = create_model(
        args.model,
        spec.num_classes,
        spec.in_channels,
        spec.image_size,
        weights,
        keep_pretrained_head=False,
        **spec.arch_kwargs,
    )
    if args.mode == "scratch":
        init_weights(model, args.init)
    elif args.init != "default":
        raise UserError("--init only applies to --mode scratch (pretrained weights would be overwritten)")
    if args.mode == "transfer":
        model.freeze_backbone()
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    run = resumed_run or new_run_dir(args.name, args.mode, args.model, args.data, False)
    print(
        f"run {run}\n{source.name}: {len(source.class_names)} classes, train {len(source.train)} / val "
        f"{len(source.val)} / test {len(source.test) if source.test else 0} images"
        + (f" ({source.skipped} unreadable files skipped)" if source.skipped else "")
        + f"\nmodel {args.model} ({args.mode}, weights={weights}), input {spec.color} {spec.image_size}px, "
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable params, device {device}"
    )
    t0 = time.perf_counter()
    batches = Batches(args, source, spec, model, weights, device)
    result = fit(args, batches, spec, run, state)
    finish(args, batches, spec, run, result, time.perf_counter() - t0 + (state or {}).get("seconds", 0.0))
    point_latest(run)
    print(f"wrote {run}/best.pt (+ metrics.json, curves.png, confusion_matrix.png, history.csv, meta.json)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
