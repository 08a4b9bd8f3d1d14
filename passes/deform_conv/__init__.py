"""DeformConv (DCNv1/v2, ONNX opset 19): a Conv whose taps are read at learned fractional offsets.

Output `y[n, o, i, j] = b[o] + Σ_{c, k} w[o, c, k] · m[n, g(c), k, i, j] · X̃[n, c, p_k(i, j)]`,
where tap k = (kh, kw) of output (i, j) reads X at `p_k = (i·s_h - pad_top + kh·d_h + Δy,
j·s_w - pad_left + kw·d_w + Δx)`, the offsets `Δ = offset[n, g(c), k, :, i, j]` per offset group
g(c), `X̃` the bilinear interpolation of X with zeros outside it, and `m` the optional mask (DCNv2)
— what `onnx.reference` and onnxruntime's kernel compute (both 2-D only).

Rewrites:

- `native`:        DeformConv → DeformConv with every attribute explicit.
- `gather_im2col`: DeformConv → sampling positions (base grid + offsets) ∘ Floor ∘ 4 corners ×
  (Gather on the flattened map, weight, zero outside) ∘ Sum ∘ × mask ∘ Transpose/Reshape to
  im2col columns ∘ MatMul with the reshaped weight (per group) ∘ + bias. Only ops every runtime has.
- `grid_sample`:   DeformConv → the same positions normalized for GridSample (bilinear, zeros,
  align_corners 0), every tap stacked into one GridSample per offset group ∘ × mask ∘ MatMul.
  GridSample is opset 16+; onnxruntime, TensorRT and OpenVINO run it.

Both lowerings share the geometry (`_positions`) and the tail (`_contract`): a grouped im2col
MatMul of `[group, out/group, in/group·K]` weights with `[N, group, in/group·K, oH·oW]` columns.

Recognizers, one module each beside this one, rewrite the decompositions that exports carry when
the op could not be exported into the canonical DeformConv node (`emit_deform_conv`), so that the
tuner chooses between onnxruntime's kernel and the lowerings:

    recognize_tap_grid_sample   one GridSample per tap (× mask), contracted with the weights
                                (Einsum, MatMul, Conv 1x1, ...)              → DeformConv
    recognize_gathered_corners  four bilinear corners by GatherND / GatherElements, weighted, summed
                                (× mask), im2col layout, Conv of stride = kernel → DeformConv
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from convlower.modelio import default_opset

from ..base import (
    Builder,
    Dim,
    GroupedKernelSizes,
    NotLowerable,
    OpFamily,
    SimpleVariant,
    float_dtype,
    int_attr,
    non_negative_ints,
    positive_ints,
    spec_key,
    static_shape,
)
from ..col2im import sliding_blocks
from ..dynamic_filter import shape_vector
from ..local_functions import DOMAIN, CanonicalOp, add_function, register_canonical_op

DEFORM_CONV_OPSET = 19
CARRIER_OPSET = 11
"""The lowest opset the carrier's body runs at (Range, Clip with bounds as inputs)."""
GRID_SAMPLE_OPSET = 16
"""GridSample's first opset; its `mode` is "bilinear" until 19 and "linear" from 20."""


@dataclass(frozen=True, kw_only=True)
class DeformConvSpec(GroupedKernelSizes):
    """One DeformConv node, every default resolved: X `[N, in, *image]`, W `[out, in/group, *kernel]`,
    offset `[N, offset_group·K·rank, *output]`, optional bias `[out]` and mask `[N, offset_group·K, *output]`."""

    op: str = "DeformConv"
    dtype: str
    opset: int
    batch: Dim
    in_channels: Dim
    out_channels: Dim
    image: tuple[Dim, ...]
    output: tuple[Dim, ...]
    kernel_shape: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]
    group: int
    offset_group: int
    has_bias: bool
    has_mask: bool

    def key(self) -> str:
        return spec_key(self)

    @property
    def rank(self) -> int:
        return len(self.image)


