"""Where training batches come from (shared by the plain engine and the Lightning engine): cached features of
the frozen part, or images through a DataLoader."""

from __future__ import annotations

import argparse

import numpy as np
from torch.utils.data import DataLoader

from core.models.efficientnet_lite import Prefix, Suffix
from core.spec import ModelSpec
from core.transforms import eval_transform, train_transform
from training import distributed, features
from training.data import DataSource, ImageDataset, Split, balanced_subset, collate_skip
from training.distributed import Dist
from training.engine import Int8Consistency, predict, set_bn_momentum, with_penalty
from training.runs import ARTIFACTS


def train_views(args: argparse.Namespace, source: DataSource) -> int:
    """Cached views per training image: --views, or 8 for a partial finetune on symmetric data (ELPV), else 1."""
    if args.views != "auto":
        return int(args.views)
    return 8 if args.trainable_from is not None and source.symmetric else 1


def transfer_cached(args: argparse.Namespace) -> bool:
    """Transfer runs train the head on cached backbone features unless images must go through it every epoch."""
    return args.mode == "transfer" and args.augment == "none" and not args.no_feature_cache


def int8_select_applies(args: argparse.Namespace) -> bool:
    """Where --int8-select means something: a transfer head trained with --int8-aware on cached features, whose INT8
    model's validation logits are the head on the cached INT8 features."""
    return bool(args.int8_aware) and args.trainable_from is None and transfer_cached(args)


def image_loader(split: Split, transform, args: argparse.Namespace, sampler) -> DataLoader:
    return DataLoader(
        ImageDataset(split, transform),
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.workers,
        pin_memory=args.pin_memory,
        collate_fn=collate_skip,
        persistent_workers=False,
        drop_last=False,
    )


class Batches:
    """Where batches come from: cached features of the frozen part (transfer: the whole backbone; partial
    finetune: its first blocks) or images through a DataLoader. Training loaders draw this rank's shard of the
    epoch's permutation; evaluation loaders a strided shard."""

    def __init__(self, args, source: DataSource, spec: ModelSpec, model, weights, device, d: Dist) -> None:
        self.args, self.source, self.spec, self.model, self.weights, self.device, self.d = (
            args,
            source,
            spec,
            model,
            weights,
            device,
            d,
        )
        self.stop = args.trainable_from
        self.use_features = transfer_cached(args) or self.stop is not None
        self.views = train_views(args, source)
        if self.stop is not None:
            self.frozen, self.trainee = Prefix(model.backbone, self.stop), Suffix(model.backbone, model.head, self.stop)
        else:
            self.frozen, self.trainee = model.backbone, model.head if self.use_features else model
        # --int8-aware with --int8-consistency > 0: what trains (the head, or blocks[stop:] and the head) sees each
        # image's fp32 and INT8 features side by side (training.engine.Int8Consistency)
        self.paired = self.use_features and args.int8_aware and args.int8_consistency > 0
        if self.paired:  # a partial finetune runs blocks[stop:] before the head
            body = None if self.stop is None else model.backbone
            self.trainee = Int8Consistency(model.head, args.int8_consistency, body, self.stop or 0)
        set_bn_momentum(self.trainee, args.bn_momentum)
        self._train_tf = train_transform(spec, args.augment)
        self._eval_tf = eval_transform(spec)
        self._features: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _cached_int8(self, name: str, split: Split) -> np.ndarray:
        """A split (the training views, or validation) through the export's INT8 model of the frozen part (the
        backbone in transfer mode, the first blocks in a partial finetune), calibrated on the images the export
        calibrates on (training split, class-balanced subset)."""
        calib = balanced_subset(self.source.train.labels, features.INT8_AWARE_CALIB)
        subset = Split([self.source.train.items[i] for i in calib], [self.source.train.labels[i] for i in calib])
        return self._cached(name, split, subset)[0]

    def _cached(self, name: str, split: Split, int8_calib: Split | None = None) -> tuple[np.ndarray, np.ndarray]:
        name_key = name + ("-int8" if int8_calib is not None else "")
        if name_key not in self._features:
            get = lambda: features.cached_features(  # noqa: E731
                self.frozen,
                self.spec,
                self.weights,
                split,
                name,
                ARTIFACTS / "cache" / "features",
                self.device,
                progress=not self.args.no_progress and self.d.main,
                stop=self.stop,
                views=self.views if name == "train" else 1,
                int8_calib=int8_calib,
            )
            if self.d.main:  # rank 0 fills the cache, the others read it
                self._features[name_key] = get()
            distributed.barrier(self.d)
            if not self.d.main:
                self._features[name_key] = get()
        return self._features[name_key]

    def loader(self, name: str, split: Split, train: bool, epoch: int = 0):
        """This rank's batches: a shard of the epoch's permutation (train) or a strided shard (eval)."""
        x, y = self._cached(name, split) if self.use_features else (None, None)
        n = len(y) if self.use_features else len(split)  # features: only the images that decoded
        ix = distributed.epoch_order(n, self.args.seed, epoch, self.d) if train else distributed.eval_indices(n, self.d)
        if self.use_features:
            views = self.views if name == "train" else 1
            alt = self._cached_int8("train", split) if train and self.args.int8_aware else None
            seed = self.args.seed * 100_003 + epoch if train and (views > 1 or alt is not None) else None
            return features.FeatureLoader(x, y, self.args.batch_size, ix, views, seed, alt, self.paired)
        if train:
            return image_loader(split, self._train_tf, self.args, ix)  # a list of indices serves as the sampler
        return image_loader(split, self._eval_tf, self.args, ix)

    def criterion(self, crit):
        """The training loss: `crit`, plus the INT8 consistency penalty where the head trains on paired features."""
        return with_penalty(crit, self.trainee) if self.paired else crit

    def predict(self, name: str, split: Split) -> tuple[np.ndarray, np.ndarray, int]:
        """Logits and labels of a whole split, computed in shards and gathered on every rank."""
        return self._gathered(self.loader(name, split, train=False))

    def predict_int8_val(self) -> np.ndarray | None:
        """Transfer --int8-aware: the head's logits on the validation images' INT8 backbone features (the export's
        MIXED numbers; the tail is float, so these are exactly the INT8 model's logits), in the order of
        predict("val"); None for other runs and with --no-int8-select. What the INT8-aware epoch selection reads."""
        if not int8_select_applies(self.args) or self.args.int8_select is False:
            return None
        xq = self._cached_int8("val", self.source.val)
        _, y = self._cached("val", self.source.val)
        ix = distributed.eval_indices(len(y), self.d)
        return self._gathered(features.FeatureLoader(xq, y, self.args.batch_size, ix, 1, None, None, False))[0]

    def _gathered(self, loader) -> tuple[np.ndarray, np.ndarray, int]:
        logits, labels, skipped = predict(self.trainee, loader, self.device)
        logits, labels = distributed.gather_arrays(self.d, logits, labels)
        (skipped,) = distributed.sum_all(self.d, [skipped])
        return logits, labels, int(skipped)
