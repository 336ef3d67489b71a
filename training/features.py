"""Frozen parts computed once and cached: the whole backbone (transfer: train only the head) or the first
blocks of an EfficientNet-Lite (partial finetune: train the rest on their cached output).

The frozen part is exported to ONNX and run by ONNX Runtime, ~10x faster than PyTorch eager for
depthwise convolutions on CPU (field notes); on GPU, or if export fails, PyTorch runs it.
Preprocessing is core.preprocess, which the golden test pins to the training eval transform.
Training images can be cached under several label-preserving views (flips, 90-degree rotations of the
preprocessed square, optionally also of one jittered copy): a training step then draws one view per image, as
augmentation would.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from core.errors import UserError
from core.images import ImageError
from core.models.efficientnet_lite import Prefix
from core.onnx_export import simplified, torch_to_onnx
from core.preprocess import preprocess
from core.spec import ModelSpec
from training.data import Split, load_item
from training.engine import progress_bar

if TYPE_CHECKING:  # onnx and ONNX Runtime's quantizer load only when a run trains against INT8 (~1.3 s per start)
    from core.quantization import QConfig


def _item_key(item: object) -> str:
    if isinstance(item, (str, Path)):
        st = os.stat(item)
        return f"{item}:{st.st_size}:{st.st_mtime_ns}"
    if isinstance(item, np.ndarray):
        return hashlib.sha1(item.tobytes()).hexdigest()
    ds, i = item  # (torchvision dataset, index)
    return f"{type(ds).__name__}:{getattr(ds, 'root', '')}:{i}"


CACHE_VERSION = 6  # bump when decoding or backbone code changes what features come out (6: covariance / sqrt(C))


def cache_key(spec: ModelSpec, weights: str | None, split: Split, stop: int | None = None, views: int = 1) -> str:
    """Everything that changes the cached arrays: preprocessing, backbone options, weights, where the frozen
    part stops (None = whole backbone), the number of views, and every file (path, size, mtime)."""
    pre = spec.to_dict()
    for k in ("class_names", "arch_kwargs"):
        pre.pop(k)
    bb = {k: v for k, v in spec.arch_kwargs.items() if k not in ("head", "dropout", "hidden")}
    if stop is not None:  # pooling and taps act after the cached prefix
        bb = {k: v for k, v in bb.items() if k not in ("taps", "pool", "cov_taps")}
    blob = [CACHE_VERSION, pre, bb, weights, stop, views]
    h = hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode())
    for it in split.items:
        h.update(_item_key(it).encode())
    return h.hexdigest()[:24]


def symmetric_view(x: np.ndarray, k: int) -> np.ndarray:
    """View k (0..7) of a batch of square images [..., H, W]: k % 4 quarter turns, mirrored when k >= 4.
    The 8 are the symmetries of a square; views 0 and 4 (identity, horizontal flip) are the 2-view set."""
    x = np.rot90(x, k % 4, axes=(-2, -1))
    return np.ascontiguousarray(x[..., ::-1] if k >= 4 else x)


def jittered(x: np.ndarray) -> np.ndarray:
    """One jittered copy of each preprocessed image of a batch [B, C, H, W]: zoomed in by 1.00-1.12 at a random
    position (so no border appears: on a solar cell a black edge reads as inactive area), then contrast x0.75-1.33
    about the image's mean and brightness +-0.15 (in normalised units), clipped to the preprocessed range [-1, 1].
    The draw is seeded by the image's own numbers, so the fp32 and INT8 caches of a split see the same copy."""
    out = np.empty_like(x)
    for i, img in enumerate(x):
        rng = np.random.default_rng(int.from_bytes(hashlib.sha1(img.tobytes()).digest()[:8], "little"))
        contrast = float(np.exp(rng.uniform(np.log(0.75), np.log(1.33))))
        brightness, zoom = float(rng.uniform(-0.15, 0.15)), float(rng.uniform(1.0, 1.12))
        h, w = img.shape[-2:]
        ch, cw = round(h / zoom), round(w / zoom)
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = torch.from_numpy(np.ascontiguousarray(img[:, y0 : y0 + ch, x0 : x0 + cw], np.float32))[None]
        t = torch.nn.functional.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0].numpy()
        out[i] = np.clip(contrast * (t - t.mean()) + t.mean() + brightness, -1.0, 1.0)
    return out


# --views N caches, per training image, these symmetries (symmetric_view's k) of the image and, where the flag is set,
# then the same symmetries of its jittered copy; train.py's --views choices are this table's keys
VIEW_ORDER = {1: ((0,), False), 2: ((0, 4), False), 8: (tuple(range(8)), False), 16: (tuple(range(8)), True)}


