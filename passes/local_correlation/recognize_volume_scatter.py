"""Cost volumes filled by slice assignment, recognized as one `convlower.LocalCorrelation`.

GwcNet's `build_gwc_volume` and `build_corr_volume` (`GroupwiseVolume`, `CorrelationVolume` in
models/correlation_idioms.py) fill a zero volume one disparity at a time:

    volume = left.new_zeros([B, G, D, H, W])
    for i in range(D):
        volume[:, :, i, :, i:] = (left[..., i:] * right[..., :-i]).view(B, G, C // G, H, W - i).mean(2)
    # one group, [B, D, H, W]:  volume[:, i, :, i:] = (left[..., i:] * right[..., :-i]).mean(1)

that is `Y[b, g, d, h, w] = mean_{c in g} left[b, c, h, w] · right[b, c, h, w - d]`, zero where
`w < d`: the LocalCorrelation of A = left and B = right over the displacements δ = -d along W
(`first=(0, 0), last=(0, -(D-1)), step=(1, -1)`), G groups, the mean (or the sum).

What torch 2.13 exports. Each value written, `term_i` (i = 0 reads the maps whole, no Slice):

    left ─► Slice(axis 3, i:) ──┐
    right ─► Slice(axis 3, :-i) ┴► Mul ─► Reshape[B, G, C/G, H, W-i] ─► ReduceMean|ReduceSum(axes [2]) ─► term_i
                                   (one group: no Reshape, the reduction over axis 1)

TorchScript (opset 17), static or symbolic dims: a zero Constant (static) or ConstantOfShape(0)
(symbolic), then one ScatterND per disparity whose indices enumerate every element written, built
from Range, Expand, Where, Unsqueeze and Concat (70-150 nodes per disparity: 3,555 nodes for
StereoNet's 24):

    zeros ─► ScatterND(idx_0, Reshape(Expand(term_0))) ─► ScatterND(idx_1, Reshape(Expand(term_1))) ─► … ─► volume
             idx_i [B, G, 1, H, W-i, 5] = Concat(Unsqueeze(Expand(b)), .., Unsqueeze(Expand(w + i)), axis -1)

dynamo (opset 18), static or symbolic dims: ConstantOfShape(0), then per disparity a
select_scatter of a slice_scatter of the volume as the previous write left it:

    vol_i-1 ─► Gather(axis 2, i) ─► Transpose ─► ScatterND([[i], .., [W-1]], Transpose(term_i)) ─► Transpose ─┐
    vol_i-1 ──────────────────────────────────► ScatterElements(axis 2, index i) ◄── Unsqueeze(axis 2) ◄───────┘ ─► vol_i
    (the whole-row write of i = 0 has no ScatterND; Identity nodes between; the last Identity is the output)

Rather than match these node by node, the recognizer evaluates the data movement. From each final
scatter (one whose result reaches no further scatter through data-movement ops) it walks back
through data-movement ops (ScatterND, ScatterElements, Gather, Slice, Transpose, Reshape,
(Un)Squeeze, Expand, Concat, Identity) to their leaves, each of which must be a zero fill (a float
constant of zeros, ConstantOfShape of 0) or a term as drawn above; their indices, shapes and axes
must fold from constants and static shapes (NumPy for the data movement and the index arithmetic
above, `symbolic.folded_value` for the rest). It then runs that data movement on labels: the
zeros are label 0, each element of each term a label of its own. The volume's labels say which
term element, or a zero, lands where; the match holds only where every slice d of the volume's
disparity axis holds one term exactly as LocalCorrelation lays out a displacement δ_d: the term's
A window at the positions p it covers, B read at p + δ_d, every position whose p + δ_d falls in B
covered, zeros elsewhere; and the δ_d run row-major through a window of displacements. So the
disparities may be written in any order, into slots in another order (descending slots: a
positive step), with a step (`i = s·d`), with either map as A (`left[..., i:] * right[..., :-i]`
written at `:-i` correlates right against left, δ = +i), at spatial ranks 1 to 3 (a 2-D window of
displacements: one slot per offset, row-major).

Rewrite (K displacements):

    LocalCorrelation(A, B, first, last, step, groups=G, reduction) ─► volume           [B, G, K, *S]
    LocalCorrelation(A, B, ..., groups=1) ─► Squeeze(axis 1) ─► volume                  [B, K, *S]

Under symbolic dims the matcher runs at trial sizes (`symbolic.matches_at_every_size`) and must find
the same volume, maps and window at each; the rewrite holds no size, so the model keeps its dims.
The export's volume is exactly zero where `p + δ` leaves B; LocalCorrelation is too, for finite A.

Left as they are, each because its labels or its terms differ: a fill that is not zero (`new_ones`,
`new_full`); a value written at another W offset than its A window (one pixel right); a product of
windows at the same offset written from offset d (no shift); a missing or repeated disparity; a
product reduced over another axis than the group's channels (rows); a reduction other than the mean
or the sum (a max); anything else added to or written into the volume; operands other than windows
of two maps of one shape read back through Slice to their whole batch and channels (a map that is
itself a channel slice of a larger tensor is left alone too); volumes or terms of more than
`MAX_VOLUME_ELEMENTS` elements at the sizes matched, whose labels are not evaluated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..base import Builder, attr_text, constant_value, static_shape
from ..matching.shifted_slices import sliced_ranges
from ..matching.reduction import AXES_BECOME_INPUT, read_reduction
from ..matching.symbolic import SHAPE_ARITHMETIC, folded_value, matches_at_every_size
from . import OP_TYPE, Correlation, emit_local_correlation

SCATTERS = ("ScatterND", "ScatterElements")
DATA_INPUTS: dict[str, tuple[int, ...] | None] = {
    "ScatterND": (0, 2), "ScatterElements": (0, 2), "Gather": (0,), "Slice": (0,), "Transpose": (0,), "Reshape": (0,),
    "Unsqueeze": (0,), "Squeeze": (0,), "Expand": (0,), "Identity": (0,), "Concat": None,
}
"""Data-movement ops: which inputs carry the volume's data (None: all); the others are indices,
shapes or axes, which must fold."""
MAX_VOLUME_ELEMENTS = 1 << 25
"""The largest volume (elements) whose labels are evaluated: 128 MiB of int32 labels."""


# --- the terms: reduce_c(A-window · B-window) ---------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """`base[:, :, starts[0]:starts[0] + lengths[0], ...]`: positions of a map `[N, C, *S]`, whole along N and C."""

    base: gs.Tensor
    starts: tuple[int, ...]
    lengths: tuple[int, ...]


@dataclass(frozen=True)
class Term:
    """A value written into the volume: `reduce` over each of `groups` channel groups of the product of two
    windows of one extent; its elements in `[N, G, *lengths]` order."""

    tensor: gs.Tensor
    factors: tuple[Window, Window]
    groups: int
    reduction: str


def _window(tensor: gs.Tensor, opset: int) -> Window | None:
    """`tensor` as a window of the map its Slices read (itself, whole, when none does); None unless the
    map is `[N, C, *S]` (1 to 3 spatial axes), read whole along N and C and with step 1 elsewhere."""
    read = sliced_ranges(tensor, opset)
    if read is None:
        return None
    base, ranges = read
    shape = static_shape(base)
    if shape is None or not 3 <= len(shape) <= 5 or ranges[:2] != [(0, 1, shape[0]), (0, 1, shape[1])]:
        return None
    if any(step != 1 or count < 1 for _, step, count in ranges[2:]):
        return None
    return Window(base, tuple(r[0] for r in ranges[2:]), tuple(r[2] for r in ranges[2:]))


def _term(tensor: gs.Tensor, opset: int) -> Term | None:
    """The term when `tensor` is `reduce(Reshape[N, G, C/G, *S](Mul(a, b)), axis 2)`, or for one group
    `reduce(Mul(a, b), axis 1)` (either keeping the reduced axis or not), a and b windows of one extent."""
    node = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if node is None or node.op not in AXES_BECOME_INPUT:
        return None
    reduced = node.inputs[0]
    grouped = len(reduced.inputs) == 1 and reduced.inputs[0].op == "Reshape"
    product = reduced.inputs[0].inputs[0] if grouped else reduced
    mul = product.inputs[0] if len(product.inputs) == 1 else None
    if mul is None or mul.op != "Mul" or len(mul.inputs) != 2:
        return None
    factors = [_window(t, opset) for t in mul.inputs]
    shape, view = static_shape(product), static_shape(reduced)
    if None in factors or shape is None or view is None or None in shape or None in view:
        return None
    a, b = factors
    assert a is not None and b is not None
    if a.lengths != b.lengths or static_shape(a.base) != static_shape(b.base) or list(shape[2:]) != list(a.lengths):
        return None
    n, channels = shape[:2]
    if grouped:
        groups = view[1]
        if len(view) != len(shape) + 1 or groups < 1 or channels % groups or view != (n, groups, channels // groups, *shape[2:]):
            return None
    else:
        groups = 1
    reduction = read_reduction(node, len(view), opset)
    if reduction is None or reduction.axes != {2 if grouped else 1}:
        return None
    out = static_shape(tensor)
    if out is None or math.prod(out) != n * groups * math.prod(a.lengths):  # type: ignore[arg-type]
        return None
    return Term(tensor, (a, b), groups, reduction.kind)


def _is_zero_fill(tensor: gs.Tensor) -> bool:
    """A float tensor of zeros: a zero constant, or ConstantOfShape of 0 (its default fill)."""
    value = constant_value(tensor)
    if value is not None:
        return value.dtype.kind == "f" and not np.any(value)
    node = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if node is None or node.op != "ConstantOfShape":
        return False
    fill = node.attrs.get("value")
    fill_value = np.zeros(1, np.float32) if fill is None else np.asarray(fill.values)
    return fill_value.dtype.kind == "f" and not np.any(fill_value)


# --- evaluating the data movement on labels ---------------------------------------------------------------


Evaluate = Callable[[gs.Node, list, int], "np.ndarray | None"]
"""One op in NumPy: (node, its input values, opset) -> its output value, or None where it cannot say."""


def _axes(node: gs.Node, values: list[np.ndarray | None], opset: int, since: int) -> list[int] | None:
    """Axes given as the second input from opset `since` on, as an attribute before."""
    if opset >= since:
        return None if len(values) < 2 or values[1] is None else [int(a) for a in np.ravel(values[1])]
    axes = node.attrs.get("axes")
    return None if axes is None else [int(a) for a in axes]


def _slice(node: gs.Node, values: list[np.ndarray | None], opset: int) -> np.ndarray:
    data = values[0]
    assert data is not None
    starts, ends = np.ravel(values[1]), np.ravel(values[2])
    axes = np.ravel(values[3]) if len(values) > 3 and values[3] is not None else np.arange(starts.size)
    steps = np.ravel(values[4]) if len(values) > 4 and values[4] is not None else np.ones(starts.size, np.int64)
    index = [slice(None)] * data.ndim
    for axis, start, end, step in zip(axes, starts, ends, steps):
        index[int(axis) % data.ndim] = slice(int(start), int(end), int(step))  # Python clamps as ONNX Slice does
    return data[tuple(index)]


def _reshape(node: gs.Node, values: list[np.ndarray | None], opset: int) -> np.ndarray:
    data, shape = values[0], [int(d) for d in np.ravel(values[1])]
    assert data is not None
    if not node.attrs.get("allowzero", 0):
        shape = [data.shape[axis] if d == 0 else d for axis, d in enumerate(shape)]
    return data.reshape(shape)


def _unsqueeze(node: gs.Node, values: list[np.ndarray | None], opset: int) -> np.ndarray | None:
    data, axes = values[0], _axes(node, values, opset, 13)
    if data is None or axes is None:
        return None
    rank = data.ndim + len(axes)
    return np.expand_dims(data, tuple(sorted(a % rank for a in axes)))


def _squeeze(node: gs.Node, values: list[np.ndarray | None], opset: int) -> np.ndarray | None:
    data, axes = values[0], _axes(node, values, opset, 13)
    assert data is not None
    return np.squeeze(data) if axes is None else np.squeeze(data, tuple(a % data.ndim for a in axes))


def _scatter_nd(node: gs.Node, values: list[np.ndarray | None], opset: int) -> np.ndarray | None:
    """ScatterND without reduction; None where indices repeat (ONNX leaves the result undefined)."""
    data, indices, updates = values
    assert data is not None and indices is not None and updates is not None
    if attr_text(node.attrs.get("reduction", "none")) != "none":
        return None
    depth = indices.shape[-1]
    coordinates = tuple(np.where(c < 0, c + n, c) for c, n in zip(np.moveaxis(indices, -1, 0), data.shape[:depth]))
    written = np.zeros(math.prod(data.shape[:depth]), np.int8)
    written[np.ravel_multi_index(coordinates, data.shape[:depth])] = 1
    if int(written.sum()) != math.prod(indices.shape[:-1]):
        return None
    out = np.array(data)
    out[coordinates] = updates
    return out


def _scatter_elements(node: gs.Node, values: list[np.ndarray | None], opset: int) -> np.ndarray | None:
    """ScatterElements without reduction; None where an index repeats along the axis (undefined in ONNX)."""
    data, indices, updates = values
    assert data is not None and indices is not None and updates is not None
    if attr_text(node.attrs.get("reduction", "none")) != "none" or indices.shape != updates.shape:
        return None
    axis = int(node.attrs.get("axis", 0)) % data.ndim
    indices = np.where(indices < 0, indices + data.shape[axis], indices)
    if indices.shape[axis] > 1 and np.any(np.diff(np.sort(indices, axis), axis=axis) == 0):
        return None
    out = np.array(data)
    np.put_along_axis(out, indices, updates, axis)
    return out


def _cast(node: gs.Node, values: list[np.ndarray | None], opset: int) -> np.ndarray:
    assert values[0] is not None
    return values[0].astype(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))


def _constant_of_shape(node: gs.Node, values: list[np.ndarray | None], opset: int) -> np.ndarray:
    fill = node.attrs.get("value")
    fill_value = np.zeros(1, np.float32) if fill is None else np.asarray(fill.values).ravel()
    return np.full([int(d) for d in np.ravel(values[0])], fill_value[0], fill_value.dtype)


def _transpose(node: gs.Node, values: list[np.ndarray | None], opset: int) -> np.ndarray:
    return np.transpose(values[0], node.attrs.get("perm"))


def _gather(node: gs.Node, values: list[np.ndarray | None], opset: int) -> np.ndarray:
    return np.take(values[0], values[1], axis=int(node.attrs.get("axis", 0)))


def _expand(node: gs.Node, values: list[np.ndarray | None], opset: int) -> np.ndarray:
    data, shape = values[0], tuple(int(d) for d in np.ravel(values[1]))
    assert data is not None
    return np.broadcast_to(data, np.broadcast_shapes(data.shape, shape))


def _concat(node: gs.Node, values: list[np.ndarray | None], opset: int) -> np.ndarray:
    return np.concatenate(values, axis=int(node.attrs["axis"]))


def _range(node: gs.Node, values: list[np.ndarray | None], opset: int) -> np.ndarray:
    start, limit, delta = values
    return np.arange(start, limit, delta).astype(np.result_type(start, limit, delta))


def _elementwise(function: Callable[..., np.ndarray]) -> Evaluate:
    """An op that applies `function` to its inputs."""

    def evaluate(node: gs.Node, values: list[np.ndarray | None], opset: int) -> np.ndarray:
        return function(*values)

    return evaluate


NUMPY_OPS: dict[str, Evaluate] = {
    "Identity": _elementwise(np.asarray),
    "Transpose": _transpose,
    "Gather": _gather,
    "Expand": _expand,
    "Concat": _concat,
    "Slice": _slice,
    "Reshape": _reshape,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "ScatterND": _scatter_nd,
    "ScatterElements": _scatter_elements,
    "Cast": _cast,
    "ConstantOfShape": _constant_of_shape,
    "Range": _range,
    "Add": _elementwise(np.add),
    "Sub": _elementwise(np.subtract),
    "Mul": _elementwise(np.multiply),
    "Equal": _elementwise(np.equal),
    "Where": _elementwise(np.where),
}
"""The data-movement ops, and the index arithmetic the exporters compute scatter indices with, in
NumPy; other shape arithmetic folds through `symbolic.folded_value`."""


@dataclass
class DataMovement:
    """The data movement ending at a volume, as found by walking back from it: its nodes in
    evaluation order, its leaves (zero fills and terms), and how often each tensor is read."""

    nodes: list[gs.Node]
    zeros: list[gs.Tensor]
    terms: list[Term]
    reads: dict[str, int]


class _Walk:
    """Walks back from a volume: data tensors through data-movement ops to zero fills and terms,
    index tensors through index arithmetic to constants and static shapes."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.modes: dict[str, bool] = {}
        """Tensor name -> whether it carries data (else it is an index, shape or axes)."""
        self.found = DataMovement([], [], [], {})

    def data(self, tensor: gs.Tensor) -> bool:
        if not self._first_visit(tensor, True):
            return self.modes[tensor.name]
        node = tensor.inputs[0] if len(tensor.inputs) == 1 else None
        if node is not None and node.op in DATA_INPUTS:
            positions = DATA_INPUTS[node.op]
            for index, source in enumerate(node.inputs):
                carries = positions is None or index in positions
                if source.name and not (self.data(source) if carries else self.index(source)):
                    return False
            self.found.nodes.append(node)
            return True
        if _is_zero_fill(tensor):
            self.found.zeros.append(tensor)
            return True
        term = _term(tensor, self.opset)
        if term is None:
            return False
        self.found.terms.append(term)
        return True

    def index(self, tensor: gs.Tensor) -> bool:
        if not self._first_visit(tensor, False):
            return not self.modes[tensor.name]
        if constant_value(tensor) is not None:
            return True
        node = tensor.inputs[0] if len(tensor.inputs) == 1 else None
        if node is None or (node.domain or "") not in ("", "ai.onnx"):
            return False
        if node.op == "Shape":  # of a static shape, or of an index computed here (inference leaves Range's unknown)
            shape = static_shape(node.inputs[0])
            if (shape is None or None in shape) and not self.index(node.inputs[0]):
                return False
        elif node.op in NUMPY_OPS:
            if not all(self.index(source) for source in node.inputs if source.name):
                return False
        elif node.op not in SHAPE_ARITHMETIC or folded_value(tensor, self.opset) is None:
            return False
        self.found.nodes.append(node)
        return True

    def _first_visit(self, tensor: gs.Tensor, data: bool) -> bool:
        if tensor.name in self.modes:
            return False
        self.modes[tensor.name] = data
        return True


