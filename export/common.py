"""What every export step needs: the source model (checkpoint, or the pretrained ImageNet Lite0 when no run
exists), the output folder, and real images preprocessed exactly by the spec (calibration and held-out)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.checkpoint import Checkpoint, load_model, save_checkpoint
from core.errors import UserError
from core.images import ImageError
from core.models import create_model, default_spec
from core.preprocess import preprocess
from core.spec import ModelSpec
from training.data import Split, balanced_subset, load_item, load_source, stratified_split
from training.runs import ARTIFACTS, resolve_checkpoint

IMAGENET_DIR = ARTIFACTS / "cache" / "imagenet-lite0"

EXPORT_FILES = {  # artifact name -> file in the export folder
    "onnx_fp32": "model.onnx",
    "onnx_int8": "model.int8.onnx",
    "ort_fp32": "model.ort",
    "ort_int8": "model.int8.ort",
    "torchscript": "model.pt",
    "torchscript_mobile": "model.ptl",
    "executorch": "model.pte",
    "executorch_int8": "model.int8.pte",
    "litert": "model.tflite",
    "litert_int8": "model.int8.tflite",
}
LEGACY = {"torchscript_mobile": "legacy: PyTorch Mobile, unmaintained upstream; ExecuTorch replaces it"}
INT8 = {"onnx_int8", "ort_int8", "executorch_int8", "litert_int8"}


def format_label(name: str) -> str:
    """The artifact's name as tables show it: legacy formats say so."""
    return f"{name} ({LEGACY[name]})" if name in LEGACY else name


def existing_artifacts(d: Path) -> dict[str, Path]:
    return {k: d / f for k, f in EXPORT_FILES.items() if (d / f).is_file()}


def imagenet_lite0_checkpoint() -> Path:
    """The offline pretrained EfficientNet-Lite0 ImageNet classifier as a checkpoint of our own format."""
    path = IMAGENET_DIR / "best.pt"
    if not path.is_file():
        from torchvision.models import ResNet18_Weights  # ships the 1000 ImageNet category names offline

        spec = default_spec("efficientnet_lite0", ResNet18_Weights.DEFAULT.meta["categories"], weights="imagenet")
        model = create_model("efficientnet_lite0", 1000, weights="imagenet", **spec.arch_kwargs)
        save_checkpoint(
            Checkpoint(
                spec,
                model.state_dict(),
                {"note": "ImageNet-1k pretrained, not fine-tuned"},
                {"data": "imagenet-samples"},
            ),
            path,
        )
    return path


def default_checkpoint(arg: str | None) -> Path:
    """--checkpoint, else runs/latest/best.pt, else the pretrained ImageNet Lite0 (fresh machine)."""
    return resolve_checkpoint(arg, fallback=_pretrained_fallback)


def _pretrained_fallback() -> Path:
    print("no training run found: exporting the pretrained ImageNet EfficientNet-Lite0 classifier")
    return imagenet_lite0_checkpoint()


# Held-out images every export check reads by default: the whole split up to this many. The INT8 budget's class
# gate (5 points) cannot be read on a small sample: ELPV's rarest class has 12 images in 300 of its 656 test images,
# where one flipped image is 8.3 points, and 27 in all 656 (3.7 points).
HELDOUT_IMAGES = 1000
SAMPLE_CROPS = 256  # random crops of the two sample photos that stand in for held-out images of the ImageNet model

PT2E_CALIB = 64  # calibration images for the pt2e observers of the phone runtimes' INT8 (one image per call)


def pt2e_quantized(module, quantizer, calib: np.ndarray, **convert_options):
    """A torch.export'ed module with `quantizer`'s observers calibrated on up to PT2E_CALIB training images, one
    image per call (the phone programs run at batch 1), then converted to its quantized graph."""
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    prepared = prepare_pt2e(module, quantizer)
    with torch.no_grad():
        for i in range(min(len(calib), PT2E_CALIB)):
            prepared(torch.from_numpy(np.ascontiguousarray(calib[i : i + 1], np.float32)))
    return convert_pt2e(prepared, **convert_options)


def standalone_parser(description: str):
    """The arguments every single-format exporter takes (export/to_torchscript.py, to_executorch.py, to_litert.py)."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--checkpoint", help="checkpoint or run folder (default artifacts/runs/latest/best.pt)")
    p.add_argument("--out", help="output folder (default <run>/export)")
    return p


def standalone_inputs(args) -> tuple:
    """(model, checkpoint, output folder) for a single-format exporter's parsed arguments."""
    path = default_checkpoint(args.checkpoint)
    model, ck = load_model(path)
    return model, ck, output_dir(path, args.out)


def output_dir(ckpt_path: Path, out: str | None) -> Path:
    d = Path(out) if out else ckpt_path.parent / "export"
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to output folder {d} ({e.strerror}); pass a writable --out") from None
    return d


@dataclass
class Images:
    x: np.ndarray  # float32 [N, C, S, S], preprocessed by the spec
    y: np.ndarray  # int64 labels; -1 where there is no ground truth (ImageNet sample images)


def _load(split: Split, spec: ModelSpec, idx: list[int]) -> Images:
    xs, ys = [], []
    for i in idx:
        try:
            xs.append(preprocess(load_item(split.items[i]), spec))
            ys.append(split.labels[i])
        except ImageError:
            continue
    if not xs:
        raise UserError("no readable images for calibration/validation")
    return Images(np.stack(xs), np.asarray(ys, np.int64))


