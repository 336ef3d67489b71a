"""torchvision transforms built from a ModelSpec: the training eval transform and augmentation presets."""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from core.preprocess import to_color
from core.spec import ModelSpec

AUGMENTATIONS = ("none", "basic", "strong")
_INTERP = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}


def _to_tensor(spec: ModelSpec) -> list[Callable]:
    return [T.PILToTensor(), T.ToDtype(torch.float32, scale=True), T.Normalize(spec.mean, spec.std)]


class _ToColor:
    """Picklable (DataLoader workers) colour-policy step."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    def __call__(self, im: Image.Image) -> Image.Image:
        return to_color(im, self.spec)


def _color(spec: ModelSpec) -> _ToColor:
    return _ToColor(spec)


def _resize_crop(spec: ModelSpec) -> list[Callable]:
    interp = _INTERP[spec.interpolation]
    if spec.crop == "squash":
        return [T.Resize((spec.image_size, spec.image_size), interpolation=interp, antialias=True)]
    return [T.Resize(spec.resize_size, interpolation=interp, antialias=True), T.CenterCrop(spec.image_size)]


def eval_transform(spec: ModelSpec) -> Callable[[Image.Image], torch.Tensor]:
    return T.Compose([_color(spec), *_resize_crop(spec), *_to_tensor(spec)])


def train_transform(spec: ModelSpec, preset: str) -> Callable[[Image.Image], torch.Tensor]:
    """Augmentation presets. basic = seed 003's recipe; strong adds crops, flips both ways and colour."""
    interp = _INTERP[spec.interpolation]
    s = spec.image_size
    if preset == "none":
        return eval_transform(spec)
    if preset == "basic":
        aug = [
            T.Resize((s, s), interpolation=interp, antialias=True),
            T.RandomAffine(0, shear=10, scale=(0.8, 1.2)),
            T.RandomHorizontalFlip(),
        ]
    elif preset == "strong":
        aug = [
            T.RandomResizedCrop(s, scale=(0.5, 1.0), interpolation=interp, antialias=True),
            T.RandomHorizontalFlip(),
            T.RandomVerticalFlip(),
            T.RandomRotation(10),
            T.ColorJitter(brightness=0.3, contrast=0.3),
        ]
    else:
        raise ValueError(f"unknown augmentation preset {preset!r}; choose from {AUGMENTATIONS}")
    tail = [T.RandomErasing(p=0.25)] if preset == "strong" else []
    return T.Compose([_color(spec), *aug, *_to_tensor(spec), *tail])
