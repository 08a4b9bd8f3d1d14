"""ConvTranspose: its spec and the variants that rewrite one ONNX `ConvTranspose` node into standard ops.

Rewrites (n spatial dims, K = prod(kernel_shape) taps, G = group, S = prod(strides) phases):

    native            ConvTranspose → ConvTranspose     every attribute explicit (pads, output_padding, ...)
    col2im            ConvTranspose → Reshape ∘ MatMul(Wᵀ) ∘ Reshape ∘ Col2Im ∘ Add? ∘ Reshape?   (seed 002)
    zero_insert_conv  ConvTranspose → spread(X, strides) ∘ Slice? ∘ Conv(flipped W)
    subpixel          ConvTranspose → Slice? ∘ Conv(S phase kernels) ∘ (DepthToSpace | Reshape·Transpose·Reshape) ∘ Slice?

What a ConvTranspose computes, on each spatial axis: every input element x[j] scatters x[j]·w[k]
to position j·stride + k·dilation of a "full" output, overlaps summing, and the output is that full
output read from `pads_begin` on, `out` long (past the computed extent it reads zeros). So the
node is fully described by (pads_begin, out). The spec keeps them in one canonical explicit form:
`pads` (begins, then the ends that crop) and `output_padding` (only where the output reaches past
the computed extent), whatever mix of pads, auto_pad, output_shape and output_padding the node
used. The resolution follows onnxruntime, which the ONNX text leaves loose in corners:

- output_shape given: total = stride·(in-1) + output_padding + extent - out, clamped at 0; the
  begin gets total//2 for SAME_UPPER and total - total//2 otherwise;
- SAME_UPPER / SAME_LOWER: the same split of max(0, extent + output_padding - stride), the total
  that makes out = in·stride when the kernel reaches past the stride (otherwise out is smaller);
- nodes onnxruntime refuses are NotLowerable, with its reason: output_padding not below the stride
  (the ONNX bound is max(stride, dilation)), and an output_shape past in·stride + extent - 1.

The lowerings:

- `col2im`: the seed-002 formulation, columns = Wᵀ·X (one batched MatMul over groups), then Col2Im
  scatters and sums them. Col2Im exists from opset 18, and the ONNX spec asks for 2 or more spatial
  dims, so a 1-D node is lifted to 2-D through a unit axis.
- `zero_insert_conv`: X spread by the stride (zeros between elements), then a stride-1 Conv with
  the kernel flipped and its channel axes swapped per group; the conv's pads and a Slice place the
  window. S times the MACs of the others: a baseline more than a contender.
- `subpixel`: output phase r (position ≡ r mod stride) is a stride-1 conv of X with the taps
  k ≡ r + pads_begin (mod stride); all S phases share one kernel grid, so one Conv with M·S output
  channels computes them and DepthToSpace (2-D, equal strides) or Reshape-Transpose-Reshape
  interleaves them. Dilation 1 only. For kernel == stride (UNet decoders) it is a 1×1 conv.

Weights and bias are rearranged (reshaped, transposed, flipped, windowed) once at rewrite time when
they are constants, and by nodes when they are graph inputs. Every variant handles a dynamic batch;
all but `native` need static spatial dims.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from .base import (
    Builder,
    int_attr,
    non_negative_ints,
    quantized_operands,
    Dim,
    GroupedKernelSizes,
    NotLowerable,
    OpFamily,
    Reshape,
    SimpleVariant,
    Transpose,
    attr_text,
    constant_value,
    float_dtype,
    positive_ints,
    rearranged,
    spec_key,
    static_shape,
)
from .col2im import COL2IM_DILATION_BUG, COL2IM_OPSET, cut, interleave, plan_window, window
from .conv import operands

_SLICE_TO_START = np.iinfo(np.int64).min


@dataclass(frozen=True, kw_only=True)
class ConvTransposeSpec(GroupedKernelSizes):
    """One ONNX ConvTranspose with every default, auto_pad and output_shape resolved.

    Spatial dims are None where symbolic. `pads` (all begins, then all ends) and `output_padding`
    are canonical: an end pad and an output padding are never both non-zero on one axis.
    """

    op: str = "ConvTranspose"
    dtype: str
    rank: int
    batch: Dim
    in_channels: int
    out_channels: int
    in_spatial: tuple[Dim, ...]
    out_spatial: tuple[Dim, ...]
    kernel_shape: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]
    output_padding: tuple[int, ...]
    group: int
    has_bias: bool
    weight_is_constant: bool
    bias_is_constant: bool
    opset: int

    def key(self) -> str:
        return spec_key(self)

    @property
    def pads_begin(self) -> tuple[int, ...]:
        return self.pads[: self.rank]

    @property
    def pads_end(self) -> tuple[int, ...]:
        return self.pads[self.rank :]

    @property
    def extents(self) -> tuple[int, ...]:
        """The dilated kernel's extent on each axis: (k-1)·d + 1."""
        return tuple((k - 1) * d + 1 for k, d in zip(self.kernel_shape, self.dilations))

    @property
    def spatial_known(self) -> bool:
        return None not in self.in_spatial


