"""Conv: its spec and the variants that rewrite one ONNX `Conv` node into standard ops.

Rewrites (K = prod(kernel_shape) kernel taps, G = groups, P = prod(output spatial dims)):

    native            Conv → Conv                        every attribute explicit, pads resolved
    im2col            Conv → Pad ∘ Slice×K ∘ Concat ∘ Reshape ∘ MatMul ∘ Add? ∘ Reshape
    shift_matmul      Conv → Pad ∘ (Slice ∘ Reshape ∘ MatMul)×K ∘ Sum ∘ Reshape
    einsum            Conv → Pad ∘ Slice×K ∘ Concat ∘ Reshape ∘ Einsum ∘ Add? ∘ Reshape
    pointwise_matmul  Conv[1×…×1] → Pad? ∘ Slice? ∘ Reshape ∘ MatMul ∘ Sum? ∘ Reshape
    depthwise_shift   Conv[group = C] → Pad ∘ Unsqueeze? ∘ (Slice ∘ Mul)×K ∘ Sum ∘ Reshape?
    patchify_matmul   Conv[stride = kernel, no pad] → Slice? ∘ Reshape ∘ Transpose ∘ Reshape ∘ MatMul ∘ Add? ∘ Reshape
    conv2d_row        Conv[1-D] → Unsqueeze ∘ Conv[1×k] ∘ Squeeze
    conv2d_column     Conv[1-D] → Unsqueeze ∘ Conv[k×1] ∘ Squeeze

Every lowering but `native` starts the same way (seed 003): pad the input once, then read it
through each kernel tap as a strided Slice, the "window" of that tap, which already has the
output's spatial shape. The variants differ in how they contract windows with weights: one MatMul
over the windows concatenated (im2col, seed 003 `conv_im2col`), a MatMul per window summed (seed 003
`conv_matmul`), an Einsum over the stacked windows with a group index (seeds 001 and 004), or, for a
depthwise conv, a broadcast Mul per window summed.

A conv whose strides equal its kernel and that has no padding (the patch embedding of ViT, Swin
and video transformers) reads every input element exactly once, in non-overlapping patches:
`patchify_matmul` needs no windows, only a reshape of the input into patches and one MatMul. A 1-D
conv can run as a 2-D conv on a `[1, T]` row or a `[T, 1]` column (`conv2d_row`, `conv2d_column`),
layouts a runtime may serve by other kernels than its 1-D conv; the tuner picks per node.

Layouts stay channels-first, so the windowed lowerings never transpose activations: windows `[N, C, *out]`
concatenated on axis 2 have exactly the memory layout of `[N, C, K, *out]`, which reshapes for free
to `[N, G, C/G·K, P]`, and `W[G, M/G, C/G·K] @ cols` gives `[N, G, M/G, P]`. The group axis is left out
when G = 1. Weights and bias are reshaped and transposed in NumPy once at rewrite time when they are
constants, and by nodes in the graph when they are run-time inputs.

Dynamic shapes: window slices count their ends back from the end of each axis, and the final
Reshape reads symbolic output dims off a window at run time, so every variant handles a dynamic
batch and dynamic spatial dims (`patchify_matmul` computes its patch grid at run time from the input's
Shape). The one exception is `auto_pad` SAME_UPPER/SAME_LOWER on a dynamic spatial dim: its pads
depend on the run-time size, the spec records them as unknown (`pads` None), and only the variants
that keep a Conv apply (`native`, and the 2-D layouts of a 1-D conv, which pass `auto_pad` on).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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
    tap_windows,
)

EINSUM_OPSET = 12


@dataclass(frozen=True, kw_only=True)
class ConvSpec(GroupedKernelSizes):
    """One ONNX Conv with every default and auto_pad resolved.

    Spatial dims are None where symbolic. `pads` is ONNX order (all begins, then all ends), or None
    where `auto_pad` is SAME_* on a dynamic spatial dim, so that the pads are only known at run time.
    `auto_pad` keeps the node's own setting, for reports and for `native` in that case.
    """

    op: str = "Conv"
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
    pads: tuple[int, ...] | None
    auto_pad: str
    group: int
    has_bias: bool
    weight_is_constant: bool
    bias_is_constant: bool
    opset: int

    def key(self) -> str:
        return spec_key(self)

    @property
    def resolved_pads(self) -> tuple[int, ...]:
        """The static pads; only for variants whose `why_not` checked `pads_known`."""
        if self.pads is None:
            raise ValueError(f"auto_pad={self.auto_pad} on a dynamic spatial dim: the pads are only known at run time")
        return self.pads

    @property
    def pads_known(self) -> bool:
        return self.pads is not None

    @property
    def group_dims(self) -> list[int]:
        """`[group]` for a grouped conv, `[]` otherwise: the leading axis of grouped layouts."""
        return [self.group] if self.group > 1 else []


def make_spec(node: gs.Node, opset: int) -> ConvSpec:
    """The spec of one Conv node; raises NotLowerable with the reason where it cannot be described."""
    x, weight = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    quantized = quantized_operands(node)
    if quantized:
        raise NotLowerable(quantized)
    dtype = float_dtype(x)
    x_shape = static_shape(x)
    if x_shape is None:
        raise NotLowerable("the input's rank is unknown; run shape inference or give the input a shape")
    if len(x_shape) < 3:
        raise NotLowerable(f"the input has rank {len(x_shape)}; Conv takes [N, C, spatial...]")
    rank = len(x_shape) - 2
    w_shape = static_shape(weight)
    if w_shape is None or len(w_shape) != rank + 2:
        raise NotLowerable(f"the weight's shape is unknown or not of rank {rank + 2}")
    group = int_attr(node, "group", 1)
    out_channels = _known(w_shape[0], "the weight's output-channel dim")
    if group < 1 or out_channels % group:
        raise NotLowerable(f"group={group} does not divide the {out_channels} output channels")
    in_per_group = w_shape[1] if w_shape[1] is not None else _known(x_shape[1], "the input's channel dim") // group
    in_channels = in_per_group * group
    if x_shape[1] is not None and x_shape[1] != in_channels:
        raise NotLowerable(f"input has {x_shape[1]} channels, weight and group={group} expect {in_channels}")
    kernel_shape = positive_ints(node.attrs.get("kernel_shape", w_shape[2:]), rank, "kernel_shape")
    if any(w is not None and w != k for w, k in zip(w_shape[2:], kernel_shape)):
        raise NotLowerable(f"kernel_shape {list(kernel_shape)} disagrees with the weight's shape {list(w_shape)}")
    strides = positive_ints(node.attrs.get("strides", [1] * rank), rank, "strides")
    dilations = positive_ints(node.attrs.get("dilations", [1] * rank), rank, "dilations")
    in_spatial = x_shape[2:]
    auto_pad = attr_text(node.attrs.get("auto_pad", "NOTSET"))
    pads, out_spatial = _resolve_padding(
        auto_pad, node.attrs.get("pads"), in_spatial, kernel_shape, strides, dilations
    )
    return ConvSpec(
        dtype=dtype,
        rank=rank,
        batch=x_shape[0],
        in_channels=in_channels,
        out_channels=out_channels,
        in_spatial=in_spatial,
        out_spatial=out_spatial,
        kernel_shape=kernel_shape,
        strides=strides,
        dilations=dilations,
        pads=pads,
        auto_pad=auto_pad,
        group=group,
        has_bias=bias is not None,
        weight_is_constant=constant_value(weight) is not None,
        bias_is_constant=bias is not None and constant_value(bias) is not None,
        opset=opset,
    )


def _known(dim: Dim, what: str) -> int:
    if dim is None:
        raise NotLowerable(f"{what} is symbolic; it must be static")
    return dim


def _resolve_padding(
    auto_pad: str,
    pads_attr: Sequence[int] | None,
    in_spatial: tuple[Dim, ...],
    kernel_shape: tuple[int, ...],
    strides: tuple[int, ...],
    dilations: tuple[int, ...],
) -> tuple[tuple[int, ...] | None, tuple[Dim, ...]]:
    """(pads, output spatial dims) as the ONNX Conv spec defines them for this auto_pad."""
    rank = len(in_spatial)
    extents = [(k - 1) * d + 1 for k, d in zip(kernel_shape, dilations)]
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        out = tuple(None if n is None else -(-n // s) for n, s in zip(in_spatial, strides))
        if None in in_spatial:
            return None, out
        totals = [max(0, (o - 1) * s + e - n) for o, s, e, n in zip(out, strides, extents, in_spatial)]
        lower = [t - t // 2 if auto_pad == "SAME_LOWER" else t // 2 for t in totals]
        return tuple(lower) + tuple(t - b for t, b in zip(totals, lower)), out
    if auto_pad == "VALID":
        pads = (0,) * (2 * rank)
    elif auto_pad == "NOTSET":
        pads = non_negative_ints(pads_attr if pads_attr is not None else [0] * (2 * rank), 2 * rank, "pads")
    else:
        raise NotLowerable(f"auto_pad={auto_pad!r} is not one of NOTSET, VALID, SAME_UPPER, SAME_LOWER")
    out = []
    for n, begin, end, e, s in zip(in_spatial, pads[:rank], pads[rank:], extents, strides):
        if n is not None and n + begin + end < e:
            raise NotLowerable(f"the kernel (extent {e}) is larger than the padded input ({n + begin + end})")
        out.append(None if n is None else (n + begin + end - e) // s + 1)
    return pads, tuple(out)


# ---- why a variant does not apply ------------------------------------------------------------


def why_not_unknown_pads(spec: ConvSpec) -> str | None:
    if spec.pads_known:
        return None
    return f"auto_pad={spec.auto_pad} on a dynamic spatial dim: the pads are only known at run time"


def why_not_native(spec: ConvSpec) -> str | None:
    return None


def why_not_einsum(spec: ConvSpec) -> str | None:
    if spec.opset < EINSUM_OPSET:
        return f"Einsum needs opset {EINSUM_OPSET}; the model is opset {spec.opset}"
    return why_not_unknown_pads(spec)


def why_not_pointwise(spec: ConvSpec) -> str | None:
    if spec.taps != 1:
        return f"kernel {'x'.join(map(str, spec.kernel_shape))} is not 1x1"
    return why_not_unknown_pads(spec)


def why_not_depthwise(spec: ConvSpec) -> str | None:
    if spec.group != spec.in_channels:
        return f"group={spec.group} with {spec.in_channels} input channels is not depthwise (group == channels)"
    return why_not_unknown_pads(spec)


def why_not_patchify(spec: ConvSpec) -> str | None:
    if spec.strides != spec.kernel_shape:
        return f"strides {_tuple_text(spec.strides)} differ from kernel_shape {_tuple_text(spec.kernel_shape)}"
    if spec.taps == 1:
        kernel = "x".join(map(str, spec.kernel_shape))
        return f"kernel {kernel} with stride 1 is pointwise: pointwise_matmul lowers it without the patch reshapes"
    if any(d != 1 for d in spec.dilations):
        return f"dilations {_tuple_text(spec.dilations)} are not 1"
    if spec.group != 1:
        return f"group={spec.group} is not 1"
    if not spec.pads_known:
        return why_not_unknown_pads(spec)
    if any(spec.resolved_pads):
        return f"pads {_tuple_text(spec.resolved_pads)} are not zero"
    return None


def why_not_2d_layout(spec: ConvSpec) -> str | None:
    if spec.rank != 1:
        return f"rank {spec.rank} Conv: the 2-D layouts are for 1-D Convs"
    return None


def _tuple_text(values: Sequence[int]) -> str:
    """`(1, 1)`, and `(2)` for one value (not Python's `(2,)`)."""
    return f"({', '.join(map(str, values))})"


# ---- shared pieces of the lowerings ----------------------------------------------------------


def split_first_axis(b: Builder, tensor: gs.Tensor, count: int) -> list[gs.Tensor]:
    """`tensor[i]` for each i < count: constants when `tensor` is one, else Gather nodes."""
    value = constant_value(tensor)
    if value is not None:
        return [b.const(value[i], "tap") for i in range(count)]
    return [b.op("Gather", [tensor, b.const(np.asarray(i, dtype=np.int64), "index")], {"axis": 0}) for i in range(count)]


def padded(b: Builder, spec: ConvSpec, x: gs.Tensor) -> gs.Tensor:
    """x zero-padded on its spatial axes by the resolved pads (x itself when they are all zero)."""
    begins, ends = spec.resolved_pads[: spec.rank], spec.resolved_pads[spec.rank :]
    return b.pad(x, [0, 0, *begins, 0, 0, *ends])


def windows(b: Builder, spec: ConvSpec, x: gs.Tensor, first_axis: int = 2) -> list[gs.Tensor]:
    """The padded input seen through each kernel tap, taps in row-major order (see `tap_windows`)."""
    return tap_windows(b, x, spec.kernel_shape, spec.strides, spec.dilations, first_axis)


def to_output(b: Builder, spec: ConvSpec, y: gs.Tensor, window: gs.Tensor, window_axis: int, out: gs.Variable) -> None:
    """Reshape y (batch first, then M·P elements per item) into the Conv's output `[N, M, *out]`.

    Symbolic output spatial dims are read at run time off `window`, whose spatial axes start at
    `window_axis` and have the output's size.
    """
    head = [0, spec.out_channels]
    if None not in spec.out_spatial:
        shape = b.ints(head + list(spec.out_spatial))
    else:
        shape = b.concat([b.ints(head), b.shape(window, start=window_axis)], axis=0)
    b.reshape(y, shape, out=out)


def operands(spec: ConvSpec, inputs: Sequence[gs.Tensor]) -> tuple[gs.Tensor, gs.Tensor, gs.Tensor | None]:
    """(X, W, B or None) of the Conv node."""
    return inputs[0], inputs[1], inputs[2] if spec.has_bias else None


def grouped_bias(b: Builder, spec: ConvSpec, bias: gs.Tensor) -> gs.Tensor:
    """B as `[G, M/G, 1]` (`[M, 1]` when G = 1), to add to a `[N, G, M/G, P]` product."""
    return rearranged(b, bias, Reshape((*spec.group_dims, spec.out_per_group, 1)))


# ---- the variants ----------------------------------------------------------------------------


def build_native(b: Builder, spec: ConvSpec, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]) -> None:
    """Conv itself with every attribute explicit: the baseline the tuner times the others against.

    Resolving SAME_* pads here also lets onnxruntime run a dilated SAME conv, which it refuses.
    """
    attrs: dict = {
        "kernel_shape": list(spec.kernel_shape),
        "strides": list(spec.strides),
        "dilations": list(spec.dilations),
        "group": spec.group,
    }
    if spec.pads_known:
        attrs["pads"] = list(spec.resolved_pads)
    else:
        attrs["auto_pad"] = spec.auto_pad
    b.op("Conv", list(inputs[: 3 if spec.has_bias else 2]), attrs, out=outputs[0])


