"""Paper: "MobileNets: Efficient CNNs for Mobile Vision Applications" (Howard et al., 2017)."""

from __future__ import annotations

from torch import nn

from core.models.layers import GlobalPool, conv_bn_act

_MBV1 = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), *[(512, 1)] * 5, (1024, 2), (1024, 1))


def _mobilenet_v1(in_channels: int, width: float) -> tuple[nn.Module, int]:
    c = lambda n: max(8, int(n * width))  # noqa: E731
    layers: list[nn.Module] = [conv_bn_act(in_channels, c(32), 3, 2)]
    cin = c(32)
    for cout, stride in _MBV1:
        layers += [conv_bn_act(cin, cin, 3, stride, groups=cin), conv_bn_act(cin, c(cout), 1)]
        cin = c(cout)
    return nn.Sequential(*layers, GlobalPool()), cin


def mobilenet_v1(in_channels: int = 3, **_: object) -> tuple[nn.Module, int]:
    return _mobilenet_v1(in_channels, 1.0)


def mobilenet_v1_050(in_channels: int = 3, **_: object) -> tuple[nn.Module, int]:
    return _mobilenet_v1(in_channels, 0.5)
