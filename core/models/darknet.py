"""Darknet-53, the backbone of "YOLOv3: An Incremental Improvement" (Redmon & Farhadi, 2018)."""

from __future__ import annotations

import torch
from torch import nn

from core.models.layers import GlobalPool, conv_bn_act


class DarkResidual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        act = lambda: nn.LeakyReLU(0.1)  # noqa: E731
        self.body = nn.Sequential(conv_bn_act(c, c // 2, 1, act=act), conv_bn_act(c // 2, c, 3, act=act))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def darknet53(in_channels: int = 3, **_: object) -> tuple[nn.Module, int]:
    act = lambda: nn.LeakyReLU(0.1)  # noqa: E731
    layers: list[nn.Module] = [conv_bn_act(in_channels, 32, 3, act=act)]
    c = 32
    for repeats in (1, 2, 8, 8, 4):
        layers.append(conv_bn_act(c, c * 2, 3, 2, act=act))
        c *= 2
        layers += [DarkResidual(c) for _ in range(repeats)]
    return nn.Sequential(*layers, GlobalPool()), c
