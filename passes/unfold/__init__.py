"""The `convlower.Unfold` family: F.unfold as one canonical node, `[N, C, *S]` to `[N, C*K, L]`.

    Unfold → gather        Pad + Gather per axis + Transpose (as exported)
    Unfold → slice_concat  Pad + Slice per tap + Concat
    Unfold → conv_unfold   grouped Conv with an identity kernel (finite inputs)

Its recognizer (`recognize_unfold.py`) takes the exported F.unfolds that no other recognizer
consumed. F.fold needs none: both exporters already write it as the standard Col2Im.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import onnx_graphsurgeon as gs

from ..base import Builder, OpFamily, SimpleVariant, applies_to_any_shape
from ..dynamic_filter import (
    SlidingWindow,
    WindowSpec,
    conv_unfold_why_not,
    conv_windows,
    gathered_windows,
    output_extents,
    overload_name,
    pad_spatial,
    resolved_attrs,
    shape_vector,
    stacked_windows,
    unknown_dims,
    window_spec_fields,
)
from ..local_functions import DOMAIN, CanonicalOp, register_canonical_op

OP_TYPE = "Unfold"


@dataclass(frozen=True)
class UnfoldSpec(WindowSpec):
    """One Unfold node (F.unfold): X `[N, C, *S]` to `[N, C*K, L]`, rows channel-major."""


def make_unfold_spec(node: gs.Node, opset: int) -> UnfoldSpec:
    return UnfoldSpec(**window_spec_fields(node))


def _columns_out(b: Builder, spec: UnfoldSpec, unfolded: gs.Tensor, out: gs.Variable) -> None:
    """`[N, C, K..., *S_out]` (taps and positions each in row-major order, the K taps on one axis
    or on one per spatial axis) to `[N, C*K, L]`."""
    if spec.channels is not None:
        b.reshape(unfolded, [0, spec.channels * spec.window.taps, -1], out=out)
        return
    per_tap = b.reshape(unfolded, [0, 0, spec.window.taps, -1])
    b.reshape(per_tap, shape_vector(b, [0, -1, b.shape(per_tap, 3)]), out=out)


def build_gather(b: Builder, spec: UnfoldSpec, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]) -> None:
    """As torch exports it: Pad, one Gather per spatial axis (indices from Range at run time where
    an extent is symbolic), Transpose, Reshape."""
    padded = pad_spatial(b, inputs[0], spec.window, leading_axes=2)
    extents = output_extents(b, spec.window, inputs[0], spec.out_spatial)
    _columns_out(b, spec, gathered_windows(b, padded, spec.window, extents, first_axis=2), outputs[0])


def build_slice_concat(b: Builder, spec: UnfoldSpec, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]) -> None:
    """Pad, one strided Slice per tap, Concat on a new tap axis: no index tensors, any input size."""
    padded = pad_spatial(b, inputs[0], spec.window, leading_axes=2)
    _columns_out(b, spec, stacked_windows(b, padded, spec.window, first_axis=2), outputs[0])


def build_conv_unfold(b: Builder, spec: UnfoldSpec, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]) -> None:
    """A grouped Conv with an identity kernel writes tap k of channel c to row c*K + k.

    Exact for finite X only: the Conv's 0 * inf and 0 * NaN turn the other K - 1 rows of every
    window holding a ±inf or NaN to NaN. DynamicFilter's conv_unfold mends ±inf (see `bounded`)
    because a NaN tap makes its whole output NaN anyway; here each row is an output, and no single
    elementwise op after the Conv can tell a spread NaN from a read one. Branching on the input
    (`If`) would fix it at no cost, but onnx-graphsurgeon 0.6.1's toposort recurses forever on a
    graph holding both functions and subgraphs."""
    columns = conv_windows(b, inputs[0], spec.window, int(spec.channels))  # type: ignore[arg-type]
    b.reshape(columns, [0, 0, -1], out=outputs[0])


VARIANTS = (
    SimpleVariant("gather", applies_to_any_shape, build_gather, "Pad + Gather per axis + Transpose (as exported)"),
    SimpleVariant("slice_concat", applies_to_any_shape, build_slice_concat, "Pad + Slice per tap + Concat"),
    SimpleVariant(
        "conv_unfold", conv_unfold_why_not, build_conv_unfold, "grouped Conv with an identity kernel",
        caveat="spreads NaN and ±inf in X to the other columns of their window (the identity kernel computes 0·inf)",
    ),
)


def build_reference_body(
    b: Builder, attrs: Mapping[str, Any], inputs: Sequence[gs.Variable], outputs: Sequence[gs.Variable]
) -> None:
    """The model-local function body: slice_concat with no shape known, so it runs for any input."""
    build_slice_concat(b, UnfoldSpec(op=OP_TYPE, **unknown_dims(SlidingWindow.from_attrs(attrs))), inputs, outputs)


FAMILY = OpFamily(OP_TYPE, DOMAIN, make_unfold_spec, VARIANTS)
CANONICAL = register_canonical_op(CanonicalOp(OP_TYPE, ("X",), resolved_attrs, overload_name, build_reference_body))
