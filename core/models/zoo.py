"""Seed 004's architectures that torchvision does not ship, compact and readable.

Each builder returns (backbone -> pooled features, feature count); ImageClassifier adds the head.
Papers: NiN (Lin et al., 2013), LeNet-5 (LeCun et al., 1998) with BatchNorm (Ioffe & Szegedy, 2015),
SENet (Hu et al., 2018), MLP-Mixer (Tolstikhin et al., 2021), MobileNetV1 (Howard et al., 2017),
Xception (Chollet, 2017), Darknet-53 (Redmon & Farhadi, YOLOv3, 2018).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError


def _cbr(cin: int, cout: int, k: int = 3, s: int = 1, groups: int = 1, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), act())


class GlobalPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))


# --- NiN: mlpconv blocks (a conv followed by two 1x1 convs), global average pooling instead of FC layers.
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


# --- LeNet-5 with BatchNorm after every conv/linear layer (d2l's "BatchNorm ConvNet").
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


# --- SE-ResNet: ResNet basic blocks whose residual branch is rescaled per channel by squeeze-excitation.
class SEBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, reduction: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _cbr(cin, cout, 3, stride), nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
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
    layers: list[nn.Module] = [_cbr(in_channels, 64, 3, 1)]  # 3x3 stem: works from 32x32 up
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [SEBlock(cin, cout, stride), SEBlock(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, GlobalPool()), 512


# --- MLP-Mixer: patches -> token-mixing MLP (across positions) + channel-mixing MLP, no convolutions or attention.
class MixerLayer(nn.Module):
    def __init__(self, tokens: int, dim: int, token_hidden: int, channel_hidden: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, token_hidden), nn.GELU(), nn.Linear(token_hidden, tokens))
        self.channel_mlp = nn.Sequential(nn.Linear(dim, channel_hidden), nn.GELU(), nn.Linear(channel_hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, tokens, dim]
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class Mixer(nn.Module):
    def __init__(self, in_channels: int, image_size: int, patch: int, dim: int, depth: int) -> None:
        super().__init__()
        if image_size % patch:
            raise UserError(f"MLP-Mixer with {patch}px patches needs an image size divisible by {patch}")
        self.image_size, tokens = image_size, (image_size // patch) ** 2
        self.stem = nn.Conv2d(in_channels, dim, patch, patch)
        self.layers = nn.Sequential(*[MixerLayer(tokens, dim, dim // 2, dim * 4) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)
        return self.norm(self.layers(x)).mean(1)


def mixer_tiny(in_channels: int = 3, image_size: int = 32, **_: object) -> tuple[nn.Module, int]:
    """4 layers, 128 wide, 4px patches: CIFAR/MNIST-sized inputs. Token MLPs are sized for image_size."""
    return Mixer(in_channels, image_size, 4, 128, 4), 128


def mixer_s16(in_channels: int = 3, image_size: int = 224, **_: object) -> tuple[nn.Module, int]:
    """Mixer-S/16: 8 layers, 512 wide, 16px patches."""
    return Mixer(in_channels, image_size, 16, 512, 8), 512


# --- MobileNetV1: depthwise-separable convolutions; `width` scales every layer's channels.
_MBV1 = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), *[(512, 1)] * 5, (1024, 2), (1024, 1))


def _mobilenet_v1(in_channels: int, width: float) -> tuple[nn.Module, int]:
    c = lambda n: max(8, int(n * width))  # noqa: E731
    layers: list[nn.Module] = [_cbr(in_channels, c(32), 3, 2)]
    cin = c(32)
    for cout, stride in _MBV1:
        layers += [_cbr(cin, cin, 3, stride, groups=cin), _cbr(cin, c(cout), 1)]
        cin = c(cout)
    return nn.Sequential(*layers, GlobalPool()), cin


def mobilenet_v1(in_channels: int = 3, **_: object) -> tuple[nn.Module, int]:
    return _mobilenet_v1(in_channels, 1.0)


def mobilenet_v1_050(in_channels: int = 3, **_: object) -> tuple[nn.Module, int]:
    return _mobilenet_v1(in_channels, 0.5)


# --- Xception: entry flow, 8 middle-flow blocks of separable convolutions with residuals, exit flow.
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
        _cbr(in_channels, 32, 3, 2),
        _cbr(32, 64, 3, 1),
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


# --- Darknet-53: YOLOv3's backbone, 3x3/1x1 residual pairs with LeakyReLU, five stride-2 stages.
class DarkResidual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        act = lambda: nn.LeakyReLU(0.1)  # noqa: E731
        self.body = nn.Sequential(_cbr(c, c // 2, 1, act=act), _cbr(c // 2, c, 3, act=act))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def darknet53(in_channels: int = 3, **_: object) -> tuple[nn.Module, int]:
    act = lambda: nn.LeakyReLU(0.1)  # noqa: E731
    layers: list[nn.Module] = [_cbr(in_channels, 32, 3, act=act)]
    c = 32
    for repeats in (1, 2, 8, 8, 4):
        layers.append(_cbr(c, c * 2, 3, 2, act=act))
        c *= 2
        layers += [DarkResidual(c) for _ in range(repeats)]
    return nn.Sequential(*layers, GlobalPool()), c


ZOO = {
    "nin": (nin, 8),
    "lenet_bn": (lenet_bn, 16),
    "se_resnet18": (se_resnet18, 8),
    "mixer_tiny": (mixer_tiny, 8),
    "mixer_s16": (mixer_s16, 16),
    "mobilenet_v1": (mobilenet_v1, 32),
    "mobilenet_v1_050": (mobilenet_v1_050, 32),
    "xception": (xception, 32),
    "darknet53": (darknet53, 32),
}


# --- ViT (Dosovitskiy et al., 2021): torchvision's VisionTransformer, small config for 32x32 inputs.
def vit_tiny(in_channels: int = 3, image_size: int = 32, **_: object) -> tuple[nn.Module, int]:
    """6 layers, 4 heads, 192 wide, 4px patches; the class token's final embedding is the feature."""
    from torchvision.models.vision_transformer import VisionTransformer

    if image_size % 4:
        raise UserError("vit_tiny uses 4px patches: the image size must be divisible by 4")
    vit = VisionTransformer(image_size, 4, 6, 4, 192, 384)
    if in_channels != 3:
        vit.conv_proj = nn.Conv2d(in_channels, 192, 4, 4)
    vit.heads = nn.Identity()
    return vit, 192