def make_spec(node: gs.Node, opset: int) -> DeformConvSpec:
    """The DeformConv node read into a spec: channels, image and kernel must be static."""
    x, weight = node.inputs[0], node.inputs[1]
    x_shape, w_shape = static_shape(x), static_shape(weight)
    if x_shape is None or w_shape is None or len(x_shape) < 3 or len(w_shape) != len(x_shape):
        raise NotLowerable("the ranks of X and W are unknown or differ")
    rank = len(x_shape) - 2
    if any(d is None for d in (*x_shape[1:], *w_shape)):
        raise NotLowerable(f"X {list(x_shape)} and W {list(w_shape)} need static channel, spatial and kernel dims")
    kernel = tuple(int(v) for v in node.attrs.get("kernel_shape", w_shape[2:]))
    if kernel != tuple(w_shape[2:]):
        raise NotLowerable(f"kernel_shape {list(kernel)} differs from W's {list(w_shape[2:])}")
    strides = positive_ints(node.attrs.get("strides", [1] * rank), rank, "strides")
    dilations = positive_ints(node.attrs.get("dilations", [1] * rank), rank, "dilations")
    pads = non_negative_ints(node.attrs.get("pads", [0] * 2 * rank), 2 * rank, "pads")
    group, offset_group = int_attr(node, "group", 1), int_attr(node, "offset_group", 1)
    in_channels, out_channels = int(x_shape[1]), int(w_shape[0])
    if group < 1 or in_channels != w_shape[1] * group or out_channels % group:
        raise NotLowerable(f"X has {in_channels} channels, W {list(w_shape)}: inconsistent with group {group}")
    if offset_group < 1 or in_channels % offset_group:
        raise NotLowerable(f"{in_channels} input channels do not divide into offset_group {offset_group}")
    image = tuple(int(d) for d in x_shape[2:])
    output = tuple(sliding_blocks(*axis) for axis in zip(image, kernel, strides, dilations, pads, pads[rank:]))
    if min(output) < 1:
        raise NotLowerable(f"the dilated kernel {list(kernel)} does not fit the padded image {list(image)}")
    present = [i < len(node.inputs) and not node.inputs[i].is_empty() for i in (3, 4)]
    return DeformConvSpec(
        dtype=float_dtype(x), opset=opset, batch=x_shape[0], in_channels=in_channels, out_channels=out_channels,
        image=image, output=output, kernel_shape=kernel, strides=strides, dilations=dilations, pads=pads,
        group=group, offset_group=offset_group, has_bias=present[0], has_mask=present[1],
    )


def why_not_native(spec: DeformConvSpec) -> str | None:
    if spec.opset < DEFORM_CONV_OPSET:
        return f"DeformConv needs opset {DEFORM_CONV_OPSET}, the model imports {spec.opset}"
    return None


def why_not_lowered(spec: DeformConvSpec) -> str | None:
    if spec.rank != 2:
        return f"a {spec.rank}-D DeformConv: the lowerings are 2-D, as onnx.reference and onnxruntime's kernel are"
    return None


def why_not_grid_sample(spec: DeformConvSpec) -> str | None:
    if spec.opset < GRID_SAMPLE_OPSET:
        return f"GridSample needs opset {GRID_SAMPLE_OPSET}, the model imports {spec.opset}"
    return why_not_lowered(spec)


def build_native(b: Builder, spec: DeformConvSpec, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]) -> None:
    """DeformConv again, every attribute written out."""
    attrs = {"kernel_shape": list(spec.kernel_shape), "strides": list(spec.strides), "dilations": list(spec.dilations),
             "pads": list(spec.pads), "group": spec.group, "offset_group": spec.offset_group}
    b.op("DeformConv", list(inputs), attrs, out=outputs[0])


Size = int | gs.Tensor
"""A size known when the graph is built, or a 1-element int64 tensor read off a Shape at run time
(the function body of a carrier, where no shape is known)."""


