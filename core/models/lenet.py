"""LeNet-5 (LeCun et al., 1998) with BatchNorm (Ioffe & Szegedy, ICML 2015), d2l's "BatchNorm ConvNet"."""

from __future__ import annotations

from torch import nn


def lenet_bn(in_channels: int = 1, **_: object) -> tuple[nn.Module, int]:
    net = nn.Sequential(
        nn.Conv2d(in_channels, 6, 5),
        nn.BatchNorm2d(6),
        nn.ReLU(True),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.BatchNorm2d(16),
        nn.ReLU(True),
        nn.AdaptiveAvgPool2d(5),
        nn.Flatten(),
        nn.Linear(400, 120),
        nn.BatchNorm1d(120),
        nn.ReLU(True),
        nn.Linear(120, 84),
        nn.BatchNorm1d(84),
        nn.ReLU(True),
    )
    return net, 84
