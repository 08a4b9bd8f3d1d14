"""Deformable convolutions exported as gathered bilinear corners and an im2col Conv, recognized as one DeformConv.

`deform_conv2d_onnx_exporter` (the widely copied exporter of `torchvision.ops.deform_conv2d` for
runtimes without DeformConv; fixtures in tests/fixtures) spells out equation (1) of the DCNv2
paper, and code in the style of its pure-torch ports ends the same way:

    p = p_0 + p_k + Reshape(offset, [N, G, K, 2, oH, oW])        sampling positions, in the padded image
    corners Floor(p) and Floor(p) + 1, Cast, Clip into the padded image; bilinear weights from p - Floor(p)
    v_c = GatherND(Transpose(Reshape(Pad(X))), [y_c, x_c])  |  GatherElements(Reshape(Pad(X)), y_c·W + x_c)
    v = Sum_c weight_c · v_c  [× Reshape(mask)]                  [N, G, C/G, K, oH, oW]
    Y = Conv(Reshape(Transpose(Reshape(v))), W, strides = kernel_shape) [+ bias]     the im2col layout [N, C, oH·kh, oW·kw]
    ⇒ DeformConv(X, W, offset, bias, mask)       (below opset 19: the convlower.DeformConv carrier)

The anchor is the last step: a Conv whose strides equal its constant kernel's shape, without pads
or dilations, reading a layout of sampled columns. Walking back from it through the sampling
arithmetic finds the region's boundary: X, where every Gather's data comes from through layout
ops (Pad, Reshape, Transpose); the mask, the non-constant factor of the columns before the
layout; the offsets, the first tensor on the way back shaped `[N, 2·K·G, oH, oW]`. Then the
region is run (`regions.run_region`), and is the rewrite only where:

- at zero offsets and a mask of ones it equals a plain Conv of X with W at one geometry
  (strides, dilations, symmetric pads, searched over those that give the output size);
- at random offsets (taps between pixels, some off the image) and a random mask it equals the
  DeformConv of that geometry, computed by the `gather_im2col` lowering (`reference_model`).

The Conv's bias and a constant bias added after it (`+ bias.view(1, -1, 1, 1)`) become the node's bias.

Not matched (left as exported): opsets below 11, where the carrier's body does not run (the
exporter's own minimum is 12); symbolic dims (the exporter writes static Reshape targets anyway); positions computed other
than from the offsets as they are (the probe refuses them).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..base import constant_value, static_shape
from ..col2im import sliding_blocks
from ..matching.regions import POSITION_OPS, is_constant, region_model, run_region
from . import CARRIER_OPSET, DEFORM_CONV_OPSET, Geometry, emit_deform_conv, reference_model

GATHERS = frozenset({"GatherND", "GatherElements", "Gather"})
SAMPLING_OPS = POSITION_OPS | GATHERS | {"Clip", "Pad", "Sum", "Floor", "Ceil", "Min", "Max", "Round"}
"""Ops of bilinear sampling: position arithmetic, corner indices and gathers, weights and their sum."""
LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Pad", "Identity", "Flatten", "Squeeze", "Unsqueeze"})
MAX_STRIDE = 4
MAX_DILATION = 4
TOLERANCE = 1e-4
"""Relative to the output's scale: how far the region may be from the DeformConv it is taken for."""


@dataclass
class GatheredCornersMatch:
    image: gs.Tensor
    offset: gs.Tensor
    mask: gs.Tensor | None
    output: gs.Variable
    weight: np.ndarray
    bias: np.ndarray | None
    geometry: Geometry
    group: int
    offset_group: int


