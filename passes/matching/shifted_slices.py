"""Shifted slices of one zero-padded input: the windows that hand-written shift-and-sum code reads.

Code that writes a dynamic filter without F.unfold pads its input once and reads one slice of the
padded tensor per kernel tap, `padded[..., i:i + h, j:j + w]`. Both torch exporters write each
slice as a chain of Slice nodes (one per sliced axis; the dynamo exporter shares the first Slice
between the taps of a row), with constant starts and ends at static dims and Shape arithmetic
(`end = Shape(x)[2] + i`) at symbolic ones; the TorchScript exporter computes F.pad's pads with
ConstantOfShape, Concat, Reshape, Slice, Transpose and Cast:

    Pad(x, zeros on the spatial axes only)
      -> Slice(axis 2, i : i + h) -> Slice(axis 3, j : j + w)   = the window of tap (i, j)

`shifted_slice` reads one window back to its Pad: every Slice's starts, ends, axes and steps
folded (`folded_value`), composed per axis and clamped as Slice clamps them, so each window is an
offset, a step and a length per spatial axis of the padded input. `kernel_window` checks that a
set of windows is exactly the taps of one `SlidingWindow` -- every offset of a k1 x k2 (x k3) box
once, spaced by the dilation, all with the same step (the stride) and each as long as the Conv
output extent -- and gives each window its row-major tap index.

Used by `dynamic_filter/recognize_shift_loop.py` (taps weighted by filter channels and added),
`dynamic_filter/recognize_stacked_shifts.py` (taps stacked on a new axis, weighted and summed) and
`local_correlation/recognize_correlation_loop.py` (shifted slices times the other map, summed over channels).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from ..base import constant_value, static_shape
from ..dynamic_filter import SlidingWindow
from .symbolic import folded_value
from .unfold import zero_pads

Range = tuple[int, int, int]
"""Positions read along one axis: (first position, step, count)."""


def unsqueezed_axes(node: gs.Node, opset: int) -> list[int] | None:
    """The axes an Unsqueeze inserts (an input from opset 13, an attribute before); None for other nodes."""
    if node.op != "Unsqueeze":
        return None
    if opset >= 13:
        axes = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    else:
        axes = node.attrs.get("axes")
    return None if axes is None else [int(a) for a in np.ravel(axes)]


def only_use(tensor: gs.Tensor, graph: gs.Graph) -> bool:
    """Whether `tensor` feeds one node and is not a graph output: it may vanish with its consumer."""
    return len(tensor.outputs) == 1 and tensor not in graph.outputs


def has_sliced_pad(graph: gs.Graph) -> bool:
    """Whether any Pad output is sliced: without one there is no shifted slice to find (and no
    reason to bind symbolic dims to trial sizes, which infers shapes through the whole graph)."""
    return any(n.op == "Pad" and any(c.op == "Slice" for t in n.outputs for c in t.outputs) for n in graph.nodes)


def spatial_zero_pads(pad: gs.Node, opset: int, rank: int, first_spatial: int) -> tuple[int, ...] | None:
    """The pads (ONNX order, spatial axes only) of a constant-mode Pad that pads a rank-`rank` tensor
    with zeros on the axes from `first_spatial` on and nowhere else; None for any other Pad."""
    pads = zero_pads(pad, opset, rank)
    if pads is None:
        return None
    if np.any(pads[:first_spatial]) or np.any(pads[rank : rank + first_spatial]):
        return None
    return tuple(int(p) for p in pads[first_spatial:rank]) + tuple(int(p) for p in pads[rank + first_spatial :])


def sliced_ranges(tensor: gs.Tensor, opset: int) -> tuple[gs.Tensor, list[Range]] | None:
    """The tensor a chain of Slice nodes ending at `tensor` reads, and the positions it reads along
    each axis of it; None unless that tensor's shape is static and every Slice folds to positive
    steps. `tensor` itself, read whole, when no Slice produces it."""
    tensor, chain = _slice_chain(tensor)
    shape = static_shape(tensor)
    if shape is None or any(d is None for d in shape):
        return None
    ranges = _compose([(0, 1, int(d)) for d in shape], chain, opset)  # type: ignore[arg-type]
    return None if ranges is None else (tensor, ranges)


def _slice_chain(tensor: gs.Tensor) -> tuple[gs.Tensor, list[gs.Node]]:
    """The tensor the Slice nodes ending at `tensor` read, and those Slices, outermost first."""
    chain = []
    while len(tensor.inputs) == 1 and tensor.inputs[0].op == "Slice":
        chain.append(tensor.inputs[0])
        tensor = tensor.inputs[0].inputs[0]
    return tensor, chain


def _compose(ranges: list[Range], chain: list[gs.Node], opset: int) -> list[Range] | None:
    """`ranges` (the positions read of the tensor the chain starts from) narrowed by each Slice of
    `chain` in turn, from the last (the one reading that tensor) to the first."""
    for node in reversed(chain):
        fields = _slice_fields(node, len(ranges), opset)
        if fields is None:
            return None
        for axis, start, end, step in fields:
            first, stride, count = ranges[axis]
            picked = range(count)[slice(start, end, step)]  # Python clamps as ONNX Slice does for step > 0
            ranges[axis] = (first + picked.start * stride, stride * step, len(picked))
    return ranges


def _slice_fields(node: gs.Node, rank: int, opset: int) -> list[tuple[int, int, int, int]] | None:
    """(axis, start, end, step) for each axis a Slice reads; None unless all fold and steps are positive."""
    if opset < 10 or len(node.inputs) < 3:
        return None
    starts, ends = folded_value(node.inputs[1], opset), folded_value(node.inputs[2], opset)
    count = None if starts is None else starts.size
    axes = folded_value(node.inputs[3], opset) if len(node.inputs) > 3 and node.inputs[3].name else np.arange(count or 0)
    steps = folded_value(node.inputs[4], opset) if len(node.inputs) > 4 and node.inputs[4].name else np.ones(count or 0, np.int64)
    if starts is None or ends is None or axes is None or steps is None:
        return None
    if not starts.size == ends.size == axes.size == steps.size or np.any(steps < 1) or np.any((axes < -rank) | (axes >= rank)):
        return None
    fields = [(int(a) % rank, int(s), int(e), int(t)) for a, s, e, t in zip(*(np.ravel(v) for v in (axes, starts, ends, steps)))]
    return fields if len({axis for axis, *_ in fields}) == len(fields) else None


@dataclass(frozen=True)
class ShiftedSlice:
    """One window of a zero-padded input: `window` reads `Pad(source)` at `offsets + steps * p` for
    `p < lengths` on each spatial axis (axes from `first_spatial` on), and whole along the others."""

    window: gs.Tensor
    source: gs.Tensor
    first_spatial: int
    pads: tuple[int, ...]
    padded: tuple[int, ...]
    offsets: tuple[int, ...]
    steps: tuple[int, ...]
    lengths: tuple[int, ...]

    @property
    def shape(self) -> list[int]:
        """The window's shape (computed: exported slices of a computed Pad often have none)."""
        return [int(d) for d in self.source.shape[: self.first_spatial]] + list(self.lengths)