def _size(b: Builder, known: Dim, tensor: gs.Tensor, axis: int) -> Size:
    return int(known) if known is not None else b.shape(tensor, axis, axis + 1)


def _product(b: Builder, *sizes: Size) -> Size:
    factor = math.prod(s for s in sizes if isinstance(s, int))
    tensors = [s for s in sizes if not isinstance(s, int)]
    if not tensors:
        return factor
    product = tensors[0]
    for tensor in tensors[1:]:
        product = b.mul(product, tensor)
    return product if factor == 1 else b.mul(product, b.ints([factor]))


def _float_scalar(b: Builder, size: Size, minus: float = 0.0) -> gs.Tensor:
    """`size - minus` as a 0-d float (for comparisons and Clip bounds)."""
    if isinstance(size, int):
        return b.scalar(size - minus)
    value = b.op("Cast", [b.squeeze(size, [0])], {"to": _onnx_float(b)})
    return b.op("Sub", [value, b.scalar(minus)]) if minus else value


def _int_scalar(b: Builder, size: Size) -> gs.Tensor:
    return b.const(np.array(size, np.int64)) if isinstance(size, int) else b.squeeze(size, [0])


def _output_sizes(b: Builder, spec: DeformConvSpec, offset: gs.Tensor) -> tuple[Size, Size]:
    """oH, oW: the spec's, or the offset's trailing dims at run time."""
    return _size(b, spec.output[0], offset, 2), _size(b, spec.output[1], offset, 3)


def _grid(b: Builder, size: Size, stride: int, pad: int, tap_starts: np.ndarray, shape: tuple[int, int, int], hint: str) -> gs.Tensor:
    """Where every tap reads along one axis before its offset, `i·stride - pad + tap_start`,
    shaped `shape` to broadcast against the offsets."""
    if isinstance(size, int):
        grid = (np.arange(size) * stride - pad)[None, :] + tap_starts[:, None]
        return b.const(grid.reshape(shape).astype(b.dtype), hint)
    steps = b.op("Range", [b.scalar(0.0), _float_scalar(b, size), b.scalar(1.0)])
    starts = b.add(b.mul(steps, b.scalar(float(stride))), b.scalar(float(-pad)))
    return b.reshape(b.add(b.unsqueeze(starts, [0]), b.const(tap_starts[:, None].astype(b.dtype), hint)), list(shape))


def _positions(b: Builder, spec: DeformConvSpec, offset: gs.Tensor, out: tuple[Size, Size]) -> tuple[gs.Tensor, gs.Tensor]:
    """Every tap's sampling row and column, `[N, offset_group, K, oH, oW]` each: the regular
    grid of the convolution plus the offsets (stored per tap as (Δy, Δx))."""
    (kh, kw), taps = spec.kernel_shape, spec.taps
    split = b.reshape(offset, shape_vector(b, [0, spec.offset_group, taps, 2, *out]))
    dy = b.squeeze(b.slice(split, [0], [1], [3]), [3])
    dx = b.squeeze(b.slice(split, [1], [2], [3]), [3])
    tap_rows = (np.arange(kh) * spec.dilations[0]).repeat(kw)
    tap_cols = np.tile(np.arange(kw) * spec.dilations[1], kh)
    y = b.add(dy, _grid(b, out[0], spec.strides[0], spec.pads[0], tap_rows, (taps, -1, 1), "rows"))
    x = b.add(dx, _grid(b, out[1], spec.strides[1], spec.pads[1], tap_cols, (taps, 1, -1), "cols"))
    return y, x


def _masked(b: Builder, spec: DeformConvSpec, inputs: Sequence[gs.Tensor], out: tuple[Size, Size]) -> gs.Tensor | None:
    """The mask as `[N, offset_group, K, oH, oW]`, or None without one."""
    if not spec.has_mask:
        return None
    return b.reshape(inputs[4], shape_vector(b, [0, spec.offset_group, spec.taps, *out]))


