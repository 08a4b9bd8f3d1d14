"""Local correlations written with `F.unfold` / `nn.Unfold`, recognized as one `convlower.LocalCorrelation`.

Flow and stereo code without a correlation kernel compares every position of one map with a window
of the other by unfolding the second map (`models/correlation_idioms.py`):

    windows = F.unfold(f2, k, padding=k // 2).view(b, c, k * k, h, w)       # UnfoldCorrelation
    cost = (windows * f1[:, :, None]).sum(1)                                # [B, k*k, H, W]

    padded = F.pad(right, (D - 1, 0, 0, 0))                                 # UnfoldStereo
    windows = nn.Unfold((1, D))(padded).view(b, c, D, h, w)
    cost = (left.unsqueeze(2) * windows).sum(1).flip(1)                     # [B, D, H, W]

Both are `Y[n, k, p] = sum_c A[n, c, p] · B[n, c, p + δ_k]` with B read as zero outside its extent,
A the map that multiplies the windows and B the map unfolded. The window's zero pads (F.unfold's
own, and any constant zero `F.pad` before it) fix the displacements: on each spatial axis
`δ = j·dilation - pad_begin` for taps j = 0..k-1. UnfoldCorrelation's 9x9 window is
first=(-4, -4), last=(4, 4), step=(1, 1); UnfoldStereo's left pad of D-1 is first=(0, -(D-1)),
last=(0, 0), step=(1, 1), and its `.flip(1)` reverses the displacement order: first=(0, 0),
last=(0, -(D-1)), step=(1, -1), disparity d <-> δ = -d, as GwcNet's volumes.

What both torch exporters write (TorchScript at opset 17, dynamo at 18), at static dims:

    f2 ─► [Pad(zeros, spatial: F.pad)]* ─► Pad(zeros: F.unfold's padding, perhaps all 0)
       ─► Gather(axis 2, idx[kh, Ho]) ─► Gather(axis 4, idx[kw, Wo]) ─► Transpose(0,1,2,4,3,5)   T [N, C, kh, kw, Ho, Wo]
       ─► Reshape [N, C·K, L] (TorchScript) ─► Reshape [N, C, K, H, W]                        the view
    f1 ─► Unsqueeze(2) ───────────────────────────────────────────────── Mul                [N, C, K, H, W]
       ─► ReduceSum(axes [1], keepdims 0)                                                    [N, K, H, W]
       ─► [Slice(starts [-1], ends [INT64_MIN (dynamo) | -INT64_MAX (TorchScript)], axes [1], steps [-1])]   flip(1)

(dynamo stores the Gather indices as initializers; TorchScript computes them from Shape with
Range and Add, and its F.pad's pads from ConstantOfShape, Concat, Slice, Transpose and Cast.)
Under symbolic batch/H/W both exporters compute the indices and the view's shape from `Shape`
at run time:

    Shape(Pad(f2)) ─► Gather ─► [Add(pads) ─► Sub(reach - 1)] ─► Range ─► Unsqueeze ─► Add([[0], [d], ..]) ─► idx
    Shape(f1) ─► Gather / Shape(start, end) ─► Unsqueeze ─► Concat(.., [C], [K], ..) ─► the view's Reshape target

The window is read by `unfold.match_unfold` (the F.unfold recognizer's matcher of the exported
unfold), the axes of each view of T by `unfold.axis_kinds`; under symbolic dims the matcher runs
at trial sizes (`symbolic.matches_at_every_size`) and counts only where it matches alike at every
trial. Also matched: `einsum('nckhw,nchw->nkhw', windows, f1)` (any output order: a Transpose
follows), `.mean(1)` (reduction "mean"), `keepdim=True`, the view `[N, C, kh, kw, H, W]`,
dilated windows (δ steps by the dilation), channel groups (`.view(b, G, C//G, K, h, w)` summed
over axis 2: `[N, G, K, H, W]`), and a flip of any tap axis of the output (`.flip` over one or
both axes of a `[N, kh, kw, H, W]` output), folded into descending displacements.

The rewrite: the output (the flip's, where a flip over tap axes only is the sum's only use) is

    LocalCorrelation(A, B, first, last, step, groups, reduction)  [N, G, K, H, W]
    ─► Squeeze(1) (G = 1 and the output [N, K, H, W]) | Reshape | nothing ─► [Transpose (einsum's order)]

with a Reshape target that reads the batch and any symbolic spatial extent off A's shape at run
time: the model keeps its symbolic dims.

Soundness: the unfold must be stride 1 with `Ho, Wo = H, W` (total zero pads = reach - 1 on each
axis), every pad a constant zero pad of the spatial axes; A must be a tensor of B's shape reached
only through Reshape/Unsqueeze (flat order kept) and broadcast exactly over the tap axes (not over
the batch or channels); the reduction must run over exactly the channel axes (or only the inner
split: groups); a flip is folded only where it reverses a whole axis holding taps.

Left as they are (each with a test): a sum over the window axis (a DynamicFilter, or an Unfold
times a broadcast map: the plain Unfold recognizer's), a sum over channels and taps, a max or
another reduction, a reflect or replicate F.pad or a non-zero fill (another meaning at the
border: the unfold then stays a plain `convlower.Unfold`), A broadcast over the batch, products of
two unfolds, strided windows (Ho != H). A flip over a spatial axis is not folded: it stays a
Slice after the rewritten correlation (as would any Slice that is not a whole reversal). A pad
on the other side (`F.pad(right, (0, D - 1))`) is another window, δ = 0..D-1, recognized as such;
a pad of another total size cannot be viewed as `[b, c, D, h, w]` (torch refuses the view).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from ..base import Builder, static_shape
from ..dynamic_filter import shape_vector
from ..matching.reduction import read_reduction
from ..matching.symbolic import dims_across, folded_value, has_symbolic_inputs, local, matches_at_every_size, reshape_parts
from ..matching.unfold import (
    UnfoldMatch,
    axis_kinds,
    einsum_use,
    has_unfold_transpose,
    match_unfold,
    same_dim,
    views_of,
    zero_pads,
)
from . import Correlation, emit_local_correlation

SPATIAL = 2
"""F.unfold's input is `[N, C, H, W]`: two spatial axes."""
CHANNEL_KINDS = ("c", "c_outer", "c_inner")
RESHAPING = ("Reshape", "Unsqueeze")
"""Ops that take A to its broadcast form without moving any element (flat order kept)."""