def _walk(volume: gs.Tensor, opset: int) -> DataMovement | None:
    walk = _Walk(opset)
    if not walk.data(volume) or not walk.found.terms:
        return None
    found = walk.found
    for node in found.nodes:
        for tensor in node.inputs:
            found.reads[tensor.name] = found.reads.get(tensor.name, 0) + 1
    return found


def _labels(volume: gs.Tensor, found: DataMovement, opset: int) -> tuple[np.ndarray, list[int]] | None:
    """The volume's labels, and the first label of each term: 0 where a zero fill lands, `first[t] + e`
    where element e of term t does. Values are freed once their last reader has run."""
    shape = static_shape(volume)
    sizes = [math.prod(static_shape(t.tensor)) for t in found.terms]  # type: ignore[arg-type]
    if shape is None or None in shape or math.prod(shape) > MAX_VOLUME_ELEMENTS or sum(sizes) >= MAX_VOLUME_ELEMENTS:  # type: ignore[arg-type]
        return None
    firsts = list(np.cumsum([1] + sizes[:-1]))
    values: dict[str, np.ndarray] = {}
    for zero in found.zeros:
        zero_shape = static_shape(zero)
        if zero_shape is None or None in zero_shape:
            return None
        values[zero.name] = np.zeros(zero_shape, np.int32)  # type: ignore[arg-type]
    for term, first, size in zip(found.terms, firsts, sizes):
        values[term.tensor.name] = np.arange(first, first + size, dtype=np.int32).reshape(static_shape(term.tensor))  # type: ignore[arg-type]
    reads = dict(found.reads)
    for node in found.nodes:
        if node.op == "Shape":  # reads the static shape of its input, or the shape of an index computed here
            start, end = node.attrs.get("start", 0), node.attrs.get("end", None)
            computed = values.get(node.inputs[0].name)
            dims = computed.shape if computed is not None else static_shape(node.inputs[0])
            out = np.asarray(dims[start:end], np.int64)  # type: ignore[index]
        elif node.op in NUMPY_OPS:
            inputs = [_value(t, values) if t.name else None for t in node.inputs]
            out = None if any(v is None for v, t in zip(inputs, node.inputs) if t.name) else NUMPY_OPS[node.op](node, inputs, opset)
        else:
            out = folded_value(node.outputs[0], opset)
        if out is None:
            return None
        values[node.outputs[0].name] = out
        for tensor in node.inputs:
            reads[tensor.name] = reads.get(tensor.name, 1) - 1
            if reads[tensor.name] == 0 and tensor.name != volume.name:
                values.pop(tensor.name, None)
    labels = values.get(volume.name)
    return None if labels is None or list(labels.shape) != list(shape) else (labels, firsts)


