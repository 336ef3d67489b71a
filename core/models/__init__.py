"""Model registry: `create_model(name, num_classes, ...)` and `model_from_spec(spec)`.

Every architecture becomes ImageClassifier(backbone -> pooled features, head), so transfer learning,
feature caching, export and parity checks work the same for all of them.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from core.errors import UserError
from core.models import simple
from core.models.classifier import HEADS, ImageClassifier, make_head
from core.models.efficientnet_lite import LITE_VARIANTS, EfficientNetLite, stage_ends
from core.models.pretrained import (
    LITE_WEIGHTS,
    lite_imagenet_state_dict,
    load_state_dict_file,
    torchvision_preprocessing,
)
from core.models.tv import torchvision_backbone
from core.models.zoo import ZOO
from core.spec import ModelSpec

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LITE_TRANSFER_TAPS = (2, 4, 7, 10, 14)  # ends of stages 2-6: texture statistics at every scale
# A builder: (in_channels, image_size, weights, **arch_kwargs) -> (backbone, num_features, pretrained head sd)
Builder = Callable[..., tuple[nn.Module, int, dict | None]]


@dataclass(frozen=True)
class ModelEntry:
    """A registered architecture with its complete preprocessing defaults (timm's pretrained_cfg, torchvision's
    weight enums): every spec is built from them by `default_spec`. Torchvision entries read theirs from the
    DEFAULT weights' `transforms()` (`from_weights`), so a finetune records what the weights were trained with."""

    name: str
    build: Builder
    default_size: int
    min_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_weights: str | None = None  # what finetune/transfer use when --weights is not given
    family: str = "torchvision"
    extra: dict[str, Any] = field(default_factory=dict)
    resize_size: int | None = None  # shorter side before a center crop at default_size (None: size / 0.875)
    interpolation: str = "bilinear"
    transfer_taps: tuple[int, ...] = ()  # extra pooled feature blocks in transfer mode (EfficientNet-Lite)
    transfer_pool: str = "mean"  # pooling in transfer mode
    transfer_cov_taps: tuple[int, ...] = ()  # blocks whose covariance is pooled too in transfer mode
    from_weights: bool = False  # fill size/resize/interpolation/mean/std from torchvision's DEFAULT weights

    def preprocessing(self) -> dict[str, Any]:
        """size, resize_size, interpolation, mean, std: the defaults a spec of this model starts from."""
        if self.from_weights:
            return torchvision_preprocessing(self.name)
        resize = self.resize_size or round(self.default_size / 0.875)
        return {
            "size": self.default_size,
            "resize_size": resize,
            "interpolation": self.interpolation,
            "mean": self.mean,
            "std": self.std,
        }


_REGISTRY: dict[str, ModelEntry] = {}


def register(entry: ModelEntry) -> ModelEntry:
    _REGISTRY[entry.name] = entry
    return entry


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"unknown model {name!r}{hint}; choose from: {', '.join(list_models())}")
    return _REGISTRY[name]


def _lite(variant: str) -> Builder:
    width, depth, _, _ = LITE_VARIANTS[variant]

    def build(
        in_channels: int = 3,
        image_size: int = 224,
        weights: str | None = None,
        taps: tuple[int, ...] = (),
        pool: str = "mean",
        drop_connect: float = 0.2,
        cov_taps: tuple[int, ...] = (),
    ):
        net = EfficientNetLite(width, depth, in_channels, drop_connect, tuple(taps), pool, tuple(cov_taps))
        if not weights:
            return net, net.num_features, None
        sd = lite_imagenet_state_dict(variant) if weights == LITE_WEIGHTS else load_state_dict_file(weights)
        head_sd = {"fc.weight": sd.pop("_fc.weight"), "fc.bias": sd.pop("_fc.bias")} if "_fc.weight" in sd else None
        net.load_state_dict(sd)
        return net, net.num_features, head_sd

    return build


