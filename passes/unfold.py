"""The exported F.unfold idioms: recognizing them, and the `convlower.Unfold` family.

Both torch exporters (dynamo and TorchScript, opset 17+) write `F.unfold(x, k, dilation, padding,
stride)` as

    Pad(x) -> Gather(axis=2, index[kh, ho]) -> Gather(axis=4, index[kw, wo]) -> Transpose(0,1,2,4,3,5)

with `index[k, p] = k * dilation + p * stride`, giving T `[N, C, Kh, Kw, Ho, Wo]`; one Reshape or
more then make the `[N, C*K, L]` of F.unfold or the user's view of it. At static dims the dynamo
exporter stores the indices as initializers; the TorchScript one, and both under symbolic dims,
compute them from `Shape(x)` with Range and Add:

    Shape(x) -> Gather -> Add(pads) -> Sub(reach - 1) -> Range -> Unsqueeze -> Add([[0], [d], [2d]]) -> index

The matchers read static shapes and fold that arithmetic (`folded_value`); under symbolic dims
they run at trial sizes (`symbolic.matches_at_every_size`), and the rewrite reads the batch and
the output extent from the input's run-time shape, so the model keeps its symbolic dims.

Two recognizers run (plain unfolds last, after every recognizer that consumes an unfold):

1. `recognize_dynamic_filters`: a view of T weighted by filters and summed over exactly the kernel
   axes -- `einsum('nckhw,nkhw->nchw', ...)` (seed 000, method_1) or `(cols * f).sum(dim)` (kernel
   prediction networks, involution) -- becomes one `convlower.DynamicFilter` node, with the filters
   transposed and reshaped to the canonical `[N, G, K, *S_out]`.
2. `recognize_unfolds`: an unfold still used otherwise becomes a `convlower.Unfold` node
   (output `[N, C*K, L]`, as F.unfold), whose variants are `gather` (as exported), `slice_concat`
   and `conv_unfold`.

Anything that differs -- a non-zero or non-constant pad, indices of another pattern, a sum over other
axes, another reduction, filters broadcast over the batch -- is left as it is. F.fold needs no
recognizer: both exporters already write it as the standard Col2Im.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from . import register, register_recognizer
from .base import Builder, OpFamily, SimpleVariant, attr_text, constant_value, static_shape
from .dynamic_filter import (
    OP_TYPE as DYNAMIC_FILTER,
    SlidingWindow,
    WindowSpec,
    conv_windows,
    gathered_windows,
    overload_name,
    pad_spatial,
    resolved_attrs,
    shape_vector,
    stacked_windows,
    unknown_dims,
    output_extents,
    window_spec_fields,
)
from .local_functions import DOMAIN, CanonicalOp, add_function, register_canonical_op
from .symbolic import dims_across, folded_value, local, matches_at_every_size

OP_TYPE = "Unfold"
UNFOLD_PERM = [0, 1, 2, 4, 3, 5]

def same_dim(a: int | str | None, b: int | str | None) -> bool:
    """Equal static dims, or the same named symbolic dim."""
    return a is not None and a == b


# --- the exported F.unfold ---------------------------------------------------------------------------


@dataclass(frozen=True)
class UnfoldMatch:
    """One exported F.unfold: its input, window, and T `[N, C, Kh, Kw, Ho, Wo]` (the Transpose output)."""

    source: gs.Tensor
    window: SlidingWindow
    columns: gs.Tensor
    batch: int | str | None
    channels: int
    out_spatial: tuple[int, int]

    def signature(self) -> tuple:
        """What must be the same at every trial size for the match to hold at every size."""
        return (self.columns.name, self.source.name, self.window, self.channels)

    @property
    def axes(self) -> list[tuple[str, int]]:
        """T's axes after the batch axis, each with its kind: channel, kernel tap or spatial."""
        (kh, kw), (ho, wo) = self.window.kernel_shape, self.out_spatial
        return [("c", self.channels), ("k", kh), ("k", kw), ("s", ho), ("s", wo)]