def _contract(b: Builder, spec: DeformConvSpec, columns: gs.Tensor, inputs: Sequence[gs.Tensor], out: tuple[Size, Size],
              y: gs.Variable) -> None:
    """`columns` `[N, in, K, oH, oW]` (channel-major, as X's channels) times W per group, plus bias, into `y`."""
    in_per_group = _size(b, spec.in_per_group if spec.in_channels is not None else None, inputs[1], 1)
    grouped = b.reshape(columns, shape_vector(b, [0, spec.group, -1, _product(b, *out)]))
    weight = b.reshape(inputs[1], shape_vector(b, [spec.group, -1, _product(b, in_per_group, spec.taps)]))
    product = b.matmul(weight, grouped)
    image_shape = shape_vector(b, [0, spec.out_channels if spec.out_channels is not None else -1, *out])
    if not spec.has_bias:
        b.reshape(product, image_shape, out=y)
        return
    b.add(b.reshape(product, image_shape), b.reshape(inputs[3], [-1, 1, 1]), out=y)


def build_gather_im2col(b: Builder, spec: DeformConvSpec, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]) -> None:
    """Bilinear sampling by Gather on the flattened map, then one grouped im2col MatMul.

    X becomes rows of channels, `[N·G·H·W, C/G]` (G the offset groups), so one Gather reads every
    corner of every tap for all of a group's channels at once. Each of the four corners (⌊y⌋ or
    ⌊y⌋+1, ⌊x⌋ or ⌊x⌋+1) has a weight, the bilinear one times 0 where the corner is outside the
    image (its index is clipped in, its value not used), times the mask; the weighted corners sum
    to the sampled columns. Sizes the spec does not know are read off Shape at run time, so the
    carrier's function body is this lowering too."""
    x_in, groups = inputs[0], spec.offset_group
    height, width = _size(b, spec.image[0], x_in, 2), _size(b, spec.image[1], x_in, 3)
    out = _output_sizes(b, spec, inputs[2])
    y, x = _positions(b, spec, inputs[2], out)
    y0, x0 = b.op("Floor", [y]), b.op("Floor", [x])
    fy, fx = b.op("Sub", [y, y0]), b.op("Sub", [x, x0])
    one, zero = b.scalar(1.0), b.scalar(0.0)
    last_row, last_col = _float_scalar(b, height, 1.0), _float_scalar(b, width, 1.0)
    mask = _masked(b, spec, inputs, out)
    image_size = _product(b, height, width)
    grouped = b.transpose(b.reshape(x_in, shape_vector(b, [0, groups, -1, image_size])), [0, 1, 3, 2])
    per_group = spec.in_channels // groups if spec.in_channels is not None else b.shape(grouped, 3, 4)
    rows = b.reshape(grouped, shape_vector(b, [-1, per_group]))
    rows_in_all = _int_scalar(b, _product(b, b.shape(x_in, 0, 1), groups, image_size))
    first_rows = b.op("Range", [b.const(np.array(0, np.int64)), rows_in_all, _int_scalar(b, image_size)])
    base = b.reshape(first_rows, [-1, groups, 1, 1, 1])  # the first row of each image's offset group
    row_stride = _int_scalar(b, width)
    corners = []
    for dy in (0, 1):
        for dx in (0, 1):
            cy = y0 if dy == 0 else b.add(y0, one)
            cx = x0 if dx == 0 else b.add(x0, one)
            wy = b.op("Sub", [one, fy]) if dy == 0 else fy
            wx = b.op("Sub", [one, fx]) if dx == 0 else fx
            inside = b.op("And", [
                b.op("And", [b.op("GreaterOrEqual", [cy, zero]), b.op("LessOrEqual", [cy, last_row])]),
                b.op("And", [b.op("GreaterOrEqual", [cx, zero]), b.op("LessOrEqual", [cx, last_col])]),
            ])
            weight = b.mul(b.mul(wy, wx), b.op("Cast", [inside], {"to": _onnx_float(b)}))
            if mask is not None:
                weight = b.mul(weight, mask)
            iy = b.op("Cast", [b.op("Clip", [cy, zero, last_row])], {"to": 7})
            ix = b.op("Cast", [b.op("Clip", [cx, zero, last_col])], {"to": 7})
            index = b.add(b.add(b.mul(iy, row_stride), ix), base)
            values = b.op("Gather", [rows, index], {"axis": 0})  # [N, G, K, oH, oW, C/G]
            corners.append(b.mul(values, b.unsqueeze(weight, [5])))
    sampled = b.sum(corners)
    columns = b.transpose(sampled, [0, 1, 5, 2, 3, 4])  # [N, G, C/G, K, oH, oW]: channels in X's order
    _contract(b, spec, columns, inputs, out, outputs[0])