SAME = ("SAME_UPPER", "SAME_LOWER")
AUTO_PADS = ("NOTSET", "VALID", *SAME)


def make_spec(node: gs.Node, opset: int) -> ConvTransposeSpec:
    """The spec of one ConvTranspose node; raises NotLowerable with the reason where it cannot be described."""
    x, weight = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    quantized = quantized_operands(node)
    if quantized:
        raise NotLowerable(quantized)
    dtype = float_dtype(x)
    w_shape = static_shape(weight)
    if w_shape is None or len(w_shape) < 3 or None in w_shape:
        raise NotLowerable("the weight's shape must be static, [C, M/group, *kernel]")
    rank = len(w_shape) - 2
    if rank > 3:
        raise NotLowerable(f"{rank} spatial dims: convlower lowers ConvTranspose with 1 to 3")
    x_shape = static_shape(x) or (None,) * (rank + 2)
    if len(x_shape) != rank + 2:
        raise NotLowerable(f"the input has rank {len(x_shape)}, the weight {rank + 2}")
    in_channels, group = w_shape[0], int_attr(node, "group", 1)
    if group < 1 or in_channels % group:
        raise NotLowerable(f"group={group} does not divide the {in_channels} input channels")
    if x_shape[1] is not None and x_shape[1] != in_channels:
        raise NotLowerable(f"the input has {x_shape[1]} channels, the weight {in_channels}")
    kernel_shape = positive_ints(node.attrs.get("kernel_shape", w_shape[2:]), rank, "kernel_shape")
    if kernel_shape != tuple(w_shape[2:]):
        raise NotLowerable(f"kernel_shape {list(kernel_shape)} disagrees with the weight's shape {list(w_shape)}")
    strides = positive_ints(node.attrs.get("strides", [1] * rank), rank, "strides")
    dilations = positive_ints(node.attrs.get("dilations", [1] * rank), rank, "dilations")
    output_padding = non_negative_ints(node.attrs.get("output_padding", [0] * rank), rank, "output_padding")
    auto_pad = attr_text(node.attrs.get("auto_pad", "NOTSET"))
    if auto_pad not in AUTO_PADS:
        raise NotLowerable(f"auto_pad={auto_pad!r} is not one of {', '.join(AUTO_PADS)}")
    if "pads" in node.attrs and auto_pad != "NOTSET":
        raise NotLowerable(f"pads and auto_pad={auto_pad} are both set; ONNX allows one of them")
    pads = non_negative_ints(node.attrs.get("pads", [0] * 2 * rank), 2 * rank, "pads")
    output_shape = node.attrs.get("output_shape")
    if output_shape is not None and len(output_shape) not in (rank, rank + 2):
        raise NotLowerable(f"output_shape {list(output_shape)} has neither {rank} nor {rank + 2} entries")
    targets = [None] * rank if output_shape is None else [int(v) for v in list(output_shape)[-rank:]]
    axes = [
        _resolve_axis(
            axis, x_shape[2 + axis], kernel_shape[axis], strides[axis], dilations[axis], output_padding[axis],
            auto_pad, (pads[axis], pads[rank + axis]), targets[axis],
        )
        for axis in range(rank)
    ]
    begins, ends, adjusts, out_spatial = (tuple(column) for column in zip(*axes))
    return ConvTransposeSpec(
        dtype=dtype,
        rank=rank,
        batch=x_shape[0],
        in_channels=in_channels,
        out_channels=w_shape[1] * group,
        in_spatial=tuple(x_shape[2:]),
        out_spatial=out_spatial,
        kernel_shape=kernel_shape,
        strides=strides,
        dilations=dilations,
        pads=begins + ends,
        output_padding=adjusts,
        group=group,
        has_bias=bias is not None,
        weight_is_constant=constant_value(weight) is not None,
        bias_is_constant=bias is not None and constant_value(bias) is not None,
        opset=opset,
    )


