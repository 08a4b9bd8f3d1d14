"""NumPy oracles for the canonical ops, written from their definitions (DESIGN.md), not from
convlower's reference, window helpers or lowerings.

    DynamicFilter:  Y[n, c, p] = sum_k Xpad[n, c, p*stride + k*dilation] * F[n, c // (C/G), k, p]
    Unfold:         F.unfold's rows [n, c*K + k, l]: tap k (row-major) of channel c at position l
    LocalCorrelation:  Y[n, g, k, p] = scale * reduce_{c in group g} A[n, c, p] * B[n, c, p + δ_k]  (B zero outside)

A window is anything with `kernel_shape`, `strides`, `dilations` and `pads` (ONNX order: every
begin pad, then every end pad), such as `convlower.passes.dynamic_filter.SlidingWindow`; only those
four fields are read: the output extent, the padding and the tap positions are computed here.
Each tap is read with NumPy fancy indexing, one index array per spatial axis, the plainest
transcription of the formula (no strided views, no shifted slices as the lowerings use).
The LocalCorrelation oracle loops over displacements, groups and channels one by one; it is
itself checked against a loop over every output element in tests/test_local_correlation.py.
"""

from __future__ import annotations

import itertools
import math
from typing import Protocol, Sequence

import numpy as np


class Window(Protocol):
    kernel_shape: Sequence[int]
    strides: Sequence[int]
    dilations: Sequence[int]
    pads: Sequence[int]


def output_extent(window: Window, spatial: Sequence[int]) -> tuple[int, ...]:
    """Per spatial axis, how many positions the kernel takes: floor((S + pads - reach) / stride) + 1."""
    rank = len(window.kernel_shape)
    return tuple(
        (size + window.pads[i] + window.pads[i + rank] - window.dilations[i] * (window.kernel_shape[i] - 1) - 1)
        // window.strides[i] + 1
        for i, size in enumerate(spatial)
    )


def padded(x: np.ndarray, window: Window) -> np.ndarray:
    """X with zeros added at the begin and end of each spatial axis."""
    rank = len(window.kernel_shape)
    return np.pad(x, [(0, 0), (0, 0)] + [(window.pads[i], window.pads[i + rank]) for i in range(rank)])


def tap_reads(window: Window, out_spatial: Sequence[int]) -> list[tuple]:
    """Per kernel offset (row-major), the index into Xpad of every output position: p*stride + k*dilation."""
    reads = []
    for offset in itertools.product(*(range(k) for k in window.kernel_shape)):
        axes = [o * d + np.arange(n) * s for o, d, s, n in zip(offset, window.dilations, window.strides, out_spatial)]
        reads.append((slice(None), slice(None), *np.ix_(*axes)))
    return reads


