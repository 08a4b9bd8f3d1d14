"""Kernel-prediction denoiser: a conv encoder predicts a K x K filter per pixel, applied to the image.

A dynamic-filter family (as in KPN burst denoising and Monte-Carlo render denoisers): the filters
depend on the input, so they are not Conv weights but a tensor, and the filtering is written the
plain-torch way of seed 000 — `F.unfold` + `view` + multiply + `sum`. How torch exports that idiom
(Pad + Gather + Transpose + Reshape, then Mul + ReduceSum) is what convlower's recognizer must find
and what its `DynamicFilter` lowerings replace.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .common import instantiate, pick


class KPNDenoiser(nn.Module):
    """y[n, c, p] = sum_k x_pad[n, c, p + k] * w[n, k, p], with w = softmax_k(encoder(x)).

    One filter per pixel, shared by all colour channels (a `DynamicFilter` with one filter group);
    the softmax makes each filter a weighted average of the neighbourhood.
    """

    def __init__(self, channels: int = 3, hidden: int = 32, kernel_size: int = 5) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, kernel_size * kernel_size, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        k = self.kernel_size
        filters = self.encoder(x).softmax(dim=1)  # [N, K*K, H, W]
        patches = F.unfold(x, k, padding=k // 2).view(n, c, k * k, h, w)
        return (patches * filters.unsqueeze(1)).sum(2)


def build(size: str = "realistic") -> tuple[nn.Module, tuple[Tensor, ...]]:
    """Small: 1x3x16x16 image, K=3. Realistic: 4x3x128x128 images, K=5."""
    batch, side, k, hidden = pick(size, small=(1, 16, 3, 8), realistic=(4, 128, 5, 32))
    return instantiate(lambda: KPNDenoiser(3, hidden, k), (batch, 3, side, side))