def _resolve_axis(
    axis: int,
    size: Dim,
    kernel: int,
    stride: int,
    dilation: int,
    output_padding: int,
    auto_pad: str,
    pads: tuple[int, int],
    output_shape: int | None,
) -> tuple[int, int, int, Dim]:
    """(pad begin, pad end, output padding, output size) of one spatial axis, canonical (see the module doc)."""
    extent = (kernel - 1) * dilation + 1
    if output_padding >= stride:
        raise NotLowerable(
            f"output_padding {output_padding} on spatial axis {axis} is not below the stride {stride}: "
            "onnxruntime refuses it"
        )
    if output_shape is not None:
        if size is None:
            raise NotLowerable("output_shape on a dynamic spatial dim: the pads depend on the run-time size")
        total = stride * (size - 1) + output_padding + extent - output_shape
        begin = _split_begin(max(total, 0), auto_pad)
        end = total - begin
    elif auto_pad in SAME:
        total = max(0, extent + output_padding - stride)
        begin = _split_begin(total, auto_pad)
        end = total - begin
    elif auto_pad == "VALID":
        begin = end = 0
    else:
        begin, end = pads
    end, output_padding = max(0, end - output_padding), max(0, output_padding - end)
    if output_padding >= stride:
        raise NotLowerable(
            f"output_shape {output_shape} on spatial axis {axis} reaches past in·stride + extent - 1 = "
            f"{size * stride + extent - 1}: onnxruntime refuses it"
        )
    if size is None:
        return begin, end, output_padding, None
    out = stride * (size - 1) + output_padding + extent - begin - end
    if out < 1:
        raise NotLowerable(f"the output is empty on spatial axis {axis}: onnxruntime refuses it")
    return begin, end, output_padding, out


def _split_begin(total: int, auto_pad: str) -> int:
    """The begin's share of a total pad: the smaller half for SAME_UPPER, the larger otherwise."""
    return total // 2 if auto_pad == "SAME_UPPER" else total - total // 2


# ---- why a variant does not apply ------------------------------------------------------------


def why_not_native(spec: ConvTransposeSpec) -> str | None:
    return None


def why_not_zero_insert_conv(spec: ConvTransposeSpec) -> str | None:
    if spec.spatial_known:
        return None
    return "dynamic spatial dims: this variant needs the input's spatial sizes (a dynamic batch is fine)"


def why_not_col2im(spec: ConvTransposeSpec) -> str | None:
    if spec.opset < COL2IM_OPSET:
        return f"Col2Im exists from opset {COL2IM_OPSET}; the model is opset {spec.opset}"
    if spec.rank > 2 and any(d != 1 for d in spec.dilations):
        return f"dilations {list(spec.dilations)}: {COL2IM_DILATION_BUG}"
    return why_not_zero_insert_conv(spec)


def why_not_subpixel(spec: ConvTransposeSpec) -> str | None:
    if all(s == 1 for s in spec.strides):
        return "stride 1 on every axis: there are no phases to interleave (zero_insert_conv is that one Conv)"
    if any(d != 1 for d in spec.dilations):
        return f"dilations {list(spec.dilations)}: the phase kernels are built for dilation 1"
    return why_not_zero_insert_conv(spec)


# ---- weight rearrangements beyond reshape and transpose --------------------------------------


@dataclass(frozen=True)
class Rearrangement:
    """A step for `rearranged`: what it does to a constant (NumPy, at rewrite time) and to a run-time input (nodes)."""

    on_array: Callable[[np.ndarray], np.ndarray]
    on_graph: Callable[[Builder, gs.Tensor], gs.Tensor]


def flip(axes: tuple[int, ...]) -> Rearrangement:
    """Reverse the axes: np.flip, or a Slice with step -1."""
    ones = [-1] * len(axes)
    return Rearrangement(
        lambda value: np.flip(value, axes),
        lambda b, tensor: b.slice(tensor, ones, [_SLICE_TO_START] * len(axes), axes, ones),
    )


def kernel_window(sizes: Sequence[int], starts: Sequence[int], stops: Sequence[int]) -> Rearrangement:
    """The window [start, stop) of each kernel axis (axes 2...), zeros outside the kernel."""
    extents = [(0, n) for n in sizes]
    plan = plan_window(extents, starts, stops)

    def on_array(value: np.ndarray) -> np.ndarray:
        index = [slice(None)] * value.ndim
        for axis, start, stop in zip(plan.axes, plan.starts, plan.stops):
            index[axis] = slice(start, stop)
        half = len(plan.pads) // 2
        return np.pad(value[tuple(index)], [(0, 0), (0, 0), *zip(plan.pads[:half], plan.pads[half:])])

    return Rearrangement(on_array, lambda b, tensor: window(b, tensor, extents, starts, stops))


