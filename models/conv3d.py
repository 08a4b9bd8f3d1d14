"""A small C3D-style video classifier: 3x3x3 convolutions over clips shaped [N, C, T, H, W].

The volumetric workload: 3-D `Conv` specs (kernel, stride and pads of rank 3), with a first
downsampling in space only (stride 1x2x2) and later ones in space and time, as video nets do.
"""

from __future__ import annotations

from torch import Tensor, nn

from .common import Classifier, conv_bn, instantiate, pick


class VideoNet(Classifier):
    """Conv3d + BatchNorm + ReLU stages of `widths`: stride 1, then 1x2x2, then 2x2x2 for the rest."""

    def __init__(self, widths: tuple[int, ...], classes: int) -> None:
        strides = [(1, 1, 1), (1, 2, 2)] + [(2, 2, 2)] * (len(widths) - 2)
        channels = (3,) + widths
        features = nn.Sequential(*(
            conv_bn(c_in, c_out, 3, stride, dims=3) for c_in, c_out, stride in zip(channels, widths, strides)
        ))
        super().__init__(features, widths[-1], classes)


def build(size: str = "realistic") -> tuple[nn.Module, tuple[Tensor, ...]]:
    """Small: a 1x3x4x16x16 clip, widths 4-8. Realistic: a 1x3x16x112x112 clip, widths 16-64 (C3D's input)."""
    frames, side, widths, classes = pick(size, small=(4, 16, (4, 8, 8), 10), realistic=(16, 112, (16, 32, 64, 64), 400))
    return instantiate(lambda: VideoNet(widths, classes), (1, 3, frames, side, side))