def filter_oracle(x: np.ndarray, f: np.ndarray, window: Window) -> np.ndarray:
    """DynamicFilter: the sum over taps of Xpad at the tap times its filter plane, each group's
    filter repeated over that group's C/G channels. Accumulates in X's dtype, tap by tap."""
    out = output_extent(window, x.shape[2:])
    taps = math.prod(window.kernel_shape)
    assert f.shape[0] == x.shape[0] and f.shape[2] == taps and tuple(f.shape[3:]) == out, (x.shape, f.shape, out)
    assert x.shape[1] % f.shape[1] == 0, "C must be a multiple of G"
    per_channel = np.repeat(f, x.shape[1] // f.shape[1], axis=1)
    xpad = padded(x, window)
    y = np.zeros((*x.shape[:2], *out), dtype=x.dtype)
    for k, read in enumerate(tap_reads(window, out)):
        y = y + xpad[read] * per_channel[:, :, k]
    return y


def unfold_oracle(x: np.ndarray, window: Window) -> np.ndarray:
    """Unfold (F.unfold at any rank): `[N, C*K, L]`, row c*K + k holds tap k of channel c at
    every output position, positions row-major."""
    out = output_extent(window, x.shape[2:])
    taps = np.stack([padded(x, window)[read] for read in tap_reads(window, out)], axis=2)
    return taps.reshape(x.shape[0], x.shape[1] * math.prod(window.kernel_shape), -1)


class Correlation(Protocol):
    """A LocalCorrelation's attributes, as `convlower.passes.local_correlation.Correlation` holds them."""

    first: Sequence[int]
    last: Sequence[int]
    step: Sequence[int]
    groups: int
    reduction: str
    scale: float


def displacements(correlation: Correlation) -> list[tuple[int, ...]]:
    """Every displacement δ, row-major (first axis slowest): first, first + step, .., last on each
    axis (descending where the step is negative)."""
    axes = zip(correlation.first, correlation.last, correlation.step)
    return list(itertools.product(*(range(f, l + (1 if s > 0 else -1), s) for f, l, s in axes)))


def local_correlation(a: np.ndarray, b: np.ndarray, correlation: Correlation) -> np.ndarray:
    """LocalCorrelation: `Y[n, g, k, p] = scale * reduce_{c in group g} A[n, c, p] * B[n, c, p + δ_k]`,
    `[N, G, K, *S]`, with B read as zero where `p + δ_k` falls outside it. One displacement at a
    time (B moved by δ onto a zero array), then one group at a time, channel by channel."""
    assert a.shape == b.shape, (a.shape, b.shape)
    batch, channels, *spatial = a.shape
    groups = correlation.groups
    assert channels % groups == 0, "C must be a multiple of G"
    per_group = channels // groups
    moves = displacements(correlation)
    y = np.zeros((batch, groups, len(moves), *spatial), dtype=a.dtype)
    for k, delta in enumerate(moves):
        b_at = np.zeros_like(b)  # b_at[..., p] = B[..., p + δ] where that is inside B
        to = tuple(slice(max(0, -d), max(0, min(size, size - d))) for d, size in zip(delta, spatial))
        read = tuple(slice(max(0, d), max(0, min(size, size + d))) for d, size in zip(delta, spatial))
        if all(t.stop > t.start for t in to):
            b_at[(slice(None), slice(None), *to)] = b[(slice(None), slice(None), *read)]
        for g in range(groups):
            total = np.zeros((batch, *spatial), dtype=a.dtype)
            for c in range(g * per_group, (g + 1) * per_group):
                total = total + a[:, c] * b_at[:, c]
            if correlation.reduction == "mean":
                total = total / a.dtype.type(per_group)
            y[:, g, k] = a.dtype.type(correlation.scale) * total
    return y


def bilinear_zeros(image: np.ndarray, y: float, x: float) -> np.ndarray:
    """`image` `[C, H, W]` read at the fractional point (y, x): the four neighbouring pixels weighted
    by (1 - |y - row|)(1 - |x - col|), a pixel outside the image reading 0."""
    height, width = image.shape[1:]
    value = np.zeros(image.shape[0], np.float64)
    for row in (math.floor(y), math.floor(y) + 1):
        for col in (math.floor(x), math.floor(x) + 1):
            if 0 <= row < height and 0 <= col < width:
                value += (1 - abs(y - row)) * (1 - abs(x - col)) * image[:, row, col]
    return value


def deform_conv(x: np.ndarray, w: np.ndarray, offset: np.ndarray, bias: np.ndarray | None, mask: np.ndarray | None, *,
                strides: Sequence[int], dilations: Sequence[int], pads: Sequence[int], group: int,
                offset_group: int) -> np.ndarray:
    """2-D DeformConv from its definition (ONNX DeformConv, torchvision's deform_conv2d): output
    (i, j)'s tap (kh, kw) reads every channel of its offset group at (i·s - pad + kh·d + Δy,
    j·s - pad + kw·d + Δx), bilinearly with zeros outside, times the mask; a grouped convolution
    of those samples with W, plus the bias. In float64, loop by loop."""
    n, channels, _, _ = x.shape
    out_channels, in_per_group, kh, kw = w.shape
    oh, ow = offset.shape[2:]
    per_offset_group, out_per_group = channels // offset_group, out_channels // group
    offsets = offset.reshape(n, offset_group, kh, kw, 2, oh, ow)
    masks = np.ones((n, offset_group, kh, kw, oh, ow)) if mask is None else mask.reshape(n, offset_group, kh, kw, oh, ow)
    y = np.zeros((n, out_channels, oh, ow), np.float64)
    for b in range(n):
        for i in range(oh):
            for j in range(ow):
                samples = np.zeros((channels, kh, kw), np.float64)
                for g in range(offset_group):
                    part = x[b, g * per_offset_group:(g + 1) * per_offset_group].astype(np.float64)
                    for p in range(kh):
                        for q in range(kw):
                            dy, dx = offsets[b, g, p, q, :, i, j]
                            at = (i * strides[0] - pads[0] + p * dilations[0] + dy, j * strides[1] - pads[1] + q * dilations[1] + dx)
                            samples[g * per_offset_group:(g + 1) * per_offset_group, p, q] = (
                                bilinear_zeros(part, *at) * masks[b, g, p, q, i, j])
                for o in range(out_channels):
                    g = o // out_per_group
                    y[b, o, i, j] = np.sum(w[o].astype(np.float64) * samples[g * in_per_group:(g + 1) * in_per_group])
    if bias is not None:
        y += bias.reshape(1, -1, 1, 1)
    return y
