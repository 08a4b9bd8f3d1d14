"""Pad-once correlation loops (PWC-Net/RAFT-style pure-torch flow correlation, FlowNetC's step-2
window), recognized as one `convlower.LocalCorrelation`.

Code that correlates two maps `[B, C, *S]` without a CUDA kernel (`models/correlation_idioms.py`'s
`PaddedShiftLoop`) pads the second map once and reads one shifted slice of it per displacement:

    padded = F.pad(f2, [d, d] * rank)
    for i in range(0, 2 * d + 1, step):  for j in range(0, 2 * d + 1, step):
        costs.append((f1 * padded[:, :, i:i + h, j:j + w]).mean(1, keepdim=True))      # or .sum
    torch.cat(costs, 1)                       # or .mean(1) / .sum(1) then torch.stack(costs, 1)

and group-wise (GwcNet's correlation, pad-once): `(f1 * shifted).view(b, G, c // G, h, w).mean(2)`,
then `torch.stack(costs, 2)` (`[B, G, K, H, W]`) or `torch.cat(costs, 1)` (`[B, K·G, H, W]`).

Both torch exporters write it, at ranks 1 and 2, static or symbolic B/H/W, as

    f2 ──► Pad(zeros, spatial axes) ──► Slice(axis 2) ─► Slice(axis 3) ─┐        (one chain per displacement)
    f1 ─────────────────────────────────────────────────────────────── Mul
        ─► [Reshape(→ [B, G, C/G, *S])] ─► ReduceMean|ReduceSum(one axis: 1, or 2 after the Reshape)
        ─► [Unsqueeze(axis u)] ─► Concat(axis u | the kept unit axis | the group axis) ─► out

- TorchScript (opset 17): the Pad's pads come from ConstantOfShape, Concat, Reshape, Slice,
  Transpose and Cast; ReduceMean takes `axes` as an attribute, ReduceSum as an input; each
  displacement has its own Slice pair, and each `.view` its own Reshape target. At symbolic dims
  each slice end is `Unsqueeze(Shape(f1)[axis] + offset)` and the `.view` target a Concat of
  Shape reads and a `Div` for C // G. A cat of the costs inside another cat on the same axis
  (FlowNet's `torch.cat([correlation, f1], 1)`) becomes one Concat: the costs are then a run of
  its inputs, replaced by one input.
- dynamo (opset 18): the Pad's pads are one constant; the first Slice (rows) is shared by the
  displacements of one row; ReduceMean and ReduceSum take `axes` as an input (one constant shared
  with the Slices' steps). At symbolic dims the slice ends are `Reshape(Add(offset,
  Squeeze(Shape(f1, start=2, end=3))))` and the `.view` target `Concat(Shape(f1, 0, 1), G, C/G,
  Shape(f1, 2, 3), ..)`.

Under symbolic dims the matcher runs at trial sizes (`symbolic.matches_at_every_size`), which fold
those Shape computations to constants.

What must hold: the windows are the slices of one zero-padded map B, read as the taps of one
sliding window by `shifted_slices.kernel_window` (the piece `dynamic_filter/recognize_shift_loop.py` matches its
filter taps with): offsets 0, s, 2s, .. on each axis (s, the dilation, is the displacement step),
every combination once, stride 1, each window as long as B's own extent (so the pads before and
after sum to the window's reach, and displacement δ = offset - pad before). Every product is the
window times one and the same tensor A of exactly the window's shape (no broadcasting); each
product is reduced over the channels alone (axis 1), or over axis 2 of a Reshape to
`[B, G, C/G, *S]`; every cost is reduced alike and used only by the join. The displacements come in
row-major order, ascending or descending on each axis (a negative displacement step). The join is
`stack` (Unsqueeze of every cost at the Concat's axis) or `cat` along the kept unit axis
(`keepdim=True`) or along the group axis.

Rewrite (Y `[B, G, K, *S]`; first = -pad before, last = first + (k - 1)·s, step = s per axis,
swapped and negated where the loop runs the axis in descending order):

    Y = LocalCorrelation(A, B, first, last, step, groups G (1 ungrouped), reduction mean|sum)
    then the join's layout: [Squeeze(1)] [Transpose] [Unsqueeze(unit axes)] [Reshape [B, K·G, *S]] ─► out

so `cat` with keepdim and `stack` of unkept costs give `Squeeze(Y, 1)` = `[B, K, *S]`, the group-wise
`stack(., 2)` is Y itself, and the group-wise `cat` is `Reshape(Transpose(Y, [0, 2, 1, ..]), [0, -1, *S])`
(S read off A's shape at run time where symbolic).

Left as they are (each is something else, or not known to be this op at every size):
- a reflect, replicate or non-zero constant pad (B would not read as zero outside);
- a sum or mean over the window (the displacements) instead of the channels, or over any other
  axis, or a reduction other than mean and sum;
- slices that skip a displacement, repeat one, or are shorter or longer than B (a stride);
- a window times itself, or times anything that is not one tensor shaped like the window: there is
  no A to correlate with;
- a loop whose costs are also used elsewhere (they would be computed twice), or with fewer than
  two displacements.

Not covered (the op, but not matched): a pad wider than the window's reach (slices that do not
start at offset 0), displacements joined in an order other than row-major (column-major,
shuffled: one LocalCorrelation and a Gather), a sum divided by C afterwards (a mean written out),
3-D windows (PaddedShiftLoop writes ranks 1 and 2; nothing here is bound to a rank, but no test
covers 3).

The look-alikes of `dynamic_filter/recognize_shift_loop.py` (taps weighted by filter channels and added) have no
Concat of channel reductions and are not matched here; this recognizer runs first and consumes its
slices, so that recognizer never sees a correlation loop.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from ..base import Builder, Dim
from ..dynamic_filter import SlidingWindow, shape_vector
from ..matching.shifted_slices import ShiftedSlice, has_sliced_pad, kernel_window, only_use, shifted_slice, unsqueezed_axes
from ..matching.reduction import AXES_BECOME_INPUT, read_reduction
from ..matching.symbolic import dims_across, folded_value, local, matches_at_every_size
from . import OP_TYPE as LOCAL_CORRELATION, Correlation, displacement_order, emit_local_correlation

FIRST_SPATIAL = 2
"""A and B are `[N, C, *S]`."""

Label = str
"""What one axis of a cost or of the output holds: "n" batch, "g" channel groups, "u" a kept unit
axis, "k" displacements, "k*g" displacements and groups merged (displacement-major), "s0", "s1", ..
spatial axes."""


@dataclass(frozen=True)
class Cost:
    """One displacement's cost: `reduce(window * a)` over the channels (of a group)."""

    window: ShiftedSlice
    a: gs.Tensor
    reduction: str
    groups: int | None
    """G when the product was viewed as `[N, G, C/G, *S]` and reduced over axis 2; None when it was
    reduced over axis 1 directly."""
    labels: tuple[Label, ...]


