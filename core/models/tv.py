"""torchvision architectures as backbones: build, optionally load weights, then split off the last Linear."""

from __future__ import annotations

from torch import nn

from core.models.pretrained import torchvision_state_dict


def _replace(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _set_in_channels(model: nn.Module, in_channels: int) -> None:
    name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    if conv.in_channels == in_channels:
        return
    _replace(
        model,
        name,
        nn.Conv2d(
            in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
        ),
    )


def torchvision_backbone(arch: str, in_channels: int = 3, weights: str | None = None, **kwargs: object):
    """(backbone without its classifier, feature count, the pretrained classifier's state dict or None)."""
    import torchvision

    if arch in ("googlenet", "inception_v3"):
        kwargs = {"aux_logits": False, "init_weights": weights is None, **kwargs}
    model = torchvision.models.get_model(arch, weights=None, **kwargs)
    if weights:
        sd = torchvision_state_dict(arch, weights)
        own = model.state_dict()
        missing = [k for k in own if k not in sd]
        if missing:
            raise ValueError(f"weights do not fit {arch}: missing {missing[:3]}")
        model.load_state_dict({k: v for k, v in sd.items() if k in own})
    _set_in_channels(model, in_channels)
    if arch.startswith("squeezenet"):  # its classifier is a 1x1 conv, not a Linear: pool the last Fire block
        model.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        return model, 512, None
    name, fc = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    head_sd = {"fc." + k: v for k, v in fc.state_dict().items()} if weights else None
    _replace(model, name, nn.Identity())
    return model, fc.in_features, head_sd
