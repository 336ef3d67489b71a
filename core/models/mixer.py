"""Paper: "MLP-Mixer: An all-MLP Architecture for Vision" (Tolstikhin et al., NeurIPS 2021)."""

from __future__ import annotations

import torch
from torch import nn

from core.errors import UserError


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