def cached_views(x: np.ndarray, views: int) -> Iterator[np.ndarray]:
    """The views --views caches of a batch, in VIEW_ORDER's order (the jittered copy made once per batch). A change
    to the jitter changes the cached numbers: bump CACHE_VERSION with it."""
    symmetries, with_jitter = VIEW_ORDER[views]
    for source in (x, jittered(x)) if with_jitter else (x,):
        for k in symmetries:
            yield symmetric_view(source, k)


def _batches(split: Split, spec: ModelSpec, batch_size: int) -> Iterator[tuple[np.ndarray, list[int]]]:
    """Preprocessed batches and the indices that decoded (unreadable files are warned about and dropped)."""
    for start in range(0, len(split), batch_size):
        arrays, keep = [], []
        for i in range(start, min(start + batch_size, len(split))):
            try:
                arrays.append(preprocess(load_item(split.items[i]), spec))
                keep.append(i)
            except ImageError as e:
                warnings.warn(f"skipping unreadable image: {e}", stacklevel=1)
        if keep:
            yield np.stack(arrays), keep


# What --int8-aware trains against: the export's first candidate that can fit on this CPU
# (core.quantization.int8_aware_config: MIXED) with its MinMax ranges on the export's default 256 calibration
# images. Its tail (pooling, concatenation, head) stays in float, so the INT8 backbone computes the same numbers
# here, without a head, as inside the exported model; a partial finetune's prefix, the same numbers as the exported
# model's next block reads (int8_part_config).
INT8_AWARE_CALIB = 256


def _ort_runner(backbone: nn.Module, spec: ModelSpec, tmp: Path, int8_calib: np.ndarray | None = None):
    import onnxruntime as ort

    path = tmp / "backbone.onnx"
    x = torch.zeros(1, spec.in_channels, spec.image_size, spec.image_size)
    torch_to_onnx(backbone, x, path, {0: "batch"}, 17, dynamo=False, output_name="features")
    if int8_calib is not None:  # the same ONNX Runtime INT8 numbers the export's candidate will compute
        import onnx
        from onnxruntime.quantization.shape_inference import quant_pre_process

        from core.quantization import quantize_one

        onnx.save(simplified(path), str(tmp / "simplified.onnx"))  # the graph the export quantizes: padding folded
        quant_pre_process(str(tmp / "simplified.onnx"), str(tmp / "pre.onnx"), skip_symbolic_shape=True)
        part = sum(n.op_type == "Conv" for n in onnx.load(str(tmp / "pre.onnx")).graph.node)
        # a partial finetune's Prefix holds its whole backbone (all of the network's Conv2d); its graph has its own
        whole = conv_count(backbone) if isinstance(backbone, Prefix) else part
        cfg, boundary = int8_part_config(whole, part)
        path = quantize_one(
            tmp / "pre.onnx", tmp / "int8.onnx", int8_calib, cfg, threads=torch.get_num_threads(), boundary=boundary
        )
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return lambda a: sess.run(None, {"input": a})[0]


def conv_count(module: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in module.modules())


def int8_part_config(whole_convs: int, part_convs: int) -> tuple[QConfig, bool]:
    """The export's --int8-aware configuration for a frozen part with `part_convs` of the whole network's
    `whole_convs` convolutions, and whether its output is a boundary inside the network. A partial finetune's prefix
    keeps the same first convolutions in fp32 as the export keeps in the whole model, and its output the Q/DQ pair
    that the whole model's next block reads through (core.quantization.prefix_config); the whole backbone of a
    transfer run (its head has no convolutions) keeps the configuration as is."""
    from core.quantization import int8_aware_config, prefix_config

    try:
        return prefix_config(int8_aware_config(), whole_convs, part_convs), whole_convs > part_convs
    except ValueError as e:
        raise UserError(
            f"--int8-aware: {e}: the export keeps every layer of the frozen part in fp32, so there are no INT8 "
            "features to train against; freeze more blocks (--trainable-from) or drop --int8-aware"
        ) from None


def _torch_runner(backbone: nn.Module, device: torch.device):
    @torch.no_grad()
    def run(a: np.ndarray) -> np.ndarray:
        return backbone(torch.from_numpy(a).to(device)).float().cpu().numpy()

    return run


