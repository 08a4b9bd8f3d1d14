"""Temporal convolutional network (Bai et al., 2018): dilated causal 1-D convolutions with residuals.

The sequence workload: Conv1d with dilations 1, 2, 4, 8 (receptive field 1 + 2(K-1)(1+2+4+8)),
made causal by padding on the left only: 1-D Conv specs, with the causal padding exported as a
`Pad` before the `Conv` (legacy exporter) or folded into the Conv's asymmetric `pads` (dynamo).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .common import Residual, instantiate, pick


class CausalConv1d(nn.Conv1d):
    """Conv1d whose output at step t sees inputs t - (K-1)*dilation .. t only: zeros padded on the left."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size, dilation=dilation)
        self.left_pad = (kernel_size - 1) * dilation

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, (self.left_pad, 0)))


class TemporalBlock(Residual):
    """Two causal dilated convs with ReLU, plus the input (projected by a 1x1 conv if the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int) -> None:
        body = nn.Sequential(
            CausalConv1d(in_channels, out_channels, kernel_size, dilation), nn.ReLU(),
            CausalConv1d(out_channels, out_channels, kernel_size, dilation), nn.ReLU(),
        )
        projects = in_channels != out_channels
        super().__init__(body, nn.Conv1d(in_channels, out_channels, 1) if projects else nn.Identity())


class TCN(nn.Module):
    """[N, C_in, T] -> [N, C_out, T]: one temporal block per dilation, then a 1x1 conv head per step."""

    def __init__(
        self, in_channels: int, hidden: int, out_channels: int, kernel_size: int = 3,
        dilations: tuple[int, ...] = (1, 2, 4, 8),
    ) -> None:
        super().__init__()
        widths = (in_channels,) + (hidden,) * len(dilations)
        self.blocks = nn.Sequential(*(
            TemporalBlock(c_in, c_out, kernel_size, d) for c_in, c_out, d in zip(widths, widths[1:], dilations)
        ))
        self.head = nn.Conv1d(hidden, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(x))


def build(size: str = "realistic") -> tuple[nn.Module, tuple[Tensor, ...]]:
    """Small: 1x4x64 sequence, 8 hidden channels. Realistic: 4x16x2048 sequences, 64 hidden channels."""
    batch, channels, steps, hidden = pick(size, small=(1, 4, 64, 8), realistic=(4, 16, 2048, 64))
    return instantiate(lambda: TCN(channels, hidden, channels), (batch, channels, steps))
