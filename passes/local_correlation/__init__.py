"""`convlower.LocalCorrelation`: local correlation (cost volumes, local attention scores), and its
lowerings to standard ONNX ops.

The cost volume of stereo matching and optical flow (FlowNetC and PWC-Net correlation, GwcNet's
group-wise correlation) and the q·k step of local attention compare each position of A with the
positions of B around it. For A and B `[N, C, *S]` (1 to 3 spatial axes), K displacements `δ_k`
in row-major order (first axis slowest) and G channel groups:

    Y[n, g, k, p] = scale · reduce_{c in group g} A[n, c, p] · B[n, c, p + δ_k]        Y: [N, G, K, *S]

where `reduce` is the sum or the mean over the group's C/G channels, and B reads as zero outside
its extent (as DynamicFilter reads its padded X): Y is zero where `p + δ_k` falls outside B (for
finite A). It is the transpose of DynamicFilter: the sum runs over channels, not over the window.

The node's attributes (DESIGN.md, "Canonical dynamic-filter op"):

    displacement_first  ints, one per spatial axis: the first displacement (may be negative)
    displacement_last   ints, one per spatial axis: the last one, included; last - first must be
                        a multiple of the step (an axis with no displacement: first = last = 0)
    displacement_step   ints, one per spatial axis, not 0; default all 1. Displacement o on an
                        axis is first + o·step: a negative step runs them in descending order
    groups              int G, C % G == 0; default 1
    reduction           string "mean" or "sum" over each group's channels; default "mean"
    scale               float, a constant factor on every output; default 1.0

so a GwcNet cost volume of 48 disparities over 40 groups, whose disparity d (the left image
against the right one d pixels to the left) is `Y[:, :, d]`, is `displacement_first=[0, 0],
displacement_last=[0, -47], displacement_step=[1, -1], groups=40`, and FlowNetC's 21x21 window
of stride 2 is `displacement_first=[-20, -20], displacement_last=[20, 20], displacement_step=[2, 2]`.

Rewrites (K displacements, D = the band axis's displacements, W' = W + (D - 1)·|step|):

    shift_mul_reduce    LocalCorrelation → Mul? ∘ Reshape ∘ Pad ∘ (Slice ∘ Mul ∘ ReduceSum|ReduceMean)×K ∘ Concat
    stacked_mul_reduce  LocalCorrelation → Mul? ∘ Reshape ∘ Pad ∘ (Slice ∘ Unsqueeze)×K ∘ Concat ∘ Mul ∘ ReduceSum
    banded_matmul       LocalCorrelation → Mul? ∘ Reshape ∘ Pad ∘ Transpose
                                           ∘ (Slice ∘ MatMul[W×W'] ∘ Reshape ∘ Pad ∘ Reshape ∘ Slice)×(K/D) ∘ Concat ∘ Transpose

Every lowering groups the channels (`[N, G, C/G, *S]`, a free Reshape) and pads B once, by the
window's reach on each side (cropped where the window does not include 0), so that displacement
δ reads the padded B at offset δ - min(first, last): the tap windows of a kernel with one tap per
displacement (`tap_windows`), already of A's spatial shape, taken in descending order along an
axis of negative step.

- `shift_mul_reduce` multiplies A by each shifted B and reduces the group's channels, one
  displacement at a time; its outputs are concatenated on the K axis. It is also the body of the
  op's model-local function, since it runs for any shape and dtype.
- `stacked_mul_reduce` stacks the K shifted B into one `[N, G, C/G, K, *S]` tensor and contracts
  it with A by one broadcast Mul and one ReduceSum. One Einsum in their place was measured on
  onnxruntime's CPU provider (1.31, 2 threads) and lost 2.4-8.5x at GwcNet-like stereo shapes and
  3.5x at a 5x5 local-attention window; it won 1.4x only at PWC-Net's 81 taps, where
  `banded_matmul` is more than 10x faster than either. It does not apply where the stack would
  take more than `STACK_LIMIT_BYTES`.
- `banded_matmul` is the GEMM form. Along the band axis (the last axis with more than one
  displacement) it computes all pairs, `A^T [W, C/G] @ B_padded [C/G, W']` per row, and gathers the
  diagonal band by the skew of relative-position attention: the `[W, W']` product flattened,
  padded by W, viewed as `[W, W' + 1]` shifts row p left by p, so that displacement δ is column
  δ - min(first, last) of every row (one Gather of the band from the flattened product instead was measured
  1.3-2.6x slower). Displacements on the other axes (the vertical offsets of a 2-D flow window)
  each take a slice of B and a MatMul of their own. It computes W'/D times the products the band
  needs, in one GEMM instead of elementwise: it does not apply where that is more than
  `BAND_WASTE_LIMIT` times.

Measured (benchmarks/bench_local_correlation.py, onnxruntime's CPU provider, 2 threads), against
the function body: `banded_matmul` wins wherever each group has several channels (4x at a GwcNet
volume of 8 groups, 12x at PWC-Net's 81 taps, 20x at FlowNetC's 441, 3.8x on a 3x3x3 video
window); with one channel per group its MatMuls are outer products and `stacked_mul_reduce` wins;
on a long 1-D sliding window only the shifts apply.

A mean divides by C/G: `shift_mul_reduce` reduces with ReduceMean and multiplies A once by
`scale`, the others multiply A once by `scale / (C/G)` before the products (A is smaller than Y
wherever G·K > C). Every variant works at spatial ranks 1 to 3 and with symbolic batch, channel
and spatial dims, what a Reshape target or a Pad needs of an unknown dim read off `Shape` at run
time. The function body, which knows no dtype, casts a scale like A at run time (CastLike): a
scale other than 1 needs opset 15 there.

A recognizer that finds a correlation in an exported graph emits the canonical node with
`emit_local_correlation(builder, a, b, Correlation(...))`, which also gives the graph the body.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..base import (
    SLICE_TO_END,
    Builder,
    Dim,
    NotLowerable,
    OpFamily,
    SimpleVariant,
    applies_to_any_shape,
    attr_text,
    float_dtype,
    onnx_dtype,
    spec_key,
    static_shape,
    tap_windows,
)
from ..dynamic_filter import dims_or_shape, shape_vector
from ..local_functions import DOMAIN, CanonicalOp, add_function, register_canonical_op

OP_TYPE = "LocalCorrelation"
REDUCTIONS = ("mean", "sum")
STACK_LIMIT_BYTES = 1 << 30
"""`stacked_mul_reduce` applies while its stack of K shifted copies of B takes at most this much memory."""
BAND_WASTE_LIMIT = 16
"""`banded_matmul` applies while its all-pairs product computes at most this many times the
products of the band (W'/D); beyond that its GEMM does mostly wasted work."""


@dataclass(frozen=True)
class Correlation:
    """What a LocalCorrelation node computes: its attributes with every default resolved."""

    first: tuple[int, ...]
    last: tuple[int, ...]
    step: tuple[int, ...]
    groups: int = 1
    reduction: str = "mean"
    scale: float = 1.0

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> "Correlation":
        """Read node attributes; raises ValueError naming what is missing or wrong."""
        for name in ("displacement_first", "displacement_last"):
            if name not in attrs:
                raise ValueError(f"{name} is required")
        first = _ints(attrs["displacement_first"], "displacement_first")
        step = _ints(attrs.get("displacement_step", [1] * len(first)), "displacement_step")
        groups = attrs.get("groups", 1)
        if not isinstance(groups, (int, np.integer)) or isinstance(groups, bool):
            raise ValueError(f"groups={groups!r} is not an integer")
        scale = attrs.get("scale", 1.0)
        if not isinstance(scale, (float, int, np.floating)) or isinstance(scale, bool):
            raise ValueError(f"scale={scale!r} is not a number")
        correlation = cls(
            first, _ints(attrs["displacement_last"], "displacement_last"), step,
            int(groups), attr_text(attrs.get("reduction", "mean")), float(scale),
        )
        correlation.validate()
        return correlation

    def validate(self) -> None:
        rank = self.rank
        if rank < 1:
            raise ValueError("displacement_first is empty")
        if len(self.last) != rank or len(self.step) != rank:
            raise ValueError(
                f"displacement_first has {rank} axes but displacement_last, displacement_step have "
                f"{len(self.last)}, {len(self.step)} values"
            )
        if 0 in self.step:
            raise ValueError(f"displacement_step {list(self.step)} has a 0")
        for axis, (first, last, step) in enumerate(zip(self.first, self.last, self.step)):
            if (last - first) % step or (last - first) // step < 0:
                raise ValueError(
                    f"axis {axis}: displacements {first}..{last} step {step} do not end on the last one "
                    "(last must be first plus a non-negative multiple of the step)"
                )
        if self.groups < 1:
            raise ValueError(f"groups={self.groups} must be positive")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction {self.reduction!r} is not one of {', '.join(REDUCTIONS)}")
        if not math.isfinite(self.scale):
            raise ValueError(f"scale={self.scale} is not finite")

    @property
    def rank(self) -> int:
        return len(self.first)

    @property
    def counts(self) -> tuple[int, ...]:
        """Displacements per spatial axis."""
        return tuple((last - first) // step + 1 for first, last, step in zip(self.first, self.last, self.step))

    @property
    def taps(self) -> int:
        """K: the number of displacements, the extent of Y's axis 2."""
        return math.prod(self.counts)

    @property
    def lowest(self) -> tuple[int, ...]:
        """Per axis, the least displacement: first, or last where the step is negative."""
        return tuple(min(first, last) for first, last in zip(self.first, self.last))

    @property
    def highest(self) -> tuple[int, ...]:
        return tuple(max(first, last) for first, last in zip(self.first, self.last))

    @property
    def reaches(self) -> tuple[int, ...]:
        """Per axis, how far the displacements spread: (count - 1)·|step|, what padding adds to B."""
        return tuple(high - low for low, high in zip(self.lowest, self.highest))

    def attrs(self) -> dict[str, Any]:
        return {
            "displacement_first": list(self.first),
            "displacement_last": list(self.last),
            "displacement_step": list(self.step),
            "groups": self.groups,
            "reduction": self.reduction,
            "scale": self.scale,
        }

    def overload(self) -> str:
        """A readable name of these attributes, used as the function overload: equal names, equal bodies."""
        window = "x".join(f"{f}..{l}s{s}" for f, l, s in zip(self.first, self.last, self.step))
        scale = f"_scale{float(np.float32(self.scale)):.9g}" if self.scale != 1.0 else ""  # as the float attribute holds it
        return f"{window}_g{self.groups}_{self.reduction}{scale}"


def _ints(values: Any, name: str) -> tuple[int, ...]:
    ints = tuple(values) if isinstance(values, (list, tuple, np.ndarray)) else (values,)
    if any(not isinstance(v, (int, np.integer)) or isinstance(v, bool) for v in ints):
        raise ValueError(f"{name} {list(ints)} is not a list of integers")
    return tuple(int(v) for v in ints)


def resolved_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    return Correlation.from_attrs(attrs).attrs()


def overload_name(attrs: Mapping[str, Any]) -> str:
    return Correlation.from_attrs(attrs).overload()


@dataclass(frozen=True)
class LocalCorrelationSpec:
    """One LocalCorrelation node: A and B `[N, C, *S]`, dims None where symbolic."""

    op: str
    dtype: str | None
    batch: Dim
    channels: Dim
    spatial: tuple[Dim, ...]
    correlation: Correlation

    def key(self) -> str:
        return spec_key(self)

    @property
    def group_channels(self) -> Dim:
        """C / G: the channels each output sums over."""
        return None if self.channels is None else self.channels // self.correlation.groups

    @property
    def band_axis(self) -> int:
        """The spatial axis `banded_matmul` gathers its band along: the last with more than one
        displacement (so the per-offset blocks concatenate in row-major order), else the last."""
        counts = self.correlation.counts
        return max((axis for axis, count in enumerate(counts) if count > 1), default=len(counts) - 1)


def make_spec(node: gs.Node, opset: int) -> LocalCorrelationSpec:
    """Read a LocalCorrelation node; raises NotLowerable with the reason it cannot be described."""
    if len(node.inputs) != 2:
        raise NotLowerable(f"LocalCorrelation takes 2 inputs (A, B), this node has {len(node.inputs)}")
    try:
        correlation = Correlation.from_attrs(node.attrs)
    except ValueError as exc:
        raise NotLowerable(f"LocalCorrelation attributes: {exc}") from exc
    a, b = node.inputs
    rank = correlation.rank
    a_shape, b_shape = static_shape(a), static_shape(b)
    for name, shape in (("A", a_shape), ("B", b_shape)):
        if shape is None or len(shape) != rank + 2:
            raise NotLowerable(f"{name} must have rank {rank + 2} for a {rank}-D displacement window; its shape is {shape}")
    assert a_shape is not None and b_shape is not None
    if any(x is not None and y is not None and x != y for x, y in zip(a_shape, b_shape)):
        raise NotLowerable(f"A and B must have one shape; they are {list(a_shape)} and {list(b_shape)}")
    if onnx_dtype(a) is not None and onnx_dtype(b) is not None and onnx_dtype(a) != onnx_dtype(b):
        raise NotLowerable("A and B have different element types")
    shape = tuple(x if x is not None else y for x, y in zip(a_shape, b_shape))
    if shape[1] is not None and shape[1] % correlation.groups:
        raise NotLowerable(f"C={shape[1]} is not a multiple of groups={correlation.groups}")
    return LocalCorrelationSpec(node.op, float_dtype(a), shape[0], shape[1], shape[2:], correlation)


def generic_spec(correlation: Correlation) -> LocalCorrelationSpec:
    """The spec of the function body: only the attributes are known."""
    return LocalCorrelationSpec(OP_TYPE, None, None, None, (None,) * correlation.rank, correlation)


# --- building blocks ------------------------------------------------------------------------------------


def _grouped(b: Builder, spec: LocalCorrelationSpec, x: gs.Tensor) -> gs.Tensor:
    """`[N, C, *S]` as `[N, G, C/G, *S]`: each group's channels on an axis of their own."""
    if spec.correlation.groups == 1:
        return b.unsqueeze(x, [1])
    spatial = dims_or_shape(b, spec.spatial, x, 2)
    group_channels = spec.group_channels if spec.group_channels is not None else -1
    return b.reshape(x, shape_vector(b, [0, spec.correlation.groups, group_channels, *spatial]))


def displaced(b: Builder, x: gs.Tensor, correlation: Correlation, first_axis: int) -> gs.Tensor:
    """B zero-padded and cropped on its spatial axes (from `first_axis` on) so that index i reads
    position i + lowest: extent S + reach, and displacement δ is offset δ - lowest. Pads by the
    window's reach beyond B on each side; crops where the window does not include 0."""
    r, lead = correlation.rank, [0] * first_axis
    before = [max(0, -low) for low in correlation.lowest]
    after = [max(0, high) for high in correlation.highest]
    padded = b.pad(x, lead + before + lead + after)
    crop_start = [max(0, low) for low in correlation.lowest]
    crop_end = [max(0, -high) for high in correlation.highest]
    axes = [i for i in range(r) if crop_start[i] or crop_end[i]]
    if not axes:
        return padded
    return b.slice(
        padded, [crop_start[i] for i in axes], [-crop_end[i] or SLICE_TO_END for i in axes], [first_axis + i for i in axes]
    )


def shifted(b: Builder, displaced_b: gs.Tensor, correlation: Correlation, first_axis: int) -> list[gs.Tensor]:
    """B at `p + δ_k` for every position p of A, one tensor per displacement in row-major order:
    the tap windows of a kernel with one tap per displacement, spaced |step| apart."""
    return displacement_order(
        tap_windows(b, displaced_b, correlation.counts, (1,) * correlation.rank, [abs(s) for s in correlation.step], first_axis),
        correlation.counts, correlation.step,
    )


def displacement_order(windows: list[gs.Tensor], counts: Sequence[int], steps: Sequence[int]) -> list[gs.Tensor]:
    """Tap windows (offsets ascending on every axis, row-major) in the order of the displacements:
    descending along the axes of negative step."""
    descending = tuple(axis for axis, step in enumerate(steps) if step < 0)
    if not descending:
        return windows
    order = np.flip(np.arange(len(windows)).reshape(tuple(counts)), axis=descending).ravel()
    return [windows[i] for i in order]


def _typed_scalar(b: Builder, value: float, like: gs.Tensor, dtype: str | None) -> gs.Tensor:
    """A scalar constant of `dtype`, or, where the dtype is not known (a function body), cast like
    `like` at run time (CastLike, opset 15)."""
    if dtype is not None:
        return b.const(np.asarray(value, dtype=dtype), "scalar")
    if b.opset < 15:
        raise ValueError(f"a scale other than 1 needs opset 15 or later in the function body (CastLike); the model has {b.opset}")
    return b.op("CastLike", [b.const(np.asarray(value, dtype=np.float32), "scalar"), like])


def _prescaled(b: Builder, spec: LocalCorrelationSpec, a: gs.Tensor) -> gs.Tensor:
    """A times everything the channel sum must be multiplied by: scale, and 1/(C/G) for a mean
    (C/G read off A's shape at run time where C is symbolic). A is smaller than Y when G·K > C."""
    corr = spec.correlation
    if corr.reduction == "sum" or spec.group_channels is not None:
        factor = corr.scale / (spec.group_channels if corr.reduction == "mean" else 1)  # type: ignore[operator]
        return a if factor == 1.0 else b.mul(a, _typed_scalar(b, factor, a, spec.dtype))
    channels = b.op("Div", [b.shape(a, 1, 2), b.ints([corr.groups])])
    count = b.op("Cast", [channels], {"to": onnx.helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype))})
    return b.mul(a, b.op("Div", [_typed_scalar(b, corr.scale, a, spec.dtype), count]))