def extract_features(
    frozen: nn.Module,
    spec: ModelSpec,
    split: Split,
    device: torch.device,
    batch_size: int = 32,
    desc: str = "features",
    progress: bool = True,
    views: int = 1,
    int8_calib: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, ...] for one view, [N, views, ...] for several; labels [N]) of the images that decode.
    With int8_calib, the frozen part runs as the export's INT8 model calibrated on those images."""
    frozen = frozen.eval()
    feats, labels = [], []
    with tempfile.TemporaryDirectory() as tmp:
        run = None
        if int8_calib is not None:
            run = _ort_runner(frozen, spec, Path(tmp), int8_calib)  # no PyTorch fallback: it has no such INT8
        elif device.type == "cpu":
            try:
                run = _ort_runner(frozen, spec, Path(tmp))
            except Exception as e:
                warnings.warn(
                    f"ONNX Runtime feature path unavailable ({type(e).__name__}); using PyTorch", stacklevel=1
                )
        run = run or _torch_runner(frozen.to(device), device)
        total = -(-len(split) // batch_size)
        for x, keep in progress_bar(_batches(split, spec, batch_size), desc, progress, total):
            if views == 1:
                feats.append(run(x))
            else:  # float16 halves the cache of feature maps; the loader gives float32 back
                feats.append(np.stack([run(v).astype(np.float16) for v in cached_views(x, views)], 1))
            labels += [split.labels[i] for i in keep]
    if not feats:
        raise ValueError("no readable images in split")
    x = np.concatenate(feats)
    return (x.astype(np.float32) if views == 1 else x), np.asarray(labels, np.int64)


def cached_features(
    frozen: nn.Module,
    spec: ModelSpec,
    weights: str | None,
    split: Split,
    name: str,
    cache_dir: Path,
    device: torch.device,
    progress: bool = True,
    stop: int | None = None,
    views: int = 1,
    int8_calib: Split | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    tag = f"{spec.arch}-{name}" + (f"-upto{stop}" if stop is not None else "") + (f"-{views}views" if views > 1 else "")
    key = cache_key(spec, weights, split, stop, views)
    calib = None
    if int8_calib is not None:  # the INT8 numbers depend on the calibration images and the scheme too
        from core.quantization import int8_aware_config

        tag += "-int8"
        # how the INT8 graph is made (configuration, simplified graph, input on its pixel grid): a change of any of
        # them must not reuse old caches
        recipe = int8_aware_config().name + "-onnxsim-grid" + ("-prefix-lead-boundary" if stop is not None else "")
        key = hashlib.sha256((key + cache_key(spec, weights, int8_calib) + recipe).encode())
        key = key.hexdigest()[:24]
    path = cache_dir / f"{tag}-{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            return z["x"], z["y"]
    if int8_calib is not None:
        calib = np.concatenate([x for x, _ in _batches(int8_calib, spec, 32)])
    x, y = extract_features(
        frozen, spec, split, device, desc=f"features[{name}]", progress=progress, views=views, int8_calib=calib
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}.npz")
    np.savez(tmp, x=x, y=y)
    os.replace(tmp, path)
    return x, y


class FeatureLoader:
    """Minibatches of cached features, in the given index order, in the (x, y, skipped) shape of the engine.

    With several cached views per image ([N, V, ...]), each image contributes one view per epoch, drawn from
    `view_seed` (seed and epoch: a resumed run draws the same views); without a seed, view 0 (the image as is)."""

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        batch_size: int,
        indices: list[int],
        views: int = 1,
        view_seed: int | None = None,
        alt: np.ndarray | None = None,
        paired: bool = False,
    ) -> None:
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)
        self.batch_size, self.indices = batch_size, torch.tensor(indices, dtype=torch.long)
        self.multi_view = views > 1  # x is [N, views, ...] float16 (see extract_features)
        rng = np.random.default_rng(view_seed)
        drawn = rng.integers(0, views, len(y)) if view_seed is not None else None
        self.views = torch.from_numpy(drawn if drawn is not None else np.zeros(len(y), np.int64))
        # --int8-aware: each image comes from the INT8 run of the frozen part in half of the epochs (seeded), or
        # (paired) every batch is [B, 2, ...]: each image's fp32 and INT8 features side by side
        self.alt, self.paired = (torch.from_numpy(alt) if alt is not None else None), paired
        self.use_alt = torch.from_numpy(rng.random(len(y)) < 0.5) if alt is not None else None

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self):
        for s in range(0, len(self.indices), self.batch_size):
            ix = self.indices[s : s + self.batch_size]
            x = self._take(self.x, ix)
            if self.alt is not None and self.paired:
                x = torch.stack([x, self._take(self.alt, ix)], 1)
            elif self.alt is not None:
                x = torch.where(self.use_alt[ix].view(-1, *[1] * (x.ndim - 1)), self._take(self.alt, ix), x)
            yield x, self.y[ix], 0

    def _take(self, x: torch.Tensor, ix: torch.Tensor) -> torch.Tensor:
        return x[ix, self.views[ix]].float() if self.multi_view else x[ix]
