"""train.py's argument parser and YAML config merge (a config sets any option; the command line wins)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from core.errors import UserError
from core.models import get_entry, list_models
from core.models.classifier import HEADS, INITS
from core.spec import COLOR_MODES, CROP_MODES, INTERPOLATIONS
from core.transforms import AUGMENTATIONS
from training.batches import transfer_cached
from training.engine import CLASS_WEIGHTS, OPTIMIZERS, SCHEDULES
from training.features import VIEW_ORDER
from training.recorder import DEFAULT_INT8_SELECT_MARGIN, SELECT_METRICS

MODES = ("scratch", "finetune", "transfer")
# Per-mode defaults: transfer trains a head on cached features (cheap epochs); finetune moves all weights.
# --ema: on for transfer heads, whose validation accuracy otherwise swings by up to 50 points between epochs on
# ELPV's unnormalised frozen features (README "Weight averaging"); off where it was not measured to help (the
# partial finetune: validation 79.39 % with it, 80.41 % without, seed 0).
MODE_DEFAULTS = {
    "transfer": {"epochs": 40, "lr": 1e-3, "ema": 0.995},
    "finetune": {"epochs": 12, "lr": 1e-3, "ema": 0.0},
    "scratch": {"epochs": 30, "lr": 2e-3, "ema": 0.0},
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train an image classifier (scratch / finetune / transfer).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="YAML file setting any option below (flags override it)")
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default="elpv",
        help="ImageFolder path (train/ val/ [test/] or class folders) or elpv|digits|mnist|"
        "fashionmnist|cifar10|flowers102",
    )
    g.add_argument("--elpv-task", choices=("4class", "binary"), default="4class")
    g.add_argument("--val-split", type=float, default=0.15, help="fraction held out for validation")
    g.add_argument("--data-dir", type=Path, default=Path("artifacts/data"), help="download folder (torchvision)")
    g.add_argument("--workers", type=int, default=2)
    g.add_argument("--strict-data", action="store_true", help="stop when the data check finds problems")
    g.add_argument("--no-data-check", action="store_true", help="skip the data health check")
    g.add_argument("--pin-memory", action="store_true")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="efficientnet_lite0", help=f"one of: {', '.join(list_models())}")
    g.add_argument("--mode", choices=MODES, default="transfer")
    g.add_argument(
        "--weights",
        help="pretrained weights: 'imagenet' (Lite0, offline), a torchvision enum "
        "name (DEFAULT, IMAGENET1K_V1) or a .pth file; default per model",
    )
    g.add_argument("--head", choices=HEADS, default="linear")
    g.add_argument("--init", choices=INITS, default="default", help="scratch: weight initialisation")
    g.add_argument("--hidden", type=int, default=256, help="MLP head width")
    g.add_argument("--dropout", type=float, help="head dropout (default per model)")
    g.add_argument(
        "--taps",
        default="auto",
        help="EfficientNet-Lite: extra feature blocks, e.g. '4,7,10,14', "
        "'none', or auto (multi-scale in transfer mode)",
    )
    g.add_argument("--pool", choices=("auto", "mean", "meanmax"), default="auto")
    g.add_argument(
        "--cov-taps",
        default="auto",
        help="EfficientNet-Lite: blocks whose output also gives its channel covariance over positions "
        "(second-order texture statistics), e.g. '14' (Lite0's last 192-channel block: 18,528 features), 'none', "
        "or auto (the end of stage 6 in transfer mode, none otherwise)",
    )
    g = p.add_argument_group("preprocessing (recorded in the model spec)")
    g.add_argument("--image-size", type=int, help="network input side (default per model/data)")
    g.add_argument("--resize-size", type=int, help="shorter side before center crop (default: the model's ratio)")
    g.add_argument("--crop", choices=CROP_MODES, help="default: squash for square built-in data, else center")
    g.add_argument("--interpolation", choices=INTERPOLATIONS, help="default: what the model's weights declare")
    g.add_argument("--color", choices=COLOR_MODES, help="default: rgb, or gray3/gray for grayscale data")
    g.add_argument("--augment", choices=AUGMENTATIONS, default="none")
    g.add_argument(
        "--views",
        choices=("auto", *map(str, VIEW_ORDER)),
        default="auto",
        help="cached-feature training: views of each training image (2 = + horizontal flip, 8 = the square's "
        "flips and 90-degree rotations, 16 = those 8 of the image and of one copy with its zoom, contrast and "
        "brightness jittered; twice the cache); auto = 8 for a partial finetune on data whose labels survive them "
        "(ELPV cells), else 1",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help="default per mode")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    g.add_argument("--lr", type=float, help="head learning rate (default per mode)")
    g.add_argument("--backbone-lr-scale", type=float, default=0.1, help="finetune: backbone lr = lr * this")
    g.add_argument(
        "--trainable-from",
        type=int,
        help="finetune, EfficientNet-Lite: freeze the blocks before this one, cache their output once per image "
        "and view, train the rest (a partial finetune: much cheaper epochs on a CPU)",
    )
    g.add_argument(
        "--int8-aware",
        action=argparse.BooleanOptionalAction,
        help="train against the export's INT8 run of the frozen part (core.quantization.MIXED): in transfer mode "
        "the head learns on each image's fp32 and INT8 features together (--int8-consistency); in a partial "
        "finetune half of the samples come from the INT8 prefix, or both with --int8-consistency. Default: on "
        "for EfficientNet-Lite transfer runs on cached features (the default model), off otherwise; "
        "--no-int8-aware turns it off",
    )
    g.add_argument(
        "--int8-consistency",
        type=float,
        help="with --int8-aware: weight of the penalty on the difference between the logits on each image's fp32 "
        "and INT8 features of the frozen part (each centred over the classes); both go through what trains in one "
        "batch (a partial finetune's steps cost twice as much). 0 trains on them as separate samples (in a partial "
        "finetune each image comes from one of them per epoch). Default: 50 in transfer mode, 0 in a partial finetune",
    )
    g.add_argument(
        "--int8-select",
        action=argparse.BooleanOptionalAction,
        help="transfer with --int8-aware: the best epoch is the best one on validation (by --select-metric) among "
        "those whose INT8 model fits the export's default budget on validation (agreement >= 98 %%, top-1 drop <= 1 "
        "point, no class drop > 5 points; core/gates.py), else the best one. Default: on wherever --int8-aware "
        "trains a transfer head; --no-int8-select: --select-metric alone",
    )
    g.add_argument(
        "--int8-select-margin",
        type=float,
        help="with --int8-select: points of agreement above the budget's 98 %% an epoch's INT8 model needs on "
        f"validation to count as fitting (default {DEFAULT_INT8_SELECT_MARGIN:g}: a 296-image validation split "
        "measures 98 %% agreement to +-0.8 points, so an epoch chosen at exactly 98 %% misses the gate on other "
        "images about half the time); 0 uses the budget as it is",
    )
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--schedule", choices=SCHEDULES, default="cosine")
    g.add_argument("--warmup-epochs", type=float, default=1.0)
    g.add_argument("--step-size", type=int, default=10, help="step schedule: epochs per decay")
    g.add_argument("--gamma", type=float, default=0.1, help="step schedule: decay factor")
    g.add_argument("--label-smoothing", type=float, default=0.1)
    g.add_argument(
        "--mixup",
        type=float,
        default=0.0,
        metavar="ALPHA",
        help="mixup: blend each training batch with a shuffled copy of itself, and the targets alike, by lam ~ "
        "Beta(ALPHA, ALPHA) (what it blends: images, or the cached features / block maps of a transfer run or "
        "partial finetune); 0 = off, 0.2-0.4 typical",
    )
    g.add_argument(
        "--class-weight",
        choices=CLASS_WEIGHTS,
        default="none",
        help="weight the loss by the training split's inverse class frequency (or its square root): rare classes "
        "count more (the average weight per sample stays 1)",
    )
    g.add_argument(
        "--bn-momentum",
        type=float,
        help="BatchNorm running-statistics momentum of the trained layers (PyTorch's convention: the weight of "
        "each new batch; default: the architecture's, 0.01 for EfficientNet-Lite as in TF, 0.1 for torchvision)",
    )
    g.add_argument(
        "--ema",
        type=float,
        metavar="DECAY",
        help="evaluate and save an exponential moving average of the trained weights, updated every step with "
        "this decay (e.g. 0.99: an average over ~100 steps; warmed up over the first steps); 0 turns it off "
        "(default: 0.995 for --mode transfer, off otherwise)",
    )
    g.add_argument(
        "--select-metric",
        choices=tuple(SELECT_METRICS),
        default="accuracy",
        help="the validation figure that chooses the saved epoch (best.pt) and that --patience waits on: accuracy, "
        "or balanced accuracy (the mean of the per-class recalls: for imbalanced data, where a model can gain "
        "accuracy by never predicting a rare class); ties go to accuracy, then the lower validation loss",
    )
    g.add_argument("--patience", type=int, default=0, help="early stopping after N epochs without val gain")
    g = p.add_argument_group("run")
    g.add_argument("--name", help="run folder name under artifacts/runs (default: time-mode-model-data)")
    g.add_argument("--resume", nargs="?", const="latest", help="continue a run: its folder (default latest)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower)")
    g.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N")
    g.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="CUDA mixed precision")
    g.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train convolutions in channels_last memory format (default on: a training step of Lite0 / MobileNetV2 /"
        " ResNet18 ran 1.5 / 1.7 / 1.1x faster on a 2-core CPU, and it is the layout CUDA tensor cores want)",
    )
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument(
        "--engine", choices=("torch", "lightning"), default="torch", help="training loop: plain PyTorch or Lightning"
    )
    g.add_argument("--sync-bn", action="store_true", help="torchrun on CUDA: SyncBatchNorm across processes")
    g.add_argument("--no-feature-cache", action="store_true", help="transfer: run the backbone every epoch")
    g.add_argument("--no-progress", action="store_true")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = get_args_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**load_config(pre.config, parser))
    args = parser.parse_args(argv)
    for k, v in MODE_DEFAULTS[args.mode].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0:
        raise UserError("--epochs and --batch-size must be >= 1 and --lr > 0")
    if args.int8_consistency is None:
        args.int8_consistency = 50.0 if args.trainable_from is None else 0.0
    if args.int8_consistency < 0:
        raise UserError(f"--int8-consistency {args.int8_consistency} is negative: give a weight >= 0, e.g. 50")
    if args.int8_aware is None:  # measured where it matters: the default EfficientNet-Lite transfer model
        args.int8_aware = transfer_cached(args) and get_entry(args.model).family == "efficientnet_lite"
    if args.mixup < 0:
        raise UserError(f"--mixup {args.mixup} is negative: give the Beta distribution's alpha, e.g. 0.2 (0: off)")
    if not 0 <= args.ema < 1:
        raise UserError(
            f"--ema {args.ema} is outside [0, 1): give the weight the average keeps per step, e.g. 0.99 (0: off)"
        )
    if args.bn_momentum is not None and not 0 < args.bn_momentum <= 1:
        raise UserError(
            f"--bn-momentum {args.bn_momentum} is outside (0, 1]: give the weight of each new batch, e.g. 0.1"
        )
    return args


def load_config(path: Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"config file {path} must be a mapping of option: value")
    cfg = {str(k).replace("-", "_"): v for k, v in cfg.items()}
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise UserError(f"config file {path}: unknown options {unknown}")
    return cfg
