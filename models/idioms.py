"""Dynamic filters written the ways papers' repositories write them, for recognition tests and benchmarks.

Each layer takes the input and its per-position filters in the layout its idiom uses, and computes
a spatially variant filter (a `convlower.DynamicFilter`, or for `PixelAdaptive` a
`convlower.PixelAdaptiveConv`) in plain torch, exactly as such code is written:

| layer | idiom | filters |
| --- | --- | --- |
| `UnfoldMulSum` | `F.unfold(x).view(n, c, k*k, h, w) * f.unsqueeze(1)`, `.sum(2)` (KPN denoisers) | `[N, K, H, W]` |
| `UnfoldSignal` | `F.unfold(x.unsqueeze(2), (1, k))` on a 1-D signal viewed as `[N, C, 1, T]` | `[N, K, T]` |
| `TensorUnfold` | `F.pad(x).unfold(2, k, s).unfold(3, k, s)` patches times filters, summed over the kernel axes (ranks 1 to 3) | `[N, 1, *S, k, ..]` |
| `ShiftLoop` | pad once, then per tap a slice of the padded input times one filter channel, accumulated with `+` | `[N, K, *S]` |
| `StackedShifts` | KPN burst denoisers: K shifted slices of a 5-D burst stacked on a new axis, times kernels, summed | `[B, F, K, C, H, W]` |
| `PixelAdaptive` | PAC: `F.unfold(x).view(...) * kernel`, then `einsum('ijklmn,ojkl->iomn', ., weight)` | `[N, 1, k, k, H, W]` |

`FilterNet` wraps any of them in a small image net whose filters are predicted from the input by a
convolution and a softmax, as kernel-prediction networks do, so that one input drives the whole
model and the filter dominates its cost.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _torch_pads(rank: int, pad: int) -> list[int]:
    """F.pad's amounts for `pad` zeros on both sides of the last `rank` axes."""
    return [pad] * 2 * rank


