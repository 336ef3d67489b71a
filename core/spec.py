"""ModelSpec: the one description of a model that travels inside every artifact.

Written once at training time; checkpoints, meta.json, ONNX metadata and TorchScript extra files carry it
as JSON, and every reader rebuilds preprocessing and labels from it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from core.errors import UserError

SPEC_VERSION = 1
COLOR_MODES = ("rgb", "gray", "gray3")  # gray3: grayscale replicated to 3 channels for RGB backbones
CROP_MODES = ("center", "squash")  # center: resize shorter side then center-crop; squash: resize to square
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class ModelSpec:
    """Preprocessing is given by keyword and has no silent defaults (no ImageNet mean/std, no 224/256): specs
    are built by `core.models.default_spec` from the registry entry's own defaults, or read from an artifact."""

    arch: str
    class_names: tuple[str, ...]
    _: dataclasses.KW_ONLY
    image_size: int  # side of the square the network sees
    resize_size: int  # shorter side before the center crop (crop == "center"); = image_size for "squash"
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop: str = "center"
    interpolation: str = "bilinear"
    color: str = "rgb"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        problems = []
        if not self.class_names:
            problems.append("no class names")
        if len(set(self.class_names)) != len(self.class_names):
            problems.append("duplicate class names")
        if self.crop not in CROP_MODES:
            problems.append(f"crop {self.crop!r} not in {CROP_MODES}")
        if self.interpolation not in INTERPOLATIONS:
            problems.append(f"interpolation {self.interpolation!r} not in {INTERPOLATIONS}")
        if self.color not in COLOR_MODES:
            problems.append(f"color {self.color!r} not in {COLOR_MODES}")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            problems.append(f"mean/std need {self.in_channels} values for color {self.color!r}")
        if any(s <= 0 for s in self.std):
            problems.append("std must be positive")
        if self.image_size < 1 or (self.resize_size < self.image_size and self.crop == "center"):
            problems.append("need 1 <= image_size <= resize_size")
        if problems:
            raise UserError("invalid model spec: " + "; ".join(problems))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        """Channels of the network input."""
        return 1 if self.color == "gray" else 3

    @property
    def view_channels(self) -> int:
        """Channels of the uint8 image before normalisation (model.uint8.onnx's input): gray3 is replicated to 3
        channels only at normalisation."""
        return 3 if self.color == "rgb" else 1

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["class_names"] = list(self.class_names)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        if not isinstance(d, dict) or "arch" not in d or "class_names" not in d:
            raise UserError("model spec is missing or malformed (needs at least 'arch' and 'class_names')")
        if int(d.get("version", 1)) > SPEC_VERSION:
            raise UserError(f"model spec version {d['version']} is newer than this code understands; upgrade")
        known = {f.name for f in dataclasses.fields(cls)}
        missing = sorted({"image_size", "resize_size", "mean", "std"} - set(d))
        if missing:
            raise UserError(f"model spec lacks {', '.join(missing)}: re-export it from its checkpoint")
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise UserError(f"model spec is not valid JSON: {e}") from None

    def replace(self, **changes: Any) -> ModelSpec:
        return dataclasses.replace(self, **changes)