def recognize_gathered_corners(graph: gs.Graph, opset: int) -> None:
    """Replace every gathered-corners decomposition of a deformable convolution with one DeformConv."""
    if opset < CARRIER_OPSET or not any(n.op in GATHERS for n in graph.nodes):
        return
    matches = [m for node in graph.nodes if node.op == "Conv" and not node.domain for m in [match_gathered_corners(graph, node)] if m]
    for match in matches:
        emit_deform_conv(graph, f"{match.output.name}/DeformConv", match.image, match.weight, match.offset, match.geometry,
                         match.output, bias=match.bias, mask=match.mask, group=match.group, offset_group=match.offset_group,
                         opset=opset)
    if matches:
        graph.cleanup().toposort(mode="nodes")


def match_gathered_corners(graph: gs.Graph, conv: gs.Node) -> GatheredCornersMatch | None:
    """The DeformConv that this im2col Conv and the sampling before it compute, else None."""
    weight = constant_value(conv.inputs[1]) if len(conv.inputs) > 1 else None
    columns_shape = static_shape(conv.inputs[0])
    if weight is None or weight.ndim != 4 or columns_shape is None or len(columns_shape) != 4 or None in columns_shape:
        return None
    kernel = tuple(int(d) for d in weight.shape[2:])
    if kernel[0] * kernel[1] < 2 or not _im2col_conv(conv, kernel):
        return None
    group = int(conv.attrs.get("group", 1))
    channels = int(weight.shape[1]) * group
    out_size = (columns_shape[2] // kernel[0], columns_shape[3] // kernel[1])
    if columns_shape[1] != channels or columns_shape[2] % kernel[0] or columns_shape[3] % kernel[1]:
        return None
    boundary = _boundary(conv.inputs[0], channels, kernel[0] * kernel[1], out_size)
    if boundary is None:
        return None
    image, offset, mask = boundary
    output, bias = _output_and_bias(graph, conv, int(weight.shape[0]))
    inputs = [t for t in (image, offset, mask) if t is not None]
    model = region_model(graph, inputs, [output])
    image_shape = static_shape(image)
    if model is None or image_shape is None or None in image_shape[1:]:
        return None
    offset_group = int(offset.shape[1]) // (2 * kernel[0] * kernel[1])
    probe = _Probe(model, image, offset, mask, tuple(int(d) for d in image_shape[1:]), out_size)
    for geometry in _geometries(tuple(int(d) for d in image_shape[2:]), kernel, out_size):
        if probe.is_conv(weight, bias, geometry, group) and probe.is_deform_conv(weight, bias, geometry, group, offset_group):
            return GatheredCornersMatch(image, offset, mask, output, weight, bias, geometry, group, offset_group)
    return None


def _im2col_conv(conv: gs.Node, kernel: tuple[int, int]) -> bool:
    """A Conv that reads each output's kh x kw block once: strides = kernel, no pads, no dilations."""
    return (list(conv.attrs.get("strides", [1, 1])) == list(kernel)
            and not any(conv.attrs.get("pads", [0] * 4))
            and all(d == 1 for d in conv.attrs.get("dilations", [1, 1]))
            and conv.attrs.get("auto_pad", "NOTSET") in ("NOTSET", b"NOTSET"))


def _boundary(
    columns: gs.Tensor, channels: int, taps: int, out_size: tuple[int, int]
) -> tuple[gs.Tensor, gs.Tensor, gs.Tensor | None] | None:
    """The image, offsets and mask (or None) the sampled columns are computed from."""
    values = columns
    while values.inputs and values.inputs[0].op in LAYOUT_OPS - {"Pad"} and len(values.outputs) <= 1:
        values = values.inputs[0].inputs[0]
    mask = None
    if values.inputs and values.inputs[0].op == "Mul":
        factors = [t for t in values.inputs[0].inputs if not is_constant(t) and _producer_op(t) not in ("Sum", "Add")]
        if len(factors) == 1:
            mask = _through_layout(factors[0])
            values = next(t for t in values.inputs[0].inputs if t is not factors[0])
    sampling = _walk(values, SAMPLING_OPS, stop=lambda t: False)
    gathers = [n for n in sampling if n.op in GATHERS]
    images = {id(_through_layout(n.inputs[0])): _through_layout(n.inputs[0]) for n in gathers}
    if not gathers or len(images) != 1:
        return None
    image = next(iter(images.values()))
    image_shape = static_shape(image)
    if image_shape is None or len(image_shape) != 4 or image_shape[1] != channels:
        return None

    def is_offset(tensor: gs.Tensor) -> bool:
        shape = static_shape(tensor)
        return (shape is not None and len(shape) == 4 and tuple(shape[2:]) == out_size and shape[1] is not None
                and shape[1] % (2 * taps) == 0 and channels % (shape[1] // (2 * taps)) == 0)

    offsets: dict[int, gs.Tensor] = {}
    for node in _walk(values, SAMPLING_OPS, stop=lambda t: t is image or is_offset(t)):
        for tensor in node.inputs:
            if is_offset(tensor) and tensor is not image:
                offsets[id(tensor)] = tensor
    if len(offsets) != 1:
        return None
    offset = next(iter(offsets.values()))
    if mask is not None:
        shape = static_shape(mask)
        if shape is None or len(shape) != 4 or shape[1] != offset.shape[1] // 2 or tuple(shape[2:]) != out_size:
            return None
    return image, offset, mask


def _producer_op(tensor: gs.Tensor) -> str | None:
    return tensor.inputs[0].op if tensor.inputs else None


def _through_layout(tensor: gs.Tensor) -> gs.Tensor:
    """Back from `tensor` through layout ops to the tensor they rearrange."""
    while tensor.inputs and tensor.inputs[0].op in LAYOUT_OPS and tensor.inputs[0].inputs:
        tensor = tensor.inputs[0].inputs[0]
    return tensor


def _walk(start: gs.Tensor, through: frozenset[str], stop) -> list[gs.Node]:  # noqa: ANN001 - a predicate on tensors
    """The nodes reached walking back from `start` through ops in `through`, not past `stop` tensors."""
    seen: set[int] = set()
    nodes: list[gs.Node] = []
    pending = [start]
    while pending:
        tensor = pending.pop()
        if id(tensor) in seen or stop(tensor) or len(tensor.inputs) != 1 or is_constant(tensor):
            continue
        seen.add(id(tensor))
        node = tensor.inputs[0]
        if node.op not in through or node.domain:
            continue
        nodes.append(node)
        pending.extend(t for t in node.inputs if not t.is_empty())
    return nodes


def _output_and_bias(graph: gs.Graph, conv: gs.Node, out_channels: int) -> tuple[gs.Variable, np.ndarray | None]:
    """The Conv's output, or the output of a constant bias added to it, and the bias in all."""
    bias = constant_value(conv.inputs[2]).astype(np.float64) if len(conv.inputs) > 2 and not conv.inputs[2].is_empty() \
        and constant_value(conv.inputs[2]) is not None else None
    output = conv.outputs[0]
    uses = list(output.outputs)
    if len(uses) == 1 and uses[0].op == "Add" and not any(t is output for t in graph.outputs):
        other = [t for t in uses[0].inputs if t is not output]
        value = constant_value(other[0]) if len(other) == 1 else None
        if value is not None and value.shape in ((out_channels, 1, 1), (1, out_channels, 1, 1)):  # per channel, not per column
            bias = value.reshape(out_channels).astype(np.float64) + (bias if bias is not None else 0.0)
            output = uses[0].outputs[0]
    return output, bias


def _geometries(image: tuple[int, int], kernel: tuple[int, int], out_size: tuple[int, int]) -> list[Geometry]:
    """Strides, dilations and symmetric pads that give the output size, smallest first."""
    per_axis = []
    for size, k, out in zip(image, kernel, out_size):
        per_axis.append([(s, d, p) for s in range(1, MAX_STRIDE + 1) for d in range(1, MAX_DILATION + 1)
                         for p in range(0, d * (k - 1) + s) if sliding_blocks(size, k, s, d, p, p) == out])
    return [Geometry(kernel, (sh, sw), (dh, dw), (ph, pw, ph, pw))
            for (sh, dh, ph), (sw, dw, pw) in itertools.product(*per_axis)]


class _Probe:
    """The region run at chosen inputs, and what a DeformConv candidate computes there."""

    def __init__(self, model, image: gs.Tensor, offset: gs.Tensor, mask: gs.Tensor | None,  # noqa: ANN001
                 image_shape: tuple[int, int, int], out_size: tuple[int, int]) -> None:
        self.model, self.names = model, (image.name, offset.name, mask.name if mask is not None else None)
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((1, *image_shape)).astype(np.float32)
        self.offset_shape = (1, int(offset.shape[1]), *out_size)
        self.mask_shape = (1, int(offset.shape[1]) // 2, *out_size) if mask is not None else None
        self.offset = rng.uniform(-3.0, 3.0, self.offset_shape).astype(np.float32)
        self.mask = rng.uniform(0.1, 1.0, self.mask_shape).astype(np.float32) if mask is not None else None
        self._at_rest: np.ndarray | None = None

    def _feeds(self, offset: np.ndarray, mask: np.ndarray | None) -> dict[str, np.ndarray]:
        feeds = {self.names[0]: self.x, self.names[1]: offset}
        if self.names[2] is not None:
            feeds[self.names[2]] = mask
        return feeds

    def is_conv(self, weight: np.ndarray, bias: np.ndarray | None, geometry: Geometry, group: int) -> bool:
        """At zero offsets and a mask of ones, a DeformConv is this plain Conv."""
        if self._at_rest is None:
            ones = np.ones(self.mask_shape, np.float32) if self.mask_shape is not None else None
            (self._at_rest,) = run_region(self.model, self._feeds(np.zeros(self.offset_shape, np.float32), ones))
        expected = _conv(self.x.astype(np.float64), weight.astype(np.float64), bias, geometry, group)
        return self._at_rest.shape == expected.shape and _close(self._at_rest, expected)

    def is_deform_conv(self, weight: np.ndarray, bias: np.ndarray | None, geometry: Geometry, group: int, offset_group: int) -> bool:
        reference = reference_model(self.x.shape, weight, bias, self.offset_shape, self.mask_shape, geometry, group, offset_group,
                                    DEFORM_CONV_OPSET)
        feeds = {"x": self.x, "offset": self.offset, **({"mask": self.mask} if self.mask is not None else {})}
        (expected,) = run_region(reference, feeds)
        (got,) = run_region(self.model, self._feeds(self.offset, self.mask))
        return got.shape == expected.shape and _close(got, expected)


def _close(got: np.ndarray, expected: np.ndarray) -> bool:
    return bool(np.abs(got - expected).max() <= TOLERANCE * max(1.0, float(np.abs(expected).max())))


def _conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, geometry: Geometry, group: int) -> np.ndarray:
    """A grouped 2-D convolution from its definition (NumPy), for the check at zero offsets."""
    (kh, kw), (sh, sw), (dh, dw), (pt, pl, pb, pr) = geometry.kernel_shape, geometry.strides, geometry.dilations, geometry.pads
    padded = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    oh = sliding_blocks(x.shape[2], kh, sh, dh, pt, pb)
    ow = sliding_blocks(x.shape[3], kw, sw, dw, pl, pr)
    per_in, per_out = weight.shape[1], weight.shape[0] // group
    out = np.zeros((x.shape[0], weight.shape[0], oh, ow))
    for g in range(group):
        block = padded[:, g * per_in:(g + 1) * per_in]
        for i in range(kh):
            for j in range(kw):
                window = block[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
                out[:, g * per_out:(g + 1) * per_out] += np.einsum("oc,nchw->nohw", weight[g * per_out:(g + 1) * per_out, :, i, j], window)
    return out + (bias.reshape(1, -1, 1, 1) if bias is not None else 0.0)
