"""A small UNet (Ronneberger et al., 2015) whose decoder upsamples with ConvTranspose2d (k2, s2).

The transposed-convolution workload: each decoder level doubles the resolution with a 2x2,
stride-2 `ConvTranspose` (what convlower's `col2im`, `zero_insert_conv` and `subpixel` variants
replace), then concatenates the encoder's skip connection and applies two 3x3 Convs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import conv_bn, instantiate, pick


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two 3x3 Conv + BatchNorm + ReLU: the UNet's unit at every level."""
    return nn.Sequential(conv_bn(in_channels, out_channels, 3), conv_bn(out_channels, out_channels, 3))


class UNet(nn.Module):
    """Encoder levels of `widths` (2x2 max pool between them), a mirrored decoder, and a 1x1 conv head."""

    def __init__(self, in_channels: int, out_channels: int, widths: tuple[int, ...]) -> None:
        super().__init__()
        self.encoder = nn.ModuleList(double_conv(c_in, c) for c_in, c in zip((in_channels,) + widths, widths))
        deeper, shallower = widths[:0:-1], widths[-2::-1]
        self.upsample = nn.ModuleList(nn.ConvTranspose2d(c, s, 2, stride=2) for c, s in zip(deeper, shallower))
        self.decoder = nn.ModuleList(double_conv(2 * c, c) for c in shallower)
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        skips: list[Tensor] = []
        for level, block in enumerate(self.encoder):
            x = block(x if level == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()  # the bottleneck's output is x itself
        for upsample, block in zip(self.upsample, self.decoder):
            x = block(torch.cat([skips.pop(), upsample(x)], dim=1))
        return self.head(x)


def build(size: str = "realistic") -> tuple[nn.Module, tuple[Tensor, ...]]:
    """Small: 1x3x32x32, widths 4-16 (3 levels). Realistic: 1x3x256x256, widths 16-128 (4 levels)."""
    side, widths = pick(size, small=(32, (4, 8, 16)), realistic=(256, (16, 32, 64, 128)))
    return instantiate(lambda: UNet(3, 1, widths), (1, 3, side, side))