# --- B: the unfolded map, and the window's displacements -----------------------------------------------


@dataclass(frozen=True)
class Window:
    """The unfolded map B `[N, C, H, W]` before every zero pad, and the displacements its window reads."""

    source: gs.Tensor
    first: tuple[int, ...]
    step: tuple[int, ...]
    counts: tuple[int, ...]


def correlation_window(unfold: UnfoldMatch, opset: int) -> Window | None:
    """B and the displacements of an exported F.unfold: B is the tensor before the constant zero
    pads of spatial axes that precede the unfold (F.pad's, then F.unfold's own); a pad of any other
    kind ends the walk (its output is then B). None unless the window is stride 1 and its output
    keeps B's spatial extent (the pads add up to the window's reach less one)."""
    source, pads = unfold.source, list(unfold.window.pads)
    while len(source.inputs) == 1 and source.inputs[0].op == "Pad":
        outer = zero_pads(source.inputs[0], opset, 2 + SPATIAL)
        if outer is None or any(outer[a] for a in (0, 1, 2 + SPATIAL, 3 + SPATIAL)):
            break
        pads = [p + q for p, q in zip(pads, outer[2 : 2 + SPATIAL] + outer[4 + SPATIAL :])]
        source = source.inputs[0].inputs[0]
    shape = source.shape
    window = unfold.window
    if shape is None or len(shape) != 2 + SPATIAL or any(s != 1 for s in window.strides):
        return None
    if any(not same_dim(o, shape[2 + a]) for a, o in enumerate(unfold.out_spatial)):
        return None
    return Window(source, tuple(-p for p in pads[:SPATIAL]), window.dilations, window.kernel_shape)