def _value(tensor: gs.Tensor, values: dict[str, np.ndarray]) -> np.ndarray | None:
    if tensor.name in values:
        return values[tensor.name]
    return constant_value(tensor)


# --- reading the volume as a correlation ---------------------------------------------------------------


@dataclass(frozen=True)
class VolumeMatch:
    """A volume that is `LocalCorrelation(a, b, correlation)`, `[N, G, K, *S]`, or `[N, K, *S]` when not `grouped`."""

    volume: gs.Tensor
    a: gs.Tensor
    b: gs.Tensor
    correlation: Correlation
    grouped: bool


def _placement(term: Term, first: int, a: gs.Tensor, b: gs.Tensor, slab: np.ndarray) -> tuple[int, ...] | None:
    """δ when `slab` `[N, G, *S]` is displacement δ of the correlation of a and b as LocalCorrelation
    lays it out, filled from `term` (labels from `first`); None otherwise."""
    spatial = slab.shape[2:]
    for p, q in (term.factors, term.factors[::-1]):
        if p.base is not a or q.base is not b:
            continue
        shift = tuple(qs - ps for ps, qs in zip(p.starts, q.starts))
        covered = tuple(max(0, -d) for d in shift)
        if p.starts != covered or p.lengths != tuple(s - abs(d) for s, d in zip(spatial, shift)):
            continue
        expected = np.zeros_like(slab)
        window = (slice(None), slice(None), *(slice(s, s + n) for s, n in zip(p.starts, p.lengths)))
        expected[window] = np.arange(first, first + expected[window].size, dtype=slab.dtype).reshape(expected[window].shape)
        if np.array_equal(expected, slab):
            return shift
    return None


