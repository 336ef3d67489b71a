"""ImageClassifier = backbone (image -> pooled features) + head. One layout for every architecture."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

HEADS = ("linear", "mlp")
INITS = ("default", "xavier", "kaiming")


def init_weights(module: nn.Module, scheme: str) -> None:
    """Re-initialise conv/linear weights (scratch training); seed 004 notes VGG needs Xavier to train."""
    if scheme == "default":
        return
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if scheme == "xavier":
                nn.init.xavier_uniform_(m.weight)
            else:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def make_head(
    num_features: int, num_classes: int, kind: str = "linear", dropout: float = 0.2, hidden: int = 256
) -> nn.Sequential:
    if kind == "linear":
        layers = [("dropout", nn.Dropout(dropout)), ("fc", nn.Linear(num_features, num_classes))]
    elif kind == "mlp":  # seed 003's head: Linear -> ReLU -> Dropout -> Linear
        layers = [
            ("norm", nn.LayerNorm(num_features)),
            ("fc1", nn.Linear(num_features, hidden)),
            ("act", nn.ReLU(inplace=True)),
            ("dropout", nn.Dropout(dropout)),
            ("fc", nn.Linear(hidden, num_classes)),
        ]
    else:
        raise ValueError(f"unknown head {kind!r}; choose from {HEADS}")
    return nn.Sequential(OrderedDict(layers))


class ImageClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, num_features: int, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.num_features = num_features
        self._eval_always: list[nn.Module] = []  # frozen parts: their BatchNorm statistics must not move

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def freeze_backbone(self) -> None:
        """Transfer learning: no gradients and frozen BatchNorm statistics in the backbone."""
        self.backbone.requires_grad_(False)
        self.keep_in_eval([self.backbone])

    def keep_in_eval(self, modules: list[nn.Module]) -> None:
        self._eval_always = list(modules)
        for m in modules:
            m.eval()

    def train(self, mode: bool = True) -> ImageClassifier:
        super().train(mode)
        for m in self._eval_always:
            m.eval()
        return self