def match_unfold(transpose: gs.Node, opset: int) -> UnfoldMatch | None:
    """The F.unfold ending at this Transpose, or None when any part differs from the exported form."""
    if transpose.op != "Transpose" or list(transpose.attrs.get("perm", [])) != UNFOLD_PERM:
        return None
    gather_w = _producer(transpose.inputs[0], "Gather")
    gather_h = _producer(gather_w.inputs[0], "Gather") if gather_w else None
    if gather_w is None or gather_h is None or _axis(gather_h, 4) != 2 or _axis(gather_w, 5) != 4:
        return None
    pad = _producer(gather_h.inputs[0], "Pad")
    source, pads = (gather_h.inputs[0], [0] * 8) if pad is None else (pad.inputs[0], zero_pads(pad, opset, 4))
    shape = static_shape(source)
    if pads is None or shape is None or len(shape) != 4 or any(d is None for d in shape[1:]) or any(pads[i] for i in (0, 1, 4, 5)):
        return None
    spatial_pads = (pads[2], pads[3], pads[6], pads[7])
    axes = []
    for axis, gather in enumerate((gather_h, gather_w)):
        index = folded_value(gather.inputs[1], opset)
        padded = shape[2 + axis] + spatial_pads[axis] + spatial_pads[axis + 2]  # type: ignore[operator]
        found = window_axis(index, padded)
        if found is None:
            return None
        axes.append(found)
    (kh, sh, dh, ho), (kw, sw, dw, wo) = axes
    window = SlidingWindow((kh, kw), (sh, sw), (dh, dw), spatial_pads)
    return UnfoldMatch(source, window, transpose.outputs[0], source.shape[0], int(shape[1]), (ho, wo))  # type: ignore[arg-type]


def _producer(tensor: gs.Tensor, op: str) -> gs.Node | None:
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == op:
        return tensor.inputs[0]
    return None


def _axis(gather: gs.Node, rank: int) -> int:
    axis = int(gather.attrs.get("axis", 0))
    return axis + rank if axis < 0 else axis


def zero_pads(pad: gs.Node, opset: int, rank: int) -> list[int] | None:
    """The pads of a constant-mode Pad that pads a rank-`rank` tensor with zeros; None for any other
    Pad (another mode, a fill that is not zero or not known, an `axes` input, negative pads)."""
    if attr_text(pad.attrs.get("mode", "constant")) != "constant" or len(pad.inputs) < 2:
        return None
    if len(pad.inputs) > 3 and pad.inputs[3].name:
        return None
    if len(pad.inputs) > 2 and pad.inputs[2].name:
        fill = constant_value(pad.inputs[2])
        if fill is None or np.any(fill != 0):
            return None
    pads = folded_value(pad.inputs[1], opset)
    if pads is None or pads.shape != (2 * rank,) or np.any(pads < 0):
        return None
    return [int(p) for p in pads]


def window_axis(index: np.ndarray | None, padded: int) -> tuple[int, int, int, int] | None:
    """(kernel, stride, dilation, out) of one axis whose Gather index is `k * dilation + p * stride`
    and covers exactly the Conv output extent of `padded` input positions; None otherwise."""
    if index is None or index.ndim != 2 or min(index.shape) < 1 or index[0, 0] != 0:
        return None
    kernel, out = index.shape
    dilation = int(index[1, 0]) if kernel > 1 else 1
    reach = (kernel - 1) * dilation + 1
    stride = int(index[0, 1]) if out > 1 else max(1, padded - reach + 1)
    if dilation < 1 or stride < 1 or (padded - reach) // stride + 1 != out:
        return None
    expected = np.arange(kernel)[:, None] * dilation + np.arange(out)[None, :] * stride
    return (kernel, stride, dilation, out) if np.array_equal(index, expected) else None


def find_unfolds(graph: gs.Graph, opset: int) -> list[UnfoldMatch]:
    return [m for m in (match_unfold(n, opset) for n in graph.nodes if n.op == "Transpose") if m is not None]


def has_unfold_transpose(graph: gs.Graph) -> bool:
    """Whether any node could end an exported F.unfold: spares a graph without one the trial sizes."""
    return any(n.op == "Transpose" and list(n.attrs.get("perm", [])) == UNFOLD_PERM for n in graph.nodes)


# --- views of T and the dynamic-filter idiom ---------------------------------------------------------


def views_of(columns: gs.Tensor) -> list[gs.Tensor]:
    """T and every tensor reached from it through Reshape nodes only."""
    found, frontier = [columns], [columns]
    while frontier:
        tensor = frontier.pop()
        for node in tensor.outputs:
            if node.op == "Reshape" and node.inputs[0] is tensor:
                found.append(node.outputs[0])
                frontier.append(node.outputs[0])
    return found


def axis_kinds(match: UnfoldMatch, view: gs.Tensor) -> list[str] | None:
    """The kind of each axis of a view of T: "n" (batch), "c", "c_outer"/"c_inner" (channels split
    in two, as grouped layers do), "k", "s", or "unit" (size 1); None when an axis mixes kinds or
    splits anything but the channels, or the view's shape is not known well enough."""
    shape = view.shape
    if shape is None or len(shape) < 2 or not same_dim(shape[0], match.batch):
        return None
    dims = list(shape[1:])
    if any(not isinstance(d, int) for d in dims):
        return None
    axes = [(kind, size) for kind, size in match.axes if size != 1]
    kinds = ["n"] + ["unit" if d == 1 else "" for d in dims]
    sized = [j + 1 for j, d in enumerate(dims) if d != 1]
    i = j = 0
    while i < len(axes) and j < len(sized):
        size = shape[sized[j]]
        kind, extent = axes[i]
        if extent == size:
            kinds[sized[j]] = kind
            i, j = i + 1, j + 1
        elif extent < size:
            merged = {kind}
            while extent < size and i + 1 < len(axes):
                i += 1
                extent *= axes[i][1]
                merged.add(axes[i][0])
            if extent != size or len(merged) > 1:
                return None
            kinds[sized[j]] = kind
            i, j = i + 1, j + 1
        else:
            if kind != "c" or j + 1 >= len(sized) or size * shape[sized[j + 1]] != extent:
                return None
            kinds[sized[j]], kinds[sized[j + 1]] = "c_outer", "c_inner"
            i, j = i + 1, j + 2
    if i != len(axes) or j != len(sized):
        return None
    return kinds


