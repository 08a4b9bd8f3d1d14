"""`convlower.DynamicFilter`: spatially variant filtering, and its lowerings to standard ONNX ops.

Filters that change per output position (kernel prediction networks, dynamic filter networks,
involution, CARAFE) compute, with `K = prod(kernel_shape)` taps in row-major order:

    Y[n, c, p] = sum_k Xpad[n, c, p * strides + k * dilations] * F[n, c // (C / G), k, p]

for X `[N, C, *S]`, F `[N, G, K, *S_out]` and Y `[N, C, *S_out]`. Written as unfold + einsum
(seed 000, method_1) onnxruntime spends most of its time gathering the unfolded copy; shift-sum
(method_2) multiplies each of the K shifted views by its filter plane and adds them, an order of
magnitude faster. The variants here are those formulations; `shift_sum` is also the body of the
op's model-local function, since it runs for any shape.

Every variant works at spatial ranks 1 to 3 (and more) and with symbolic batch and spatial dims
(and symbolic C and G, except `conv_unfold`, whose identity kernel has C groups): what a
Reshape target or a Gather index needs of an unknown dim is read off `Shape` at run time. Every
variant keeps the definition's NaN and ±inf pattern: ±inf or NaN in X or F gives exactly the
outputs that the sum of products gives (see `bounded` for how `conv_unfold` does).

The building blocks (padding, shifted slices, gathered windows, identity-kernel Conv) are shared
with the Unfold family in `unfold/`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from ..base import (
    Builder,
    Dim,
    NotLowerable,
    OpFamily,
    SimpleVariant,
    applies_to_any_shape,
    float_dtype,
    spec_key,
    static_shape,
    tap_windows,
)
from ..local_functions import DOMAIN, CanonicalOp, register_canonical_op

OP_TYPE = "DynamicFilter"
SPATIAL_LETTERS = "hwdvuts"
"""Einsum letters for spatial axes; the other letters of the equations never clash with these."""


@dataclass(frozen=True)
class SlidingWindow:
    """Where a kernel sits on the input, with ONNX Conv conventions and every default resolved."""

    kernel_shape: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]
    """ONNX order: the begin pad of every spatial axis, then the end pads."""

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> "SlidingWindow":
        """Read node attributes; raises ValueError naming what is missing or wrong."""
        if "kernel_shape" not in attrs:
            raise ValueError("kernel_shape is required")
        if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            raise ValueError("auto_pad is not supported; give explicit pads")
        kernel = tuple(int(k) for k in attrs["kernel_shape"])
        rank = len(kernel)
        window = cls(
            kernel,
            tuple(int(s) for s in attrs.get("strides", [1] * rank)),
            tuple(int(d) for d in attrs.get("dilations", [1] * rank)),
            tuple(int(p) for p in attrs.get("pads", [0] * 2 * rank)),
        )
        window.validate()
        return window

    def validate(self) -> None:
        rank = self.rank
        if rank < 1:
            raise ValueError("kernel_shape is empty")
        if len(self.strides) != rank or len(self.dilations) != rank or len(self.pads) != 2 * rank:
            raise ValueError(
                f"kernel_shape has {rank} axes but strides, dilations, pads have "
                f"{len(self.strides)}, {len(self.dilations)}, {len(self.pads)} values"
            )
        if min(self.kernel_shape + self.strides + self.dilations) < 1 or min(self.pads) < 0:
            raise ValueError("kernel_shape, strides and dilations must be positive and pads non-negative")

    @property
    def rank(self) -> int:
        return len(self.kernel_shape)

    @property
    def taps(self) -> int:
        """K: the number of kernel offsets."""
        return math.prod(self.kernel_shape)

    def offsets(self) -> list[tuple[int, ...]]:
        """Every kernel offset, row-major (the order of F's tap axis and of F.unfold's rows)."""
        return list(itertools.product(*(range(k) for k in self.kernel_shape)))

    def output_size(self, in_spatial: Sequence[Dim]) -> tuple[Dim, ...]:
        """Output extent per spatial axis (ONNX Conv formula); None where the input's is unknown."""
        return tuple(
            None if size is None else (size + self.pads[i] + self.pads[i + self.rank] - self.reach(i)) // self.strides[i] + 1
            for i, size in enumerate(in_spatial)
        )

    def reach(self, axis: int) -> int:
        """How many input positions one kernel spans along a spatial axis, dilation included."""
        return (self.kernel_shape[axis] - 1) * self.dilations[axis] + 1

    def attrs(self) -> dict[str, list[int]]:
        return {
            "kernel_shape": list(self.kernel_shape),
            "strides": list(self.strides),
            "dilations": list(self.dilations),
            "pads": list(self.pads),
        }

    def overload(self) -> str:
        """A readable name of this window, used as the function overload: equal names, equal bodies."""
        def join(values: Sequence[int]) -> str:
            return "x".join(map(str, values))

        return f"k{join(self.kernel_shape)}_s{join(self.strides)}_d{join(self.dilations)}_p{join(self.pads)}"