# --- A, the product and the reduction over channels -----------------------------------------------------


@dataclass(frozen=True)
class ChannelSum:
    """A view of T times A `[N, C, H, W]`, reduced over the view axes `reduced` by `consumer`.

    `natural_axes` are the view axes the reduction keeps, in the view's order (None: a reduced axis
    kept as 1); the consumer's output holds them permuted, its axis i holding natural axis
    `output_perm[i]` (an einsum's output order; the identity for a ReduceSum)."""

    consumer: gs.Node
    a: gs.Tensor
    reduced: frozenset[int]
    reduction: str
    natural_axes: tuple[int | None, ...]
    output_perm: tuple[int, ...]

    @property
    def output_axes(self) -> tuple[int | None, ...]:
        """The view axis each axis of the consumer's output holds."""
        return tuple(self.natural_axes[p] for p in self.output_perm)


def reshaped_origin(tensor: gs.Tensor, b_shape: Sequence[int | str | None]) -> gs.Tensor | None:
    """The tensor of B's shape that `tensor` is, through Reshape and Unsqueeze nodes only (same
    elements in the same flat order); None when there is none."""
    while True:
        shape = tensor.shape
        if shape is not None and len(shape) == len(b_shape) and all(same_dim(x, y) for x, y in zip(shape, b_shape)):
            return tensor
        if len(tensor.inputs) != 1 or tensor.inputs[0].op not in RESHAPING:
            return None
        tensor = tensor.inputs[0].inputs[0]


def _broadcast_over_taps(view_shape: Sequence, kinds: Sequence[str], operand_shape: Sequence | None) -> bool:
    """Whether an operand of the view's rank holds the view's batch, channel and spatial extents and
    is broadcast (size 1) along every tap axis."""
    if operand_shape is None or len(operand_shape) != len(view_shape):
        return False
    for kind, v, a in zip(kinds, view_shape, operand_shape):
        if kind in ("k", "unit"):
            if a != 1:
                return False
        elif not same_dim(a, v):
            return False
    return True


def _mul_channel_sums(node: gs.Node, view: gs.Tensor, kinds: Sequence[str], b_shape: Sequence, opset: int) -> list[ChannelSum]:
    """`(view * A').sum(channels)` / `.mean(channels)` with A' a broadcast view of A `[N, C, H, W]`."""
    if node.op != "Mul" or len(node.inputs) != 2 or sum(t is view for t in node.inputs) != 1:
        return []
    operand = node.inputs[1] if node.inputs[0] is view else node.inputs[0]
    if not _broadcast_over_taps(view.shape, kinds, operand.shape):
        return []
    a = reshaped_origin(operand, b_shape)
    if a is None:
        return []
    found = []
    for consumer in node.outputs[0].outputs:
        reduced = read_reduction(consumer, len(kinds), opset)
        if reduced is None or consumer.inputs[0] is not node.outputs[0]:
            continue
        axes = reduced.axes
        kept = tuple(None if j in axes else j for j in range(len(kinds)) if reduced.keepdims or j not in axes)
        found.append(ChannelSum(consumer, a, axes, reduced.kind, kept, tuple(range(len(kept)))))
    return found