@dataclass(frozen=True)
class FilterUse:
    """A view of T weighted by filters and summed over some of its axes.

    `filter_axes[j]` is the filters' axis that runs along axis j of the view (None where the filters
    are broadcast along it). `extra_axes` are filter axes the view lacks, kept in the output (CARAFE's
    upsampling phases: several filters per position over one unfold). The output holds the batch,
    the extra axes, then the view's unsummed axes in order, permuted by `output_perm`.
    """

    consumer: gs.Node
    view: gs.Tensor
    filters: gs.Tensor
    filter_axes: tuple[int | None, ...]
    reduced: frozenset[int]
    extra_axes: tuple[int, ...] = ()
    output_perm: tuple[int, ...] | None = None

    @property
    def extra_shape(self) -> list[int]:
        return [int(self.filters.shape[a]) for a in self.extra_axes]


def einsum_use(node: gs.Node, view: gs.Tensor) -> FilterUse | None:
    """`einsum(view, filters)` or `einsum(filters, view)`: every view letter but the summed ones in
    the output, filter letters from the view or kept in the output, no ellipsis, no diagonals."""
    equation = attr_text(node.attrs.get("equation", "")).replace(" ", "")
    if len(node.inputs) != 2 or "..." in equation or "->" not in equation:
        return None
    operands, output = equation.split("->")
    terms = operands.split(",")
    if len(terms) != 2 or any(len(set(t)) != len(t) for t in terms + [output]):
        return None
    position = [i for i, t in enumerate(node.inputs) if t is view]
    if len(position) != 1:
        return None
    view_term, filter_term = terms[position[0]], terms[1 - position[0]]
    filters = node.inputs[1 - position[0]]
    extra = [letter for letter in filter_term if letter not in view_term]
    if len(view_term) != len(view.shape or ()) or len(filter_term) != len(filters.shape or ()):
        return None
    if any(letter not in output for letter in extra) or any(not isinstance(filters.shape[filter_term.index(e)], int) for e in extra):
        return None
    reduced = frozenset(j for j, letter in enumerate(view_term) if letter not in output)
    natural = view_term[0] + "".join(extra) + "".join(l for j, l in enumerate(view_term[1:], 1) if j not in reduced)
    if sorted(natural) != sorted(output):
        return None
    axes = tuple(filter_term.index(letter) if letter in filter_term else None for letter in view_term)
    extra_axes = tuple(filter_term.index(letter) for letter in extra)
    return FilterUse(node, view, filters, axes, reduced, extra_axes, tuple(natural.index(l) for l in output))


def _mul_sum_uses(node: gs.Node, view: gs.Tensor, opset: int) -> list[FilterUse]:
    """`(view * filters).sum(axes)`: a broadcast Mul that keeps the view's shape, then ReduceSum."""
    if len(node.inputs) != 2 or sum(t is view for t in node.inputs) != 1:
        return []
    filters = node.inputs[1] if node.inputs[0] is view else node.inputs[0]
    view_shape, filter_shape = view.shape, filters.shape
    if view_shape is None or filter_shape is None or len(filter_shape) != len(view_shape):
        return []
    axes: list[int | None] = []
    for j, (v, f) in enumerate(zip(view_shape, filter_shape)):
        if same_dim(v, f):
            axes.append(j)
        elif f == 1:
            axes.append(None)
        else:
            return []
    uses = []
    for reduce in node.outputs[0].outputs:
        reduced = reduce_sum_axes(reduce, len(view_shape), opset)
        if reduced is not None:
            uses.append(FilterUse(reduce, view, filters, tuple(axes), reduced))
    return uses