def shifted_slice(window: gs.Tensor, first_spatial: int, opset: int) -> ShiftedSlice | None:
    """The window, when `window` is one or more Slices of a zero Pad of the axes from `first_spatial`
    on, reading those axes only; None otherwise."""
    tensor, chain = _slice_chain(window)
    if not chain or len(tensor.inputs) != 1 or tensor.inputs[0].op != "Pad":
        return None
    pad = tensor.inputs[0]
    source = pad.inputs[0]
    shape = static_shape(source)
    if shape is None or any(d is None for d in shape) or len(shape) <= first_spatial:
        return None
    rank = len(shape) - first_spatial
    pads = spatial_zero_pads(pad, opset, len(shape), first_spatial)
    if pads is None:
        return None
    padded = tuple(int(shape[first_spatial + i]) + pads[i] + pads[rank + i] for i in range(rank))  # type: ignore[arg-type]
    whole = [(0, 1, int(d)) for d in shape[:first_spatial]] + [(0, 1, d) for d in padded]  # type: ignore[arg-type]
    ranges = _compose(list(whole), chain, opset)
    if ranges is None or ranges[:first_spatial] != whole[:first_spatial]:
        return None
    spatial = ranges[first_spatial:]
    return ShiftedSlice(
        window, source, first_spatial, pads, padded,
        tuple(r[0] for r in spatial), tuple(r[1] for r in spatial), tuple(r[2] for r in spatial),
    )


def kernel_window(slices: Sequence[ShiftedSlice]) -> tuple[SlidingWindow, list[int]] | None:
    """The sliding window whose taps are exactly `slices`, and each slice's row-major tap index.

    All slices must read the same padded input with the same steps (the strides) and lengths (the
    output extent, which must be the Conv formula's for the padded extent); per axis, the offsets
    must be 0, d, 2d, ... (d the dilation), and the slices must cover their product once each.
    """
    if not slices:
        return None
    first = slices[0]

    def reads(s: ShiftedSlice) -> tuple:
        return s.source, s.first_spatial, s.pads, s.steps, s.lengths

    if any(reads(s) != reads(first) for s in slices):
        return None
    kernel, dilations = [], []
    for axis in range(len(first.offsets)):
        offsets = sorted({s.offsets[axis] for s in slices})
        dilation = offsets[1] - offsets[0] if len(offsets) > 1 else 1
        if offsets != list(range(0, dilation * len(offsets), dilation)) or dilation < 1:
            return None
        kernel.append(len(offsets))
        dilations.append(dilation)
    window = SlidingWindow(tuple(kernel), first.steps, tuple(dilations), first.pads)
    rank = window.rank
    unpadded = [size - first.pads[i] - first.pads[rank + i] for i, size in enumerate(first.padded)]
    if window.output_size(unpadded) != first.lengths:
        return None
    taps = {offset: k for k, offset in enumerate(itertools.product(*(range(0, k * d, d) for k, d in zip(kernel, dilations))))}
    indices = [taps.get(s.offsets) for s in slices]
    if len(slices) != window.taps or None in indices or len(set(indices)) != len(indices):
        return None
    return window, indices  # type: ignore[return-value]
