"""Col2Im (fold): scatter columns back into an image, summing where blocks overlap (seed 002).

Rewrites:

- `native`:    Col2Im → Col2Im with every attribute explicit and its shape inputs as constants.
- `shift_add`: Col2Im → Reshape ∘ Σ_k Slice/Pad(block offset k) per stride phase ∘ Concat ∘
  (DepthToSpace | Reshape·Transpose·Reshape) ∘ Slice? — every block offset's column is an image
  on the stride grid shifted by `k·dilation - pad`; cut and padded into place at the columns' own
  resolution, the offsets of each stride phase sum, and the phases interleave. The transpose of
  the shift-sum unfold, for runtimes and providers without a Col2Im kernel.

`window` (a Slice and a Pad that place a tensor in a window, zeros outside its data) and
`interleave` (stride phases into one image) are the scatter geometry ConvTranspose's variants share.

onnxruntime's CPU Col2Im (checked on 1.31) runs 1-D to 4-D images but gets only 2-D ones right
when a dilation is > 1 (`COL2IM_DILATION_BUG`); the ONNX spec asks for at least 2 spatial dims.
So `conv_transpose.col2im` lifts a 1-D node to 2-D through a unit axis and declines dilated 3-D
ones. `shift_add` computes the spec's result in every case: on a dilated 1-D or 3-D Col2Im it
disagrees with onnxruntime's own kernel, and it is onnxruntime that is wrong.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from .base import (
    Builder,
    Dim,
    NotLowerable,
    OpFamily,
    SimpleVariant,
    applies_to_any_shape,
    constant_value,
    float_dtype,
    non_negative_ints,
    positive_ints,
    spec_key,
    static_shape,
)

COL2IM_OPSET = 18
"""Col2Im's first opset."""

COL2IM_DILATION_BUG = "onnxruntime's CPU Col2Im (checked on 1.31) miscomputes dilated images that are not 2-D"
"""Its 2-D kernel is right; its N-D one misplaces taps when a dilation is > 1 (compared with onnx.reference)."""


@dataclass(frozen=True)
class Window:
    """How a window [start, stop) on each spatial axis meets a tensor's data: the Slice that cuts
    the part holding data (axes counted from 0, spatial from 2), and the zero pads (spatial begins,
    then spatial ends) that complete it."""

    axes: tuple[int, ...]
    starts: tuple[int, ...]
    stops: tuple[int, ...]
    pads: tuple[int, ...]


def plan_window(
    extents: Sequence[tuple[int, int]],
    starts: Sequence[int],
    stops: Sequence[int],
    sizes: Sequence[int] | None = None,
) -> Window:
    """The window [starts, stops) over spatial axes whose data lies in `extents`, positions outside reading 0.

    `extents[i]` = (lo, hi) is where spatial axis i holds data: (0, size) for a plain tensor, a
    sub-range when several pieces are stacked along one axis; then `sizes` gives the axes' lengths.
    """
    sizes = sizes if sizes is not None else [hi for _, hi in extents]
    axes, slice_starts, slice_stops, begins, ends = [], [], [], [], []
    for axis, ((lo, hi), start, stop, size) in enumerate(zip(extents, starts, stops, sizes), 2):
        inner_start, inner_stop = max(start, lo), min(stop, hi)
        if inner_stop <= inner_start:  # the window misses the data: an empty cut, padded to all zeros
            inner_start = inner_stop = lo
            begins.append(stop - start)
            ends.append(0)
        else:
            begins.append(inner_start - start)
            ends.append(stop - inner_stop)
        if (inner_start, inner_stop) != (0, size):
            axes.append(axis)
            slice_starts.append(inner_start)
            slice_stops.append(inner_stop)
    return Window(tuple(axes), tuple(slice_starts), tuple(slice_stops), tuple(begins + ends))


def cut(b: Builder, x: gs.Tensor, plan: Window, out: gs.Variable | None = None) -> gs.Tensor:
    """The Slice of `plan` (x itself when it cuts nothing); the caller supplies the zero pads."""
    if plan.axes:
        return b.slice(x, plan.starts, plan.stops, plan.axes, out=out)
    return x if out is None else b.identity(x, out)


