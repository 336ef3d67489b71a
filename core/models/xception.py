"""Paper: "Xception: Deep Learning with Depthwise Separable Convolutions" (Chollet, CVPR 2017)."""

from __future__ import annotations

import torch
from torch import nn

from core.models.layers import GlobalPool, conv_bn_act


class SepConv(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cin, 3, 1, 1, groups=cin, bias=False),
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )


class XBlock(nn.Module):
    def __init__(self, cin: int, cout: int, reps: int, stride: int, relu_first: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(reps):
            layers += [nn.ReLU(), SepConv(cin if i == 0 else cout, cout)]
        self.body = nn.Sequential(
            *(layers if relu_first else layers[1:]), *([nn.MaxPool2d(3, stride, 1)] if stride > 1 else [])
        )
        self.skip = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.skip(x)


def xception(in_channels: int = 3, **_: object) -> tuple[nn.Module, int]:
    net = nn.Sequential(
        conv_bn_act(in_channels, 32, 3, 2),
        conv_bn_act(32, 64, 3, 1),
        XBlock(64, 128, 2, 2, relu_first=False),
        XBlock(128, 256, 2, 2),
        XBlock(256, 728, 2, 2),
        *[XBlock(728, 728, 3, 1) for _ in range(8)],
        XBlock(728, 1024, 2, 2),
        SepConv(1024, 1536),
        nn.ReLU(),
        SepConv(1536, 2048),
        nn.ReLU(),
        GlobalPool(),
    )
    return net, 2048
