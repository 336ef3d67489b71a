"""Eval-time preprocessing rebuilt from a ModelSpec with Pillow and numpy only (no torch).

This is what the deployment runtime and the demo run. The training eval transform
(`core.transforms.eval_transform`, torchvision) is built from the same spec; a golden test
keeps the two within 1/255.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from core.spec import ModelSpec

_PIL_INTERP = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


def to_color(im: Image.Image, spec: ModelSpec) -> Image.Image:
    """RGB or L, as the spec's color policy says (gray3 = grayscale replicated to 3 channels)."""
    if spec.color == "rgb":
        return im.convert("RGB")
    if spec.color == "gray3":
        return im.convert("L").convert("RGB")
    return im.convert("L")


def resize_crop(im: Image.Image, spec: ModelSpec) -> Image.Image:
    """Resize and crop exactly as torchvision's Resize(int) + CenterCrop do on PIL images."""
    interp = _PIL_INTERP[spec.interpolation]
    s = spec.image_size
    if spec.crop == "squash":
        return im.resize((s, s), interp)
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = spec.resize_size, int(spec.resize_size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), interp)
    top = round((new_h - s) / 2.0)  # torchvision CenterCrop rounding
    left = round((new_w - s) / 2.0)
    return im.crop((left, top, left + s, top + s))


def model_view(im: Image.Image, spec: ModelSpec) -> Image.Image:
    """The exact pixels the network sees (before normalisation): used for the demo's crop preview.

    Grayscale content stays one channel through the resize and is replicated at normalisation: resizing
    three identical channels gives the same numbers at a third of the cost (a 1-megapixel upload)."""
    if spec.color == "gray3" or (spec.color == "rgb" and im.mode == "L"):
        return resize_crop(im.convert("L"), spec)
    return resize_crop(to_color(im, spec), spec)


def normalize(view: Image.Image, spec: ModelSpec) -> np.ndarray:
    """uint8 HW(C) -> float32 CHW, (x / 255 - mean) / std per channel; a 1-channel view fills every channel."""
    a = np.asarray(view, dtype=np.float32)
    planes = [a] if a.ndim == 2 else [a[:, :, c] for c in range(a.shape[2])]
    out = np.empty((len(spec.mean), a.shape[0], a.shape[1]), np.float32)
    for c, (m, s) in enumerate(zip(spec.mean, spec.std, strict=True)):
        np.multiply(planes[c % len(planes)], np.float32(1.0 / (255.0 * s)), out=out[c])
        out[c] -= np.float32(m / s)
    return out


def preprocess(im: Image.Image, spec: ModelSpec) -> np.ndarray:
    """Decoded image -> float32 CHW array, normalised, ready to batch."""
    return normalize(model_view(im, spec), spec)