def _einsum_channel_sum(node: gs.Node, view: gs.Tensor, kinds: Sequence[str], b_shape: Sequence) -> ChannelSum | None:
    """`einsum('nckhw,nchw->nkhw', view, A)` (operands either way round, any output order): A has
    B's shape and runs along the view's batch, channel and spatial axes in order, not the taps."""
    use = einsum_use(node, view)
    if use is None or use.extra_axes or use.output_perm is None:
        return None
    a = use.filters
    if a.shape is None or len(a.shape) != len(b_shape) or not all(same_dim(x, y) for x, y in zip(a.shape, b_shape)):
        return None
    held = [axis for axis, kind in zip(use.filter_axes, kinds) if kind not in ("k", "unit")]
    if any(axis is not None for axis, kind in zip(use.filter_axes, kinds) if kind in ("k", "unit")) or held != list(range(len(b_shape))):
        return None
    natural = tuple(j for j in range(len(kinds)) if j not in use.reduced)
    return ChannelSum(node, a, use.reduced, "sum", natural, tuple(use.output_perm))


def _groups(kinds: Sequence[str], view_shape: Sequence, reduced: frozenset[int]) -> int | None:
    """G for a reduction over these view axes: 1 over every channel axis, the outer split's extent
    over only the inner split; None when the reduction runs over anything else."""
    channels = {j for j, kind in enumerate(kinds) if kind in CHANNEL_KINDS}
    if reduced == channels:
        return 1
    inner = {j for j, kind in enumerate(kinds) if kind == "c_inner"}
    if inner and reduced == inner:
        return int(view_shape[kinds.index("c_outer")])
    return None


# --- the output: its axes, a flip of the taps ------------------------------------------------------------


def _tap_axes(kinds: Sequence[str], view_shape: Sequence, kernel: Sequence[int]) -> dict[int, tuple[int, ...]] | None:
    """For each tap axis of the view, the window axes whose taps it holds (row-major): one tap axis
    may hold both, or each its own. Window axes of one tap are on no axis."""
    pending = [a for a, k in enumerate(kernel) if k > 1]
    held: dict[int, tuple[int, ...]] = {}
    for j, kind in enumerate(kinds):
        if kind != "k":
            continue
        size, axes = int(view_shape[j]), []
        while pending and math.prod(kernel[a] for a in axes) < size:
            axes.append(pending.pop(0))
        if math.prod(kernel[a] for a in axes) != size:
            return None
        held[j] = tuple(axes)
    return held if not pending else None


def whole_reversal(node: gs.Node, shape: Sequence, opset: int) -> tuple[int, ...] | None:
    """The axes a Slice reverses whole (`x.flip(dims)`), or None when it does anything else."""
    if node.op != "Slice" or len(node.inputs) < 5 or not node.inputs[4].name:
        return None
    starts, ends, axes, steps = (folded_value(t, opset) for t in node.inputs[1:5])
    if any(v is None for v in (starts, ends, axes, steps)) or not np.all(steps == -1):
        return None
    reversed_axes = []
    for start, end, axis in zip(np.ravel(starts), np.ravel(ends), np.ravel(axes)):
        axis = int(axis) % len(shape)
        extent = shape[axis]
        if not isinstance(extent, int):
            return None
        start = min(max(int(start) + extent if start < 0 else int(start), 0), extent - 1)
        end = min(max(int(end) + extent if end < 0 else int(end), -1), extent - 1)
        if start != extent - 1 or end != -1:
            return None
        reversed_axes.append(axis)
    return tuple(reversed_axes)


@dataclass(frozen=True)
class UnfoldCorrelationMatch:
    """A local correlation written with an unfold: `output` is LocalCorrelation(`a`, `b`) `[N, G, K, H, W]`
    viewed as `natural_shape` (same elements, same order), then transposed by `output_perm`.
    `batch` and `spatial` are B's sizes at this trial."""

    output: gs.Tensor
    a: gs.Tensor
    b: gs.Tensor
    correlation: Correlation
    natural_shape: tuple[int, ...]
    output_perm: tuple[int, ...]
    batch: int
    spatial: tuple[int, ...]

    def signature(self) -> Hashable:
        """What must be the same at every trial size for the match to hold at every size."""
        return (self.output.name, self.a.name, self.b.name, self.correlation, self.output_perm)