def window(
    b: Builder,
    x: gs.Tensor,
    extents: Sequence[tuple[int, int]],
    starts: Sequence[int],
    stops: Sequence[int],
    sizes: Sequence[int] | None = None,
    out: gs.Variable | None = None,
) -> gs.Tensor:
    """The window [start, stop) of each spatial axis of `x`, zeros where it leaves the data: Slice, then Pad."""
    plan = plan_window(extents, starts, stops, sizes)
    if not any(plan.pads):
        return cut(b, x, plan, out)
    half = len(plan.pads) // 2
    return b.pad(cut(b, x, plan), [0, 0, *plan.pads[:half], 0, 0, *plan.pads[half:]], out=out)


def interleave(
    b: Builder,
    phased: gs.Tensor,
    channels: int,
    strides: Sequence[int],
    rows: Sequence[int],
    size: Sequence[int],
    out: gs.Variable,
) -> None:
    """[N, channels·S, *rows], channel c·S + (r1, r2, ...) holding stride phase r, into `out`
    [N, channels, *size] with phase r at positions q·stride + r.

    DepthToSpace for 2-D equal strides, else Reshape-Transpose-Reshape; then a Slice where
    rows·strides overshoots `size` (by less than a stride).
    """
    rank = len(strides)
    merged = [q * s for q, s in zip(rows, strides)]
    exact = merged == list(size)
    target = out if exact else None
    if rank == 2 and strides[0] == strides[1]:
        image = b.op("DepthToSpace", [phased], {"blocksize": strides[0], "mode": "CRD"}, out=target)
    else:
        split = b.reshape(phased, [0, channels, *strides, *rows])
        perm = [0, 1, *(a for i in range(rank) for a in (2 + rank + i, 2 + i))]
        image = b.reshape(b.transpose(split, perm), [0, channels, *merged], out=target)
    if not exact:
        window(b, image, [(0, n) for n in merged], [0] * rank, size, out=out)


@dataclass(frozen=True, kw_only=True)
class Col2ImSpec:
    """One Col2Im node: `[N, C·prod(block_shape), L]` columns → `[N, C, *image_shape]`, defaults resolved.

    `blocks` is the number of sliding blocks along each axis; their product is L.
    """

    op: str = "Col2Im"
    dtype: str
    opset: int
    batch: Dim
    channels: int
    image_shape: tuple[int, ...]
    block_shape: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]
    blocks: tuple[int, ...]

    def key(self) -> str:
        return spec_key(self)

    @property
    def rank(self) -> int:
        return len(self.image_shape)


def sliding_blocks(image: int, block: int, stride: int, dilation: int, pad_begin: int, pad_end: int) -> int:
    """How many blocks slide along one axis of a padded image (the count Col2Im checks L against)."""
    return (image + pad_begin + pad_end - ((block - 1) * dilation + 1)) // stride + 1


def make_spec(node: gs.Node, opset: int) -> Col2ImSpec:
    """The Col2Im node read into a spec: shape inputs must be constants, the column count consistent."""
    columns = node.inputs[0]
    image_shape, block_shape = (constant_value(t) for t in node.inputs[1:3])
    if image_shape is None or block_shape is None:
        raise NotLowerable("image_shape and block_shape must be constants (initializers or Constant nodes)")
    image, block = tuple(int(v) for v in image_shape.ravel()), tuple(int(v) for v in block_shape.ravel())
    rank = len(image)
    if len(block) != rank or rank == 0:
        raise NotLowerable(f"image_shape {list(image)} and block_shape {list(block)} differ in rank")
    strides = positive_ints(node.attrs.get("strides", [1] * rank), rank, "strides")
    dilations = positive_ints(node.attrs.get("dilations", [1] * rank), rank, "dilations")
    pads = non_negative_ints(node.attrs.get("pads", [0] * 2 * rank), 2 * rank, "pads")
    shape = static_shape(columns)
    if shape is None or len(shape) != 3 or shape[1] is None:
        raise NotLowerable(f"the columns input must be [N, C·{math.prod(block)}, L] with a static second dim")
    channels, remainder = divmod(shape[1], math.prod(block))
    if remainder or channels == 0:
        raise NotLowerable(
            f"the columns' second dim {shape[1]} is not a multiple of prod(block_shape) = {math.prod(block)}"
        )
    blocks = tuple(
        sliding_blocks(image[i], block[i], strides[i], dilations[i], pads[i], pads[rank + i]) for i in range(rank)
    )
    if min(blocks) < 1:
        raise NotLowerable(f"the dilated block {list(block)} does not fit the padded image {list(image)}")
    if shape[2] is not None and shape[2] != math.prod(blocks):
        raise NotLowerable(
            f"the columns hold {shape[2]} blocks, but the image, block, pads and strides make {list(blocks)}"
        )
    return Col2ImSpec(
        dtype=float_dtype(columns),
        opset=opset,
        batch=shape[0],
        channels=channels,
        image_shape=image,
        block_shape=block,
        strides=strides,
        dilations=dilations,
        pads=pads,
        blocks=blocks,
    )