def build_im2col(b: Builder, spec: ConvSpec, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]) -> None:
    """im2col (seed 003 `conv_im2col`): all windows as one column matrix, one MatMul.

    Windows concatenated on axis 2 are `[N, C, K, *out]` in memory, i.e. `[N, G, C/G·K, P]`
    columns; `W[G, M/G, C/G·K] @ columns` is the whole conv. One large GEMM, at the cost of
    materializing K copies of the input.
    """
    x, weight, bias = operands(spec, inputs)
    taps = windows(b, spec, padded(b, spec, x))
    columns = b.reshape(b.concat(taps, axis=2), [0, *spec.group_dims, spec.in_per_group * spec.taps, -1])
    w = rearranged(b, weight, Reshape((*spec.group_dims, spec.out_per_group, spec.in_per_group * spec.taps)))
    y = b.matmul(w, columns)
    if bias is not None:
        y = b.add(y, grouped_bias(b, spec, bias))
    to_output(b, spec, y, taps[0], 2, outputs[0])


def build_shift_matmul(b: Builder, spec: ConvSpec, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]) -> None:
    """Sum over kernel taps of a MatMul on the shifted input (seed 003 `conv_matmul`).

    `y = Σ_k W[:, :, k] @ window_k`: K small GEMMs of `[M/G, C/G] @ [C/G, P]` that never build
    the K-times-larger column matrix. The bias joins the Sum. For a 1×1 kernel this is a single
    MatMul (the `pointwise_matmul` variant).
    """
    x, weight, bias = operands(spec, inputs)
    taps = windows(b, spec, padded(b, spec, x))
    tap_shape = (*spec.group_dims, spec.out_per_group, spec.in_per_group)
    w = rearranged(
        b, weight, Reshape((spec.out_channels, spec.in_per_group, spec.taps)), Transpose((2, 0, 1)),
        Reshape((spec.taps, *tap_shape)),
    )
    terms = [
        b.matmul(w_k, b.reshape(window, [0, *spec.group_dims, spec.in_per_group, -1]))
        for w_k, window in zip(split_first_axis(b, w, spec.taps), taps)
    ]
    if bias is not None:
        terms.append(grouped_bias(b, spec, bias))
    to_output(b, spec, b.sum(terms), taps[0], 2, outputs[0])