def _flip_after(
    output: gs.Tensor, shape: Sequence, flippable: dict[int, tuple[int, ...]], graph_outputs: set[str], opset: int
) -> tuple[gs.Node | None, tuple[int, ...]]:
    """The only use of `output` when it reverses tap axes only (`flippable`: output axis -> window
    axes it holds; size-1 axes may be reversed too), and the window axes it reverses; (None, ())
    when there is no such flip to fold: it then stays a Slice after the correlation."""
    if output.name in graph_outputs or len(output.outputs) != 1 or output.outputs[0].inputs[0] is not output:
        return None, ()
    reversed_axes = whole_reversal(output.outputs[0], shape, opset)
    if not reversed_axes or any(axis not in flippable and shape[axis] != 1 for axis in reversed_axes):
        return None, ()
    return output.outputs[0], tuple(sorted({w for axis in reversed_axes for w in flippable.get(axis, ())}))


def find_unfold_correlations(graph: gs.Graph, opset: int) -> list[UnfoldCorrelationMatch]:
    """Every unfold-times-map-summed-over-channels of a graph whose shapes are static (but perhaps the batch)."""
    graph_outputs = {t.name for t in graph.outputs}
    found = []
    for match, window in find_unfolds_with_window(graph, opset):
        b_shape = window.source.shape
        for view in views_of(match.columns):
            kinds = axis_kinds(match, view)
            if kinds is None:
                continue
            taps = _tap_axes(kinds, view.shape, match.window.kernel_shape)
            if taps is None:
                continue
            uses: list[ChannelSum] = []
            for node in view.outputs:
                if node.op == "Einsum":
                    use = _einsum_channel_sum(node, view, kinds, b_shape)
                    uses.extend([use] if use else [])
                else:
                    uses.extend(_mul_channel_sums(node, view, kinds, b_shape, opset))
            for use in uses:
                built = _correlation_match(window, view, kinds, taps, use, graph_outputs, opset)
                if built is not None:
                    found.append(built)
    return found


def find_unfolds_with_window(graph: gs.Graph, opset: int) -> list[tuple[UnfoldMatch, Window]]:
    """Each exported F.unfold whose window is a correlation window, with that window."""
    found = []
    for node in graph.nodes:
        match = match_unfold(node, opset) if node.op == "Transpose" else None
        window = correlation_window(match, opset) if match is not None else None
        if window is not None:
            found.append((match, window))
    return found


def _correlation_match(
    window: Window, view: gs.Tensor, kinds: Sequence[str], taps: dict[int, tuple[int, ...]],
    use: ChannelSum, graph_outputs: set[str], opset: int,
) -> UnfoldCorrelationMatch | None:
    """The match a channel sum over a view of the window makes, its flip folded in; None unless
    the sum runs over the channels (all of them, or each group's)."""
    groups = _groups(kinds, view.shape, use.reduced)
    result = use.consumer.outputs[0] if use.consumer.outputs else None
    if groups is None or result is None or result.shape is None or any(not isinstance(d, int) for d in result.shape):
        return None
    natural_shape = tuple(1 if j is None else int(view.shape[j]) for j in use.natural_axes)
    flippable = {i: taps[j] for i, j in enumerate(use.output_axes) if j is not None and j in taps}
    flip, flipped = _flip_after(result, result.shape, flippable, graph_outputs, opset)
    output = flip.outputs[0] if flip is not None else result
    if output.shape is None or any(not isinstance(d, int) for d in output.shape):
        return None
    first, step, last = [], [], []
    for axis in range(SPATIAL):
        start, stride = window.first[axis], window.step[axis]
        end = start + (window.counts[axis] - 1) * stride
        if axis in flipped:
            start, end, stride = end, start, -stride
        first.append(start)
        step.append(stride)
        last.append(end)
    correlation = Correlation(tuple(first), tuple(last), tuple(step), groups, use.reduction)
    b_shape = window.source.shape
    return UnfoldCorrelationMatch(
        output, use.a, window.source, correlation, natural_shape, use.output_perm,
        int(b_shape[0]), tuple(int(d) for d in b_shape[2:]),
    )