def build_grid_sample(b: Builder, spec: DeformConvSpec, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]) -> None:
    """Every tap of an offset group sampled by one GridSample (bilinear, zeros outside), then one
    grouped im2col MatMul. Positions are normalized for align_corners 0, `(2p + 1) / size - 1`,
    which holds for an image one pixel wide too."""
    (height, width), groups = spec.image, spec.offset_group
    per_group = spec.in_channels // groups
    taps, (oh, ow) = spec.taps, spec.output
    y, x = _positions(b, spec, inputs[2], (oh, ow))
    ny = b.add(b.mul(y, b.scalar(2.0 / height)), b.scalar(1.0 / height - 1.0))
    nx = b.add(b.mul(x, b.scalar(2.0 / width)), b.scalar(1.0 / width - 1.0))
    grid = b.reshape(b.concat([b.unsqueeze(nx, [5]), b.unsqueeze(ny, [5])], axis=5), [-1, taps * oh, ow, 2])
    images = b.reshape(inputs[0], [-1, per_group, height, width])
    mode = "linear" if spec.opset >= 20 else "bilinear"
    sampled = b.op("GridSample", [images, grid], {"mode": mode, "padding_mode": "zeros", "align_corners": 0})
    if spec.has_mask:
        sampled = b.mul(sampled, b.reshape(inputs[4], [-1, 1, taps * oh, ow]))
    _contract(b, spec, b.reshape(sampled, [-1, spec.in_channels, taps, oh, ow]), inputs, (oh, ow), outputs[0])


@dataclass(frozen=True)
class Geometry:
    """Where the taps of a 2-D DeformConv read before their offsets: the regular grid of a Conv."""

    kernel_shape: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, int, int, int]

    def attrs(self) -> dict[str, list[int]]:
        return {"kernel_shape": list(self.kernel_shape), "strides": list(self.strides),
                "dilations": list(self.dilations), "pads": list(self.pads)}


def emit_deform_conv(
    graph: gs.Graph,
    name: str,
    x: gs.Tensor,
    weight: np.ndarray,
    offset: gs.Tensor,
    geometry: Geometry,
    out: gs.Variable,
    *,
    bias: np.ndarray | None = None,
    mask: gs.Tensor | None = None,
    offset_channels: Sequence[int] | None = None,
    mask_channels: Sequence[int] | None = None,
    group: int = 1,
    offset_group: int = 1,
    opset: int = DEFORM_CONV_OPSET,
) -> gs.Node:
    """One canonical DeformConv node computing `out`: what a recognizer calls once it has read a
    decomposition's weights and geometry. Below opset 19 the node is the `convlower.DeformConv`
    carrier, its function body added to the graph. `offset_channels` and
    `mask_channels` pick and order the channels of `offset` and `mask` that the op reads (offset
    channel 2k the row offset of tap k, 2k + 1 its column offset), where the decomposition read
    them from another layout; a Gather on the channel axis does it, none where they already are."""
    dtype = x.dtype if x.dtype is not None else np.float32
    inputs = [x, gs.Constant(f"{name}/weight", np.ascontiguousarray(weight, dtype)),
              _picked(graph, name, offset, offset_channels, "offset"),
              gs.Constant(f"{name}/bias", np.ascontiguousarray(bias, dtype)) if bias is not None else gs.Variable.empty()]
    if mask is not None:
        inputs.append(_picked(graph, name, mask, mask_channels, "mask"))
    out.inputs.clear()
    attrs = {**geometry.attrs(), "group": group, "offset_group": offset_group}
    if opset >= DEFORM_CONV_OPSET:
        node = gs.Node("DeformConv", name=name, attrs=attrs, inputs=inputs, outputs=[out])
    else:
        attrs = carrier_attrs({**attrs, "has_bias": bias is not None, "has_mask": mask is not None})
        node = gs.Node("DeformConv", name=name, domain=DOMAIN, attrs=attrs, inputs=inputs, outputs=[out])
        add_function(graph, "DeformConv", attrs, opset)
    graph.nodes.append(node)
    return node