def build_einsum(b: Builder, spec: ConvSpec, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]) -> None:
    """Einsum over the stacked windows with a group index (seeds 001, 004: `bgcnw,gdcw->bgdn`).

    Windows stacked as `[N, G, C/G, K, P]` contract with `W[G, M/G, C/G, K]` over channels and
    taps in one Einsum. The weight goes first: onnxruntime's Einsum then computes `W @ windows`
    with no transpose of the output (2-10x faster on CPU than windows first).
    """
    x, weight, bias = operands(spec, inputs)
    taps = windows(b, spec, padded(b, spec, x))
    stacked = b.reshape(b.concat(taps, axis=2), [0, *spec.group_dims, spec.in_per_group, spec.taps, -1])
    w = rearranged(b, weight, Reshape((*spec.group_dims, spec.out_per_group, spec.in_per_group, spec.taps)))
    g = "g" if spec.group > 1 else ""
    y = b.einsum(f"{g}mck,n{g}ckp->n{g}mp", [w, stacked])
    if bias is not None:
        y = b.add(y, grouped_bias(b, spec, bias))
    to_output(b, spec, y, taps[0], 2, outputs[0])


def build_depthwise_shift(
    b: Builder, spec: ConvSpec, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]
) -> None:
    """Depthwise conv (group == C) as a sum over taps of window × per-channel weight.

    `y[n, c·m + j] = Σ_k window_k[n, c] · W[c·m + j, 0, k]` for channel multiplier m: K broadcast
    Muls and one Sum, no GEMM (a depthwise conv has no channel reduction to give one). With m > 1
    the input gets an axis for j, `[N, C, 1, *S]`, that the weights `[C, m, 1…]` broadcast along.
    """
    x, weight, bias = operands(spec, inputs)
    multiplier = spec.out_channels // spec.in_channels
    multiplier_dims = [multiplier] if multiplier > 1 else []
    source = padded(b, spec, x)
    first_axis = 2
    if multiplier > 1:
        source = b.unsqueeze(source, [2])
        first_axis = 3
    taps = windows(b, spec, source, first_axis)
    tap_shape = (spec.in_channels, *multiplier_dims, *[1] * spec.rank)
    w = rearranged(b, weight, Reshape((spec.out_channels, spec.taps)), Transpose((1, 0)), Reshape((spec.taps, *tap_shape)))
    terms = [b.mul(window, w_k) for window, w_k in zip(taps, split_first_axis(b, w, spec.taps))]
    if bias is not None:
        terms.append(rearranged(b, bias, Reshape(tap_shape)))
    if multiplier == 1:
        b.sum(terms, out=outputs[0])
    else:
        to_output(b, spec, b.sum(terms), taps[0], first_axis, outputs[0])


