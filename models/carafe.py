"""CARAFE (Wang et al., ICCV 2019): content-aware reassembly of features, a learned 2x upsampler.

A dynamic-filter family: for each low-resolution position a small conv encoder predicts
scale^2 reassembly kernels of K x K (softmax over the K*K taps), one per output sub-pixel; each is
applied to the position's K x K neighbourhood (plain torch: `F.unfold` + `view` + `einsum`, seed
000's method_1 with a sub-pixel axis), and pixel shuffle interleaves the scale^2 results into the
upsampled map. It is scale^2 dynamic filters of one filter group sharing one unfold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import instantiate, pick


class CARAFE(nn.Module):
    """[N, C, H, W] -> [N, C, sH, sW]: y[n, c, s*i+a, s*j+b] = sum_k x_pad[n, c, (i, j)+k] * w[n, k, a*s+b, i, j].

    `compressed` channels feed the kernel encoder (a conv of `encoder_kernel`); `up_kernel` is K.
    """

    def __init__(
        self, channels: int, compressed: int = 64, encoder_kernel: int = 3, up_kernel: int = 5, scale: int = 2
    ) -> None:
        super().__init__()
        self.up_kernel, self.scale = up_kernel, scale
        self.compress = nn.Conv2d(channels, compressed, 1)
        kernels = up_kernel * up_kernel * scale * scale
        self.encode = nn.Conv2d(compressed, kernels, encoder_kernel, padding=encoder_kernel // 2)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        k, s = self.up_kernel, self.scale
        # channel k*s^2 + sub-pixel, the layout pixel shuffle would turn into [N, K*K, sH, sW]
        kernels = self.encode(self.compress(x)).view(n, k * k, s * s, h, w).softmax(dim=1)
        patches = F.unfold(x, k, padding=k // 2).view(n, c, k * k, h, w)
        reassembled = torch.einsum("nckhw,nkshw->ncshw", patches, kernels)
        return F.pixel_shuffle(reassembled.reshape(n, c * s * s, h, w), s)


def build(size: str = "realistic") -> tuple[nn.Module, tuple[Tensor, ...]]:
    """Small: 1x8x8x8 features, K=3. Realistic: 2x64x64x64 features (an FPN level), K=5 as in the paper."""
    batch, channels, side, compressed, k = pick(size, small=(1, 8, 8, 8, 3), realistic=(2, 64, 64, 64, 5))
    return instantiate(lambda: CARAFE(channels, compressed, 3, k), (batch, channels, side, side))
