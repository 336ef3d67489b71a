"""Paper: "CycleMLP: A MLP-like Architecture for Dense Prediction" (Chen et al., ICLR 2022)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.models.layers import GlobalPool


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