def build_patchify_matmul(
    b: Builder, spec: ConvSpec, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]
) -> None:
    """A conv with strides = kernel and no padding as non-overlapping patches and one MatMul.

    Each output position reads its own patch, so the column matrix is the input itself rearranged:
    crop to whole patches (out·k per axis, only where an axis may have a remainder), Reshape to
    `[N, C, O1, k1, O2, k2, ...]`, Transpose to `[N, C, k1, k2, ..., O1, O2, ...]`, Reshape to
    `[N, C·K, P]`; then `W[M, C·K] @ columns` is `[N, M, P]`. No input element is copied K times
    as in im2col. Symbolic spatial dims get the patch grid `O = Shape(x)[2:] / k` at run time.
    On onnxruntime's CPU provider the Conv itself stays faster (benchmarks/bench_conv.py: 1.4x on
    ViT-B/16's, 2.3x on a video Swin's): the 8-D Transpose costs more than the Conv's own im2col.
    """
    x, weight, bias = operands(spec, inputs)
    grid = patch_grid(b, spec, x)
    patches = b.reshape(whole_patches(b, spec, x, grid), patch_split_shape(b, spec, grid))
    kernel_axes = [3 + 2 * i for i in range(spec.rank)]
    grid_axes = [2 + 2 * i for i in range(spec.rank)]
    columns = b.reshape(b.transpose(patches, [0, 1, *kernel_axes, *grid_axes]), [0, spec.in_channels * spec.taps, -1])
    y = b.matmul(rearranged(b, weight, Reshape((spec.out_channels, spec.in_channels * spec.taps))), columns)
    if bias is not None:
        y = b.add(y, grouped_bias(b, spec, bias))
    head = [0, spec.out_channels]
    out_shape = b.ints(head + list(spec.out_spatial)) if grid is None else b.concat([b.ints(head), grid], axis=0)
    b.reshape(y, out_shape, out=outputs[0])