def resolved_attrs(attrs: Mapping[str, Any]) -> dict[str, list[int]]:
    return SlidingWindow.from_attrs(attrs).attrs()


def overload_name(attrs: Mapping[str, Any]) -> str:
    return SlidingWindow.from_attrs(attrs).overload()


@dataclass(frozen=True)
class WindowSpec:
    """A node that slides a window over X `[N, C, *S]` (DynamicFilter, Unfold); dims None where
    symbolic. The function bodies are built from a spec with only the window known."""

    op: str
    dtype: str | None
    batch: Dim
    channels: Dim
    in_spatial: tuple[Dim, ...]
    out_spatial: tuple[Dim, ...]
    window: SlidingWindow

    def key(self) -> str:
        return spec_key(self)


def window_spec_fields(node: gs.Node) -> dict[str, Any]:
    """The WindowSpec fields of a node: attributes resolved, X's shape and dtype read.
    Raises NotLowerable with the reason the node cannot be described."""
    try:
        window = SlidingWindow.from_attrs(node.attrs)
    except ValueError as exc:
        raise NotLowerable(f"{node.op} attributes: {exc}") from exc
    shape = static_shape(node.inputs[0])
    if shape is None or len(shape) != window.rank + 2:
        raise NotLowerable(f"X must have rank {window.rank + 2} for a {window.rank}-D kernel; its shape is {shape}")
    out_spatial = window.output_size(shape[2:])
    if any(o is not None and o < 1 for o in out_spatial):
        raise NotLowerable(f"the kernel does not fit the padded input: output extent {list(out_spatial)}")
    return dict(
        op=node.op,
        dtype=float_dtype(node.inputs[0]),
        batch=shape[0],
        channels=shape[1],
        in_spatial=shape[2:],
        out_spatial=out_spatial,
        window=window,
    )


def unknown_dims(window: SlidingWindow) -> dict[str, Any]:
    """WindowSpec fields with only the window known: what a function body is built for."""
    rank = window.rank
    return dict(dtype=None, batch=None, channels=None, in_spatial=(None,) * rank, out_spatial=(None,) * rank, window=window)


@dataclass(frozen=True)
class DynamicFilterSpec(WindowSpec):
    """One DynamicFilter node: G filter groups over X's channels."""

    groups: Dim

    @property
    def group_channels(self) -> Dim:
        """C / G: channels sharing one filter plane."""
        return None if self.channels is None or self.groups is None else self.channels // self.groups


