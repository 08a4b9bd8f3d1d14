"""Deformable convolutions written as one GridSample per tap, recognized as one ONNX DeformConv.

Ports of DCN that have no deform_conv2d to call (`models/deform_idioms.py`) sample the image once per
kernel tap, at the regular grid of the convolution plus that tap's offsets, normalized for
`F.grid_sample`, multiply each sample by its tap's mask (DCNv2), and contract the samples with the
weights:

    grid_k = normalize(base_k + offset[:, c_y(k)], base_k + offset[:, c_x(k)])         for k < K
    T_k = GridSample(X, grid_k) [× mask[:, m(k)]]                                        [N, C, oH, oW]
    Y = Σ_{c,k} W[:, c, k] · T_k[:, c] + b   (stack ∘ Einsum | Concat ∘ Conv 1x1 | Σ Conv 1x1 | ...)
    ⇒ DeformConv(X, W, offset[:, order], b, mask[:, order])    (below opset 19: the convlower.DeformConv carrier)

Exports spell the grids (Gather or Slice of the offsets, Add, Mul, Div, Sub, Unsqueeze, Concat) and
the contraction many ways, so the structure only finds the region's boundary: the GridSample
nodes that sample one image (bilinear, zeros outside), the one tensor their grids are computed
from by position arithmetic (`regions.cone_leaves`), the one tensor every mask factor comes from,
and the first tensor that depends on every sample, followed through linear ops (Einsum, MatMul,
Conv, Add, Reshape, ...) while each still has one consumer. What the region computes is read by
running it (`regions.run_region`), and is the rewrite only where:

- at zero offsets each grid is a Conv's tap position for every output pixel (strides, dilations,
  pads), the K grids one tap each of a full kh x kw kernel, in any order;
- at random offsets every grid moves by exactly one offset channel on each axis (the channel map);
- every mask factor is exactly one channel of the mask tensor (the mask's channel map);
- the tail is `Y[o, p] = Σ_{c,k} W[o, c, k] · T_k[c, p] + b[o]` at every pixel p: b read at zero
  samples, W at samples with one element set per (c, k), each at a pixel of its own, and the
  whole checked on random samples. The longest such chain is taken (bias adds included).

Not matched (left as exported): offset groups (each group's GridSample reads a slice of X),
GridSample other than bilinear with zeros outside (border or reflection padding is not DCN's
zero-outside sampling), offsets scaled or bounded before use (a grid that moves by 2·offset or by
tanh(offset)).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..base import attr_text, static_shape
from ..col2im import sliding_blocks
from ..matching.regions import POSITION_OPS, cone_leaves, is_constant, region_model, run_region
from . import GRID_SAMPLE_OPSET, Geometry, emit_deform_conv

TAIL_OPS = frozenset({"Einsum", "MatMul", "Gemm", "Conv", "Add", "Sub", "Mul", "Reshape", "Transpose", "ReduceSum",
                      "Squeeze", "Unsqueeze", "Flatten", "Identity"})
"""Ops that may continue the weighted sum of the samples past the first tensor that reads them all."""
MAX_TAIL = 8
"""The longest chain of such ops followed; the probe decides where the weighted sum ends."""
POSITION_TOLERANCE = 1e-3
"""Pixels: how far a probed position may be from its expected value (float32 normalization)."""
SUM_TOLERANCE = 1e-4
"""Relative to the output's scale: how far the tail may be from the weighted sum read off it."""


@dataclass
class TapGridSampleMatch:
    """A recognized per-tap decomposition: what the canonical node needs."""

    image: gs.Tensor
    offset: gs.Tensor
    mask: gs.Tensor | None
    output: gs.Variable
    geometry: Geometry
    weight: np.ndarray  # [out, C, kh, kw]
    bias: np.ndarray | None
    offset_channels: list[int]
    mask_channels: list[int] | None


def recognize_tap_grid_samples(graph: gs.Graph, opset: int) -> None:
    """Replace every per-tap GridSample decomposition of a deformable convolution with one DeformConv."""
    if opset < GRID_SAMPLE_OPSET:
        return
    layers: dict[tuple[int, ...], list[gs.Node]] = {}
    graph.toposort(mode="nodes")  # the tail is found by walking the nodes in order
    for node in graph.nodes:
        if node.op == "GridSample" and not node.domain and _samples_like_dcn(node):
            image = node.inputs[0]
            offsets = [t for t in cone_leaves([node.inputs[1]], POSITION_OPS, stop=[image]) if t is not image]
            layers.setdefault((id(image), *sorted(id(t) for t in offsets)), []).append(node)
    matches = [m for samplers in layers.values() if len(samplers) > 1 for m in [match_tap_grid_samples(graph, samplers)] if m]
    for match in matches:
        emit_deform_conv(graph, f"{match.output.name}/DeformConv", match.image, match.weight, match.offset,
                         match.geometry, match.output, bias=match.bias, mask=match.mask,
                         offset_channels=match.offset_channels, mask_channels=match.mask_channels, opset=opset)
    if matches:
        graph.cleanup().toposort(mode="nodes")