def patch_grid(b: Builder, spec: ConvSpec, x: gs.Tensor) -> gs.Tensor | None:
    """The patch counts per spatial axis (the output's spatial dims) as a run-time int64 vector
    `Shape(x)[2:] / kernel` when any of them is symbolic; None when all are static (in the spec)."""
    if None not in spec.out_spatial:
        return None
    return b.op("Div", [b.shape(x, start=2), b.ints(spec.kernel_shape)])


def whole_patches(b: Builder, spec: ConvSpec, x: gs.Tensor, grid: gs.Tensor | None) -> gs.Tensor:
    """x cut to `out·k` along each spatial axis, dropping the remainder the conv never reads: a
    Slice only where an axis may have one (a static size that is not a multiple of its kernel, or
    a symbolic size with a kernel > 1); x itself otherwise."""
    ragged = [i for i, (n, k) in enumerate(zip(spec.in_spatial, spec.kernel_shape)) if k > 1 and (n is None or n % k)]
    if not ragged:
        return x
    if grid is None:
        ends = [spec.out_spatial[i] * spec.kernel_shape[i] for i in ragged]
        return b.slice(x, [0] * len(ragged), ends, [2 + i for i in ragged])
    ends = b.op("Mul", [grid, b.ints(spec.kernel_shape)])
    return b.op("Slice", [x, b.ints([0] * spec.rank), ends, b.ints(range(2, 2 + spec.rank))])