def build_native(b: Builder, spec: Col2ImSpec, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]) -> None:
    """Col2Im again, every attribute written out and the shape inputs as fresh constants."""
    attrs = {"strides": list(spec.strides), "dilations": list(spec.dilations), "pads": list(spec.pads)}
    b.op("Col2Im", [inputs[0], b.ints(spec.image_shape), b.ints(spec.block_shape)], attrs, out=outputs[0])


def build_shift_add(b: Builder, spec: Col2ImSpec, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]) -> None:
    """Σ over block offsets k of the k-th column image shifted into place, per stride phase, interleaved.

    Block offset k lands at image positions l·stride + k·dilation - pad: on stride phase
    r = (k·dilation - pad) mod stride, shifted by ⌊(k·dilation - pad) / stride⌋ at the columns'
    own resolution. So each offset's image is cut and padded into its phase's window by one Slice
    and one Pad (the columns reshaped to [N, C, K·L0, L1, ...] make it a range of axis 2), each
    phase sums its offsets, and the phases interleave into the image (cropped to image_shape).
    With stride 1 there is one phase and no interleave.
    """
    kernel_size, phases = math.prod(spec.block_shape), math.prod(spec.strides)
    stacked_size = [kernel_size * spec.blocks[0], *spec.blocks[1:]]
    stacked = b.reshape(inputs[0], [0, spec.channels, *stacked_size])
    rows = [-(-n // s) for n, s in zip(spec.image_shape, spec.strides)]
    by_phase: dict[tuple[int, ...], list[gs.Tensor]] = {}
    for index, offset in enumerate(itertools.product(*(range(k) for k in spec.block_shape))):
        reach = [k * d - p for k, d, p in zip(offset, spec.dilations, spec.pads)]
        extents = [(index * spec.blocks[0], (index + 1) * spec.blocks[0]), *((0, n) for n in spec.blocks[1:])]
        starts = [lo - r // s for (lo, _), r, s in zip(extents, reach, spec.strides)]
        stops = [start + q for start, q in zip(starts, rows)]
        phase = tuple(r % s for r, s in zip(reach, spec.strides))
        by_phase.setdefault(phase, []).append(window(b, stacked, extents, starts, stops, stacked_size))
    if phases == 1:
        b.sum(by_phase[(0,) * spec.rank], out=outputs[0])
        return
    sums = {phase: b.sum(terms) for phase, terms in by_phase.items()}
    zeros = None if len(sums) == phases else _zeros_like(b, next(iter(sums.values())))
    ordered = [sums.get(phase, zeros) for phase in itertools.product(*(range(s) for s in spec.strides))]
    phased = b.reshape(b.concat(ordered, axis=2), [0, spec.channels * phases, *rows])
    interleave(b, phased, spec.channels, spec.strides, rows, spec.image_shape, outputs[0])


def _zeros_like(b: Builder, x: gs.Tensor) -> gs.Tensor:
    """Zeros of x's shape and the builder's dtype: the phases no block offset reaches."""
    return b.op("ConstantOfShape", [b.shape(x)], {"value": b.const(np.zeros(1, b.dtype), "zero")})


FAMILY = OpFamily(
    op_type="Col2Im",
    domain="",
    make_spec=make_spec,
    variants=(
        SimpleVariant("native", applies_to_any_shape, build_native, "Col2Im with explicit attributes"),
        SimpleVariant("shift_add", applies_to_any_shape, build_shift_add, "Σ of spread, shifted column images (Pad/Slice/Sum)"),
    ),
)