@dataclass(frozen=True)
class CorrelationLoopMatch:
    """Inputs `start` to `end` of the Concat making `output` join per-displacement costs: together
    they are a layout of LocalCorrelation(`a`, `b`) (the whole output where they are all its inputs)."""

    output: gs.Tensor
    start: int
    end: int
    a: gs.Tensor
    b: gs.Tensor
    correlation: Correlation
    layout: tuple[Label, ...]
    """The joined costs' axes; Y is ("n", "g", "k", "s0", ..)."""
    spatial: tuple[int, ...]

    def signature(self) -> tuple:
        return self.output.name, self.start, self.end, self.a.name, self.b.name, self.correlation, self.layout


@dataclass(frozen=True)
class Run:
    """Concat inputs `start` to `end` that all read as costs, joined alike: `stack_axis` is the axis
    each was unsqueezed at (a stack), None for a cat. `readings` holds each input's readings."""

    start: int
    end: int
    stack_axis: int | None
    readings: tuple[tuple[Cost, ...], ...]


def _single_producer(tensor: gs.Tensor, op: str | tuple[str, ...], graph: gs.Graph) -> gs.Node | None:
    """The node of type `op` that makes `tensor`, when `tensor` feeds nothing else."""
    ops = (op,) if isinstance(op, str) else op
    if len(tensor.inputs) != 1 or tensor.inputs[0].op not in ops or not only_use(tensor, graph):
        return None
    return tensor.inputs[0]


