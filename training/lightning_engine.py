"""`--engine lightning`: the same models, data, schedule and checkpoints, driven by a Lightning Trainer.

For users coming from seed 002's Lightning variant. Only the loop changes: batches come from the same
`Batches` (cached features or images), the optimizer/scheduler from training.engine, and every epoch
ends in the same EpochRecorder, so best.pt/last.pt/resume.pt/history.csv are byte-for-byte the same
format as the plain engine's (and `--resume` works across engines). Lightning is optional:
`pip install lightning`.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

import torch

from core.errors import UserError
from core.spec import ModelSpec
from training.batches import Batches
from training.ema import averaged, resumed_ema
from training.engine import make_criterion, make_optimizer, make_scheduler, mixed_targets, mixup_batch, to_layout
from training.recorder import EpochRecorder


def _import_lightning():
    warnings.filterwarnings("ignore", message=".*treespec.*")  # lightning internals vs newer torch, harmless
    try:
        import lightning.pytorch as pl
    except ImportError:
        raise UserError("--engine lightning needs the optional package: pip install lightning") from None
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)  # no "GPU available: False" banners
    return pl


def require(distributed: bool) -> None:
    """Fail before anything is written when this engine cannot run."""
    if distributed:
        raise UserError("--engine lightning runs one process; under torchrun use the default --engine torch")
    _import_lightning()


def fit_lightning(args: argparse.Namespace, batches: Batches, spec: ModelSpec, run: Path, state: dict | None) -> dict:
    pl = _import_lightning()
    rec = EpochRecorder(args, spec, run, True, state)
    model, source = batches.model, batches.source
    if state:
        model.load_state_dict(state["model"])
        print(f"resuming {run.name} at epoch {rec.start}/{args.epochs}")
    ema = resumed_ema(batches.trainee, args.ema, state)
    remaining = args.epochs - rec.start + 1
    if remaining < 1:
        return rec.close()

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = batches.trainee
            self.crit = batches.criterion(
                make_criterion(args, source.train.labels, len(source.class_names), torch.device("cpu"))
            )
            self.sums = [0.0, 0.0, 0, 0]  # loss*n, correct, seen, skipped
            self.t_epoch = 0.0

        @property
        def epoch(self) -> int:
            return rec.start + self.current_epoch

        def train_dataloader(self):
            return batches.loader("train", source.train, True, self.epoch)

        def configure_optimizers(self):
            steps = len(batches.loader("train", source.train, train=True))
            scale = args.backbone_lr_scale if args.mode == "finetune" else 1.0
            opt = make_optimizer(self.net, args.optimizer, args.lr, args.weight_decay, scale)
            sched = make_scheduler(
                opt, args.schedule, args.epochs, steps, args.warmup_epochs, args.step_size, args.gamma
            )
            if state:
                opt.load_state_dict(state["optimizer"])
                sched.load_state_dict(state["scheduler"])
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        def on_train_epoch_start(self) -> None:
            torch.manual_seed(args.seed * 100_003 + self.epoch)  # as the plain engine: resumable dropout
            self.sums, self.t_epoch = [0.0, 0.0, 0, 0], time.perf_counter()

        def training_step(self, batch, batch_idx):
            x, y, skipped = batch
            self.sums[3] += int(skipped)
            if len(y) == 0:
                return None  # every image of this batch was unreadable: Lightning skips the step
            x, mix = mixup_batch(to_layout(x, args.channels_last), y, args.mixup)
            logits = self.net(x)
            loss = self.crit(logits, mixed_targets(y, mix, logits.shape[1]))
            self.sums[0] += loss.item() * len(y)
            self.sums[1] += (logits.argmax(1) == y).sum().item()
            self.sums[2] += len(y)
            self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False)
            return loss

        def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
            if ema and outputs is not None:  # a step was taken (not a batch of unreadable images)
                ema.update()

        def on_train_epoch_end(self) -> None:
            loss_sum, hits, seen, skipped = self.sums
            train = {
                "loss": loss_sum / max(seen, 1),
                "acc": hits / max(seen, 1),
                "skipped": skipped,
                "seconds": time.perf_counter() - self.t_epoch,
            }
            opt = self.trainer.optimizers[0]
            sched = self.trainer.lr_scheduler_configs[0].scheduler
            with averaged(ema) as ema_state:  # --ema: the average is evaluated and saved
                logits, labels, _ = batches.predict("val", source.val)
                resume_state = {
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "scaler": None,
                    "engine": "lightning",
                    **ema_state,
                }
                lr = opt.param_groups[-1]["lr"]
                int8 = batches.predict_int8_val()
                if rec.end_epoch(self.epoch, train, logits, labels, lr, model, resume_state, int8):
                    self.trainer.should_stop = True

    cuda = batches.device.type == "cuda"
    precision = {"bf16": "bf16-mixed", "fp16": "16-mixed"}.get(args.amp, "32-true") if cuda else "32-true"
    trainer = pl.Trainer(
        max_epochs=remaining,
        accelerator="gpu" if cuda else "cpu",
        devices=[batches.device.index or 0] if cuda else 1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,  # the recorder writes our own checkpoints
        enable_model_summary=False,
        enable_progress_bar=not args.no_progress,
        num_sanity_val_steps=0,
        reload_dataloaders_every_n_epochs=1,  # a new permutation per epoch, as the plain engine
        use_distributed_sampler=False,
        default_root_dir=str(run),
    )
    trainer.fit(Module())
    return rec.close()