def _samples_like_dcn(node: gs.Node) -> bool:
    """Bilinear, zeros outside: DCN's sampling (either align_corners; the probe unnormalizes)."""
    mode = attr_text(node.attrs.get("mode", "bilinear"))
    return mode in ("bilinear", "linear") and attr_text(node.attrs.get("padding_mode", "zeros")) == "zeros"


def match_tap_grid_samples(graph: gs.Graph, samplers: list[gs.Node]) -> TapGridSampleMatch | None:
    """The DeformConv these GridSample nodes and what follows them compute, else None."""
    image = samplers[0].inputs[0]
    shape = static_shape(image)
    if shape is None or len(shape) != 4 or None in shape[1:]:
        return None
    channels, height, width = (int(d) for d in shape[1:])
    grids = [s.inputs[1] for s in samplers]
    leaves = [t for t in cone_leaves(grids, POSITION_OPS, stop=[image]) if t is not image]
    if len(leaves) != 1:
        return None
    offset = leaves.pop()
    offset_shape = static_shape(offset)
    if offset_shape is None or len(offset_shape) != 4 or None in offset_shape[1:]:
        return None
    taps = _read_taps(graph, image, offset, samplers, (channels, height, width), tuple(int(d) for d in offset_shape[1:]))
    if taps is None:
        return None
    geometry, order, offset_channels, out_size = taps
    masked = _read_masks(graph, samplers, out_size)
    if masked is None:
        return None
    samples, mask, mask_channels = masked
    tail = _read_tail(graph, samples, channels, out_size)
    if tail is None:
        return None
    output, weight, bias = tail
    kh, kw = geometry.kernel_shape
    kernel = np.zeros((weight.shape[0], channels, kh, kw), weight.dtype)
    for k, (i, j) in enumerate(order):
        kernel[:, :, i, j] = weight[:, :, k]
    canonical = sorted(range(len(order)), key=lambda k: order[k])
    return TapGridSampleMatch(
        image=image, offset=offset, mask=mask, output=output, geometry=geometry, weight=kernel,
        bias=None if not np.any(bias) else bias,
        offset_channels=[c for k in canonical for c in offset_channels[k]],
        mask_channels=None if mask_channels is None else [mask_channels[k] for k in canonical],
    )


