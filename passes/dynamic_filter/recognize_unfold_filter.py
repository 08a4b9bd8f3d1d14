"""F.unfold weighted by per-pixel filters and summed over the kernel taps: a `convlower.DynamicFilter`.

    T = unfold(x)   (matching/unfold.py: Pad -> Gather -> Gather -> Transpose)
      -> Reshape(user's view) -> Einsum('nckhw,nkhw->nchw', view, filters)          (seed 000, method_1)
                              -> Mul(view, filters) -> ReduceSum(kernel axes)       (kernel prediction, involution)

becomes one `convlower.DynamicFilter(x, filters')`, the filters transposed and reshaped to the
canonical `[N, G, K, *S_out]`, then what brings its `[N, E*C, *S_out]` to the use's layout.

The sum must run over exactly the kernel axes; the filters must run along the batch, every kernel
and spatial axis, and along the channels (G = C), their outer split (G = groups) or neither (G = 1).
Several filters per position over one unfold (CARAFE's upsampling phases) tile the input. A sum
over other axes, another reduction, filters broadcast over the batch stay as they are; a sum over
the channels is a correlation (`local_correlation/recognize_unfold_correlation.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from ..base import Builder
from ..local_functions import DOMAIN, add_function
from ..matching.symbolic import dims_across, local, matches_at_every_size, reshape_parts
from ..matching.unfold import FilterUse, UnfoldMatch, axis_kinds, filter_uses, find_unfolds, has_unfold_transpose, views_of
from . import OP_TYPE as DYNAMIC_FILTER, output_extents, shape_vector


def _filter_groups(match: UnfoldMatch, kinds: list[str], use: FilterUse) -> int | None:
    """G when `use` is a dynamic filter over its view, else None.

    The sum must run over exactly the kernel axes; the filters must run along the batch, every
    kernel and spatial axis, and along the channels (G = C), their outer split (G = groups) or
    neither (G = 1) -- never the inner split. The output's shape must be known past the batch.
    """
    kernel = {j for j, kind in enumerate(kinds) if kind == "k"}
    output = use.consumer.outputs[0].shape if use.consumer.outputs else None
    if not kernel or use.reduced != kernel or output is None or any(not isinstance(d, int) for d in output[1:]):
        return None
    has = {kind for kind, axis in zip(kinds, use.filter_axes) if axis is not None}
    needed = {j for j, kind in enumerate(kinds) if kind in ("n", "k", "s")}
    if any(use.filter_axes[j] is None for j in needed) or "c_inner" in has:
        return None
    if "c" in has:
        return match.channels
    if "c_outer" in has:
        return int(use.view.shape[kinds.index("c_outer")])
    return 1


@dataclass(frozen=True)
class FilterMatch:
    """A dynamic filter found over one F.unfold: the unfold, the kind of each axis of the view the
    filters weight, the use, and the filter groups G."""

    unfold: UnfoldMatch
    kinds: tuple[str, ...]
    use: FilterUse
    groups: int

    def signature(self) -> tuple:
        """What must be the same at every trial size for the match to hold at every size."""
        use = self.use
        return (use.consumer.outputs[0].name, use.view.name, use.filters.name, self.unfold.window, self.kinds,
                self.groups, use.filter_axes, use.reduced, use.extra_axes, use.output_perm)


def find_dynamic_filters(graph: gs.Graph, opset: int) -> list[FilterMatch]:
    """Every unfold-weight-sum idiom of a graph whose shapes are static (but perhaps the batch)."""
    found = []
    for match in find_unfolds(graph, opset):
        for view in views_of(match.columns):
            kinds = axis_kinds(match, view)
            if kinds is None:
                continue
            for use in filter_uses(view, opset):
                groups = _filter_groups(match, kinds, use)
                if groups is not None and use.consumer.outputs:
                    found.append(FilterMatch(match, tuple(kinds), use, groups))
    return found


def recognize_dynamic_filters(graph: gs.Graph, opset: int) -> None:
    """Replace every exported unfold-weight-sum idiom with one `convlower.DynamicFilter` node,
    at static shapes or, found alike at every trial size, under symbolic dims."""
    if not has_unfold_transpose(graph):
        return
    for per_trial in matches_at_every_size(graph, opset, find_dynamic_filters, FilterMatch.signature):
        _replace_with_dynamic_filter(graph, opset, per_trial)
    graph.cleanup()


def _canonical_filters(
    b: Builder, per_trial: Sequence[FilterMatch], filters: gs.Tensor, extent: Sequence[int | gs.Tensor]
) -> gs.Tensor:
    """The filters as `[N, E*G, K, *S_out]`: their axes put in canonical order (batch, extra,
    channel, kernel, spatial -- the view's order with the extra axes after the batch), then
    reshaped; only a reordering of axes longer than 1 needs a Transpose."""
    first = per_trial[0]
    use, kinds = first.use, first.kinds
    in_view = [axis for axis, kind in zip(use.filter_axes, kinds) if axis is not None and kind != "unit"]
    ordered = in_view[:1] + list(use.extra_axes) + in_view[1:]
    perm = ordered + [a for a in range(len(use.filters.shape)) if a not in ordered]
    moved = [a for a in perm if use.filters.shape[a] != 1]
    transposed = moved != sorted(moved)
    if transposed:
        filters = b.transpose(filters, perm)
    head = [math.prod(use.extra_shape) * first.groups, first.unfold.window.taps]
    if not transposed and all(
        list(m.use.filters.shape[1:]) == head + list(m.unfold.out_spatial) for m in per_trial
    ):
        return filters
    reshaped = b.reshape(filters, shape_vector(b, [0, *head, *extent]))
    reshaped.shape = [filters.shape[0] if filters.shape else None, *head, *(e if isinstance(e, int) else None for e in extent)]
    reshaped.dtype = use.filters.dtype
    return reshaped


def _replace_with_dynamic_filter(graph: gs.Graph, opset: int, per_trial: Sequence[FilterMatch]) -> None:
    """Emit the DynamicFilter for a match (one per trial size) and what brings its `[N, E*C, *S_out]`
    to the use's output, shape-generic: sizes that vary between trials are read at run time.

    With extra filter axes (E > 1) the input is tiled E times along the channels, so channel
    e*C + c is filtered by group e*G + c // (C/G).
    """
    first = per_trial[0]
    match, use = first.unfold, first.use
    output = local(graph, use.consumer.outputs[0])
    source, filters = local(graph, match.source), local(graph, use.filters)
    out_spatial = dims_across(*(m.unfold.out_spatial for m in per_trial))
    dtype = output.dtype or use.consumer.outputs[0].dtype or np.float32
    b = Builder(graph, opset, use.consumer.name or DYNAMIC_FILTER, dtype=dtype)
    batch = b.shape(source, 0, 1)
    extent = output_extents(b, match.window, source, out_spatial)
    copies = math.prod(use.extra_shape)
    channels = copies * match.channels
    if copies > 1:
        tiled = b.op("Tile", [source, b.ints([1, copies, 1, 1])])
        tiled.shape, tiled.dtype = [source.shape[0], channels, *source.shape[2:]], source.dtype
        source = tiled
    filters = _canonical_filters(b, per_trial, filters, extent)

    steps: list[tuple[str, list[list[int]] | list[int]]] = []
    shapes = [[m.unfold.batch, channels, *m.unfold.out_spatial] for m in per_trial]
    perm = list(use.output_perm or ())
    if perm != sorted(perm):
        naturals = [[m.unfold.batch, *m.use.extra_shape, *(int(d) for j, d in enumerate(m.use.view.shape[1:], 1) if j not in m.use.reduced)]
                    for m in per_trial]
        steps += [("Reshape", naturals), ("Transpose", perm)]
        shapes = [[n[p] for p in perm] for n in naturals]
    wanted = [list(m.use.consumer.outputs[0].shape) for m in per_trial]
    if wanted != shapes:
        steps.append(("Reshape", wanted))

    targets = []
    for op, values in steps:
        if op == "Reshape":
            parts = reshape_parts(values, [m.unfold.batch for m in per_trial],  # type: ignore[arg-type]
                                 [m.unfold.out_spatial for m in per_trial], batch, extent)
            if parts is None:
                return
            values = parts
        targets.append((op, values))

    output.inputs[0].outputs.clear()
    attrs = match.window.attrs()
    result = b.op(DYNAMIC_FILTER, [source, filters], attrs, domain=DOMAIN, out=None if targets else output)
    result.shape, result.dtype = [source.shape[0], channels, *out_spatial], dtype
    for i, (op, values) in enumerate(targets):
        out = output if i == len(targets) - 1 else None
        result = b.reshape(result, shape_vector(b, values), out=out) if op == "Reshape" else b.transpose(result, values, out=out)
    add_function(graph, DYNAMIC_FILTER, attrs, opset)
