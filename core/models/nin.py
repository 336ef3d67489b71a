"""NiN: "Network In Network" (Lin, Chen & Yan, ICLR 2014)."""

from __future__ import annotations

from torch import nn

from core.models.layers import GlobalPool


def nin(in_channels: int = 3, **_: object) -> tuple[nn.Module, int]:
    def mlpconv(cin: int, cout: int, k: int, s: int) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cout, k, s, k // 2),
            nn.ReLU(True),
            nn.Conv2d(cout, cout, 1),
            nn.ReLU(True),
            nn.Conv2d(cout, cout, 1),
            nn.ReLU(True),
        ]

    layers = [
        *mlpconv(in_channels, 192, 5, 1),
        nn.MaxPool2d(3, 2, 1),
        nn.Dropout(0.3),
        *mlpconv(192, 192, 5, 1),
        nn.MaxPool2d(3, 2, 1),
        nn.Dropout(0.3),
        *mlpconv(192, 384, 3, 1),
        GlobalPool(),
    ]
    return nn.Sequential(*layers), 384
