"""Recognize dynamic filters written with `Tensor.unfold` patches as one `convlower.DynamicFilter`.

The idiom (`TensorUnfold` in models/idioms.py), on X `[N, C, T]`, `[N, C, H, W]` or `[N, C, D, H, W]`:

    patches = F.pad(x, pads).unfold(2, k, s).unfold(3, k, s)      # [N, C, Ho, Wo, k, k]
    y = (patches * filters).sum((-2, -1))                          # filters [N, 1 or C, Ho, Wo, k, k]

also without F.pad, summed as `.sum(dim=(-1, -2))`, `.sum(-1).sum(-1)` (a chain of ReduceSums),
with `keepdim=True`, or by an einsum (`torch.einsum('ncijkl,nijkl->ncij', patches, filters)`, any
output order).

What the exporters write for it (torch 2.13):

dynamo (opset 18), static or symbolic dims, padded or not: one Gather per unfolded axis, whose
index `[O, k]` is `p * stride + j`, and a Transpose that moves each new tap axis to the end:

    Pad(x, zeros) -> Gather(axis=2, idx[Ho, kh]) -> Transpose(0,1,2,4,3)             [N, C, Ho, Wp, kh]
                  -> Gather(axis=3, idx[Wo, kw]) -> Transpose(0,1,2,3,5,4)           [N, C, Ho, Wo, kh, kw]
                  -> Mul(filters) -> ReduceSum(axes=[-2, -1], keepdims=0)            [N, C, Ho, Wo]

With symbolic dims each index is computed at run time (Shape -> Gather -> Squeeze -> Sub -> Range
-> Unsqueeze -> Add); `matches_at_every_size` folds it at trial sizes.

TorchScript (opset 17): the unpadded form only, with static spatial dims (a symbolic batch is
fine); `F.pad(x).unfold(...)`, and an unfold of an axis of symbolic size, fail to export with
"ONNX export of operator Unfold, input size not accessible". It stacks one Slice per window position:

    for p in range(Ho):  Slice(x, [p*s], [p*s + kh], axes=[2]) -> Transpose(0,1,3,2) -> Unsqueeze(2)
    -> Concat(axis=2)                                                                [N, C, Ho, W, kh]
    (the same over axis 3, with Transpose(0,1,2,4,3)) -> Concat(axis=3)              [N, C, Ho, Wo, kh, kw]
    -> Mul(filters) -> ReduceSum(axes=[-1, -2], keepdims=0)

(no Transpose on the last axis). Both are read as one chain of unfold steps that tracks what each
axis holds (batch, channels, positions or taps of a spatial axis), whatever Transposes come between.

The rewrite: the sum's output is computed by

    DynamicFilter(x, Reshape(Transpose(filters, to [N, G, kh, kw, Ho, Wo]), [N, G, K, Ho, Wo]))

then a Transpose where the sum's output orders the kept axes otherwise (an einsum's output) and an
Unsqueeze where it keeps the summed axes. With symbolic dims the Reshape target reads the positions'
extents off the transposed filters at run time; nothing of a trial size is written into the model.

Soundness: each axis's index must be exactly `p * stride + j` over the Conv output extent of the
padded axis, and every spatial axis unfolded once; a Pad must be a constant pad with zeros, over
the spatial axes only; the sum must run over exactly the tap axes; the filters must run along the
batch, every position and every tap axis, and along the channels (G = C) or not (G = 1), with
extents equal to the patches'.

Left as they are: another reduction (max, mean), a sum that also runs over the channels or over
only some tap axes, filters broadcast over the batch, reflect/replicate or non-zero padding. Not
covered: G groups with 1 < G < C (the patches must then be viewed as `[N, G, C/G, ..]`, a Reshape
this chain does not follow), filters with axes the patches lack (CARAFE), a spatial axis left
unfolded. Under symbolic dims a stride > 1 needs filters whose extents the graph derives from x's
(predicted from x, as kernel-prediction networks do): filters given as a separate input with their
own symbolic dims take unrelated trial sizes, so nothing matches and the idiom stays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from ..base import Builder, static_shape
from ..local_functions import DOMAIN, add_function
from ..matching.symbolic import dims_across, folded_value, local, matches_at_every_size
from ..matching.reduction import reduce_sum_axes
from ..matching.unfold import einsum_use, window_axis, zero_pads
from . import OP_TYPE as DYNAMIC_FILTER, SlidingWindow, shape_vector

Axis = tuple[str, int]
"""What one axis of the patches holds: ("n", 0) batch, ("c", 0) channels, ("s", j) spatial axis j
as yet unfolded, ("o", j) its window positions, ("k", j) its kernel taps."""
BATCH, CHANNELS = ("n", 0), ("c", 0)
MAX_RANK = 3


# --- the patches: a chain of unfolds ------------------------------------------------------------------


@dataclass(frozen=True)
class _Trace:
    """A tensor read as unfolds of `base`: what each of its axes holds, and the index `[O, k]` read
    along each unfolded spatial axis of `base`."""

    base: gs.Tensor
    axes: tuple[Axis, ...]
    indices: tuple[tuple[int, np.ndarray], ...] = ()

    def unfolded(self, spatial: int) -> bool:
        return any(j == spatial for j, _ in self.indices)


def _base_trace(tensor: gs.Tensor) -> _Trace | None:
    shape = static_shape(tensor)
    if shape is None or not 3 <= len(shape) <= MAX_RANK + 2:
        return None
    return _Trace(tensor, (BATCH, CHANNELS, *(("s", j) for j in range(len(shape) - 2))))


def _trace(tensor: gs.Tensor, opset: int) -> _Trace | None:
    """Read `tensor` back through Gather, Transpose and Slice-stacking unfold steps to the tensor they
    start from. A step that does not fit ends the chain there: that tensor is then the base."""
    node = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    step = None
    if node is not None and node.op == "Transpose":
        step = _transposed(node, opset)
    elif node is not None and node.op == "Gather":
        step = _gathered(node, opset)
    elif node is not None and node.op == "Concat":
        step = _stacked_slices(node, opset)
    return step if step is not None else _base_trace(tensor)


def _transposed(node: gs.Node, opset: int) -> _Trace | None:
    inner = _trace(node.inputs[0], opset)
    if inner is None or not inner.indices:
        return None
    perm = node.attrs.get("perm", list(reversed(range(len(inner.axes)))))
    return _Trace(inner.base, tuple(inner.axes[p] for p in perm), inner.indices)


def _gathered(node: gs.Node, opset: int) -> _Trace | None:
    """`Gather(t, index[O, k], axis)` on a spatial axis: window positions, then taps, in its place."""
    index = folded_value(node.inputs[1], opset)
    inner = _trace(node.inputs[0], opset)
    if index is None or index.ndim != 2 or inner is None:
        return None
    axis = _normalized(node.attrs.get("axis", 0), len(inner.axes))
    kind, spatial = inner.axes[axis] if 0 <= axis < len(inner.axes) else ("", 0)
    if kind != "s" or inner.unfolded(spatial):
        return None
    axes = (*inner.axes[:axis], ("o", spatial), ("k", spatial), *inner.axes[axis + 1 :])
    return _Trace(inner.base, axes, (*inner.indices, (spatial, index)))


def _stacked_slices(concat: gs.Node, opset: int) -> _Trace | None:
    """The TorchScript unfold: `Concat(axis=a)` of `Unsqueeze(a)` of one Slice per window position,
    each transposed the same way (or not at all). Read as a Gather of index `[p, j] = start_p + j`."""
    pieces = [_slice_piece(t, opset) for t in concat.inputs]
    if not pieces or any(p is None for p in pieces):
        return None
    source, axis, _, perm, unsqueezed = pieces[0]  # type: ignore[misc]
    if any(p[0] is not source or p[1] != axis or p[3] != perm or p[4] != unsqueezed for p in pieces):  # type: ignore[index]
        return None
    inner = _trace(source, opset)
    if inner is None or unsqueezed != _normalized(concat.attrs.get("axis", 0), len(inner.axes) + 1):
        return None
    kind, spatial = inner.axes[axis]
    if kind != "s" or inner.unfolded(spatial):
        return None
    sliced = [("k", spatial) if i == axis else a for i, a in enumerate(inner.axes)]
    axes = [sliced[p] for p in perm] if perm is not None else sliced
    axes.insert(unsqueezed, ("o", spatial))
    index = np.stack([p[2] for p in pieces])  # type: ignore[index]
    return _Trace(inner.base, tuple(axes), (*inner.indices, (spatial, index)))


def _slice_piece(tensor: gs.Tensor, opset: int) -> tuple[gs.Tensor, int, np.ndarray, tuple[int, ...] | None, int] | None:
    """`Unsqueeze(axis u)` of an optional Transpose of `Slice(x, [start], [end], [axis])` (step 1,
    within x's extent): (x, axis, start + arange(end - start), perm or None, u)."""
    unsqueeze = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if unsqueeze is None or unsqueeze.op != "Unsqueeze":
        return None
    axes = folded_value(unsqueeze.inputs[1], opset) if len(unsqueeze.inputs) > 1 else np.asarray(unsqueeze.attrs.get("axes", []))
    inner = unsqueeze.inputs[0]
    node = inner.inputs[0] if len(inner.inputs) == 1 else None
    perm = None
    if node is not None and node.op == "Transpose":
        perm = tuple(int(p) for p in node.attrs.get("perm", []))
        node = node.inputs[0].inputs[0] if len(node.inputs[0].inputs) == 1 else None
    if axes is None or np.size(axes) != 1 or node is None or node.op != "Slice" or len(node.inputs) < 4:
        return None
    source = node.inputs[0]
    shape = static_shape(source)
    values = [folded_value(t, opset) for t in node.inputs[1:4]]
    steps = folded_value(node.inputs[4], opset) if len(node.inputs) > 4 and node.inputs[4].name else np.ones(1)
    if shape is None or any(v is None or np.size(v) != 1 for v in values) or steps is None or np.any(steps != 1):
        return None
    start, end, axis = (int(np.ravel(v)[0]) for v in values)  # type: ignore[arg-type]
    axis = _normalized(axis, len(shape))
    extent = shape[axis] if 0 <= axis < len(shape) else None
    if extent is None or not 0 <= start < end <= extent:
        return None
    if perm is not None and sorted(perm) != list(range(len(shape))):
        return None
    return source, axis, np.arange(start, end), perm, _normalized(int(np.ravel(axes)[0]), len(shape) + 1)


def _normalized(axis: int, rank: int) -> int:
    return int(axis) + rank if int(axis) < 0 else int(axis)


# --- the padding and the window -----------------------------------------------------------------------


@dataclass(frozen=True)
class Patches:
    """`Tensor.unfold` patches of `source` X `[N, C, *S]` over every spatial axis: `axes` says what
    each axis of `tensor` holds (batch, channels, window positions and taps, in any order)."""

    source: gs.Tensor
    tensor: gs.Tensor
    axes: tuple[Axis, ...]
    window: SlidingWindow
    out_spatial: tuple[int, ...]
    batch: int
    channels: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The patches' shape, from the window: batch, channels, then positions and taps per axis."""
        sizes = {BATCH: self.batch, CHANNELS: self.channels}
        sizes.update({("o", j): o for j, o in enumerate(self.out_spatial)})
        sizes.update({("k", j): k for j, k in enumerate(self.window.kernel_shape)})
        return tuple(sizes[a] for a in self.axes)


def match_patches(tensor: gs.Tensor, opset: int) -> Patches | None:
    """The patches `tensor` holds, or None when it is not exactly a (zero-padded) sliding window."""
    trace = _trace(tensor, opset)
    if trace is None or not trace.indices:
        return None
    shape = static_shape(trace.base)
    rank = len(trace.axes) // 2 - 1
    wanted = {BATCH, CHANNELS, *(("o", j) for j in range(rank)), *(("k", j) for j in range(rank))}
    if shape is None or len(shape) != rank + 2 or len(trace.indices) != rank or set(trace.axes) != wanted:
        return None
    if trace.axes[0] != BATCH or any(d is None for d in shape):
        return None
    source, pads = trace.base, [0] * 2 * rank
    pad = trace.base.inputs[0] if len(trace.base.inputs) == 1 else None
    if pad is not None and pad.op == "Pad":
        all_pads = zero_pads(pad, opset, rank + 2)
        if all_pads is None or any(all_pads[a] for a in (0, 1, rank + 2, rank + 3)):
            return None
        source, pads = pad.inputs[0], all_pads[2 : rank + 2] + all_pads[rank + 4 :]
    found = dict(trace.indices)
    axes = [window_axis(found[j].T, int(shape[2 + j])) for j in range(rank)]  # type: ignore[arg-type]
    if any(a is None for a in axes):
        return None
    kernel, strides, dilations, out = zip(*axes)  # type: ignore[misc]
    window = SlidingWindow(tuple(kernel), tuple(strides), tuple(dilations), tuple(pads))
    return Patches(source, tensor, trace.axes, window, tuple(out), int(shape[0]), int(shape[1]))  # type: ignore[arg-type]


# --- weighted and summed over the taps -----------------------------------------------------------------


@dataclass(frozen=True)
class TensorUnfoldFilter:
    """A dynamic filter written with Tensor.unfold: patches weighted by `filters`, summed over the taps
    by `consumer`, whose output `output` holds the axes `output_axes` (None: a summed axis kept as 1).
    `filter_perm` puts the filters' axes in the order batch, [group], taps, positions, [unit axes]."""

    patches: Patches
    filters: gs.Tensor
    consumer: gs.Node
    output: gs.Tensor
    output_axes: tuple[Axis | None, ...]
    groups: int
    has_group_axis: bool
    filter_perm: tuple[int, ...]
    filter_shape: tuple[int, ...]

    def signature(self) -> Hashable:
        """What must be the same at every trial size: the tensors spanned, the window, the layout."""
        names = (self.patches.source.name, self.patches.tensor.name, self.filters.name, self.output.name)
        return names, self.patches.window, self.output_axes, self.groups, self.filter_perm


def _summed_axes(first: gs.Node, rank: int, kernel: set[int], opset: int) -> tuple[gs.Node, tuple[int | None, ...]] | None:
    """Follow ReduceSums from `first` (`x.sum(-1).sum(-1)`) until the taps are all summed: the last
    ReduceSum and, per axis of its output, the patches axis it holds (None: summed, kept as 1).
    None when a sum runs over any other axis or the chain stops short of the taps."""
    node, held, summed = first, list(range(rank)), set()
    while True:
        axes = reduce_sum_axes(node, len(held), opset)
        if axes is None or any(held[a] is None or held[a] not in kernel for a in axes):
            return None
        summed |= {held[a] for a in axes}
        keep = int(node.attrs.get("keepdims", 1))
        held = [None if i in axes and keep else h for i, h in enumerate(held) if keep or i not in axes]
        if summed == kernel:
            return node, tuple(held)
        consumers = node.outputs[0].outputs
        if len(consumers) != 1 or consumers[0].op != "ReduceSum" or consumers[0].inputs[0] is not node.outputs[0]:
            return None
        node = consumers[0]


def _weights(mul: gs.Node, patches: Patches, opset: int) -> tuple[gs.Tensor, tuple[int | None, ...]] | None:
    """The other operand of `Mul(patches, filters)` and, per patches axis, the filters' axis that runs
    along it (None where they broadcast), for a Mul that keeps the patches' shape. The shape is the
    one the window implies: inference leaves it unknown after a Range-computed Gather index."""
    operands = list(mul.inputs)
    if len(operands) != 2 or sum(t is patches.tensor for t in operands) != 1:
        return None
    filters = operands[1] if operands[0] is patches.tensor else operands[0]
    shape = known_shape(filters, opset)
    if shape is None or len(shape) != len(patches.axes):
        return None
    axes: list[int | None] = []
    for axis, (size, dim) in enumerate(zip(patches.shape, shape)):
        if dim != size and dim != 1:
            return None
        axes.append(axis if dim == size else None)
    return filters, tuple(axes)


def known_shape(tensor: gs.Tensor, opset: int, depth: int = 8) -> tuple[int, ...] | None:
    """The tensor's static shape, also where inference gave up at a Reshape whose target folds
    (ONNX data propagation does not fold the floor division of `(h - 1) // 2 + 1`, say) and at the
    Transposes after it. None when a dim stays unknown."""
    shape = static_shape(tensor)
    if shape is not None and all(d is not None for d in shape):
        return shape  # type: ignore[return-value]
    node = tensor.inputs[0] if len(tensor.inputs) == 1 and depth else None
    if node is not None and node.op == "Transpose":
        inner = known_shape(node.inputs[0], opset, depth - 1)
        perm = node.attrs.get("perm", list(reversed(range(len(inner or ())))))
        return None if inner is None else tuple(inner[p] for p in perm)
    if node is None or node.op != "Reshape":
        return None
    data, target = known_shape(node.inputs[0], opset, depth - 1), folded_value(node.inputs[1], opset)
    if data is None or target is None or target.ndim != 1 or np.sum(target == -1) > 1:
        return None
    copied = None if node.attrs.get("allowzero", 0) else 0  # what copies the input dim (with allowzero, a 0 is a 0)
    dims = [data[i] if d == copied else int(d) for i, d in enumerate(target)]
    if -1 in dims:
        known = math.prod(d for d in dims if d != -1)
        dims[dims.index(-1)] = math.prod(data) // known if known else 0
    return tuple(dims) if math.prod(dims) == math.prod(data) else None


def _uses(patches: Patches, opset: int) -> list[tuple[gs.Node, gs.Tensor, tuple[int | None, ...], tuple[int | None, ...]]]:
    """Each (consumer, filters, filter axis per patches axis, patches axis per output axis) where the
    patches are weighted by filters and summed over exactly the taps."""
    rank = len(patches.axes)
    kernel = {i for i, (kind, _) in enumerate(patches.axes) if kind == "k"}
    found = []
    for node in patches.tensor.outputs:
        weights = _weights(node, patches, opset) if node.op == "Mul" else None
        if weights is not None:
            for reduce in node.outputs[0].outputs:
                summed = _summed_axes(reduce, rank, kernel, opset) if reduce.inputs[0] is node.outputs[0] else None
                if summed is not None:
                    found.append((summed[0], weights[0], weights[1], summed[1]))
        elif node.op == "Einsum":
            use = einsum_use(node, patches.tensor)
            if use is None or use.extra_axes or use.reduced != kernel:
                continue
            natural = [i for i in range(rank) if i not in use.reduced]
            found.append((node, use.filters, use.filter_axes, tuple(natural[p] for p in use.output_perm or range(len(natural)))))
    return found


def _filter_match(
    patches: Patches,
    consumer: gs.Node,
    filters: gs.Tensor,
    filter_axes: Sequence[int | None],
    held: Sequence[int | None],
    opset: int,
) -> TensorUnfoldFilter | None:
    """The match when the filters run along the batch, every position and tap (and the channels or
    not), with every filter axis accounted for."""
    where = {axis: filter_axes[i] for i, axis in enumerate(patches.axes)}
    rank = patches.window.rank
    needed = [BATCH, *(("k", j) for j in range(rank)), *(("o", j) for j in range(rank))]
    shape = known_shape(filters, opset)
    if any(where[a] is None for a in needed) or shape is None or not consumer.outputs:
        return None
    if any(shape[where[a]] != size for a, size in zip(patches.axes, patches.shape) if where[a] is not None):
        return None  # an einsum's letters must mean the same extent in both operands
    group = where[CHANNELS]
    ordered = [where[BATCH], *([group] if group is not None else []), *(where[a] for a in needed[1:])]
    leftover = [a for a in range(len(shape)) if a not in ordered]
    if any(shape[a] != 1 for a in leftover):
        return None
    output_axes = tuple(None if h is None else patches.axes[h] for h in held)
    return TensorUnfoldFilter(
        patches, filters, consumer, consumer.outputs[0], output_axes,
        patches.channels if group is not None else 1, group is not None, tuple(ordered + leftover), shape,  # type: ignore[arg-type]
    )


def find_tensor_unfold_filters(graph: gs.Graph, opset: int) -> list[TensorUnfoldFilter]:
    """Every Tensor.unfold dynamic filter in a graph with static shapes."""
    found = []
    weighted = {t.name: t for n in graph.nodes if n.op in ("Mul", "Einsum") for t in n.inputs if t.inputs}
    for tensor in weighted.values():
        patches = match_patches(tensor, opset)
        if patches is None:
            continue
        for consumer, filters, filter_axes, held in _uses(patches, opset):
            match = _filter_match(patches, consumer, filters, filter_axes, held, opset)
            if match is not None:
                found.append(match)
    return found


# --- the rewrite -------------------------------------------------------------------------------------------


def recognize_tensor_unfold_filters(graph: gs.Graph, opset: int) -> None:
    """Replace every Tensor.unfold dynamic filter, at any input size, with one DynamicFilter node."""
    replaced = set()
    for per_trial in matches_at_every_size(graph, opset, find_tensor_unfold_filters, TensorUnfoldFilter.signature):
        if per_trial[0].output.name not in replaced:  # `Mul(patches, patches)` matches once per operand
            replaced.add(per_trial[0].output.name)
            _replace(graph, opset, per_trial)
    graph.cleanup()


def _replace(graph: gs.Graph, opset: int, per_trial: Sequence[TensorUnfoldFilter]) -> None:
    """Emit the DynamicFilter for a match (found at each trial size) into `graph`, shape-generic where
    the trials' dims differ."""
    match = per_trial[0]
    window, rank = match.patches.window, match.patches.window.rank
    out_spatial = dims_across(*(m.patches.out_spatial for m in per_trial))
    filter_dims = dims_across(*(m.filter_shape for m in per_trial))
    source, filters, output = (local(graph, t) for t in (match.patches.source, match.filters, match.output))
    consumer = output.inputs[0]
    consumer.outputs.clear()
    dtype = output.dtype or match.output.dtype or np.float32
    b = Builder(graph, opset, consumer.name or DYNAMIC_FILTER, dtype=dtype)
    canonical = _canonical_filters(b, match, filters, filter_dims, out_spatial, source.shape[0], f"{output.name}/filters")
    canonical_axes = (BATCH, CHANNELS, *(("o", j) for j in range(rank)))
    kept = tuple(a for a in match.output_axes if a is not None)
    direct = match.output_axes == canonical_axes
    attrs = window.attrs()
    result = b.op(DYNAMIC_FILTER, [source, canonical], attrs, domain=DOMAIN, out=output if direct else None)
    if not direct:
        result.shape, result.dtype = [source.shape[0], source.shape[1], *out_spatial], dtype
        perm = [canonical_axes.index(a) for a in kept]
        units = [i for i, a in enumerate(match.output_axes) if a is None]
        if perm != sorted(perm):
            result = b.transpose(result, perm, out=None if units else output)
        if units:
            b.unsqueeze(result, units, out=output)
    add_function(graph, DYNAMIC_FILTER, attrs, opset)


def _canonical_filters(
    b: Builder,
    match: TensorUnfoldFilter,
    filters: gs.Tensor,
    dims: Sequence[int | None],
    out_spatial: Sequence[int | None],
    batch: int | str | None,
    name: str,
) -> gs.Tensor:
    """The filters as `[N, G, K, *S_out]`: Transpose into batch, [group], taps, positions, then
    Reshape. With static dims a Transpose that moves only unit axes is left out and the Reshape
    target is a constant; else the positions' extents are read off the transposed filters.

    The result is called `name` whatever the dims: `optimize` recognizes the model twice, as it is
    and with its inputs bound to the profiling shapes, and finds the node's input shapes by name."""
    perm = list(match.filter_perm)
    taps = match.patches.window.taps
    rank = match.patches.window.rank
    static = all(d is not None for d in dims)
    moved = [a for a in perm if not static or dims[a] != 1]
    transposed = b.transpose(filters, perm) if moved != sorted(moved) else filters
    if static:
        target: list[int | gs.Tensor] = [int(dims[perm[0]]), match.groups, taps, *(int(o) for o in out_spatial)]  # type: ignore[arg-type]
    else:
        positions = 1 + int(match.has_group_axis) + rank
        target = [0, match.groups, taps, b.shape(transposed, positions, positions + rank)]
    canonical = gs.Variable(name, filters.dtype, [batch, match.groups, taps, *out_spatial])
    return b.reshape(transposed, shape_vector(b, target), out=canonical)