def reduce_sum_axes(node: gs.Node, rank: int, opset: int) -> frozenset[int] | None:
    if node.op != "ReduceSum" or node.attrs.get("noop_with_empty_axes", 0):
        return None
    if opset >= 13:
        axes = constant_value(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else None
    else:
        axes = node.attrs.get("axes")
    if axes is None:
        return None
    return frozenset(int(a) % rank for a in np.ravel(axes))


def _filter_uses(view: gs.Tensor, opset: int) -> list[FilterUse]:
    uses: list[FilterUse] = []
    for node in view.outputs:
        if node.op == "Einsum":
            use = einsum_use(node, view)
            uses.extend([use] if use else [])
        elif node.op == "Mul":
            uses.extend(_mul_sum_uses(node, view, opset))
    return uses


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
            for use in _filter_uses(view, opset):
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


def _shape_parts(
    b: Builder, per_trial: Sequence[Sequence[int]], batches: Sequence[int], spatials: Sequence[Sequence[int]],
    batch: gs.Tensor, extent: Sequence[int | gs.Tensor],
) -> list[int | gs.Tensor] | None:
    """A Reshape target that holds at every size, from the target found at each trial: per axis a
    static size, the batch, one spatial axis of the output, or (once) all of them merged (-1).
    None when an axis is none of these."""
    parts: list[int | gs.Tensor] = []
    for dims in zip(*per_trial):
        spatial = [i for i in range(len(extent)) if all(d == s[i] for d, s in zip(dims, spatials))]
        if all(d == dims[0] for d in dims):
            parts.append(int(dims[0]))
        elif all(d == n for d, n in zip(dims, batches)):
            parts.append(batch)
        elif spatial:
            parts.append(extent[spatial[0]])
        elif all(d == math.prod(s) for d, s in zip(dims, spatials)) and -1 not in parts:
            parts.append(-1)
        else:
            return None
    return parts


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
            parts = _shape_parts(b, values, [m.unfold.batch for m in per_trial],  # type: ignore[arg-type]
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


register_recognizer(recognize_dynamic_filters)


def recognize_unfolds(graph: gs.Graph, opset: int) -> None:
    """Replace every exported F.unfold that is still used with a `convlower.Unfold` node, at static
    shapes or, found alike at every trial size, under symbolic dims."""
    if not has_unfold_transpose(graph):
        return
    for per_trial in matches_at_every_size(graph, opset, find_unfolds, UnfoldMatch.signature):
        match = per_trial[0]
        columns, source = local(graph, match.columns), local(graph, match.source)
        if not columns.outputs:
            continue
        transpose = columns.inputs[0]
        transpose.outputs.clear()
        b = Builder(graph, opset, transpose.name or OP_TYPE, dtype=columns.dtype or np.float32)
        out_spatial = dims_across(*(m.out_spatial for m in per_trial))
        attrs = match.window.attrs()
        unfolded = b.op(OP_TYPE, [source], attrs, domain=DOMAIN)
        length = None if None in out_spatial else math.prod(out_spatial)  # type: ignore[arg-type]
        unfolded.shape, unfolded.dtype = [source.shape[0], match.channels * match.window.taps, length], columns.dtype
        extent = output_extents(b, match.window, source, out_spatial)
        b.reshape(unfolded, shape_vector(b, [0, match.channels, *match.window.kernel_shape, *extent]), out=columns)
        add_function(graph, OP_TYPE, attrs, opset)
    graph.cleanup()


# --- the Unfold family -------------------------------------------------------------------------------



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


def _any_shape(spec: UnfoldSpec) -> str | None:
    """Variants whose unknown dims are read off Shape at run time apply to every node."""
    return None


def _conv_unfold_why_not(spec: UnfoldSpec) -> str | None:
    if spec.dtype != "float32":
        return f"onnxruntime's CPU Conv runs float32 only, not {spec.dtype}"
    if spec.channels is None:
        return "needs static channels (the identity kernel has C * K output channels)"
    return None


VARIANTS = (
    SimpleVariant("gather", _any_shape, build_gather, "Pad + Gather per axis + Transpose (as exported)"),
    SimpleVariant("slice_concat", _any_shape, build_slice_concat, "Pad + Slice per tap + Concat"),
    SimpleVariant(
        "conv_unfold", _conv_unfold_why_not, build_conv_unfold, "grouped Conv with an identity kernel",
        caveat="spreads NaN and ±inf in X to the other columns of their window (the identity kernel computes 0·inf)",
    ),
)


def build_reference_body(
    b: Builder, attrs: Mapping[str, Any], inputs: Sequence[gs.Variable], outputs: Sequence[gs.Variable]
) -> None:
    """The model-local function body: slice_concat with no shape known, so it runs for any input."""
    build_slice_concat(b, UnfoldSpec(op=OP_TYPE, **unknown_dims(SlidingWindow.from_attrs(attrs))), inputs, outputs)


FAMILY = register(OpFamily(OP_TYPE, DOMAIN, make_unfold_spec, VARIANTS))
CANONICAL = register_canonical_op(CanonicalOp(OP_TYPE, ("X",), resolved_attrs, overload_name, build_reference_body))