def _group_view(tensor: gs.Tensor, shape: Sequence[int], opset: int) -> int | None:
    """G when `tensor` is a Reshape of a `shape` ([N, C, *S]) product to `[N, G, C/G, *S]`."""
    reshape = tensor.inputs[0]
    target = folded_value(reshape.inputs[1], opset)
    if target is None or target.ndim != 1 or len(target) != len(shape) + 1:
        return None
    allow_zero = int(reshape.attrs.get("allowzero", 0))
    dims = [shape[i] if d == 0 and not allow_zero and i < len(shape) else int(d) for i, d in enumerate(target)]
    if dims.count(-1) == 1:
        known = int(np.prod([d for d in dims if d != -1]))
        if known <= 0 or int(np.prod(shape)) % known:
            return None
        dims[dims.index(-1)] = int(np.prod(shape)) // known
    n, channels, *spatial = shape
    groups = dims[1]
    if groups < 1 or channels % groups or dims != [n, groups, channels // groups, *spatial]:
        return None
    return groups


def _cost(tensor: gs.Tensor, graph: gs.Graph, opset: int) -> list[Cost]:
    """The readings of `tensor` as one displacement's cost (one per way of naming the window and A
    of its Mul); empty when it is none."""
    reduce = _single_producer(tensor, tuple(AXES_BECOME_INPUT), graph)
    if reduce is None:
        return []
    reduced = reduce.inputs[0]
    view = _single_producer(reduced, "Reshape", graph)
    product = view.inputs[0] if view is not None else reduced
    mul = _single_producer(product, "Mul", graph)
    if mul is None or len(mul.inputs) != 2:
        return []
    costs = []
    for window_tensor, a in (mul.inputs, mul.inputs[::-1]):
        window = shifted_slice(window_tensor, FIRST_SPATIAL, opset)
        if window is None or a.shape is None or [_dim(d) for d in a.shape] != window.shape:
            continue
        shape = window.shape
        groups = _group_view(reduced, shape, opset) if view is not None else None
        if view is not None and groups is None:
            continue
        read = read_reduction(reduce, len(shape) + (view is not None), opset)
        if read is None or read.axes != {1 if groups is None else 2}:
            continue
        spatial = tuple(f"s{i}" for i in range(len(shape) - FIRST_SPATIAL))
        labels = ("n",) + (("g",) if groups is not None else ()) + (("u",) if read.keepdims else ()) + spatial
        costs.append(Cost(window, a, read.kind, groups, labels))
    return costs


def _dim(dim: object) -> int | None:
    return int(dim) if isinstance(dim, (int, np.integer)) else None


def _runs(concat: gs.Node, graph: gs.Graph, opset: int) -> list[Run]:
    """The runs of two or more consecutive Concat inputs that are each a cost, or each an Unsqueeze
    (at one axis, the same for the run) of a cost. A run need not be all the inputs: the TorchScript
    exporter writes `torch.cat([torch.cat(costs, 1), f1], 1)` as one Concat."""
    kinds: list[tuple[int | None, tuple[Cost, ...]] | None] = []
    for tensor in concat.inputs:
        unsqueeze = _single_producer(tensor, "Unsqueeze", graph)
        axes = unsqueezed_axes(unsqueeze, opset) if unsqueeze is not None else None
        if unsqueeze is not None and axes is not None and len(axes) == 1:
            readings, stack_axis = _cost(unsqueeze.inputs[0], graph, opset), axes[0]
        else:
            readings, stack_axis = _cost(tensor, graph, opset), None
        kinds.append((stack_axis, tuple(readings)) if readings else None)
    runs = []
    position = 0
    for key, group in itertools.groupby(kinds, key=lambda kind: None if kind is None else (kind[0],)):
        kinds_in_group = list(group)
        members = [kind for kind in kinds_in_group if kind is not None]
        if key is not None and len(members) >= 2:
            runs.append(Run(position, position + len(members), key[0], tuple(readings for _, readings in members)))
        position += len(kinds_in_group)
    return runs


def _layout(labels: tuple[Label, ...], stack_axis: int | None, concat_axis: int) -> tuple[Label, ...] | None:
    """The output's axes: the costs' axes with "k" inserted at the stack axis, or the Concat's axis
    (a kept unit axis, or the groups) taken over by the displacements."""
    rank = len(labels)
    if stack_axis is not None:
        axis = stack_axis % (rank + 1) if -(rank + 1) <= stack_axis <= rank else None
        if axis is None or concat_axis % (rank + 1) != axis:
            return None
        return labels[:axis] + ("k",) + labels[axis:]
    if not -rank <= concat_axis < rank:
        return None
    axis = concat_axis % rank
    joined = {"u": "k", "g": "k*g"}.get(labels[axis])
    return None if joined is None else labels[:axis] + (joined,) + labels[axis + 1 :]


def _correlation(window: SlidingWindow, order: list[int], groups: int, reduction: str) -> Correlation | None:
    """The displacement window whose row-major order (ascending or descending per axis) is the
    taps' `order`; None when no such order matches."""
    counts = window.kernel_shape
    rank = window.rank
    taps = list(range(window.taps))
    for signs in itertools.product((1, -1), repeat=rank):
        if any(sign < 0 and count == 1 for sign, count in zip(signs, counts)):
            continue
        if displacement_order(taps, counts, signs) != order:
            continue
        lowest = [-window.pads[i] for i in range(rank)]
        highest = [low + (count - 1) * dilation for low, count, dilation in zip(lowest, counts, window.dilations)]
        first = tuple(low if sign > 0 else high for low, high, sign in zip(lowest, highest, signs))
        last = tuple(high if sign > 0 else low for low, high, sign in zip(lowest, highest, signs))
        step = tuple(sign * dilation for sign, dilation in zip(signs, window.dilations))
        return Correlation(first, last, step, groups, reduction)
    return None


def _match(concat: gs.Node, run: Run) -> CorrelationLoopMatch | None:
    common = set.intersection(*({id(c.a) for c in reading} for reading in run.readings))
    if len(common) != 1:
        return None
    a_id = common.pop()
    costs = [next(c for c in reading if id(c.a) == a_id) for reading in run.readings]
    if len({(c.reduction, c.groups, c.labels) for c in costs}) != 1:
        return None
    first = costs[0]
    layout = _layout(first.labels, run.stack_axis, int(concat.attrs.get("axis", 0)))
    found = kernel_window([c.window for c in costs])
    if layout is None or found is None:
        return None
    window, order = found
    if any(s != 1 for s in window.strides) or list(first.window.lengths) != first.window.source.shape[FIRST_SPATIAL:]:
        return None
    correlation = _correlation(window, order, first.groups or 1, first.reduction)
    if correlation is None:
        return None
    return CorrelationLoopMatch(
        concat.outputs[0], run.start, run.end, first.a, first.window.source, correlation, layout, first.window.lengths
    )


def find_correlation_loops(graph: gs.Graph, opset: int) -> list[CorrelationLoopMatch]:
    """Every run of Concat inputs that joins the channel-reduced products of one map with the
    shifted windows of one zero-padded map, one per displacement of a window."""
    matches = []
    for node in graph.nodes:
        if node.op == "Concat" and len(node.outputs) == 1:
            found = (_match(node, run) for run in _runs(node, graph, opset))
            matches.extend(match for match in found if match is not None)
    return matches


def _extent(b: Builder, label: Label, spatial: Sequence[Dim], a: gs.Tensor) -> int | gs.Tensor:
    """The size of an output axis after the merged one: 1 for a unit axis, else a spatial extent
    (read off A at run time where it is symbolic)."""
    if label == "u":
        return 1
    axis = int(label[1:])
    extent = spatial[axis]
    return extent if extent is not None else b.shape(a, FIRST_SPATIAL + axis, FIRST_SPATIAL + axis + 1)


def _rearranged(b: Builder, y: gs.Tensor, layout: tuple[Label, ...], spatial: Sequence[Dim], a: gs.Tensor, out: gs.Variable) -> None:
    """Y `[N, G, K, *S]` (axes "n", "g", "k", "s0", ..) put into the output's `layout`, written to
    `out`: the group axis squeezed where the layout has none, a Transpose where the order differs,
    kept unit axes inserted, displacements and groups merged (S read off A where symbolic)."""
    axes: list[Label] = ["n", "g", "k", *(f"s{i}" for i in range(len(spatial)))]
    steps: list[Callable[[gs.Tensor, gs.Variable | None], gs.Tensor]] = []
    if "g" not in layout and "k*g" not in layout:
        steps.append(lambda x, o: b.squeeze(x, [1], out=o))
        axes.remove("g")
    order = [label for part in layout if part != "u" for label in (("k", "g") if part == "k*g" else (part,))]
    perm = [axes.index(label) for label in order]
    if perm != sorted(perm):
        steps.append(lambda x, o: b.transpose(x, perm, out=o))
    units = [i for i, label in enumerate(layout) if label == "u"]
    if units:
        steps.append(lambda x, o: b.unsqueeze(x, units, out=o))
    if "k*g" in layout:
        merged = layout.index("k*g")
        target = [0] * merged + [-1] + [_extent(b, label, spatial, a) for label in layout[merged + 1 :]]
        steps.append(lambda x, o: b.reshape(x, shape_vector(b, target), out=o))
    tensor = y
    for index, step in enumerate(steps):
        tensor = step(tensor, out if index == len(steps) - 1 else None)


def recognize_correlation_loops(graph: gs.Graph, opset: int) -> None:
    """Replace every pad-once correlation loop with one `convlower.LocalCorrelation` node and the
    rearrangement its join makes of it: the Concat's output, or, where the costs are some of the
    Concat's inputs, one input in their place.

    New tensors are named after the Concat's output, so that a static-shape import of the same
    model (optimize's shape probe) names them alike."""
    if not has_sliced_pad(graph):
        return
    found = matches_at_every_size(graph, opset, find_correlation_loops, CorrelationLoopMatch.signature)
    for per_trial in sorted(found, key=lambda trials: (trials[0].output.name, -trials[0].start)):  # later runs first: indices hold
        _replace(graph, opset, per_trial)
    graph.cleanup()


def _replace(graph: gs.Graph, opset: int, per_trial: Sequence[CorrelationLoopMatch]) -> None:
    """Emit the LocalCorrelation of a match (found at each trial size) into `graph`."""
    match = per_trial[0]
    joined, a, b_tensor = (local(graph, t) for t in (match.output, match.a, match.b))
    concat = joined.inputs[0]
    dtype = joined.dtype or a.dtype or np.float32
    name = f"{joined.name}/{LOCAL_CORRELATION}" + ("" if match.start == 0 else f"{match.start}")
    whole = match.start == 0 and match.end == len(concat.inputs)
    if whole:
        output = joined
        joined.inputs.clear()
    else:
        output = gs.Variable(f"{name}/joined", dtype)
        inputs = list(concat.inputs)
        concat.inputs.clear()
        concat.inputs.extend(inputs[: match.start] + [output] + inputs[match.end :])
    b = Builder(graph, opset, name, dtype=dtype)
    spatial = dims_across(*(m.spatial for m in per_trial))
    correlation = match.correlation
    direct = match.layout == ("n", "g", "k", *(f"s{i}" for i in range(len(spatial))))
    y = output if direct else gs.Variable(name, dtype)
    emit_local_correlation(b, a, b_tensor, correlation, out=y)
    if y is not joined:
        y.shape = None if a.shape is None else [a.shape[0], correlation.groups, correlation.taps, *a.shape[FIRST_SPATIAL:]]
    if not direct:
        _rearranged(b, y, match.layout, spatial, a, output)


