"""Seed 002's small models: a linear classifier and three CNN sizes, for MNIST/CIFAR-sized inputs.

Each builder returns (backbone, num_features); the backbone ends in a pooled feature vector.
"""

from __future__ import annotations

from torch import nn


def linear(in_channels: int = 3, image_size: int = 32) -> tuple[nn.Module, int]:
    """Flatten -> (head). The head is the whole model: multinomial logistic regression on pixels."""
    return nn.Flatten(), in_channels * image_size * image_size


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _cnn(in_channels: int, widths: tuple[int, ...], convs_per_stage: int) -> tuple[nn.Module, int]:
    layers: list[nn.Module] = []
    cin = in_channels
    for i, w in enumerate(widths):
        for _ in range(convs_per_stage):
            layers += _conv_bn(cin, w)
            cin = w
        if i < len(widths) - 1:
            layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), cin


def cnn_small(in_channels: int = 3, **_: object) -> tuple[nn.Module, int]:
    return _cnn(in_channels, (16, 32), 1)


def cnn_medium(in_channels: int = 3, **_: object) -> tuple[nn.Module, int]:
    return _cnn(in_channels, (32, 64, 128), 1)


def cnn_large(in_channels: int = 3, **_: object) -> tuple[nn.Module, int]:
    return _cnn(in_channels, (32, 64, 128, 256), 2)
