"""A small DCNv2 detector head: a Conv stem, then two modulated deformable 3x3 convolutions whose
offsets and masks a Conv predicts from the features (as DBNet++, PP-YOLO and FCOS-DCN heads
write them), then a 1x1 Conv to class scores.

The deformable layers call `convlower.ops.deform_conv2d` (torchvision's signature in plain torch),
which exports as one ONNX `DeformConv` per layer (opset 19, `MIN_OPSET`): the node convlower's
`DeformConv` family tunes between onnxruntime's kernel and its Gather and GridSample lowerings.
"""

from __future__ import annotations

from torch import Tensor, nn

from convlower.ops import deform_conv2d

from .common import instantiate, pick


class ModulatedDeformBlock(nn.Module):
    """DCNv2: offsets (2·9 channels) and a sigmoid mask (9 channels) predicted by one 3x3 Conv, then
    a 3x3 deformable convolution, BatchNorm-free, ReLU."""

    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__()
        self.predict = nn.Conv2d(channels, 27, 3, padding=1)
        nn.init.normal_(self.predict.weight, std=0.05)
        self.weight = nn.Parameter(nn.init.kaiming_normal_(nn.Conv2d(channels, out_channels, 3).weight.detach().clone()))
        self.bias = nn.Parameter(nn.Conv2d(channels, out_channels, 3).bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        predicted = self.predict(x)
        offset, mask = predicted[:, :18], predicted[:, 18:].sigmoid()
        return deform_conv2d(x, offset, self.weight, self.bias, padding=1, mask=mask).relu()


class DCNHead(nn.Module):
    def __init__(self, channels: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, 2, 1), nn.ReLU())
        self.blocks = nn.Sequential(ModulatedDeformBlock(channels, channels), ModulatedDeformBlock(channels, channels))
        self.classify = nn.Conv2d(channels, classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classify(self.blocks(self.stem(x)))


MIN_OPSET = 19
"""ONNX DeformConv arrives in opset 19."""


def build(size: str = "realistic") -> tuple[nn.Module, tuple[Tensor, ...]]:
    """Small: 1x3x16x16, 8 channels. Realistic: 1x3x128x128 (64x64 features), 32 channels."""
    side, channels = pick(size, small=(16, 8), realistic=(128, 32))
    return instantiate(lambda: DCNHead(channels), (1, 3, side, side))