def patch_split_shape(b: Builder, spec: ConvSpec, grid: gs.Tensor | None) -> gs.Tensor:
    """The Reshape target `[N, C, O1, k1, O2, k2, ...]` that splits each spatial axis into
    (patch index, offset in the patch): constant when the grid is static, else the run-time grid
    interleaved with the kernel by Unsqueeze, Concat and Reshape."""
    head = [0, spec.in_channels]
    if grid is None:
        return b.ints(head + [d for o, k in zip(spec.out_spatial, spec.kernel_shape) for d in (o, k)])
    kernel_column = b.const(np.asarray(spec.kernel_shape, dtype=np.int64).reshape(spec.rank, 1), "ints")
    pairs = b.concat([b.unsqueeze(grid, [1]), kernel_column], axis=1)
    return b.concat([b.ints(head), b.reshape(pairs, [-1])], axis=0)


def build_conv2d_row(b: Builder, spec: ConvSpec, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]) -> None:
    """A 1-D conv as a 2-D conv on the row `[N, C, 1, T]` with a `[1, k]` kernel."""
    build_as_2d_conv(b, spec, inputs, outputs, unit_axis=2)


def build_conv2d_column(b: Builder, spec: ConvSpec, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]) -> None:
    """A 1-D conv as a 2-D conv on the column `[N, C, T, 1]` with a `[k, 1]` kernel."""
    build_as_2d_conv(b, spec, inputs, outputs, unit_axis=3)