def make_spec(node: gs.Node, opset: int) -> DynamicFilterSpec:
    """Read a DynamicFilter node; raises NotLowerable with the reason it cannot be described."""
    if len(node.inputs) != 2:
        raise NotLowerable(f"DynamicFilter takes 2 inputs (X, F), this node has {len(node.inputs)}")
    fields = window_spec_fields(node)
    window, channels, out_spatial = fields["window"], fields["channels"], fields["out_spatial"]
    f_shape = static_shape(node.inputs[1])
    if f_shape is None or len(f_shape) != window.rank + 3:
        raise NotLowerable(f"F must have rank {window.rank + 3} ([N, G, K, *S_out]); its shape is {f_shape}")
    groups, taps = f_shape[1], f_shape[2]
    if taps is not None and taps != window.taps:
        raise NotLowerable(f"F has {taps} taps on axis 2, kernel_shape {list(window.kernel_shape)} has {window.taps}")
    if channels is not None and groups is not None and channels % groups:
        raise NotLowerable(f"C={channels} is not a multiple of the filter groups G={groups}")
    if any(o is not None and f is not None and o != f for o, f in zip(out_spatial, f_shape[3:])):
        raise NotLowerable(f"F's spatial extent {list(f_shape[3:])} is not the output extent {list(out_spatial)}")
    fields["out_spatial"] = tuple(o if o is not None else f for o, f in zip(out_spatial, f_shape[3:]))
    return DynamicFilterSpec(**fields, groups=groups)


def generic_spec(window: SlidingWindow) -> DynamicFilterSpec:
    """The spec of the function body: only the window is known."""
    return DynamicFilterSpec(op=OP_TYPE, **unknown_dims(window), groups=None)


# --- building blocks, shared with unfold/ ---------------------------------------------------------


def shape_vector(b: Builder, parts: Sequence[int | gs.Tensor]) -> gs.Tensor:
    """A 1-D int64 shape from ints and 1-D int64 tensors (read off Shape): a constant when all are ints."""
    pieces: list[gs.Tensor] = []
    run: list[int] = []
    for part in parts:
        if isinstance(part, gs.Tensor):
            if run:
                pieces.append(b.ints(run))
                run = []
            pieces.append(part)
        else:
            run.append(int(part))
    if run:
        pieces.append(b.ints(run))
    return b.concat(pieces, axis=0)


def dims_or_shape(b: Builder, dims: Sequence[Dim], tensor: gs.Tensor, start: int) -> list[int | gs.Tensor]:
    """`dims` when all are known, else the matching slice of `tensor`'s runtime shape from `start` on."""
    if all(d is not None for d in dims):
        return [int(d) for d in dims]  # type: ignore[arg-type]
    return [b.shape(tensor, start)]


def pad_spatial(b: Builder, x: gs.Tensor, window: SlidingWindow, leading_axes: int) -> gs.Tensor:
    """Zero-pad the trailing spatial axes of a tensor with `leading_axes` axes before them."""
    r = window.rank
    return b.pad(x, [0] * leading_axes + list(window.pads[:r]) + [0] * leading_axes + list(window.pads[r:]))


def shifted_windows(b: Builder, padded: gs.Tensor, window: SlidingWindow, first_axis: int) -> list[gs.Tensor]:
    """One strided slice of the padded input per kernel tap: what that tap multiplies, at every output."""
    return tap_windows(b, padded, window.kernel_shape, window.strides, window.dilations, first_axis)


def stacked_windows(b: Builder, padded: gs.Tensor, window: SlidingWindow, first_axis: int) -> gs.Tensor:
    """The unfolded input `[..., K, *S_out]`: the shifted windows stacked on a new tap axis."""
    taps = [b.unsqueeze(tap, [first_axis]) for tap in shifted_windows(b, padded, window, first_axis)]
    return b.concat(taps, axis=first_axis)


def output_extents(b: Builder, window: SlidingWindow, x: gs.Tensor, out_spatial: Sequence[Dim]) -> list[int | gs.Tensor]:
    """The output extent per spatial axis: the int where it is known, else a 1-element int64 tensor
    computed at run time from X's shape by the Conv formula `(S + pads - reach + stride) // stride`."""
    extents: list[int | gs.Tensor] = []
    for i, known in enumerate(out_spatial):
        if known is not None:
            extents.append(int(known))
            continue
        extent: gs.Tensor = b.shape(x, 2 + i, 3 + i)
        offset = window.pads[i] + window.pads[i + window.rank] - window.reach(i) + window.strides[i]
        if offset:
            extent = b.add(extent, b.ints([offset]))
        if window.strides[i] != 1:
            extent = b.op("Div", [extent, b.ints([window.strides[i]])])
        extents.append(extent)
    return extents