ZOO["vit_tiny"] = (vit_tiny, 8)


# --- CycleMLP (Chen et al., ICLR 2022): Cycle FC = every channel looks at a pixel shifted by its own offset
# (offsets cycle over channels along H or W), then a channel-mixing FC. Fixed offsets make it a shift + 1x1 conv.
def _shift(x: torch.Tensor, offset: int, dim: int) -> torch.Tensor:
    """Move content by `offset` pixels along dim (2 = H, 3 = W), zero-filled (what deformable sampling does)."""
    if offset == 0:
        return x
    pad = [0, 0, 0, 0]  # F.pad order: W left, W right, H top, H bottom
    pad[(0 if dim == 3 else 2) + (0 if offset > 0 else 1)] = abs(offset)
    y = F.pad(x, pad)
    n = x.shape[dim]
    return y.narrow(dim, 0, n) if offset > 0 else y.narrow(dim, 1, n)


def _cycle_shift(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Channel c is shifted by ((c + 1) % 3) - 1 pixels along `dim`: three shifted copies, mixed per channel."""
    c = torch.arange(x.shape[1], device=x.device)
    out = 0
    for offset in (-1, 0, 1):
        mask = (((c + 1) % 3 - 1) == offset).to(x.dtype).view(1, -1, 1, 1)
        out = out + _shift(x, offset, dim) * mask
    return out


class CycleMixer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc_c, self.fc_h, self.fc_w = nn.Conv2d(dim, dim, 1), nn.Conv2d(dim, dim, 1), nn.Conv2d(dim, dim, 1)
        self.reweight = nn.Sequential(nn.Linear(dim, dim // 4), nn.GELU(), nn.Linear(dim // 4, dim * 3))
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        h, w, ch = self.fc_h(_cycle_shift(x, 2)), self.fc_w(_cycle_shift(x, 3)), self.fc_c(x)
        a = self.reweight((h + w + ch).mean((2, 3))).reshape(n, 3, c).softmax(1)[..., None, None]
        return self.proj(h * a[:, 0] + w * a[:, 1] + ch * a[:, 2])


class CycleBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(1, dim), nn.GroupNorm(1, dim)  # LayerNorm over C, H, W
        self.mix = CycleMixer(dim)
        self.mlp = nn.Sequential(nn.Conv2d(dim, dim * 4, 1), nn.GELU(), nn.Conv2d(dim * 4, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mix(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _cyclemlp(in_channels: int, dims: tuple[int, ...], depths: tuple[int, ...], patch: int) -> tuple[nn.Module, int]:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, dims[0], patch, 4, patch // 2)]
    for i, (d, n) in enumerate(zip(dims, depths, strict=True)):
        if i:
            layers.append(nn.Conv2d(dims[i - 1], d, 3, 2, 1))
        layers += [CycleBlock(d) for _ in range(n)]
    return nn.Sequential(*layers, nn.GroupNorm(1, dims[-1]), GlobalPool()), dims[-1]


def cyclemlp_tiny(in_channels: int = 3, **_: object) -> tuple[nn.Module, int]:
    return _cyclemlp(in_channels, (32, 64, 128, 256), (1, 1, 2, 1), 3)


def cyclemlp_b1(in_channels: int = 3, **_: object) -> tuple[nn.Module, int]:
    return _cyclemlp(in_channels, (64, 128, 320, 512), (2, 2, 4, 2), 7)


ZOO["cyclemlp_tiny"] = (cyclemlp_tiny, 32)
ZOO["cyclemlp_b1"] = (cyclemlp_b1, 32)
