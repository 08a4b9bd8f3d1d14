"""MobileNetV2 (Sandler et al., 2018): inverted residual blocks, the depthwise-Conv workload.

Each block expands with a 1x1 Conv, filters with a 3x3 depthwise Conv (group == channels), and
projects back with a linear 1x1 Conv: the pointwise and depthwise Convs that convlower's
`pointwise_matmul` and `depthwise_shift` variants target.
"""

from __future__ import annotations

from torch import Tensor, nn

from .common import Classifier, conv_bn, instantiate, pick

# (expansion t, output channels c, repeats n, first stride s), as in the paper's Table 2.
MOBILENET_V2 = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)
)
TINY = ((1, 8, 1, 1), (6, 16, 2, 2))


class InvertedResidual(nn.Module):
    """1x1 expand (ReLU6), 3x3 depthwise (ReLU6), 1x1 linear project; residual when shapes agree."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        expand = [conv_bn(in_channels, hidden, 1, act=nn.ReLU6)] if expansion != 1 else []
        self.body = nn.Sequential(
            *expand,
            conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            conv_bn(hidden, out_channels, 1, act=None),
        )
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class MobileNetV2(Classifier):
    """3x3/2 stem, the inverted-residual stages of `config`, 1x1 conv to `last_channels`, pool, linear."""

    def __init__(
        self, config: tuple[tuple[int, int, int, int], ...], stem: int, last_channels: int, classes: int
    ) -> None:
        layers: list[nn.Module] = [conv_bn(3, stem, 3, 2, act=nn.ReLU6)]
        in_channels = stem
        for expansion, out_channels, repeats, stride in config:
            for i in range(repeats):
                layers.append(InvertedResidual(in_channels, out_channels, stride if i == 0 else 1, expansion))
                in_channels = out_channels
        layers.append(conv_bn(in_channels, last_channels, 1, act=nn.ReLU6))
        super().__init__(nn.Sequential(*layers), last_channels, classes)


def build(size: str = "realistic") -> tuple[nn.Module, tuple[Tensor, ...]]:
    """Small: 1x3x32x32, two tiny stages. Realistic: 1x3x224x224, the full MobileNetV2 1.0 layout."""
    side, config, stem, last, classes = pick(
        size, small=(32, TINY, 8, 32, 10), realistic=(224, MOBILENET_V2, 32, 1280, 1000)
    )
    return instantiate(lambda: MobileNetV2(config, stem, last, classes), (1, 3, side, side))
