"""Paper: "An Image is Worth 16x16 Words" (Dosovitskiy et al., ICLR 2021): a small ViT for 32x32 inputs."""

from __future__ import annotations

from torch import nn

from core.errors import UserError


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