def gathered_windows(
    b: Builder, padded: gs.Tensor, window: SlidingWindow, out_spatial: Sequence[int | gs.Tensor], first_axis: int
) -> gs.Tensor:
    """The unfolded input `[..., K_1, .., K_r, S_1, .., S_r]` by one Gather per spatial axis,
    the way torch exports F.unfold: index `[k, p] = k * dilation + p * stride`. An extent given as
    a tensor (see `output_extents`) gets its index from Range at run time, as the TorchScript
    exporter computes it; a known one gets a constant index."""
    r = window.rank
    gathered = padded
    for i in range(r):
        taps = np.arange(window.kernel_shape[i], dtype=np.int64)[:, None] * window.dilations[i]
        extent = out_spatial[i]
        index: gs.Tensor | np.ndarray
        if isinstance(extent, gs.Tensor):
            zero, stride = b.const(np.asarray(0, np.int64), "zero"), b.const(np.asarray(window.strides[i], np.int64), "stride")
            limit = b.mul(b.squeeze(extent, [0]), stride)
            positions = b.op("Range", [zero, limit, stride])
            index = b.add(b.const(taps, "taps"), b.unsqueeze(positions, [0]))
        else:
            index = taps + np.arange(int(extent), dtype=np.int64)[None, :] * window.strides[i]
        gathered = b.op("Gather", [gathered, index], {"axis": first_axis + 2 * i})
    if r == 1:
        return gathered
    leading = list(range(first_axis))
    perm = leading + [first_axis + 2 * i for i in range(r)] + [first_axis + 2 * i + 1 for i in range(r)]
    return b.transpose(gathered, perm)


def identity_kernel(window: SlidingWindow, channels: int, dtype: np.dtype) -> np.ndarray:
    """Conv weights `[C*K, 1, *kernel]` that copy tap k of channel c to output channel c*K + k."""
    taps = np.eye(window.taps, dtype=dtype).reshape(window.taps, 1, *window.kernel_shape)
    return np.tile(taps, (channels, 1) + (1,) * window.rank)


def conv_windows(b: Builder, x: gs.Tensor, window: SlidingWindow, channels: int, scale: float = 1.0) -> gs.Tensor:
    """The unfolded input `[N, C*K, *S_out]`, times `scale`, by a grouped Conv with an identity kernel.

    The Conv multiplies every tap by its kernel entry, zeros included, so a ±inf or NaN in X
    turns the other K - 1 rows of each window it lies in to NaN (0 * inf): exact for finite X."""
    weights = b.const(scale * identity_kernel(window, channels, b.dtype), "identity_kernel")
    return b.op("Conv", [x, weights], {"group": channels, **window.attrs()})


def bounded(b: Builder, x: gs.Tensor) -> gs.Tensor:
    """X with ±inf replaced by ±max (the largest finite value), NaN and finite values kept.

    `conv_windows(bounded(x), scale=2)` reads the taps without ever computing 0 * inf: a ±max tap
    doubles to ±inf (overflow), every finite one to exactly 2x, so the rows hold 2x with ±inf
    where X is ±inf. (A finite value beyond max / 2 overflows too: ~1.7e38 in float32.)"""
    largest = float(np.finfo(b.dtype).max)
    clipped = b.op("Clip", [x, b.scalar(-largest), b.scalar(largest)])
    return b.op("Where", [b.op("IsInf", [x]), clipped, x])


# --- variants ---------------------------------------------------------------------------------------


