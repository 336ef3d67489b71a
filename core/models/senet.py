"""Paper: "Squeeze-and-Excitation Networks" (Hu, Shen & Sun, CVPR 2018): SE-ResNet."""

from __future__ import annotations

import torch
from torch import nn

from core.models.layers import GlobalPool, conv_bn_act


class SEBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, reduction: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_bn_act(cin, cout, 3, stride), nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        )
        self.se = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(cout, cout // reduction, 1),
            nn.ReLU(True),
            nn.Conv2d(cout // reduction, cout, 1),
            nn.Sigmoid(),
        )
        self.skip = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return torch.relu(h * self.se(h) + self.skip(x))


def se_resnet18(in_channels: int = 3, **_: object) -> tuple[nn.Module, int]:
    layers: list[nn.Module] = [conv_bn_act(in_channels, 64, 3, 1)]  # 3x3 stem: works from 32x32 up
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [SEBlock(cin, cout, stride), SEBlock(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, GlobalPool()), 512
