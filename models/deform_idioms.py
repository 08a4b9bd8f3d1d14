"""Deformable convolutions written the ways ports without torchvision write them, for recognition
tests and benchmarks.

`PerTapGridSample` is DCN (v1, or v2 with a mask) in plain torch: per kernel tap, the regular grid
of the convolution plus that tap's offsets, normalized for `F.grid_sample`, one bilinear sample of
the whole image (zeros outside), times the tap's mask; then the samples contracted with the
weights. It computes torchvision's `deform_conv2d` (offsets `[N, 2K, oH, oW]`, the row then the
column offset of each tap, taps row-major; mask `[N, K, oH, oW]`), and the knobs are the ways
such code differs:

| knob | choices |
| --- | --- |
| `offset_layout` | `"interleaved"` (torchvision's `dy0, dx0, dy1, ...`), `"split"` (all rows, then all columns) |
| `contraction` | `"einsum"` (`stack` on a tap axis, `einsum('nckhw,ock->nohw')`), `"conv"` (`cat` on channels, 1x1 conv) |
| `align_corners` | grids normalized for either setting of `F.grid_sample` |

`padding_mode` other than `"zeros"` is not DCN (it reads the border outside the image): tests use it
as a look-alike, as they use `sample` and `contract` apart.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PerTapGridSample(nn.Module):
    """A deformable convolution as one `F.grid_sample` per tap, then an Einsum or a 1x1 Conv."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, *, stride: int = 1, padding: int = 1,
        dilation: int = 1, bias: bool = True, offset_layout: str = "interleaved", contraction: str = "einsum",
        align_corners: bool = False, padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size) / (in_channels * kernel_size))
        self.bias = nn.Parameter(torch.randn(out_channels)) if bias else None
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation
        self.offset_layout, self.contraction, self.align_corners = offset_layout, contraction, align_corners
        self.padding_mode = padding_mode

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.contract(self.sample(x, offset, mask))

    def sample(self, x: Tensor, offset: Tensor, mask: Tensor | None = None) -> list[Tensor]:
        """Each tap's bilinear samples `[N, C, oH, oW]`, times its mask."""
        _, _, height, width = x.shape
        k, s, p, d = self.kernel_size, self.stride, self.padding, self.dilation
        out_h, out_w = offset.shape[2], offset.shape[3]
        rows = (torch.arange(out_h, dtype=x.dtype) * s - p).view(1, out_h, 1)
        cols = (torch.arange(out_w, dtype=x.dtype) * s - p).view(1, 1, out_w)
        taps = k * k
        samples = []
        for tap in range(taps):
            i, j = divmod(tap, k)
            if self.offset_layout == "interleaved":
                dy, dx = offset[:, 2 * tap], offset[:, 2 * tap + 1]
            else:
                dy, dx = offset[:, tap], offset[:, taps + tap]
            y, xx = rows + i * d + dy, cols + j * d + dx
            if self.align_corners:
                grid = torch.stack((2 * xx / (width - 1) - 1, 2 * y / (height - 1) - 1), dim=-1)
            else:
                grid = torch.stack(((2 * xx + 1) / width - 1, (2 * y + 1) / height - 1), dim=-1)
            sample = F.grid_sample(x, grid, mode="bilinear", padding_mode=self.padding_mode, align_corners=self.align_corners)
            samples.append(sample if mask is None else sample * mask[:, tap:tap + 1])
        return samples

    def contract(self, samples: list[Tensor]) -> Tensor:
        """The samples times the weights, summed over channels and taps, plus the bias."""
        if self.contraction == "einsum":
            out = torch.einsum("nckhw,ock->nohw", torch.stack(samples, 2), self.weight.flatten(2))
            return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)
        weight = self.weight.flatten(2).permute(0, 2, 1).reshape(self.weight.shape[0], -1, 1, 1)  # [O, K·C]: tap-major
        return F.conv2d(torch.cat(samples, 1), weight, self.bias)