class UnfoldMulSum(nn.Module):
    """KPN-style: `F.unfold` patches viewed per pixel, times one filter per pixel, summed over taps."""

    def __init__(self, kernel_size: int = 3, dilation: int = 1) -> None:
        super().__init__()
        self.kernel_size, self.dilation = kernel_size, dilation

    def forward(self, x: Tensor, filters: Tensor) -> Tensor:
        n, c, h, w = x.shape
        k, d = self.kernel_size, self.dilation
        patches = F.unfold(x, k, dilation=d, padding=d * (k // 2)).view(n, c, k * k, h, w)
        return (patches * filters.unsqueeze(1)).sum(2)


class UnfoldSignal(nn.Module):
    """Per-timestep filters on a 1-D signal, through F.unfold on the signal viewed as `[N, C, 1, T]`."""

    def __init__(self, kernel_size: int = 9) -> None:
        super().__init__()
        self.kernel_size = kernel_size

    def forward(self, x: Tensor, filters: Tensor) -> Tensor:
        n, c, t = x.shape
        k = self.kernel_size
        patches = F.unfold(x.unsqueeze(2), (1, k), padding=(0, k // 2)).view(n, c, k, t)
        return (patches * filters.unsqueeze(1)).sum(2)


class TensorUnfold(nn.Module):
    """`Tensor.unfold` patches: pad, unfold every spatial axis (`[N, C, *S_out, k, ..]`), weight, sum.

    `filters` is `[N, 1 or C, *S_out, k, ..]`: one filter per position, shared by the channels or
    per channel.
    """

    def __init__(self, rank: int = 2, kernel_size: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.rank, self.kernel_size, self.stride = rank, kernel_size, stride

    def forward(self, x: Tensor, filters: Tensor) -> Tensor:
        k, s = self.kernel_size, self.stride
        patches = F.pad(x, _torch_pads(self.rank, k // 2))
        for axis in range(2, 2 + self.rank):
            patches = patches.unfold(axis, k, s)
        kernel_axes = tuple(range(-self.rank, 0))
        return (patches * filters).sum(kernel_axes)


class ShiftLoop(nn.Module):
    """A hand-written shift-and-sum: pad once, then one slice of the padded input per tap, times that
    tap's filter channel, accumulated with `+`, or (`use_sum=True`) stacked and summed."""

    def __init__(self, rank: int = 2, kernel_size: int = 3, use_sum: bool = False) -> None:
        super().__init__()
        self.rank, self.kernel_size, self.use_sum = rank, kernel_size, use_sum

    def forward(self, x: Tensor, filters: Tensor) -> Tensor:
        k = self.kernel_size
        spatial = x.shape[2:]
        padded = F.pad(x, _torch_pads(self.rank, k // 2))
        terms = []
        for tap, offset in enumerate(_offsets(self.rank, k)):
            window = padded[(slice(None), slice(None)) + tuple(slice(o, o + n) for o, n in zip(offset, spatial))]
            terms.append(window * filters[:, tap : tap + 1])
        if self.use_sum:
            return torch.stack(terms, 0).sum(0)
        out = terms[0]
        for term in terms[1:]:
            out = out + term
        return out


class StackedShifts(nn.Module):
    """KPN burst denoising (`KernelConv._convolution`): a burst `[B, F, C, H, W]` padded once, the K
    shifted slices stacked on a new axis 2, times per-frame, per-channel kernels `[B, F, K, C, H, W]`,
    summed over the stack axis."""

    def __init__(self, kernel_size: int = 3) -> None:
        super().__init__()
        self.kernel_size = kernel_size

    def forward(self, frames: Tensor, kernels: Tensor) -> Tensor:
        k = self.kernel_size
        h, w = frames.shape[-2:]
        padded = F.pad(frames, [k // 2] * 4)
        stack = [padded[..., i : i + h, j : j + w] for i in range(k) for j in range(k)]
        return torch.sum(kernels.mul(torch.stack(stack, dim=2)), dim=2, keepdim=False)


class PixelAdaptive(nn.Module):
    """Pixel-adaptive convolution (PAC): a static conv whose taps are modulated per pixel by a kernel
    computed from guidance features, written as pacnet's `pacconv2d` writes it."""

    def __init__(self, in_channels: int = 4, out_channels: int = 8, kernel_size: int = 3, dilation: int = 1, bias: bool = True) -> None:
        super().__init__()
        self.kernel_size, self.dilation = kernel_size, dilation
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size) / math.sqrt(in_channels * kernel_size**2))
        self.bias = nn.Parameter(torch.randn(out_channels) * 0.1) if bias else None

    def forward(self, x: Tensor, kernel: Tensor) -> Tensor:
        bs, ch, h, w = x.shape
        k, d = self.kernel_size, self.dilation
        cols = F.unfold(x, k, dilation=d, padding=d * (k // 2), stride=1)
        in_mul_k = cols.view(bs, ch, *kernel.shape[2:]) * kernel
        output = torch.einsum("ijklmn,ojkl->iomn", (in_mul_k, self.weight))
        if self.bias is not None:
            output += self.bias.view(1, -1, 1, 1)
        return output


def _offsets(rank: int, kernel_size: int) -> list[tuple[int, ...]]:
    import itertools

    return list(itertools.product(range(kernel_size), repeat=rank))


class FilterNet(nn.Module):
    """A small image net around one of the layers above: a conv predicts the filters from the input
    (softmax over the taps), the layer applies them. Inputs: one image `[N, C, H, W]`."""

    def __init__(self, idiom: str = "unfold_mul_sum", channels: int = 3, kernel_size: int = 5) -> None:
        super().__init__()
        self.idiom, self.kernel_size = idiom, kernel_size
        taps = kernel_size * kernel_size
        self.predict = nn.Conv2d(channels, taps, 3, padding=1)
        self.layer = {
            "unfold_mul_sum": lambda: UnfoldMulSum(kernel_size),
            "tensor_unfold": lambda: TensorUnfold(2, kernel_size),
            "shift_loop": lambda: ShiftLoop(2, kernel_size),
        }[idiom]()

    def forward(self, x: Tensor) -> Tensor:
        filters = self.predict(x).softmax(dim=1)  # [N, K, H, W]
        if self.idiom == "tensor_unfold":
            n, _, h, w = filters.shape
            filters = filters.permute(0, 2, 3, 1).reshape(n, 1, h, w, self.kernel_size, self.kernel_size)
        return self.layer(x, filters)