def _reduce_channels(b: Builder, x: gs.Tensor, mean: bool) -> gs.Tensor:
    """The group's channels (axis 2) summed or averaged, kept as an axis of extent 1: the K axis."""
    if not mean:
        return b.reduce_sum(x, [2], keepdims=True)
    if b.opset >= 18:
        return b.op("ReduceMean", [x, b.ints([2])], {"keepdims": 1})
    return b.op("ReduceMean", [x], {"axes": [2], "keepdims": 1})


# --- variants --------------------------------------------------------------------------------------------


def build_shift_mul_reduce(
    b: Builder, spec: LocalCorrelationSpec, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]
) -> None:
    """Pad B once, then per displacement: its Slice times A (scaled once), the group's channels
    reduced; the K results concatenated on axis 2. Shape- and dtype-generic: the function body."""
    a, b_in = inputs
    corr = spec.correlation
    if corr.scale != 1.0:
        a = b.mul(a, _typed_scalar(b, corr.scale, a, spec.dtype))
    a_grouped = _grouped(b, spec, a)
    windows = shifted(b, displaced(b, _grouped(b, spec, b_in), corr, first_axis=3), corr, first_axis=3)
    reduced = [_reduce_channels(b, b.mul(a_grouped, window), corr.reduction == "mean") for window in windows]
    b.concat(reduced, axis=2, out=outputs[0])