def _displacement_window(shifts: Sequence[tuple[int, ...]]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None:
    """(first, last, step) per axis when `shifts` run row-major through a window, else None."""
    rank = len(shifts[0])
    counts = [len({shift[axis] for shift in shifts}) for axis in range(rank)]
    if math.prod(counts) != len(shifts):
        return None
    first, steps = shifts[0], []
    for axis, count in enumerate(counts):
        stride = math.prod(counts[axis + 1 :])
        steps.append(shifts[stride][axis] - first[axis] if count > 1 else 1)
    positions = np.unravel_index(np.arange(len(shifts)), counts)
    for k, shift in enumerate(shifts):
        if any(shift[axis] != first[axis] + int(positions[axis][k]) * steps[axis] for axis in range(rank)):
            return None
    last = tuple(f + (count - 1) * step for f, count, step in zip(first, counts, steps))
    return first, last, tuple(steps)


def _read_volume(volume: gs.Tensor, labels: np.ndarray, firsts: list[int], terms: list[Term]) -> VolumeMatch | None:
    """The correlation the labelled volume is, if it is one."""
    maps = list({id(f.base): f.base for term in terms for f in term.factors}.values())
    shape = static_shape(maps[0])
    if len(maps) > 2 or any(static_shape(m) != shape for m in maps) or len({(t.groups, t.reduction) for t in terms}) != 1:
        return None
    assert shape is not None
    rank = len(shape) - 2
    grouped = labels.ndim == rank + 3
    if not grouped and labels.ndim != rank + 2:
        return None
    slabs = labels if grouped else labels[:, None]
    groups, reduction = terms[0].groups, terms[0].reduction
    if (slabs.shape[0], *slabs.shape[3:]) != (shape[0], *shape[2:]) or slabs.shape[1] != groups:
        return None
    ends = np.cumsum([math.prod(static_shape(t.tensor)) for t in terms]) + 1  # type: ignore[arg-type]
    for a, b in ([(maps[0], maps[1]), (maps[1], maps[0])] if len(maps) == 2 else [(maps[0], maps[0])]):
        shifts = []
        for d in range(slabs.shape[2]):
            slab = slabs[:, :, d]
            written = slab[slab > 0]
            index = int(np.searchsorted(ends, written[0], side="right")) if written.size else -1
            shift = _placement(terms[index], firsts[index], a, b, slab) if index >= 0 else None
            if shift is None:
                break
            shifts.append(shift)
        window = _displacement_window(shifts) if len(shifts) == slabs.shape[2] else None
        if window is not None:
            return VolumeMatch(volume, a, b, Correlation(*window, groups=groups, reduction=reduction), grouped)
    return None


def _reaches_scatter(tensor: gs.Tensor) -> bool:
    """Whether `tensor`'s data reaches a scatter through data-movement ops."""
    frontier, seen = [tensor], set()
    while frontier:
        for consumer in frontier.pop().outputs:
            if consumer.op not in DATA_INPUTS or id(consumer) in seen:
                continue
            seen.add(id(consumer))
            if consumer.op in SCATTERS:
                return True
            frontier.extend(consumer.outputs)
    return False


def _final_scatters(graph: gs.Graph) -> list[gs.Tensor]:
    """Outputs of scatters whose data reaches no further scatter through data-movement ops."""
    return [node.outputs[0] for node in graph.nodes
            if node.op in SCATTERS and len(node.outputs) == 1 and not _reaches_scatter(node.outputs[0])]


def _has_scattered_products(graph: gs.Graph) -> bool:
    """Whether a reduced product (of Mul, or of a Reshape of one) reaches a scatter: without one there is
    no volume to find, nor any reason to bind symbolic dims to trial sizes (which infers shapes
    through the whole graph, seconds for a large model with an unrelated ScatterND)."""
    for node in graph.nodes:
        if node.op not in AXES_BECOME_INPUT or len(node.inputs[0].inputs) != 1:
            continue
        producer = node.inputs[0].inputs[0]
        if producer.op == "Reshape" and len(producer.inputs[0].inputs) == 1:
            producer = producer.inputs[0].inputs[0]
        if producer.op == "Mul" and _reaches_scatter(node.outputs[0]):
            return True
    return False


def find_scatter_volumes(graph: gs.Graph, opset: int) -> list[VolumeMatch]:
    """Every volume filled by scattering correlation terms into zeros that is one LocalCorrelation."""
    matches = []
    for volume in _final_scatters(graph):
        found = _walk(volume, opset)
        labelled = _labels(volume, found, opset) if found is not None else None
        match = _read_volume(volume, *labelled, found.terms) if labelled is not None and found is not None else None
        if match is not None:
            matches.append(match)
    return matches


def _signature(match: VolumeMatch) -> tuple:
    return match.volume.name, match.a.name, match.b.name, match.correlation, match.grouped


def recognize_scatter_volumes(graph: gs.Graph, opset: int) -> None:
    """Replace every slice-assignment cost volume with one `convlower.LocalCorrelation` node (and a
    Squeeze for the one-group `[N, K, *S]` layout), named after the volume."""
    if not _has_scattered_products(graph):
        return
    tensors = graph.tensors()  # once: the lookup walks the whole graph, and the tensors matched are there from the start
    for per_trial in matches_at_every_size(graph, opset, find_scatter_volumes, _signature):
        match = per_trial[0]
        volume, a, b = (tensors[t.name] for t in (match.volume, match.a, match.b))
        volume.inputs.clear()
        builder = Builder(graph, opset, f"{volume.name}/{OP_TYPE}", dtype=volume.dtype or np.float32)
        if match.grouped:
            emit_local_correlation(builder, a, b, match.correlation, out=volume)
        else:
            builder.squeeze(emit_local_correlation(builder, a, b, match.correlation), [1], out=volume)
    graph.cleanup()