def reference_model(
    x_shape: Sequence[int], weight: np.ndarray, bias: np.ndarray | None, offset_shape: Sequence[int],
    mask_shape: Sequence[int] | None, geometry: Geometry, group: int, offset_group: int, opset: int,
) -> onnx.ModelProto:
    """A DeformConv as a model computed by the `gather_im2col` lowering, so in ops every runtime has:
    what recognizers compare a decomposition with (inputs `x`, `offset`, `mask`; output `y`)."""
    graph = gs.Graph(opset=max(opset, 13))
    x = gs.Variable("x", np.float32, list(x_shape))
    offset = gs.Variable("offset", np.float32, list(offset_shape))
    mask = gs.Variable("mask", np.float32, list(mask_shape)) if mask_shape is not None else None
    y = gs.Variable("y", np.float32)
    inputs = [x, gs.Constant("w", np.asarray(weight, np.float32)), offset,
              gs.Constant("b", np.asarray(bias, np.float32)) if bias is not None else gs.Variable.empty()]
    if mask is not None:
        inputs.append(mask)
    node = gs.Node("DeformConv", attrs={**geometry.attrs(), "group": group, "offset_group": offset_group}, inputs=inputs, outputs=[y])
    graph.inputs, graph.outputs = [t for t in (x, offset, mask) if t is not None], [y]
    spec = make_spec(node, DEFORM_CONV_OPSET)
    node.inputs.clear()
    node.outputs.clear()
    build_gather_im2col(Builder(graph, graph.opset, "reference"), spec, inputs, [y])
    return gs.export_onnx(graph.cleanup().toposort(), do_type_check=False)


def _picked(graph: gs.Graph, name: str, tensor: gs.Tensor, channels: Sequence[int] | None, what: str) -> gs.Tensor:
    """`tensor`'s channels in the order given, or `tensor` itself where that order is all of them."""
    size = tensor.shape[1] if tensor.shape is not None and len(tensor.shape) > 1 else None
    if channels is None or (list(channels) == list(range(len(channels))) and size == len(channels)):
        return tensor
    index = gs.Constant(f"{name}/{what}_channels", np.asarray(channels, np.int64))
    return graph.layer(op="Gather", name=f"{name}/{what}_gather", inputs=[tensor, index],
                       outputs=[gs.Variable(f"{name}/{what}", dtype=tensor.dtype)], attrs={"axis": 1})[0]


def _onnx_float(b: Builder) -> int:
    return {np.dtype(np.float32): 1, np.dtype(np.float16): 10, np.dtype(np.float64): 11}.get(b.dtype, 1)


FAMILY = OpFamily(
    op_type="DeformConv",
    domain="",
    carried_by_function=True,
    make_spec=make_spec,
    variants=(
        SimpleVariant("native", why_not_native, build_native, "DeformConv with explicit attributes"),
        SimpleVariant("gather_im2col", why_not_lowered, build_gather_im2col,
                      "bilinear corners by Gather on the flattened map, then an im2col MatMul"),
        SimpleVariant("grid_sample", why_not_grid_sample, build_grid_sample,
                      "every tap sampled by one GridSample per offset group, then an im2col MatMul"),
    ),
)