def _simple(fn: Callable[..., tuple[nn.Module, int]]) -> Builder:
    def build(in_channels: int = 3, image_size: int = 32, weights: str | None = None):
        if weights:
            sd = load_state_dict_file(weights)
            net, nf = fn(in_channels=in_channels, image_size=image_size)
            net.load_state_dict(sd)
            return net, nf, None
        return (*fn(in_channels=in_channels, image_size=image_size), None)

    return build


def _tv(arch: str) -> Builder:
    def build(in_channels: int = 3, image_size: int = 224, weights: str | None = None, **kw: Any):
        return torchvision_backbone(arch, in_channels, weights, **kw)

    return build


for _name, (_w, _d, _res, _drop) in LITE_VARIANTS.items():
    register(
        ModelEntry(
            _name,
            _lite(_name),
            _res,
            32,
            (0.5,) * 3,
            (0.5,) * 3,
            LITE_WEIGHTS if _name == "efficientnet_lite0" else None,
            "efficientnet_lite",
            {"dropout": _drop},
            transfer_taps=LITE_TRANSFER_TAPS,
            transfer_pool="meanmax",
            transfer_cov_taps=(stage_ends(_d)[5],),  # the end of stage 6 (Lite0: block 14, 192 channels)
        )
    )
for _name, _fn in (
    ("linear", simple.linear),
    ("cnn_small", simple.cnn_small),
    ("cnn_medium", simple.cnn_medium),
    ("cnn_large", simple.cnn_large),
):
    register(ModelEntry(_name, _simple(_fn), 32, 8, (0.5,) * 3, (0.5,) * 3, None, "simple"))
_ZOO_SIZES = {
    "cyclemlp_b1": 224,
    "mixer_s16": 224,
    "mobilenet_v1": 224,
    "mobilenet_v1_050": 224,
    "xception": 299,
    "darknet53": 256,
}
for _name, (_fn, _min) in ZOO.items():
    size = _ZOO_SIZES.get(_name, 32)
    register(ModelEntry(_name, _simple(_fn), size, _min, IMAGENET_MEAN, IMAGENET_STD, family="zoo"))
for _name, _min in (
    ("resnet18", 32),
    ("resnet34", 32),
    ("resnet50", 32),
    ("mobilenet_v2", 32),
    ("mobilenet_v3_small", 32),
    ("mobilenet_v3_large", 32),
    ("vgg11", 32),
    ("vgg11_bn", 32),
    ("vgg16", 32),
    ("vgg16_bn", 32),
    ("alexnet", 63),
    ("densenet121", 32),
    ("googlenet", 32),
    ("inception_v3", 75),
    ("shufflenet_v2_x1_0", 32),
    ("resnext50_32x4d", 32),
    ("efficientnet_b0", 32),
    ("wide_resnet50_2", 32),
    ("regnet_y_400mf", 32),
    ("squeezenet1_1", 32),
    ("vit_b_16", 224),
):
    register(
        ModelEntry(
            _name,
            _tv(_name),
            299 if _name == "inception_v3" else 224,
            _min,
            IMAGENET_MEAN,
            IMAGENET_STD,
            default_weights="DEFAULT",
            extra={"fixed_size": _name == "vit_b_16"},  # ViT's position embeddings fix its input size
            from_weights=True,
        )
    )