def build_stacked_mul_reduce(
    b: Builder, spec: LocalCorrelationSpec, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]
) -> None:
    """The K shifted B stacked into `[N, G, C/G, K, *S]`, times A `[N, G, C/G, 1, *S]`, summed over C/G."""
    a, b_in = inputs
    corr = spec.correlation
    a_grouped = b.unsqueeze(_grouped(b, spec, _prescaled(b, spec, a)), [3])
    windows = shifted(b, displaced(b, _grouped(b, spec, b_in), corr, first_axis=3), corr, first_axis=3)
    stacked = b.concat([b.unsqueeze(window, [3]) for window in windows], axis=3)
    b.reduce_sum(b.mul(stacked, a_grouped), [2], out=outputs[0])


def build_banded_matmul(
    b: Builder, spec: LocalCorrelationSpec, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]
) -> None:
    """All pairs along the band axis by MatMul, the band gathered by the skew; one MatMul per
    combination of displacements on the other axes."""
    a, b_in = inputs
    corr = spec.correlation
    r, band = corr.rank, spec.band_axis
    others = [axis for axis in range(r) if axis != band]
    # A^T: [N, G, *S_others, W, C/G]; B: [N, G, *S'_others, C/G, W'] (grouped axes: 0 N, 1 G, 2 C/G, 3.. spatial)
    a_rows = b.transpose(_grouped(b, spec, _prescaled(b, spec, a)), [0, 1, *(3 + i for i in others), 3 + band, 2])
    b_cols = b.transpose(
        displaced(b, _grouped(b, spec, b_in), corr, first_axis=3), [0, 1, *(3 + i for i in others), 2, 3 + band]
    )
    other_counts, other_steps = [corr.counts[i] for i in others], [corr.step[i] for i in others]
    blocks = tap_windows(b, b_cols, other_counts, [1] * len(others), [abs(s) for s in other_steps], first_axis=2)
    extent: int | gs.Tensor = spec.spatial[band] if spec.spatial[band] is not None else b.shape(a, 2 + band, 3 + band)
    bands = [_band(b, b.matmul(a_rows, block), extent, corr.reaches[band], corr.step[band], leading=2 + len(others))
             for block in displacement_order(blocks, other_counts, other_steps)]
    # [N, G, *S_others, W, K] back to [N, G, K, *S]
    position = {axis: 2 + j for j, axis in enumerate(others)} | {band: 2 + len(others)}
    b.transpose(b.concat(bands, axis=-1), [0, 1, 2 + r, *(position[axis] for axis in range(r))], out=outputs[0])