def repeat_columns(times: int) -> Rearrangement:
    """Broadcast `[M, 1]` to `[M, times]`: np.repeat, or Expand."""
    return Rearrangement(
        lambda value: np.repeat(value, times, axis=1), lambda b, tensor: b.op("Expand", [tensor, b.ints([1, times])])
    )


# ---- the variants ----------------------------------------------------------------------------


def build_native(
    b: Builder, spec: ConvTransposeSpec, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]
) -> None:
    """ConvTranspose itself in the canonical explicit form: the baseline the tuner times the others against."""
    attrs = {
        "kernel_shape": list(spec.kernel_shape),
        "strides": list(spec.strides),
        "dilations": list(spec.dilations),
        "pads": list(spec.pads),
        "output_padding": list(spec.output_padding),
        "group": spec.group,
    }
    b.op("ConvTranspose", [t for t in operands(spec, inputs) if t is not None], attrs, out=outputs[0])


def build_col2im(
    b: Builder, spec: ConvTransposeSpec, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]
) -> None:
    """Columns = Wᵀ·X per group (`[G, M/G·K, C/G] @ [N, G, C/G, L]`), then Col2Im sums them into place."""
    x, weight, bias = operands(spec, inputs)
    g, m, k = spec.group, spec.out_channels, spec.taps
    columns_weight = rearranged(
        b, weight, Reshape((g, spec.in_per_group, spec.out_per_group * k)), Transpose((0, 2, 1))
    )
    grouped = b.reshape(x, [0, g, spec.in_per_group, math.prod(spec.in_spatial)])
    columns = b.reshape(b.matmul(columns_weight, grouped), [0, m * k, math.prod(spec.in_spatial)])
    lift = [1] if spec.rank == 1 else []
    attrs = {
        "strides": lift + list(spec.strides),
        "dilations": lift + list(spec.dilations),
        "pads": [0] * len(lift) + list(spec.pads_begin) + [0] * len(lift) + list(spec.pads_end),
    }
    image = lift + list(spec.out_spatial)
    last = not spec.has_bias and not lift
    y = b.op(
        "Col2Im", [columns, b.ints(image), b.ints(lift + list(spec.kernel_shape))], attrs, out=outputs[0] if last else None
    )
    if bias is not None:
        y = b.add(y, rearranged(b, bias, Reshape((m, *[1] * len(image)))), out=None if lift else outputs[0])
    if lift:
        b.reshape(y, [0, m, *spec.out_spatial], out=outputs[0])


def spread(b: Builder, x: gs.Tensor, channels: int, spatial: Sequence[int], strides: Sequence[int]) -> gs.Tensor:
    """`x` [N, channels, *spatial] with `stride - 1` zeros after every element on each spatial axis.

    The result is [N, channels, *(spatial·strides)] holding x[..., i] at i·stride: the input
    dilation of a transposed convolution. Reshape to a unit axis after each strided axis, Pad that
    axis to the stride, merge. `x` itself when every stride is 1.
    """
    if all(s == 1 for s in strides):
        return x
    split_shape, pads_end = [0, channels], [0, 0]
    for size, stride in zip(spatial, strides):
        split_shape.append(size)
        pads_end.append(0)
        if stride > 1:
            split_shape.append(1)
            pads_end.append(stride - 1)
    padded = b.pad(b.reshape(x, split_shape), [0] * len(pads_end) + pads_end)
    return b.reshape(padded, [0, channels, *(size * stride for size, stride in zip(spatial, strides))])


def build_zero_insert_conv(
    b: Builder, spec: ConvTransposeSpec, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]
) -> None:
    """X spread by the stride, read through a window placed by pads_begin, convolved with the flipped kernel.

    Output position o sums z[o + pads_begin - k·dilation]·w[k] over the spread input z, a stride-1
    correlation of z with w reversed over the window [pads_begin - extent + 1, out + pads_begin).
    """
    x, weight, bias = operands(spec, inputs)
    spatial_axes = tuple(range(2, 2 + spec.rank))
    flipped = rearranged(
        b,
        weight,
        Reshape((spec.group, spec.in_per_group, spec.out_per_group, *spec.kernel_shape)),
        Transpose((0, 2, 1, *(a + 1 for a in spatial_axes))),
        Reshape((spec.out_channels, spec.in_per_group, *spec.kernel_shape)),
        flip(spatial_axes),
    )
    spread_x = spread(b, x, spec.in_channels, spec.in_spatial, spec.strides)
    spread_size = [n * s for n, s in zip(spec.in_spatial, spec.strides)]
    starts = [p - e + 1 for p, e in zip(spec.pads_begin, spec.extents)]
    stops = [o + p for o, p in zip(spec.out_spatial, spec.pads_begin)]
    plan = plan_window([(0, n) for n in spread_size], starts, stops)
    attrs = {
        "kernel_shape": list(spec.kernel_shape),
        "dilations": list(spec.dilations),
        "pads": list(plan.pads),
        "group": spec.group,
    }
    conv_inputs = [cut(b, spread_x, plan), flipped] + ([bias] if bias is not None else [])
    b.op("Conv", conv_inputs, attrs, out=outputs[0])


