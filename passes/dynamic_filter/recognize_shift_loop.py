"""Hand-written shift-and-sum loops, recognized as one `convlower.DynamicFilter`.

Code that writes a dynamic filter tap by tap (`models/idioms.py`'s `ShiftLoop`)

    padded = F.pad(x, [p] * 2 * rank)
    for t, (i, j) in enumerate(offsets):
        out = out + padded[:, :, i:i + h, j:j + w] * filters[:, t:t + 1]

is exported by both torch exporters, at ranks 1 to 3, as

    x ──► Pad(zeros, spatial axes) ──► Slice(axis 2) ─► Slice(axis 3) ─┐            (one chain per tap)
    filters ──► Slice(axis 1, t : t + 1) ────────────────────────────── Mul ─► term_t
    term_0 ─► Add ◄─ term_1 ─► Add ◄─ term_2 ... ─► out          (an Add tree: `out = out + term`)
       or     Unsqueeze(0) per term ─► Concat(axis 0) ─► ReduceSum(axes [0], keepdims 0)
                                                                   (`torch.stack(terms).sum(0)`)

and a variadic `Sum` node may stand for any Add of the tree. The taps may come in any order: what
is matched is the set of (window -> filter channel) pairs. The windows must be exactly the taps of
one sliding window (`shifted_slices.kernel_window`: a complete k1 x k2 (x k3) box, each offset once,
spaced by the dilation, all stepping by one stride, each as long as the Conv output); each filter
slice must be one channel of one filters tensor `[N, Kf, *S_out]` with the input's batch (not
broadcast over it) and the output's spatial extent. Every leaf of the tree must be such a term, and
the inner sums used nowhere else: a bias or residual added into the same chain leaves it as it is. Recognizing the loop lets the tuner pick another lowering (on CPU the export already
runs as fast as `shift_sum`).

Rewrite:

    filters ──► [Gather(axis 1, channel of each row-major tap)] ──► Unsqueeze(1) ─► F [N, 1, K, *S_out]
    DynamicFilter(x, F, kernel_shape, strides, dilations, pads)  ──► out      (G = 1)

The Gather is there only when the taps use the filter channels in another order, or not all of them.
Under symbolic dims the matcher runs at trial sizes (`symbolic.matches_at_every_size`); the
rewrite uses no shapes, so it holds at every size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..base import Builder
from ..local_functions import DOMAIN, add_function
from ..matching.shifted_slices import (
    ShiftedSlice,
    has_sliced_pad,
    kernel_window,
    only_use,
    shifted_slice,
    sliced_ranges,
    unsqueezed_axes,
)
from ..matching.symbolic import local, matches_at_every_size
from ..matching.reduction import reduce_sum_axes
from . import OP_TYPE as DYNAMIC_FILTER, SlidingWindow

SUMS = ("Add", "Sum")
FIRST_SPATIAL = 2
"""X is `[N, C, *S]`."""


@dataclass(frozen=True)
class ShiftLoopMatch:
    """An accumulation of filtered taps: `output` = DynamicFilter(`source`, channels of `filters`)."""

    output: gs.Tensor
    source: gs.Tensor
    filters: gs.Tensor
    window: SlidingWindow
    channels: tuple[int, ...]
    """The filter channel of each tap, taps in row-major order."""


def _is_inner_sum(node: gs.Node, graph: gs.Graph) -> bool:
    """An Add/Sum whose result only feeds another Add/Sum: part of a larger accumulation."""
    out = node.outputs[0]
    return only_use(out, graph) and out.outputs[0].op in SUMS


def _sum_terms(node: gs.Node, graph: gs.Graph) -> list[gs.Tensor]:
    """The leaves of the Add/Sum tree rooted at `node` (inner sums used nowhere else)."""
    terms = []
    for tensor in node.inputs:
        producer = tensor.inputs[0] if len(tensor.inputs) == 1 else None
        if producer is not None and producer.op in SUMS and only_use(tensor, graph):
            terms.extend(_sum_terms(producer, graph))
        else:
            terms.append(tensor)
    return terms


def _stacked_terms(reduce: gs.Node, graph: gs.Graph, opset: int) -> list[gs.Tensor]:
    """The terms of `ReduceSum(Concat(Unsqueeze(term, 0), ..., axis 0), axes [0], keepdims 0)`."""
    stacked = reduce.inputs[0]
    if len(stacked.inputs) != 1 or stacked.inputs[0].op != "Concat" or not only_use(stacked, graph):
        return []
    concat = stacked.inputs[0]
    if int(concat.attrs.get("axis", 0)) != 0 or int(reduce.attrs.get("keepdims", 1)) != 0:
        return []
    terms = []
    for tensor in concat.inputs:
        producer = tensor.inputs[0] if len(tensor.inputs) == 1 else None
        if producer is None or unsqueezed_axes(producer, opset) != [0] or not only_use(tensor, graph):
            return []
        terms.append(producer.inputs[0])
    rank = None if not terms or terms[0].shape is None else len(terms[0].shape) + 1
    return terms if rank and reduce_sum_axes(reduce, rank, opset) == frozenset({0}) else []


def _filtered_tap(term: gs.Tensor, graph: gs.Graph, opset: int) -> tuple[ShiftedSlice, gs.Tensor, int] | None:
    """(window, filters, channel) when `term` is `window * filters[:, channel:channel + 1]`, the
    filters `[N, Kf, *S_out]` matching the window's batch and extent."""
    if len(term.inputs) != 1 or term.inputs[0].op != "Mul" or not only_use(term, graph):
        return None
    mul = term.inputs[0]
    if len(mul.inputs) != 2:
        return None
    for window_tensor, filter_tensor in (mul.inputs, mul.inputs[::-1]):
        window = shifted_slice(window_tensor, FIRST_SPATIAL, opset)
        read = sliced_ranges(filter_tensor, opset) if window is not None else None
        if window is None or read is None:
            continue
        filters, ranges = read
        shape = window.shape
        if filters.shape is None or len(ranges) != len(shape) or ranges[1][2] != 1:
            continue
        whole = [(0, 1, d) for d in filters.shape]
        if ranges[:1] + ranges[2:] == whole[:1] + whole[2:] and [shape[0], *shape[2:]] == [filters.shape[0], *filters.shape[2:]]:
            return window, filters, ranges[1][0]
    return None


