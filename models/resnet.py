"""A small ResNet (He et al., 2016) classifier: the plain static-Conv workload.

Basic blocks (two 3x3 Conv + BatchNorm), stride-2 downsampling with a 1x1 projection shortcut,
global average pooling and a linear head: dense 7x7, 3x3 and 1x1 Convs of many shapes, where
onnxruntime's native Conv is strong and the tuner should mostly keep it.
"""

from __future__ import annotations

from torch import Tensor, nn

from .common import Classifier, Residual, conv_bn, instantiate, pick


class BasicBlock(Residual):
    """relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x)); the shortcut projects with a strided 1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        body = nn.Sequential(
            conv_bn(in_channels, out_channels, 3, stride),
            conv_bn(out_channels, out_channels, 3, act=None),
        )
        projects = stride != 1 or in_channels != out_channels
        super().__init__(body, conv_bn(in_channels, out_channels, 1, stride, act=None) if projects else nn.Identity())


class ResNet(Classifier):
    """7x7/2 stem + 3x3/2 max pool, then one stage per width (the first at stride 1, the rest at 2)."""

    def __init__(self, widths: tuple[int, ...], blocks_per_stage: int, classes: int = 1000) -> None:
        layers: list[nn.Module] = [conv_bn(3, widths[0], 7, 2), nn.MaxPool2d(3, 2, 1)]
        in_channels = widths[0]
        for stage, width in enumerate(widths):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(in_channels, width, stride))
                in_channels = width
        super().__init__(nn.Sequential(*layers), in_channels, classes)


def build(size: str = "realistic") -> tuple[nn.Module, tuple[Tensor, ...]]:
    """Small: 1x3x32x32, widths 8-16, one block a stage. Realistic: 1x3x224x224, widths 32-256, two a stage."""
    side, widths, blocks, classes = pick(size, small=(32, (8, 16), 1, 10), realistic=(224, (32, 64, 128, 256), 2, 1000))
    return instantiate(lambda: ResNet(widths, blocks, classes), (1, 3, side, side))
