"""Involution network (Li et al., CVPR 2021, "RedNet"): per-pixel kernels generated from the input.

A dynamic-filter family with filter groups: at each output position a small 1x1 conv bottleneck
turns the pixel's features into G kernels of K x K, each shared by the C/G channels of its group
(the inverse of convolution's design: spatially specific, channel agnostic). Written with the
official code's plain-torch formulation — `F.unfold` + `view` into groups + multiply + `sum` —
with a strided involution among them, so the zoo has a `DynamicFilter` with G > 1 and stride 2.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .common import Classifier, Residual, conv_bn, instantiate, pick


class Involution(nn.Module):
    """y[n, c, p] = sum_k x_pad[n, c, p*s + k] * w[n, c // (C/G), k, p], w generated from x at p."""

    def __init__(
        self, channels: int, kernel_size: int, stride: int = 1, group_channels: int = 16, reduction: int = 4
    ) -> None:
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride
        self.groups = channels // group_channels
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.reduce = conv_bn(channels, channels // reduction, 1)
        self.span = nn.Conv2d(channels // reduction, kernel_size * kernel_size * self.groups, 1)

    def forward(self, x: Tensor) -> Tensor:
        n, c, _, _ = x.shape
        k, g = self.kernel_size, self.groups
        weight = self.span(self.reduce(self.pool(x)))  # [N, G*K*K, H', W']
        h, w = weight.shape[-2:]
        weight = weight.view(n, g, 1, k * k, h, w)
        patches = F.unfold(x, k, padding=k // 2, stride=self.stride).view(n, g, c // g, k * k, h, w)
        return (patches * weight).sum(3).view(n, c, h, w)


class InvolutionBlock(Residual):
    """RedNet bottleneck: 1x1 conv, involution (maybe strided), 1x1 conv, plus an (average-pooled) shortcut."""

    def __init__(self, channels: int, kernel_size: int, stride: int, group_channels: int) -> None:
        body = nn.Sequential(
            conv_bn(channels, channels, 1),
            Involution(channels, kernel_size, stride, group_channels),
            nn.BatchNorm2d(channels), nn.ReLU(),
            conv_bn(channels, channels, 1, act=None),
        )
        super().__init__(body, nn.AvgPool2d(stride) if stride > 1 else nn.Identity())


class InvolutionNet(Classifier):
    """Stem conv (stride 2), involution blocks (the second one strided), global pool, linear head."""

    def __init__(self, width: int, kernel_size: int, group_channels: int, classes: int = 10) -> None:
        features = nn.Sequential(
            conv_bn(3, width, 3, 2),
            InvolutionBlock(width, kernel_size, 1, group_channels),
            InvolutionBlock(width, kernel_size, 2, group_channels),
            InvolutionBlock(width, kernel_size, 1, group_channels),
        )
        super().__init__(features, width, classes)


def build(size: str = "realistic") -> tuple[nn.Module, tuple[Tensor, ...]]:
    """Small: 1x3x16x16, width 16, K=3, G=2. Realistic: 1x3x128x128, width 64, K=7, G=4 (RedNet's stage-1 size)."""
    batch, side, width, k, group_channels = pick(size, small=(1, 16, 16, 3, 8), realistic=(1, 128, 64, 7, 16))
    return instantiate(lambda: InvolutionNet(width, k, group_channels), (batch, 3, side, side))