def _match(output: gs.Tensor, terms: list[gs.Tensor], graph: gs.Graph, opset: int) -> ShiftLoopMatch | None:
    taps = [_filtered_tap(term, graph, opset) for term in terms]
    if len(taps) < 2 or any(tap is None for tap in taps):
        return None
    windows = [tap[0] for tap in taps]  # type: ignore[index]
    filters = {id(tap[1]): tap[1] for tap in taps}  # type: ignore[index]
    found = kernel_window(windows)
    if found is None or len(filters) != 1:
        return None
    window, indices = found
    channels = [0] * window.taps
    for index, tap in zip(indices, taps):
        channels[index] = tap[2]  # type: ignore[index]
    return ShiftLoopMatch(output, windows[0].source, next(iter(filters.values())), window, tuple(channels))


def find_shift_loops(graph: gs.Graph, opset: int) -> list[ShiftLoopMatch]:
    """Every accumulation (Add/Sum tree or stack-and-ReduceSum) of filtered taps of one window."""
    matches = []
    for node in graph.nodes:
        if node.op in SUMS and len(node.outputs) == 1 and not _is_inner_sum(node, graph):
            terms = _sum_terms(node, graph)
        elif node.op == "ReduceSum" and len(node.outputs) == 1:
            terms = _stacked_terms(node, graph, opset)
        else:
            continue
        match = _match(node.outputs[0], terms, graph, opset)
        if match is not None:
            matches.append(match)
    return matches


def _signature(match: ShiftLoopMatch) -> tuple:
    return match.output.name, match.source.name, match.filters.name, match.window, match.channels


def recognize_shift_loops(graph: gs.Graph, opset: int) -> None:
    """Replace every exported shift-and-sum loop with one `convlower.DynamicFilter` node.

    The filters tensor it gets is named after the output, so that a static-shape import of the
    same model (optimize's shape probe) names it alike."""
    if not has_sliced_pad(graph):
        return
    for per_trial in matches_at_every_size(graph, opset, find_shift_loops, _signature):
        match = per_trial[0]
        output, source, filters = (local(graph, t) for t in (match.output, match.source, match.filters))
        output.inputs.clear()
        name = f"{output.name}/{DYNAMIC_FILTER}"
        b = Builder(graph, opset, name, dtype=output.dtype or np.float32)
        if list(match.channels) != list(range(match.filters.shape[1])):
            shape = [filters.shape[0], match.window.taps, *filters.shape[2:]]
            taps = gs.Variable(f"{name}/taps", filters.dtype, shape)
            filters = b.op("Gather", [filters, b.ints(match.channels)], {"axis": 1}, out=taps)
        planes = gs.Variable(f"{name}/F", filters.dtype, [filters.shape[0], 1, *filters.shape[1:]])
        b.unsqueeze(filters, [1], out=planes)
        attrs = match.window.attrs()
        b.op(DYNAMIC_FILTER, [source, planes], attrs, domain=DOMAIN, out=output)
        add_function(graph, DYNAMIC_FILTER, attrs, opset)
    graph.cleanup()