@dataclass(frozen=True)
class PhaseGrid:
    """One spatial axis of the subpixel decomposition.

    Phase r (output positions q·stride + r) reads x[q + j] for j in [lo, lo + taps) through the
    weight taps pads_begin + r - j·stride, so every phase shares one conv of `taps` taps over the
    input window [lo, lo + rows + taps - 1). `rows` = ceil(out / stride) outputs per phase.
    """

    lo: int
    taps: int
    rows: int
    weight_start: int

    @classmethod
    def of(cls, kernel: int, stride: int, pad_begin: int, out: int) -> "PhaseGrid":
        lo = -((kernel - 1 - pad_begin) // stride)
        hi = (stride - 1 + pad_begin) // stride
        return cls(lo=lo, taps=hi - lo + 1, rows=-(-out // stride), weight_start=pad_begin - hi * stride)


def build_subpixel(
    b: Builder, spec: ConvTransposeSpec, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]
) -> None:
    """S phase convolutions as one Conv with M·S output channels, interleaved into the output, then cropped.

    Phase kernels: the weight read through the window [weight_start, weight_start + taps·stride)
    of each kernel axis (zeros outside), split into (tap, phase), taps reversed.
    """
    x, weight, bias = operands(spec, inputs)
    rank, phases = spec.rank, math.prod(spec.strides)
    grids = [
        PhaseGrid.of(k, s, p, o) for k, s, p, o in zip(spec.kernel_shape, spec.strides, spec.pads_begin, spec.out_spatial)
    ]
    taps = [grid.taps for grid in grids]
    split = [d for grid, s in zip(grids, spec.strides) for d in (grid.taps, s)]
    phase_weight = rearranged(
        b,
        weight,
        kernel_window(
            spec.kernel_shape,
            [grid.weight_start for grid in grids],
            [grid.weight_start + grid.taps * s for grid, s in zip(grids, spec.strides)],
        ),
        Reshape((spec.group, spec.in_per_group, spec.out_per_group, *split)),
        Transpose((0, 2, *(4 + 2 * i for i in range(rank)), 1, *(3 + 2 * i for i in range(rank)))),
        Reshape((spec.out_channels * phases, spec.in_per_group, *taps)),
        flip(tuple(range(2, 2 + rank))),
    )
    conv_inputs = [phase_weight]
    if bias is not None:
        conv_inputs.append(rearranged(b, bias, Reshape((spec.out_channels, 1)), repeat_columns(phases), Reshape((-1,))))
    plan = plan_window(
        [(0, n) for n in spec.in_spatial],
        [grid.lo for grid in grids],
        [grid.lo + grid.rows + grid.taps - 1 for grid in grids],
    )
    attrs = {"kernel_shape": taps, "pads": list(plan.pads), "group": spec.group}
    phased = b.op("Conv", [cut(b, x, plan), *conv_inputs], attrs)
    rows = [grid.rows for grid in grids]
    interleave(b, phased, spec.out_channels, spec.strides, rows, spec.out_spatial, outputs[0])


FAMILY = OpFamily(
    op_type="ConvTranspose",
    domain="",
    make_spec=make_spec,
    variants=(
        SimpleVariant("native", why_not_native, build_native, "ConvTranspose with explicit attributes"),
        SimpleVariant("col2im", why_not_col2im, build_col2im, "MatMul of the weights with the input, then Col2Im"),
        SimpleVariant(
            "zero_insert_conv", why_not_zero_insert_conv, build_zero_insert_conv,
            "input spread by the stride, Conv with flipped weights",
        ),
        SimpleVariant(
            "subpixel", why_not_subpixel, build_subpixel,
            "stride^n phase convs in one Conv, interleaved by DepthToSpace",
        ),
    ),
)