# --- the rewrite ---------------------------------------------------------------------------------------------


def annotate_pad_shapes(graph: gs.Graph, opset: int) -> None:
    """Give each Pad of a static graph whose output shape inference left unknown the shape its
    folded pads make. The TorchScript exporter computes F.pad's pads with ConstantOfShape, Concat,
    Slice, Transpose and Cast, which ONNX data propagation does not follow: at static dims the
    unfold after it then has no shape to be matched by (trial graphs fold those pads instead)."""
    for node in graph.nodes:
        if node.op != "Pad" or len(node.inputs) < 2 or not node.outputs:
            continue
        source, padded = static_shape(node.inputs[0]), static_shape(node.outputs[0])
        if source is None or None in source or (padded is not None and None not in padded):
            continue
        pads = folded_value(node.inputs[1], opset)
        if pads is None or pads.shape != (2 * len(source),) or (len(node.inputs) > 3 and node.inputs[3].name):
            continue
        node.outputs[0].shape = [int(d) + int(p) + int(q) for d, p, q in zip(source, pads[: len(source)], pads[len(source) :])]


def recognize_unfold_correlations(graph: gs.Graph, opset: int) -> None:
    """Replace every exported unfold correlation with one `convlower.LocalCorrelation` node, at
    static shapes or, found alike at every trial size, under symbolic dims."""
    if not has_unfold_transpose(graph):
        return
    if not has_symbolic_inputs(graph):
        annotate_pad_shapes(graph, opset)
    for per_trial in matches_at_every_size(graph, opset, find_unfold_correlations, UnfoldCorrelationMatch.signature):
        _replace(graph, opset, per_trial)
    graph.cleanup()


def _replace(graph: gs.Graph, opset: int, per_trial: Sequence[UnfoldCorrelationMatch]) -> None:
    """Emit the LocalCorrelation for a match (one per trial size) and what takes its `[N, G, K, H, W]`
    to the output's layout: nothing, a Squeeze of G = 1, or a Reshape whose target reads the batch
    and the spatial extents that vary between trials off A's shape at run time; then einsum's
    Transpose, if any."""
    first = per_trial[0]
    output, a, b_map = local(graph, first.output), local(graph, first.a), local(graph, first.b)
    correlation = first.correlation
    b = Builder(graph, opset, output.inputs[0].name or "LocalCorrelation", dtype=output.dtype or a.dtype or np.float32)
    canonical = [[m.batch, correlation.groups, correlation.taps, *m.spatial] for m in per_trial]
    naturals = [list(m.natural_shape) for m in per_trial]
    steps: list[tuple[str, gs.Tensor | list[int]]] = []
    if correlation.groups == 1 and naturals == [[c[0], *c[2:]] for c in canonical]:
        steps.append(("Squeeze", [1]))
    elif naturals != canonical:
        spatial = dims_across(*(m.spatial for m in per_trial))
        extent = [d if d is not None else b.shape(a, 2 + j, 3 + j) for j, d in enumerate(spatial)]
        batches, spatials = [m.batch for m in per_trial], [m.spatial for m in per_trial]
        parts = reshape_parts(naturals, batches, spatials, b.shape(a, 0, 1), extent)
        if parts is None:
            return
        steps.append(("Reshape", shape_vector(b, parts)))
    if list(first.output_perm) != sorted(first.output_perm):
        steps.append(("Transpose", list(first.output_perm)))

    output.inputs[0].outputs.clear()
    y = emit_local_correlation(b, a, b_map, correlation, out=None if steps else output)
    for i, (op, value) in enumerate(steps):
        out = output if i == len(steps) - 1 else None
        if op == "Squeeze":
            y = b.squeeze(y, value, out=out)  # type: ignore[arg-type]
        elif op == "Reshape":
            y = b.reshape(y, value, out=out)  # type: ignore[arg-type]
        else:
            y = b.transpose(y, value, out=out)  # type: ignore[arg-type]


