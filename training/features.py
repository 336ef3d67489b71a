"""Transfer learning with a frozen backbone: compute features once, cache them, train only the head.

The backbone is exported to ONNX and run by ONNX Runtime, ~10x faster than PyTorch eager for
depthwise convolutions on CPU (field notes); on GPU, or if export fails, PyTorch runs it.
Preprocessing is core.preprocess, which the golden test pins to the training eval transform.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from core.images import ImageError
from core.onnx_export import torch_to_onnx
from core.preprocess import decode_size, preprocess
from core.spec import ModelSpec
from training.data import Split, load_item


def _item_key(item: object) -> str:
    if isinstance(item, (str, Path)):
        st = os.stat(item)
        return f"{item}:{st.st_size}:{st.st_mtime_ns}"
    if isinstance(item, np.ndarray):
        return hashlib.sha1(item.tobytes()).hexdigest()
    ds, i = item  # (torchvision dataset, index)
    return f"{type(ds).__name__}:{getattr(ds, 'root', '')}:{i}"


CACHE_VERSION = 3  # bump when backbone code changes what features come out


def cache_key(spec: ModelSpec, weights: str | None, split: Split) -> str:
    pre = spec.to_dict()
    for k in ("class_names", "arch_kwargs"):
        pre.pop(k)
    bb = {k: v for k, v in spec.arch_kwargs.items() if k not in ("head", "dropout", "hidden")}
    h = hashlib.sha256(json.dumps([CACHE_VERSION, pre, bb, weights], sort_keys=True, default=str).encode())
    for it in split.items:
        h.update(_item_key(it).encode())
    return h.hexdigest()[:24]


def _batches(split: Split, spec: ModelSpec, batch_size: int) -> Iterator[tuple[np.ndarray, list[int]]]:
    """Preprocessed batches and the indices that decoded (unreadable files are warned about and dropped)."""
    for start in range(0, len(split), batch_size):
        arrays, keep = [], []
        for i in range(start, min(start + batch_size, len(split))):
            try:
                arrays.append(preprocess(load_item(split.items[i], decode_size(spec)), spec))
                keep.append(i)
            except ImageError as e:
                warnings.warn(f"skipping unreadable image: {e}", stacklevel=1)
        if keep:
            yield np.stack(arrays), keep


def _ort_runner(backbone: nn.Module, spec: ModelSpec, tmp: Path):
    import onnxruntime as ort

    path = tmp / "backbone.onnx"
    x = torch.zeros(1, spec.in_channels, spec.image_size, spec.image_size)
    torch_to_onnx(backbone, x, path, {0: "batch"}, 17, dynamo=False, output_name="features")
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return lambda a: sess.run(None, {"input": a})[0]


def _torch_runner(backbone: nn.Module, device: torch.device):
    @torch.no_grad()
    def run(a: np.ndarray) -> np.ndarray:
        return backbone(torch.from_numpy(a).to(device)).float().cpu().numpy()

    return run


def extract_features(
    backbone: nn.Module,
    spec: ModelSpec,
    split: Split,
    device: torch.device,
    batch_size: int = 32,
    desc: str = "features",
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    backbone = backbone.eval()
    feats, labels = [], []
    with tempfile.TemporaryDirectory() as tmp:
        run = None
        if device.type == "cpu":
            try:
                run = _ort_runner(backbone, spec, Path(tmp))
            except Exception as e:
                warnings.warn(
                    f"ONNX Runtime feature path unavailable ({type(e).__name__}); using PyTorch", stacklevel=1
                )
        run = run or _torch_runner(backbone.to(device), device)
        total = -(-len(split) // batch_size)
        for x, keep in tqdm(
            _batches(split, spec, batch_size), total=total, desc=desc, leave=False, disable=not progress
        ):
            feats.append(run(x))
            labels += [split.labels[i] for i in keep]
    if not feats:
        raise ValueError("no readable images in split")
    return np.concatenate(feats).astype(np.float32), np.asarray(labels, np.int64)


def cached_features(
    backbone: nn.Module,
    spec: ModelSpec,
    weights: str | None,
    split: Split,
    name: str,
    cache_dir: Path,
    device: torch.device,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    path = cache_dir / f"{spec.arch}-{name}-{cache_key(spec, weights, split)}.npz"
    if path.is_file():
        with np.load(path) as z:
            return z["x"], z["y"]
    x, y = extract_features(backbone, spec, split, device, desc=f"features[{name}]", progress=progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}.npz")
    np.savez(tmp, x=x, y=y)
    os.replace(tmp, path)
    return x, y


class FeatureLoader:
    """Minibatches of cached features, in the given index order, in the (x, y, skipped) shape of the engine."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, indices: list[int]) -> None:
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)
        self.batch_size, self.indices = batch_size, torch.tensor(indices, dtype=torch.long)

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self):
        for s in range(0, len(self.indices), self.batch_size):
            ix = self.indices[s : s + self.batch_size]
            yield self.x[ix], self.y[ix], 0