def _grouped(b: Builder, spec: DynamicFilterSpec, x: gs.Tensor, f: gs.Tensor) -> gs.Tensor:
    """X as `[N, G, C/G, *S]`, so that F's `[N, G, 1, *S_out]` planes broadcast over each group."""
    if spec.groups == 1:
        return b.unsqueeze(x, [1])
    spatial = dims_or_shape(b, spec.in_spatial, x, 2)
    return b.reshape(x, shape_vector(b, [0, *_group_dims(b, spec, f), *spatial]))


def _group_dims(b: Builder, spec: DynamicFilterSpec, f: gs.Tensor) -> list[int | gs.Tensor]:
    """G and C/G for a Reshape target: ints where known, else G read off F's shape and C/G as -1."""
    groups: int | gs.Tensor = spec.groups if spec.groups is not None else b.shape(f, 1, 2)
    return [groups, spec.group_channels if spec.group_channels is not None else -1]


def _ungrouped(b: Builder, spec: DynamicFilterSpec, y: gs.Tensor, out: gs.Variable) -> None:
    """`[N, G, C/G, *S_out]` back to `[N, C, *S_out]`, written to the node's output."""
    if spec.groups == 1:
        b.squeeze(y, [1], out=out)
        return
    spatial = dims_or_shape(b, spec.out_spatial, y, 3)
    b.reshape(y, shape_vector(b, [0, -1, *spatial]), out=out)


def build_shift_sum(b: Builder, spec: DynamicFilterSpec, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]) -> None:
    """Seed 000 method_2: Pad, then for each tap a strided Slice times that tap's filter plane, summed."""
    x, f = inputs
    padded = pad_spatial(b, _grouped(b, spec, x, f), spec.window, leading_axes=3)
    products = [
        b.mul(tap, b.slice(f, [k], [k + 1], [2]))
        for k, tap in enumerate(shifted_windows(b, padded, spec.window, first_axis=3))
    ]
    _ungrouped(b, spec, b.sum(products), outputs[0])


def _unfolded_sum(
    b: Builder, spec: DynamicFilterSpec, columns: gs.Tensor, f: gs.Tensor, out: gs.Variable, *, einsum: bool, scale: float = 1.0
) -> None:
    """Given the unfolded input `[N, C, K..., *S_out]` (any grouping of C and K axes, the output's
    spatial axes last), weight it by F and sum the taps: one Einsum, or a broadcast Mul and a
    ReduceSum; then times `scale`. Unknown extents are read off the columns' shape at run time."""
    r = spec.window.rank
    spatial = dims_or_shape(b, spec.out_spatial, columns, -r)
    columns = b.reshape(columns, shape_vector(b, [0, *_group_dims(b, spec, f), spec.window.taps, *spatial]))
    if einsum:
        s = SPATIAL_LETTERS[:r]
        weighted = b.einsum(f"ngck{s},ngk{s}->ngc{s}", [columns, f])
    else:
        weighted = b.reduce_sum(b.mul(columns, b.unsqueeze(f, [2])), [3])
    if scale != 1.0:
        weighted = b.mul(weighted, b.scalar(scale))
    _ungrouped(b, spec, weighted, out)


def build_unfold_einsum(
    b: Builder, spec: DynamicFilterSpec, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]
) -> None:
    """Seed 000 method_1, as torch exports it: unfold by Pad + Gather per axis, then one Einsum."""
    x, f = inputs
    padded = pad_spatial(b, x, spec.window, leading_axes=2)
    extents = output_extents(b, spec.window, x, spec.out_spatial)
    columns = gathered_windows(b, padded, spec.window, extents, first_axis=2)
    _unfolded_sum(b, spec, columns, f, outputs[0], einsum=True)


def build_conv_unfold(
    b: Builder, spec: DynamicFilterSpec, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]
) -> None:
    """Unfold by an identity-kernel grouped Conv (onnxruntime's fast im2col), then Mul + ReduceSum.

    The Conv reads X with ±inf bounded and a kernel of 2s (see `bounded`), and the sum is halved,
    so ±inf taps stay ±inf (a plain identity Conv would make their windows NaN); a NaN tap still
    spreads over its windows' rows, which changes nothing: every output it is summed into is NaN,
    as the definition has it."""
    x, f = inputs
    columns = conv_windows(b, bounded(b, x), spec.window, int(spec.channels), scale=2.0)  # type: ignore[arg-type]
    _unfolded_sum(b, spec, columns, f, outputs[0], einsum=False, scale=0.5)