def create_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int | None = None,
    weights: str | None = None,
    head: str = "linear",
    dropout: float | None = None,
    hidden: int = 256,
    keep_pretrained_head: bool = True,
    **arch_kwargs: Any,
) -> ImageClassifier:
    entry = get_entry(name)
    size = image_size or entry.default_size
    if entry.extra.get("fixed_size") and size != entry.default_size:
        raise UserError(f"{name} takes exactly {entry.default_size}x{entry.default_size} inputs; got {size}")
    if size < entry.min_size:
        raise UserError(f"{name} needs inputs of at least {entry.min_size}x{entry.min_size}; got {size}")
    if head not in HEADS:
        raise UserError(f"unknown head {head!r}; choose from {HEADS}")
    if weights and in_channels != 3:
        raise UserError("pretrained weights take 3-channel input; use color 'gray3' (replication) for grayscale")
    backbone, nf, head_sd = entry.build(in_channels=in_channels, image_size=size, weights=weights, **arch_kwargs)
    drop = entry.extra.get("dropout", 0.2) if dropout is None else dropout
    model = ImageClassifier(backbone, nf, make_head(nf, num_classes, head, drop, hidden))
    if (
        head_sd is not None
        and keep_pretrained_head
        and head == "linear"
        and head_sd["fc.weight"].shape == model.head.fc.weight.shape
    ):
        model.head.load_state_dict(head_sd, strict=False)
    return model


def arch_kwargs_for_spec(head: str, dropout: float | None, hidden: int, **arch_kwargs: Any) -> dict[str, Any]:
    """What the spec records so the exact module tree can be rebuilt without pretrained weights."""
    return {"head": head, "dropout": dropout, "hidden": hidden, **arch_kwargs}


def default_spec(
    model: str,
    class_names: tuple[str, ...] | list[str],
    *,
    weights: str | None = None,
    transfer: bool = False,
    image_size: int | None = None,
    native_size: int | None = None,
    resize_size: int | None = None,
    crop: str | None = None,
    interpolation: str | None = None,
    color: str | None = None,
    gray: bool = False,
    head: str = "linear",
    dropout: float | None = None,
    hidden: int = 256,
    taps: tuple[int, ...] | None = None,
    pool: str | None = None,
    cov_taps: tuple[int, ...] | None = None,
) -> ModelSpec:
    """The one way a spec is built: the registry entry's preprocessing defaults, then what the data says
    (`native_size`: square images of that side, squashed rather than cropped; `gray`: grayscale data), then
    explicit choices (None = default). A center crop at another size keeps the entry's resize/crop ratio."""
    entry = get_entry(model)
    pre = entry.preprocessing()
    native = native_size if native_size and native_size >= entry.min_size else None
    size = image_size or native or pre["size"]
    crop = crop or ("squash" if native_size else "center")
    color = color or (("gray3" if weights else "gray") if gray else "rgb")
    mean, std = pre["mean"], pre["std"]
    if color == "gray":
        mean, std = (float(np.mean(mean)),), (float(np.mean(std)),)
    ratio = pre["resize_size"] / pre["size"]
    resize = size if crop == "squash" else resize_size or round(size * ratio)
    lite = entry.family == "efficientnet_lite"
    if taps is None:
        taps = entry.transfer_taps if transfer else ()
    pool = pool or (entry.transfer_pool if transfer else "mean")
    if cov_taps is None:
        cov_taps = entry.transfer_cov_taps if transfer else ()
    if cov_taps and not lite:
        raise ValueError(f"covariance pooling taps are an EfficientNet-Lite option; {model} is not one")
    lite_kw = {"taps": list(taps), "pool": pool, **({"cov_taps": sorted(set(cov_taps))} if cov_taps else {})}
    kw = arch_kwargs_for_spec(head, dropout, hidden, **(lite_kw if lite else {}))
    return ModelSpec(
        model,
        tuple(class_names),
        image_size=size,
        resize_size=resize,
        mean=mean,
        std=std,
        crop=crop,
        interpolation=interpolation or pre["interpolation"],
        color=color,
        arch_kwargs=kw,
    )


def model_from_spec(spec: ModelSpec) -> ImageClassifier:
    kw = dict(spec.arch_kwargs)
    for k in ("taps", "cov_taps"):
        if k in kw:
            kw[k] = tuple(kw[k])
    return create_model(spec.arch, spec.num_classes, spec.in_channels, spec.image_size, weights=None, **kw)
