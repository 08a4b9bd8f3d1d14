"""Optical-flow net: two frames through a shared encoder, a local correlation, a small conv head.

The correlation is written with `F.unfold`, as flow code without a custom CUDA kernel writes it:
every 9x9 window of the second frame's features times the first's, summed over channels
(`models.correlation_idioms.UnfoldCorrelation`). torch exports it as Gathers of an unfolded
tensor 81 times the feature map's size; convlower's recognizer finds it as one
`convlower.LocalCorrelation`.
"""

from __future__ import annotations

from torch import Tensor, nn

from .common import instantiate, pick
from .correlation_idioms import FlowNet


def build(size: str = "realistic") -> tuple[nn.Module, tuple[Tensor, ...]]:
    """Small: 1x3x16x24 frames, 8 channels, displacements up to 2. Realistic: 2x3x128x256 frames
    through a stride-2 encoder of 32 channels, displacements up to 4 (81 taps)."""
    batch, height, width, channels, reach = pick(size, small=(1, 16, 24, 8, 2), realistic=(2, 128, 256, 32, 4))
    shape = (batch, 3, height, width)
    return instantiate(lambda: FlowNet("unfold", channels, reach), shape, shape)
