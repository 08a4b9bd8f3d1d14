"""Stereo matching net: two frames through a shared encoder, a group-wise cost volume, a soft-argmin.

The cost volume is written as GwcNet's `build_gwc_volume` writes it: a zero `[B, G, D, H, W]`
volume filled one disparity at a time by slice assignment (`models.correlation_idioms`). torch
exports that loop as a chain of ScatterND writes (TorchScript: thousands of nodes of index
arithmetic); convlower's recognizer finds it as one `convlower.LocalCorrelation`.
"""

from __future__ import annotations

from torch import Tensor, nn

from .common import instantiate, pick
from .correlation_idioms import StereoNet


def build(size: str = "realistic") -> tuple[nn.Module, tuple[Tensor, ...]]:
    """Small: 1x3x16x32 frames, 8 channels, 4 disparities, 4 groups. Realistic: 2x3x128x256 frames
    through a stride-2 encoder of 32 channels, 24 disparities, 8 groups (the issue's measured net)."""
    batch, height, width, channels, disparities, groups = pick(
        size, small=(1, 16, 32, 8, 4, 4), realistic=(2, 128, 256, 32, 24, 8))
    shape = (batch, 3, height, width)
    return instantiate(lambda: StereoNet("groupwise", channels, disparities, groups), shape, shape)