def sample_images(spec: ModelSpec, n: int, seed: int) -> Images:
    """For the ImageNet model: random crops and flips of scikit-learn's sample photos (no labels).
    Calibration and held-out sets use different seeds, so they share no crop."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    xs = []
    for k in range(n):
        im = photos[k % len(photos)]
        w, h = im.size
        s = int(rng.integers(min(w, h) // 4, min(w, h)))
        left, top = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
        crop = im.crop((left, top, left + s, top + s))
        xs.append(preprocess(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if k % 2 else crop, spec))
    return Images(np.stack(xs), np.full(n, -1, np.int64))


def _source(ckpt: Checkpoint):
    a = ckpt.args
    src = load_source(
        a.get("data", "elpv"),
        a.get("val_split", 0.15),
        a.get("elpv_task", "4class"),
        Path(a.get("data_dir", "artifacts/data")),
    )
    if list(src.class_names) != list(ckpt.spec.class_names):
        raise UserError("the checkpoint's dataset no longer has the same classes; cannot validate on it")
    return src


def _stratified(split: Split, n: int, what: str) -> list[int]:
    """All indices (n = 0) or a stratified sample of n: accuracy keeps the split's class mix."""
    idx = list(range(len(split)))
    n_cls = len(set(split.labels))
    if 0 < n < n_cls:
        raise UserError(
            f"{what} {n} is below the {n_cls} classes of the held-out split: every class needs at least one image; "
            f"pass 0 (all images) or at least {n_cls}"
        )
    if 0 < n < len(split):
        idx = sorted(stratified_split(idx, split.labels, n)[1].items)
    return idx


def add_max_images_flag(p, what: str) -> None:
    """--max-images, shared by every export CLI that reads held-out (or validation) images."""
    p.add_argument(
        "--max-images",
        type=int,
        default=HELDOUT_IMAGES,
        help=f"{what}: a stratified sample where the split holds more (0 = all; default {HELDOUT_IMAGES})",
    )


def _crops(n: int) -> int:
    """Sample-photo crops for a requested image count: they have no split to exhaust, so "all" means SAMPLE_CROPS."""
    return min(n, SAMPLE_CROPS) if n > 0 else SAMPLE_CROPS


def _calibration(src, spec: ModelSpec, n: int) -> Images:
    """n training images, every class represented (a class missing from calibration gets ranges it never saw)."""
    if n < spec.num_classes:
        raise UserError(
            f"--calib-images {n} is below the {spec.num_classes} classes: calibration needs every class; "
            f"pass at least {spec.num_classes} (256 recommended)"
        )
    missing = sorted(set(range(spec.num_classes)) - set(src.train.labels))
    if missing:
        names = ", ".join(src.class_names[c] for c in missing)
        raise UserError(f"the training split has no images of class {names}: cannot calibrate INT8 on every class")
    return _load(src.train, spec, balanced_subset(src.train.labels, n))


def calibration_for(ckpt: Checkpoint, n: int) -> Images:
    """Calibration images alone (export/quantize.py): the held-out split is not read."""
    if ckpt.args.get("data") == "imagenet-samples":
        return sample_images(ckpt.spec, n, seed=1)
    return _calibration(_source(ckpt), ckpt.spec, n)


def data_for(ckpt: Checkpoint, calib_n: int, heldout_n: int) -> tuple[Images | None, Images, str]:
    """(calibration images from train, held-out images from test/val, description)."""
    if ckpt.args.get("data") == "imagenet-samples":
        return (
            sample_images(ckpt.spec, calib_n, seed=1) if calib_n > 0 else None,
            sample_images(ckpt.spec, _crops(heldout_n), seed=2),
            "random crops of scikit-learn sample photos (no labels: agreement with PyTorch only)",
        )
    src = _source(ckpt)
    name, held = src.eval_split
    held_idx = _stratified(held, heldout_n, "--max-images")
    return (
        _calibration(src, ckpt.spec, calib_n) if calib_n > 0 else None,
        _load(held, ckpt.spec, held_idx),
        f"{src.name} {name} split ({len(held_idx)} of {len(held)} images)",
    )


def selection_for(ckpt: Checkpoint, n: int) -> tuple[Images, str]:
    """Images that choose between INT8 candidates: the validation split, never the test split that reports
    the chosen model (choosing on test images would be model selection on test data)."""
    if ckpt.args.get("data") == "imagenet-samples":
        return sample_images(ckpt.spec, _crops(n), seed=3), "random crops of sample photos (seed 3)"
    src = _source(ckpt)
    idx = _stratified(src.val, n, "--max-images")
    return _load(src.val, ckpt.spec, idx), f"{src.name} val split ({len(idx)} of {len(src.val)} images)"


def exported(checkpoint: str | None, export_dir: Path | None, max_images: int):
    """What validate.py and benchmark.py start from: (model, checkpoint path, export folder, its artifacts,
    held-out images, their description)."""
    path = default_checkpoint(checkpoint)
    model, ck = load_model(path)
    d = export_dir or path.parent / "export"
    paths = existing_artifacts(d)
    if not paths:
        raise UserError(f"no exported models in {d}; run export/to_onnx.py first")
    _, held, desc = data_for(ck, 0, max_images)
    return model, path, d, paths, held, desc