def build_concat_shifts(
    b: Builder, spec: DynamicFilterSpec, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]
) -> None:
    """Unfold by Concat of the shifted slices (one copy, no index tensors), then Mul + ReduceSum."""
    x, f = inputs
    columns = stacked_windows(b, pad_spatial(b, x, spec.window, leading_axes=2), spec.window, first_axis=2)
    _unfolded_sum(b, spec, columns, f, outputs[0], einsum=False)


def build_nhwc_shift_sum(
    b: Builder, spec: DynamicFilterSpec, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]
) -> None:
    """shift_sum in channels-last layout: X `[N, *S, G, C/G]` and F `[K, N, *S_out, G, 1]`, so each
    tap's filter plane is one contiguous block and the channels it scales are innermost."""
    x, f = inputs
    r = spec.window.rank
    spatial = list(range(3, 3 + r))
    in_spatial = dims_or_shape(b, spec.in_spatial, x, 2)
    grouped = b.reshape(x, shape_vector(b, [0, *_group_dims(b, spec, f), *in_spatial]))
    channels_last = b.transpose(grouped, [0, *spatial, 1, 2])
    padded = b.pad(channels_last, [0, *spec.window.pads[:r], 0, 0, 0, *spec.window.pads[r:], 0, 0])
    planes = b.transpose(b.unsqueeze(f, [3]), [2, 0, *(a + 1 for a in spatial), 1, 3])
    products = [
        b.mul(tap, b.squeeze(b.slice(planes, [k], [k + 1], [0]), [0]))
        for k, tap in enumerate(shifted_windows(b, padded, spec.window, first_axis=1))
    ]
    channels_first = b.transpose(b.sum(products), [0, r + 1, r + 2, *range(1, r + 1)])
    out_spatial = dims_or_shape(b, spec.out_spatial, channels_first, 3)
    channels = spec.channels if spec.channels is not None else -1
    b.reshape(channels_first, shape_vector(b, [0, channels, *out_spatial]), out=outputs[0])


def conv_unfold_why_not(spec: WindowSpec) -> str | None:
    if spec.dtype != "float32":
        return f"onnxruntime's CPU Conv runs float32 only, not {spec.dtype}"
    if spec.channels is None:
        return "needs static channels (the identity kernel has C * K output channels)"
    return None


VARIANTS = (
    SimpleVariant("shift_sum", applies_to_any_shape, build_shift_sum, "Pad, then Slice * filter plane per tap, summed"),
    SimpleVariant("unfold_einsum", applies_to_any_shape, build_unfold_einsum, "Gather unfold + Einsum (seed 000 method_1)"),
    SimpleVariant("conv_unfold", conv_unfold_why_not, build_conv_unfold, "identity-kernel Conv unfold, Mul, ReduceSum"),
    SimpleVariant("concat_shifts", applies_to_any_shape, build_concat_shifts, "Concat of shifted slices, Mul, ReduceSum"),
    SimpleVariant("nhwc_shift_sum", applies_to_any_shape, build_nhwc_shift_sum, "shift_sum in channels-last layout"),
)


def build_reference_body(
    b: Builder, attrs: Mapping[str, Any], inputs: Sequence[gs.Variable], outputs: Sequence[gs.Variable]
) -> None:
    """The model-local function body: shift_sum with no shape known, so it runs for any input."""
    build_shift_sum(b, generic_spec(SlidingWindow.from_attrs(attrs)), inputs, outputs)


FAMILY = OpFamily(OP_TYPE, DOMAIN, make_spec, VARIANTS)
CANONICAL = register_canonical_op(CanonicalOp(OP_TYPE, ("X", "F"), resolved_attrs, overload_name, build_reference_body))