def _band(b: Builder, pairs: gs.Tensor, extent: int | gs.Tensor, reach: int, step: int, leading: int) -> gs.Tensor:
    """From all pairs `[..., W, W']` (row p: A at p against padded B at every column), the band
    `[..., W, D]`: columns p to p + reach of row p, every |step|-th, in the step's direction.
    Flattening the rows, padding W zeros at the end and viewing the result as rows of W' + 1
    shifts row p left by p (the skew of relative-position attention), so the band is columns
    `0, |step|, .. reach` of every row (from `reach` down to 0 for a negative step)."""
    flat = b.reshape(pairs, [0] * leading + [-1])
    pads: gs.Tensor
    if isinstance(extent, int):
        pads = b.ints([0] * (2 * leading + 1) + [extent])
    else:
        pads = b.concat([b.ints([0] * (2 * leading + 1)), extent], axis=0)
    skewed = b.op("Pad", [flat, pads], {"mode": "constant"})
    rows = b.reshape(skewed, shape_vector(b, [0] * leading + [extent, -1]))
    if step > 0:
        return b.slice(rows, [0], [reach + 1], [leading + 1], [step])
    return b.slice(rows, [reach], [-SLICE_TO_END], [leading + 1], [step])


def _stacked_why_not(spec: LocalCorrelationSpec) -> str | None:
    dims = (spec.batch, spec.channels, *spec.spatial)
    if any(d is None for d in dims) or spec.dtype is None:
        return None
    stack_bytes = math.prod(dims) * spec.correlation.taps * np.dtype(spec.dtype).itemsize  # type: ignore[arg-type]
    if stack_bytes > STACK_LIMIT_BYTES:
        return (
            f"its stack of K={spec.correlation.taps} shifted copies of B would take {stack_bytes / 2**30:.1f} GiB "
            f"(more than {STACK_LIMIT_BYTES / 2**30:.0f} GiB)"
        )
    return None


