"""Cost volumes and local correlations written the ways stereo, flow and local-attention code writes them.

Each layer takes two feature maps `[N, C, *S]` and correlates them over a window of displacements:
`Y[n, g, k, p] = reduce_{c in group g} A[n, c, p] · B[n, c, p + δ_k]`, zero where `p + δ_k` leaves B
(a `convlower.LocalCorrelation`). Each is written as the repositories it stands for write it:

| layer | idiom | from | output |
| --- | --- | --- | --- |
| `GroupwiseVolume` | a zero volume filled by slice assignment per disparity, `vol[:, :, i, :, i:] = (l[..., i:] * r[..., :-i]).view(B, G, C//G, H, W-i).mean(2)` | GwcNet `build_gwc_volume` | `[B, G, D, H, W]`, δ = -d along W |
| `CorrelationVolume` | the same with one group: `vol[:, i, :, i:] = (l[..., i:] * r[..., :-i]).mean(1)` | GwcNet/AANet `build_corr_volume` | `[B, D, H, W]` |
| `PaddedShiftLoop` | pad once, then per displacement a shifted slice times the other map, reduced over channels, joined by `cat` (or `stack`), with a step | PWC-Net / RAFT-style pure-torch correlation, FlowNetC (step 2) | `[B, K, H, W]` |
| `UnfoldCorrelation` | `F.unfold(f2, k, padding=k//2).view(b, c, k*k, h, w) * f1[:, :, None]`, `.sum(1)` | flow correlation without a CUDA kernel | `[B, K, H, W]` |
| `UnfoldStereo` | a left zero pad, `nn.Unfold((1, D))`, times the left map, summed over channels, `.flip(1)` | 1-D stereo cost | `[B, D, H, W]`, δ = -d along W |
| `LocalAttention` | `F.pad(k).unfold(2, w, 1).unfold(3, w, 1)` keys per head times queries, summed over the head's channels, softmax, then the same for values | stand-alone self-attention | `[B, C, H, W]` |

`StereoNet` and `FlowNet` wrap them in small two-frame nets (a light shared encoder, the volume, a
small head), as such repositories build them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def groupwise_correlation(fea1: Tensor, fea2: Tensor, num_groups: int, reduction: str = "mean") -> Tensor:
    """GwcNet's `groupwise_correlation`, verbatim in substance (`reduction` "sum" sums each group's channels instead)."""
    b, c, h, w = fea1.shape
    channels_per_group = c // num_groups
    grouped = (fea1 * fea2).view([b, num_groups, channels_per_group, h, w])
    return grouped.mean(dim=2) if reduction == "mean" else grouped.sum(dim=2)


class GroupwiseVolume(nn.Module):
    """GwcNet's `build_gwc_volume`: a zero `[B, G, D, H, W]` volume filled one disparity at a time
    (`reduction` "mean", GwcNet's, or "sum" over each group's channels)."""

    def __init__(self, max_disparity: int = 24, groups: int = 8, reduction: str = "mean") -> None:
        super().__init__()
        self.max_disparity, self.groups, self.reduction = max_disparity, groups, reduction

    def forward(self, left: Tensor, right: Tensor) -> Tensor:
        b, c, h, w = left.shape
        volume = left.new_zeros([b, self.groups, self.max_disparity, h, w])
        for i in range(self.max_disparity):
            if i > 0:
                volume[:, :, i, :, i:] = groupwise_correlation(left[:, :, :, i:], right[:, :, :, :-i], self.groups, self.reduction)
            else:
                volume[:, :, i, :, :] = groupwise_correlation(left, right, self.groups, self.reduction)
        return volume.contiguous()


class CorrelationVolume(nn.Module):
    """The one-group volume `[B, D, H, W]` (`build_corr_volume`): mean (or, `reduction` "sum", the sum)
    over all channels per disparity."""

    def __init__(self, max_disparity: int = 24, reduction: str = "mean") -> None:
        super().__init__()
        self.max_disparity, self.reduction = max_disparity, reduction

    def _reduced(self, product: Tensor) -> Tensor:
        return product.mean(dim=1) if self.reduction == "mean" else product.sum(dim=1)

    def forward(self, left: Tensor, right: Tensor) -> Tensor:
        b, c, h, w = left.shape
        volume = left.new_zeros([b, self.max_disparity, h, w])
        for i in range(self.max_disparity):
            if i > 0:
                volume[:, i, :, i:] = self._reduced(left[:, :, :, i:] * right[:, :, :, :-i])
            else:
                volume[:, i, :, :] = self._reduced(left * right)
        return volume.contiguous()


class PaddedShiftLoop(nn.Module):
    """Pure-torch flow correlation: pad the second map once by `max_displacement`, then for every
    displacement (`step` apart; FlowNetC uses 2) the shifted slice times the first map, reduced over
    channels (`mean`, or `sum`), joined on the channel axis by `cat` (or `stack`). `rank` 1 or 2.

    With `groups` G > 1 each product is viewed as `[B, G, C//G, *S]` and reduced over axis 2 (group-wise
    correlation), then joined by `cat` on axis 1 (`[B, K·G, *S]`, displacement-major) or `stack` on
    axis 2 (`[B, G, K, *S]`, GwcNet's layout)."""

    def __init__(
        self, max_displacement: int = 4, step: int = 1, reduction: str = "mean", join: str = "cat", rank: int = 2, groups: int = 1
    ) -> None:
        super().__init__()
        self.max_displacement, self.step, self.reduction, self.join, self.rank = max_displacement, step, reduction, join, rank
        self.groups = groups

    def forward(self, f1: Tensor, f2: Tensor) -> Tensor:
        d = self.max_displacement
        spatial = f1.shape[2:]
        padded = F.pad(f2, [d, d] * self.rank)
        offsets = range(0, 2 * d + 1, self.step)
        windows = [(i,) for i in offsets] if self.rank == 1 else [(i, j) for i in offsets for j in offsets]
        costs = []
        for window in windows:
            shifted = padded[(slice(None), slice(None)) + tuple(slice(o, o + n) for o, n in zip(window, spatial))]
            product = f1 * shifted
            if self.groups > 1:
                product = product.view(f1.shape[0], self.groups, f1.shape[1] // self.groups, *spatial)
                cost = product.mean(2) if self.reduction == "mean" else product.sum(2)
            else:
                keepdim = self.join == "cat"
                cost = product.mean(1, keepdim=keepdim) if self.reduction == "mean" else product.sum(1, keepdim=keepdim)
            costs.append(cost)
        if self.join == "cat":
            return torch.cat(costs, 1)
        return torch.stack(costs, 2 if self.groups > 1 else 1)


class UnfoldCorrelation(nn.Module):
    """Flow correlation by `F.unfold`: every k x k window of the second map times the first, summed over channels."""

    def __init__(self, kernel_size: int = 9) -> None:
        super().__init__()
        self.kernel_size = kernel_size

    def forward(self, f1: Tensor, f2: Tensor) -> Tensor:
        b, c, h, w = f1.shape
        k = self.kernel_size
        windows = F.unfold(f2, k, padding=k // 2).view(b, c, k * k, h, w)
        return (windows * f1[:, :, None]).sum(1)


class UnfoldStereo(nn.Module):
    """1-D stereo cost by `nn.Unfold((1, D))`: the right map padded on the left by D-1 zeros, its D
    windows along W times the left map, summed over channels, then flipped so that index d is disparity d."""

    def __init__(self, max_disparity: int = 24) -> None:
        super().__init__()
        self.max_disparity = max_disparity
        self.unfold = nn.Unfold((1, max_disparity))

    def forward(self, left: Tensor, right: Tensor) -> Tensor:
        b, c, h, w = left.shape
        d = self.max_disparity
        padded = F.pad(right, (d - 1, 0, 0, 0))
        windows = self.unfold(padded).view(b, c, d, h, w)
        cost = (left.unsqueeze(2) * windows).sum(1)
        return cost.flip(1)


class LocalAttention(nn.Module):
    """Stand-alone self-attention over a `window` x `window` neighbourhood, per head: keys and values
    unfolded with `Tensor.unfold`, q·k summed over the head's channels, softmax over the window, the
    weighted sum of the unfolded values. `keepdim=False` sums q·k to `[B, heads, H, W, K]` (and
    unsqueezes it before weighting the values); `einsum=True` writes both products as einsums
    (`'bhcxy,bhcxyk->bhxyk'`, `'bhxyk,bhcxyk->bhcxy'`), as other repositories do."""

    def __init__(self, channels: int = 16, heads: int = 4, window: int = 5, keepdim: bool = True, einsum: bool = False) -> None:
        super().__init__()
        self.heads, self.window, self.keepdim, self.einsum = heads, window, keepdim, einsum
        self.qkv = nn.Conv2d(channels, 3 * channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=1)
        pad = self.window // 2
        k = F.pad(k, [pad] * 4).unfold(2, self.window, 1).unfold(3, self.window, 1)
        v = F.pad(v, [pad] * 4).unfold(2, self.window, 1).unfold(3, self.window, 1)
        k = k.reshape(b, self.heads, c // self.heads, h, w, self.window * self.window)
        v = v.reshape(b, self.heads, c // self.heads, h, w, self.window * self.window)
        if self.einsum:
            q = q.reshape(b, self.heads, c // self.heads, h, w)
            attention = torch.einsum("bhcxy,bhcxyk->bhxyk", q, k).softmax(dim=-1)
            return torch.einsum("bhxyk,bhcxyk->bhcxy", attention, v).reshape(b, c, h, w)
        q = q.reshape(b, self.heads, c // self.heads, h, w, 1)
        attention = (q * k).sum(2, keepdim=self.keepdim).softmax(dim=-1)
        if not self.keepdim:
            attention = attention.unsqueeze(2)
        return (attention * v).sum(-1).reshape(b, c, h, w)


class Encoder(nn.Module):
    """A light shared feature encoder: two strided conv blocks, `stride` 2 or 4 overall."""

    def __init__(self, channels: int = 32, stride: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels, 3, 2, 1), nn.ReLU()]
        if stride == 4:
            layers += [nn.Conv2d(channels, channels, 3, 2, 1), nn.ReLU()]
        layers += [nn.Conv2d(channels, channels, 3, 1, 1)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class StereoNet(nn.Module):
    """Two frames through one encoder, a cost volume (`volume`: "groupwise", "correlation" or
    "unfold"), a soft-argmin over the disparities."""

    def __init__(self, volume: str = "groupwise", channels: int = 32, max_disparity: int = 24, groups: int = 8) -> None:
        super().__init__()
        self.encoder = Encoder(channels)
        self.volume = {
            "groupwise": lambda: GroupwiseVolume(max_disparity, groups),
            "correlation": lambda: CorrelationVolume(max_disparity),
            "unfold": lambda: UnfoldStereo(max_disparity),
        }[volume]()
        self.grouped = volume == "groupwise"
        self.head = nn.Conv3d(groups, 1, 3, padding=1) if self.grouped else nn.Conv2d(max_disparity, max_disparity, 3, padding=1)
        self.register_buffer("disparities", torch.arange(max_disparity, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, left: Tensor, right: Tensor) -> Tensor:
        cost = self.volume(self.encoder(left), self.encoder(right))
        cost = self.head(cost).squeeze(1) if self.grouped else self.head(cost)
        return (cost.softmax(dim=1) * self.disparities).sum(1, keepdim=True)


class FlowNet(nn.Module):
    """Two frames through one encoder, a correlation (`correlation`: "shift_loop" or "unfold"),
    and a small conv head predicting the flow."""

    def __init__(self, correlation: str = "unfold", channels: int = 32, max_displacement: int = 4) -> None:
        super().__init__()
        self.encoder = Encoder(channels)
        self.correlation = {
            "shift_loop": lambda: PaddedShiftLoop(max_displacement),
            "unfold": lambda: UnfoldCorrelation(2 * max_displacement + 1),
        }[correlation]()
        taps = (2 * max_displacement + 1) ** 2
        self.head = nn.Sequential(nn.Conv2d(taps + channels, 32, 3, padding=1), nn.LeakyReLU(0.1), nn.Conv2d(32, 2, 3, padding=1))

    def forward(self, first: Tensor, second: Tensor) -> Tensor:
        f1, f2 = self.encoder(first), self.encoder(second)
        return self.head(torch.cat([self.correlation(f1, f2), f1], 1))