# --- the carrier below opset 19 ------------------------------------------------------------------

CARRIER_INPUTS = ("X", "W", "offset", "B", "mask")


def carrier_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """A `convlower.DeformConv` carrier's attributes, every default filled in. They are DeformConv's,
    plus `has_bias` and `has_mask`: a function's body is chosen by attributes alone
    (`local_functions`), and a body that reads an absent input would not run."""
    if "kernel_shape" not in attrs:
        raise ValueError("kernel_shape is required")
    kernel = positive_ints(attrs["kernel_shape"], 2, "kernel_shape")
    resolved = {
        "kernel_shape": list(kernel),
        "strides": list(positive_ints(attrs.get("strides", [1, 1]), 2, "strides")),
        "dilations": list(positive_ints(attrs.get("dilations", [1, 1]), 2, "dilations")),
        "pads": list(non_negative_ints(attrs.get("pads", [0, 0, 0, 0]), 4, "pads")),
        "group": int(attrs.get("group", 1)),
        "offset_group": int(attrs.get("offset_group", 1)),
        "has_bias": int(bool(attrs.get("has_bias", 0))),
        "has_mask": int(bool(attrs.get("has_mask", 0))),
    }
    if resolved["group"] < 1 or resolved["offset_group"] < 1:
        raise ValueError(f"group {resolved['group']} and offset_group {resolved['offset_group']} must be positive")
    return resolved


def carrier_overload(attrs: Mapping[str, Any]) -> str:
    a = carrier_attrs(attrs)
    return "k{}_s{}_d{}_p{}_g{}_og{}_b{}_m{}".format(
        "x".join(map(str, a["kernel_shape"])), "x".join(map(str, a["strides"])), "x".join(map(str, a["dilations"])),
        "x".join(map(str, a["pads"])), a["group"], a["offset_group"], a["has_bias"], a["has_mask"])


def build_carrier_body(b: Builder, attrs: Mapping[str, Any], inputs: Sequence[gs.Variable], outputs: Sequence[gs.Variable]) -> None:
    """The carrier's model-local function body: `gather_im2col` with no shape known, so it runs
    for any input, at any opset from 11."""
    spec = DeformConvSpec(
        dtype="float32", opset=b.opset, batch=None, in_channels=None, out_channels=None, image=(None, None),
        output=(None, None), kernel_shape=tuple(attrs["kernel_shape"]), strides=tuple(attrs["strides"]),
        dilations=tuple(attrs["dilations"]), pads=tuple(attrs["pads"]), group=attrs["group"],
        offset_group=attrs["offset_group"], has_bias=bool(attrs["has_bias"]), has_mask=bool(attrs["has_mask"]),
    )
    build_gather_im2col(b, spec, inputs, outputs)


CARRIER = register_canonical_op(CanonicalOp("DeformConv", CARRIER_INPUTS, carrier_attrs, carrier_overload, build_carrier_body))


def carry_below_opset_19(model: onnx.ModelProto) -> onnx.ModelProto:
    """Below opset 19, where ONNX has no DeformConv, turn each DeformConv node of the main graph into
    a `convlower.DeformConv` carrier (in place): the same inputs and attributes, `has_bias` and
    `has_mask` added; `local_functions.attach_functions` then gives it its body."""
    if default_opset(model) >= DEFORM_CONV_OPSET:
        return model
    for node in model.graph.node:
        if node.op_type != "DeformConv" or node.domain not in ("", "ai.onnx"):
            continue
        present = [i < len(node.input) and bool(node.input[i]) for i in (3, 4)]
        node.domain = DOMAIN
        node.attribute.extend([onnx.helper.make_attribute("has_bias", int(present[0])),
                               onnx.helper.make_attribute("has_mask", int(present[1]))])
    return model
