"""Seed 000's spatially variant filter, exactly as the notebook writes it (method_1).

The filters are an input (predicted elsewhere), the feature map is unfolded and contracted with
them by `einsum('nckhw,nkhw->nchw')`. This is the graph convlower exists for: torch exports it as
Pad + Gather + Transpose + Reshape + Einsum, which onnxruntime runs an order of magnitude slower
than a shift-sum lowering of the same `DynamicFilter`. Realistic size is the notebook's own:
N=2048, C=1, 32x32, K=3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import instantiate, pick


class SeedFilter(nn.Module):
    """y[n, c, p] = sum_k x_pad[n, c, p + k] * filters[n, k, p] (K given: the exporters trace it)."""

    def __init__(self, kernel_size: int = 3) -> None:
        super().__init__()
        self.kernel_size = kernel_size

    def forward(self, feature_map: Tensor, filters: Tensor) -> Tensor:
        n, c, h, w = feature_map.shape
        k = self.kernel_size
        unfolded = F.unfold(feature_map, k, padding=k // 2).view(n, c, k * k, h, w)
        return torch.einsum("nckhw,nkhw->nchw", unfolded, filters)


def build(size: str = "realistic") -> tuple[nn.Module, tuple[Tensor, ...]]:
    """Small: N=2, C=1, 8x8, K=3. Realistic: seed 000's N=2048, C=1, 32x32, K=3."""
    batch, side = pick(size, small=(2, 8), realistic=(2048, 32))
    return instantiate(lambda: SeedFilter(3), (batch, 1, side, side), (batch, 9, side, side))