def _read_taps(
    graph: gs.Graph, image: gs.Tensor, offset: gs.Tensor, samplers: list[gs.Node],
    image_shape: tuple[int, int, int], offset_shape: tuple[int, int, int],
) -> tuple[Geometry, list[tuple[int, int]], list[tuple[int, int]], tuple[int, int]] | None:
    """Run the grids at zero and at random offsets: the convolution's geometry, each sampler's kernel
    position (i, j), each sampler's (row, column) offset channels, and the output size."""
    model = region_model(graph, [image, offset], [s.inputs[1] for s in samplers])
    if model is None:
        return None
    channels, height, width = image_shape
    rng = np.random.default_rng(0)
    moved = rng.uniform(-3.0, 3.0, (1, *offset_shape)).astype(np.float32)
    feeds = {image.name: np.zeros((1, channels, height, width), np.float32)}
    at_zero = run_region(model, {**feeds, offset.name: np.zeros_like(moved)})
    at_moved = run_region(model, {**feeds, offset.name: moved})
    out_size = at_zero[0].shape[1:3]
    if any(g.shape != (1, *out_size, 2) for g in at_zero) or tuple(out_size) != offset_shape[1:]:
        return None
    starts, strides, channel_map = [], set(), []
    for sampler, zero, shifted in zip(samplers, at_zero, at_moved):
        rows, cols = _pixels(zero[0], sampler, height, width)
        moved_rows, moved_cols = _pixels(shifted[0], sampler, height, width)
        start_row, stride_h = _regular(rows, axis=0)
        start_col, stride_w = _regular(cols, axis=1)
        if start_row is None or start_col is None:
            return None
        starts.append((start_row, start_col))
        strides.add((stride_h, stride_w))
        pair = (_moved_by(moved[0], moved_rows - rows), _moved_by(moved[0], moved_cols - cols))
        if None in pair:
            return None
        channel_map.append(pair)
    if len(strides) != 1 or len({c for pair in channel_map for c in pair}) != 2 * len(samplers):
        return None
    kernel_rows = _kernel_axis(sorted({r for r, _ in starts}))
    kernel_cols = _kernel_axis(sorted({c for _, c in starts}))
    if kernel_rows is None or kernel_cols is None or len(set(starts)) != len(starts) or \
            len(starts) != kernel_rows[1] * kernel_cols[1]:
        return None
    (first_row, kh, dilation_h), (first_col, kw, dilation_w) = kernel_rows, kernel_cols
    (stride_h, stride_w), = strides
    pad_top, pad_left = -first_row, -first_col
    if pad_top < 0 or pad_left < 0:
        return None
    pad_bottom = _far_pad(height, kh, stride_h, dilation_h, pad_top, out_size[0])
    pad_right = _far_pad(width, kw, stride_w, dilation_w, pad_left, out_size[1])
    if pad_bottom is None or pad_right is None:
        return None
    geometry = Geometry((kh, kw), (stride_h, stride_w), (dilation_h, dilation_w), (pad_top, pad_left, pad_bottom, pad_right))
    order = [((r - first_row) // dilation_h, (c - first_col) // dilation_w) for r, c in starts]
    return geometry, order, channel_map, (int(out_size[0]), int(out_size[1]))


def _pixels(grid: np.ndarray, sampler: gs.Node, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A GridSample grid `[oH, oW, 2]` (x, y normalized to [-1, 1]) as pixel rows and columns."""
    x, y = grid[..., 0].astype(np.float64), grid[..., 1].astype(np.float64)
    if int(sampler.attrs.get("align_corners", 0)):
        return (y + 1) / 2 * (height - 1), (x + 1) / 2 * (width - 1)
    return ((y + 1) * height - 1) / 2, ((x + 1) * width - 1) / 2


def _regular(positions: np.ndarray, axis: int) -> tuple[int | None, int]:
    """`positions[i, j] = start + index·stride` along `axis` (the same across the other), integers:
    (start, stride), else (None, 0). One output along the axis reads as stride 1."""
    line = positions[:, 0] if axis == 0 else positions[0, :]
    start = int(round(float(line[0])))
    stride = int(round(float(line[1] - line[0]))) if len(line) > 1 else 1
    expected = start + stride * np.arange(len(line))
    expected = expected[:, None] if axis == 0 else expected[None, :]
    if stride < 1 or np.abs(positions - expected).max() > POSITION_TOLERANCE:
        return None, 0
    return start, stride


def _moved_by(moved: np.ndarray, shift: np.ndarray) -> int | None:
    """The one channel of the probe offsets `[C, oH, oW]` that the positions moved by."""
    hits = [c for c in range(moved.shape[0]) if np.abs(moved[c] - shift).max() <= POSITION_TOLERANCE]
    return hits[0] if len(hits) == 1 else None


def _kernel_axis(starts: list[int]) -> tuple[int, int, int] | None:
    """Sorted distinct tap starts on one axis as (first, kernel size, dilation), if evenly spaced."""
    if len(starts) == 1:
        return starts[0], 1, 1
    dilation = starts[1] - starts[0]
    if any(b - a != dilation for a, b in itertools.pairwise(starts)):
        return None
    return starts[0], len(starts), dilation


def _far_pad(size: int, kernel: int, stride: int, dilation: int, near: int, out: int) -> int | None:
    """The smallest end pad that gives `out` outputs, else None."""
    far = max(0, (out - 1) * stride + dilation * (kernel - 1) + 1 - size - near)
    return far if sliding_blocks(size, kernel, stride, dilation, near, far) == out else None


def _read_masks(
    graph: gs.Graph, samplers: list[gs.Node], out_size: tuple[int, int]
) -> tuple[list[gs.Tensor], gs.Tensor | None, list[int] | None] | None:
    """The per-tap samples the contraction reads, and the mask and its channel per tap: each sample
    times one channel of one tensor (DCNv2), or every sample as it is (DCNv1)."""
    samples = [s.outputs[0] for s in samplers]
    factors = []
    for sample in samples:
        uses = list(sample.outputs)
        if len(uses) == 1 and uses[0].op == "Mul" and len(uses[0].outputs) == 1:
            other = [t for t in uses[0].inputs if t is not sample]
            if len(other) == 1 and not is_constant(other[0]):
                factors.append((uses[0].outputs[0], other[0]))
    if not factors:
        return samples, None, None
    if len(factors) != len(samples):
        return None
    leaves = cone_leaves([f for _, f in factors], POSITION_OPS)
    if len(leaves) != 1:
        return None
    mask = leaves.pop()
    mask_shape = static_shape(mask)
    model = region_model(graph, [mask], [f for _, f in factors])
    if model is None or mask_shape is None or len(mask_shape) != 4 or None in mask_shape[1:]:
        return None
    probe = np.random.default_rng(1).uniform(0.1, 1.0, (1, *(int(d) for d in mask_shape[1:]))).astype(np.float32)
    channels = []
    for value in run_region(model, {mask.name: probe}):
        if value.shape != (1, 1, *out_size):
            return None
        hits = [c for c in range(probe.shape[1]) if np.array_equal(probe[0, c], value[0, 0])]
        if len(hits) != 1:
            return None
        channels.append(hits[0])
    if len(set(channels)) != len(channels):
        return None
    return [product for product, _ in factors], mask, channels


def _read_tail(
    graph: gs.Graph, samples: list[gs.Tensor], channels: int, out_size: tuple[int, int]
) -> tuple[gs.Variable, np.ndarray, np.ndarray] | None:
    """The tensor where the weighted sum of the samples ends, its weights `[out, C, K]` and bias."""
    ends = _tail_chain(graph, samples)
    if not ends:
        return None
    model = region_model(graph, samples, ends)
    if model is None:
        return None
    taps, pixels = len(samples), out_size[0] * out_size[1]
    rng = np.random.default_rng(2)
    random = rng.standard_normal((1, channels, taps, *out_size)).astype(np.float32)
    units, elements = [], list(itertools.product(range(channels), range(taps)))
    for first in range(0, len(elements), pixels):  # one (c, k) element per pixel, as many rounds as needed
        unit = np.zeros_like(random)
        for pixel, (c, k) in enumerate(elements[first:first + pixels]):
            unit[0, c, k].flat[pixel] = 1.0
        units.append(unit)
    runs = [np.zeros_like(random), random, *units]
    outputs = [run_region(model, {s.name: value[:, :, k] for k, s in enumerate(samples)}) for value in runs]
    for index in reversed(range(len(ends))):
        found = _weighted_sum([o[index] for o in outputs], units, elements, random, pixels, out_size)
        if found is not None:
            return ends[index], *found
    return None


def _weighted_sum(
    outputs: list[np.ndarray], units: list[np.ndarray], elements: list[tuple[int, int]],
    random: np.ndarray, pixels: int, out_size: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray] | None:
    """W `[out, C, K]` and b such that the outputs are `Σ W·samples + b` per pixel, else None."""
    zero, at_random, *at_units = outputs
    if any(o.ndim != 4 or o.shape[0] != 1 or o.shape[2:] != out_size or o.shape != zero.shape for o in outputs):
        return None
    bias = zero[0, :, 0, 0].astype(np.float64)
    scale = max(1.0, float(np.abs(at_random).max()))
    if np.abs(zero[0] - bias[:, None, None]).max() > SUM_TOLERANCE * scale:
        return None
    weight = np.zeros((zero.shape[1], random.shape[1], random.shape[2]))
    for round_index, out in enumerate(at_units):
        flat = out[0].reshape(out.shape[1], -1)
        for pixel, (c, k) in enumerate(elements[round_index * pixels:(round_index + 1) * pixels]):
            weight[:, c, k] = flat[:, pixel] - bias
    predicted = np.einsum("ock,nckhw->nohw", weight, random.astype(np.float64)) + bias[None, :, None, None]
    if np.abs(predicted - at_random).max() > SUM_TOLERANCE * scale:
        return None
    return weight, bias


def _tail_chain(graph: gs.Graph, samples: list[gs.Tensor]) -> list[gs.Variable]:
    """The first tensor that depends on every sample, then each single use of it by a linear op
    whose other inputs are constants, up to `MAX_TAIL`: the candidates for the sum's end."""
    reads: dict[int, frozenset[int]] = {id(s): frozenset([k]) for k, s in enumerate(samples)}
    every = frozenset(range(len(samples)))
    first = None
    for node in graph.nodes:
        read = frozenset().union(*(reads.get(id(t), frozenset()) for t in node.inputs))
        for tensor in node.outputs:
            reads.setdefault(id(tensor), read)
        if read == every and len(node.outputs) == 1:
            first = node.outputs[0]
            break
    if first is None:
        return []
    chain = [first]
    outputs = {id(t) for t in graph.outputs}
    while len(chain) < MAX_TAIL and id(chain[-1]) not in outputs and len(chain[-1].outputs) == 1:
        use = chain[-1].outputs[0]
        if use.op not in TAIL_OPS or use.domain or len(use.outputs) != 1 or \
                not all(t is chain[-1] or t.is_empty() or is_constant(t) for t in use.inputs):
            break
        chain.append(use.outputs[0])
    return chain