def build_as_2d_conv(
    b: Builder, spec: ConvSpec, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable], unit_axis: int
) -> None:
    """Unsqueeze a unit spatial axis at `unit_axis` (2 or 3), Conv in 2-D, Squeeze it away.

    The unit axis gets kernel 1, stride 1, dilation 1 and no pads, so it maps 1 to 1; the other
    axis gets the 1-D conv's attributes, and the weight `[M, C/G, k]` the unit axis too; group and
    bias stay. Pads that are only known at run time (SAME_* on a symbolic length) stay `auto_pad`:
    SAME_* gives the unit axis zero pads, so the 2-D conv pads the length exactly as the 1-D one.
    Which of the 1-D conv, the row and the column runs fastest depends on the runtime's kernels and
    the shape: the tuner times them.
    """
    x, weight, bias = operands(spec, inputs)

    def placed(value: int, unit: int) -> list[int]:
        """A 2-D attribute: `unit` on the unit axis, `value` (the 1-D conv's) on the other."""
        return [unit, value] if unit_axis == 2 else [value, unit]

    (kernel,), (stride,), (dilation,) = spec.kernel_shape, spec.strides, spec.dilations
    attrs: dict = {
        "kernel_shape": placed(kernel, 1),
        "strides": placed(stride, 1),
        "dilations": placed(dilation, 1),
        "group": spec.group,
    }
    if spec.pads_known:
        begin, end = spec.resolved_pads
        attrs["pads"] = placed(begin, 0) + placed(end, 0)
    else:
        attrs["auto_pad"] = spec.auto_pad
    w = rearranged(b, weight, Reshape((spec.out_channels, spec.in_per_group, *placed(kernel, 1))))
    y = b.op("Conv", [b.unsqueeze(x, [unit_axis]), w, *([bias] if bias is not None else [])], attrs)
    b.squeeze(y, [unit_axis], out=outputs[0])


VARIANTS = (
    SimpleVariant("native", why_not_native, build_native, "Conv with explicit, resolved attributes"),
    SimpleVariant("im2col", why_not_unknown_pads, build_im2col, "Pad + slices + Concat + Reshape + MatMul"),
    SimpleVariant("shift_matmul", why_not_unknown_pads, build_shift_matmul, "sum over taps of MatMul on the shifted input"),
    SimpleVariant("einsum", why_not_einsum, build_einsum, "Einsum over stacked shifted windows"),
    SimpleVariant("pointwise_matmul", why_not_pointwise, build_shift_matmul, "1x1 kernels: one MatMul"),
    SimpleVariant("depthwise_shift", why_not_depthwise, build_depthwise_shift, "group == channels: sum of shifted Mul"),
    SimpleVariant(
        "patchify_matmul", why_not_patchify, build_patchify_matmul, "stride == kernel, no pads: patches + one MatMul"
    ),
    SimpleVariant("conv2d_row", why_not_2d_layout, build_conv2d_row, "1-D Conv as a 2-D Conv on a [1, T] row"),
    SimpleVariant("conv2d_column", why_not_2d_layout, build_conv2d_column, "1-D Conv as a 2-D Conv on a [T, 1] column"),
)

FAMILY = OpFamily("Conv", "", make_spec, VARIANTS)