def _banded_matmul_why_not(spec: LocalCorrelationSpec) -> str | None:
    corr, band = spec.correlation, spec.band_axis
    extent = spec.spatial[band]
    if extent is None:
        return None
    count = corr.counts[band]
    columns = extent + corr.reaches[band]
    if columns > BAND_WASTE_LIMIT * count:
        return (
            f"the all-pairs MatMul along spatial axis {band} would compute {columns} columns per row for a band of "
            f"{count} displacement(s), {columns / count:.0f}x the work (more than {BAND_WASTE_LIMIT}x cannot pay)"
        )
    return None


VARIANTS = (
    SimpleVariant("shift_mul_reduce", applies_to_any_shape, build_shift_mul_reduce, "Pad B, then per displacement Slice * A, ReduceSum|Mean"),
    SimpleVariant("stacked_mul_reduce", _stacked_why_not, build_stacked_mul_reduce, "K shifted B stacked, one Mul * A, one ReduceSum"),
    SimpleVariant("banded_matmul", _banded_matmul_why_not, build_banded_matmul, "all pairs by MatMul per row, band by skew + Slice"),
)


def build_reference_body(
    b: Builder, attrs: Mapping[str, Any], inputs: Sequence[gs.Variable], outputs: Sequence[gs.Variable]
) -> None:
    """The model-local function body: shift_mul_reduce with no shape or dtype known, so it runs for any input."""
    build_shift_mul_reduce(b, generic_spec(Correlation.from_attrs(attrs)), inputs, outputs)


def emit_local_correlation(
    b: Builder, a: gs.Tensor, b_tensor: gs.Tensor, correlation: Correlation, out: gs.Variable | None = None
) -> gs.Variable:
    """One `convlower.LocalCorrelation` node computing `correlation` of A and B into `out` (or a
    new tensor typed like A, `[N, G, K, *S]`), with the function body the graph needs to run it:
    what a recognizer calls. The model exported from the graph needs `attach_functions` to set
    overloads when its LocalCorrelation nodes have several attribute sets."""
    correlation.validate()
    attrs = correlation.attrs()
    y = b.op(OP_TYPE, [a, b_tensor], attrs, domain=DOMAIN, out=out)
    if out is None:
        y.dtype = a.dtype
        y.shape = None if a.shape is None else [a.shape[0], correlation.groups, correlation.taps, *a.shape[2:]]
    add_function(b.graph, OP_TYPE, attrs, b.opset)
    return y


FAMILY = OpFamily(OP_TYPE, DOMAIN, make_spec, VARIANTS)
CANONICAL = register_canonical_op(CanonicalOp(OP_TYPE, ("A", "B"), resolved_attrs, overload_name, build_reference_body))
