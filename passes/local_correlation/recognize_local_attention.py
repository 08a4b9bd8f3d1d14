"""Recognize local attention written with `Tensor.unfold` windows per head: the q·k as one
`convlower.LocalCorrelation`, the softmax-weighted sum of the values as one `convlower.DynamicFilter`.

The idiom (`LocalAttention` in models/correlation_idioms.py; stand-alone self-attention), for
queries, keys and values `[N, C, *S]` split into G heads of C/G channels, a window of k taps per
spatial axis (K = k^r taps in all) and `p = k // 2`:

    k = F.pad(k, [p] * 2r).unfold(2, k, 1).unfold(3, k, 1).reshape(N, G, C/G, *S, K)
    v = F.pad(v, [p] * 2r).unfold(2, k, 1).unfold(3, k, 1).reshape(N, G, C/G, *S, K)
    q = q.reshape(N, G, C/G, *S, 1)
    attention = (q * k).sum(2, keepdim=True).softmax(-1)        # [N, G, 1, *S, K]; or keepdim=False
    y = (attention * v).sum(-1)                                   # [N, G, C/G, *S]

or with einsums (`einsum('bhcxy,bhcxyk->bhxyk', q, k)`, `einsum('bhxyk,bhcxyk->bhcxy', attention, v)`,
any operand and output order).

What the exporters write for it (torch 2.13). dynamo (opset 18), static or symbolic dims: each
unfold is what dynamic_filter/recognize_tensor_unfold.py reads (`match_patches`: a zero Pad, one Gather per
axis with index `[S, k]` = `p + j`, a Transpose moving the taps last), then a Reshape that splits
the channels into heads and merges the taps:

    Pad(k) -> Gather(axis=2) -> Transpose -> Gather(axis=3) -> Transpose        [N, C, H, W, k, k]
           -> Reshape([N, G, C/G, H, W, K])                                       the keys' view
    Reshape(q, [N, G, C/G, H, W, 1]) -> Mul(., keys' view) -> ReduceSum(axes=[2], keepdims=1|0)
                                                                                  [N, G, 1, H, W, K]
    -> Softmax(axis=-1) -> Mul(., values' view) -> ReduceSum(axes=[-1], keepdims=0)  [N, G, C/G, H, W]

(an Einsum in place of each Mul + ReduceSum when the code writes einsums). With symbolic dims the
Gather indices and the Reshape targets are computed from Shape at run time; `matches_at_every_size`
folds them at trial sizes.

TorchScript (opset 17) exports none of it: the shape of `F.pad`'s output is not known to its
`Tensor.unfold` symbolic, static dims or not ("ONNX export of operator Unfold, input size not
accessible"; tests/test_recognize_local_attention.py checks that it still fails).

The rewrite. A view of unfolded keys `[N, G, C/G, *S, K]` times queries that run along every axis
but the taps, summed over the head's channels (axis 2) only, is

    LocalCorrelation(q, k, first=-p, last=k-1-p, step=1, groups=G, reduction=sum)   [N, G, K, *S]

then a Transpose (and Unsqueeze) to the layout the sum had (`[N, G, 1, *S, K]`); the queries are
taken as `[N, C, *S]` (the tensor the code reshaped, or a Reshape of what it multiplied). A view of
unfolded values times weights that run along every axis but the head's channels, summed over the
taps only, is

    DynamicFilter(v, Reshape(Transpose(weights), [N, G, K, *S_out]), window of the unfold)   [N, C, *S_out]

(G filter groups: every channel of a head is weighted alike), then a Reshape (and Transpose,
Unsqueeze) to the layout the sum had. dynamic_filter/recognize_tensor_unfold.py, registered after this
module, does not follow the Reshape into heads, so the value half is recognized here, whatever
computed its weights. Local attention thus becomes two canonical nodes around its softmax.

Soundness: the unfold is exactly a zero-padded sliding window (`match_patches`), its axes in the
order batch, channels, positions, taps, so that the Reshape to `[N, G, C/G, *S_out, K]` (its shape
read, inferred or folded, at every trial size) splits the channels and merges the taps row-major;
the other operand runs along the view's axes with their extents, and broadcasts (extent 1, or has
no axis) only along the taps (q·k) or the head's channels (values); the sum runs over exactly that
axis. For q·k the window must have stride 1 and pad by exactly its reach (so that position p of the
output is position p of the queries and of the unpadded keys), the offsets then being
`j·dilation - pad_begin`.

Left as they are: a sum over the window instead of over the head's channels (`(q * k).sum(-1)`),
reflect/replicate or non-zero padding, a window of keys with another stride (queries at p, keys
around p·stride), per-channel attention without the channel sum (the Stand-Alone-Self-Attention
repository's `softmax(q * k)`), keys with a relative-position term added after the unfold (a sum of
two products, not one correlation). Not covered: taps unfolded in another order (`.unfold(3, ..)
.unfold(2, ..)` merges them column-major), a view that keeps the taps on r axes, weights for the
values that differ per channel of a head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from ..base import Builder, static_shape
from ..dynamic_filter import OP_TYPE as DYNAMIC_FILTER, shape_vector
from ..dynamic_filter.recognize_tensor_unfold import Patches, known_shape, match_patches
from ..local_functions import DOMAIN, add_function
from ..matching.symbolic import dims_across, local, matches_at_every_size
from ..matching.reduction import reduce_sum_axes
from ..matching.unfold import einsum_use
from . import Correlation, emit_local_correlation

Axis = tuple[str, int]
"""What one axis of a view of unfolded patches holds: ("n", 0) batch, ("g", 0) heads, ("c", 0) the
channels of a head, ("o", j) the window positions along spatial axis j, ("k", 0) the merged taps."""
BATCH, HEADS, HEAD_CHANNELS, TAPS = ("n", 0), ("g", 0), ("c", 0), ("k", 0)
SCORES, VALUES = "scores", "values"
UNFOLDING_OPS = ("Gather", "Concat")
"""The ops an exported unfold steps by (dynamo's Gather, TorchScript's Concat of Slices): a graph with
no Reshape of their output, or of a Transpose of it, has nothing to match."""


# --- the view: unfolded patches, split into heads --------------------------------------------------------


@dataclass(frozen=True)
class HeadView:
    """Tensor.unfold patches `[N, C, *S_out, k_1, .., k_r]` of `patches.source`, reshaped into
    `view` `[N, G, C/G, *S_out, K]`: G heads, the taps merged row-major."""

    patches: Patches
    view: gs.Tensor
    heads: int

    @property
    def rank(self) -> int:
        return self.patches.window.rank

    @property
    def axes(self) -> tuple[Axis, ...]:
        return (BATCH, HEADS, HEAD_CHANNELS, *(("o", j) for j in range(self.rank)), TAPS)

    @property
    def shape(self) -> tuple[int, ...]:
        p = self.patches
        return (p.batch, self.heads, p.channels // self.heads, *p.out_spatial, p.window.taps)


def match_head_view(reshape: gs.Node, opset: int) -> HeadView | None:
    """The view a Reshape makes of Tensor.unfold patches, or None when it is not exactly
    `[N, G, C/G, *S_out, K]` of patches laid out batch, channels, positions, taps."""
    if reshape.op != "Reshape" or not reshape.outputs:
        return None
    patches = match_patches(reshape.inputs[0], opset)
    if patches is None:
        return None
    rank = patches.window.rank
    natural = (("n", 0), ("c", 0), *(("o", j) for j in range(rank)), *(("k", j) for j in range(rank)))
    shape = known_shape(reshape.outputs[0], opset)
    if patches.axes != natural or shape is None or len(shape) != rank + 4:
        return None
    heads = shape[1]
    if heads < 1 or patches.channels % heads:
        return None
    view = HeadView(patches, reshape.outputs[0], heads)
    return view if shape == view.shape else None


# --- a use of the view: weighted by another tensor and summed -----------------------------------------------


@dataclass(frozen=True)
class WeightedSum:
    """`view` weighted by `other` and summed over the view axes `summed` by `consumer`.

    `other_axes[i]` is the axis of `other` that runs along view axis i, None where `other` broadcasts
    (extent 1 there, or no such axis in an einsum); `output_axes` says what each axis of the
    consumer's output holds (None: a summed axis kept with extent 1)."""

    consumer: gs.Node
    other: gs.Tensor
    other_shape: tuple[int, ...]
    other_axes: tuple[int | None, ...]
    summed: frozenset[int]
    output_axes: tuple[Axis | None, ...]


def weighted_sums(view: HeadView, opset: int) -> list[WeightedSum]:
    """Every `(view * other).sum(axes)` (one Mul, then one ReduceSum) and einsum of the view with
    another tensor, where the other tensor's extents are the view's or 1."""
    found = []
    for node in view.view.outputs:
        if node.op == "Mul" and len(node.inputs) == 2 and sum(t is view.view for t in node.inputs) == 1:
            other = node.inputs[1] if node.inputs[0] is view.view else node.inputs[0]
            shape = known_shape(other, opset)
            if shape is None or len(shape) != len(view.axes):
                continue
            other_axes = tuple(i if size == extent else None for i, (size, extent) in enumerate(zip(view.shape, shape)))
            if any(a is None and extent != 1 for a, extent in zip(other_axes, shape)):
                continue
            for reduce in node.outputs[0].outputs:
                summed = reduce_sum_axes(reduce, len(view.axes), opset) if reduce.inputs[0] is node.outputs[0] else None
                if summed is None or not reduce.outputs:
                    continue
                keep = int(reduce.attrs.get("keepdims", 1))
                output_axes = tuple(None if i in summed else a for i, a in enumerate(view.axes) if keep or i not in summed)
                found.append(WeightedSum(reduce, other, shape, other_axes, summed, output_axes))
        elif node.op == "Einsum":
            use = einsum_use(node, view.view)
            shape = known_shape(use.filters, opset) if use is not None else None
            if use is None or use.extra_axes or shape is None or not node.outputs:
                continue
            other_axes = tuple(
                None if a is None or (shape[a] == 1 and extent != 1) else a for a, extent in zip(use.filter_axes, view.shape)
            )
            if any(a is not None and shape[a] != extent for a, extent in zip(other_axes, view.shape)):
                continue
            natural = [a for i, a in enumerate(view.axes) if i not in use.reduced]
            output_axes = tuple(natural[p] for p in use.output_perm or range(len(natural)))
            found.append(WeightedSum(node, use.filters, shape, other_axes, use.reduced, output_axes))
    return found


# --- the two matches ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionMatch:
    """A weighted sum over a head view that is one canonical op: `kind` SCORES (q·k, a
    LocalCorrelation of `other` with the unfolded keys) or VALUES (a DynamicFilter of the unfolded
    values with `other` as its filters)."""

    kind: str
    view: HeadView
    use: WeightedSum

    @property
    def output(self) -> gs.Tensor:
        return self.use.consumer.outputs[0]

    def signature(self) -> Hashable:
        """What must be the same at every trial size: the tensors spanned, the window, the layout."""
        patches, use = self.view.patches, self.use
        names = (patches.source.name, self.view.view.name, use.other.name, self.output.name)
        return self.kind, names, patches.window, patches.channels, self.view.heads, use.other_axes, use.output_axes


def _only_along(use: WeightedSum, view: HeadView, broadcast: Axis) -> bool:
    """True when `other` runs along every view axis but `broadcast` (either way where the view's
    extent is 1 there), and has no other axis longer than 1."""
    for axis, other_axis, extent in zip(view.axes, use.other_axes, view.shape):
        if (other_axis is None) != (axis == broadcast) and not (axis == broadcast and extent == 1):
            return False
    spare = set(range(len(use.other_shape))) - set(use.other_axes)
    return all(use.other_shape[a] == 1 for a in spare)


def _centred(view: HeadView) -> bool:
    """The window reads the keys around each query: stride 1, padded by exactly its reach."""
    window = view.patches.window
    rank = window.rank
    return all(
        window.strides[j] == 1 and window.pads[j] + window.pads[j + rank] == window.reach(j) - 1 for j in range(rank)
    )


def find_local_attention(graph: gs.Graph, opset: int) -> list[AttentionMatch]:
    """Every q·k and every attention-weighted sum of values over head views, in a graph with static shapes."""
    found = []
    for node in graph.nodes:
        view = match_head_view(node, opset) if node.op == "Reshape" else None
        if view is None:
            continue
        for use in weighted_sums(view, opset):
            channels, taps = view.axes.index(HEAD_CHANNELS), view.axes.index(TAPS)
            if use.summed == {channels} and _only_along(use, view, TAPS) and _centred(view):
                found.append(AttentionMatch(SCORES, view, use))
            elif use.summed == {taps} and _only_along(use, view, HEAD_CHANNELS):
                found.append(AttentionMatch(VALUES, view, use))
    return found


# --- the rewrite --------------------------------------------------------------------------------------------


def recognize_local_attention(graph: gs.Graph, opset: int) -> None:
    """Replace every local-attention q·k with a LocalCorrelation and every weighted sum of unfolded
    values with a DynamicFilter, at any input size."""
    if not any(n.op == "Reshape" and _unfolded(n.inputs[0]) for n in graph.nodes):
        return
    replaced = set()
    for per_trial in matches_at_every_size(graph, opset, find_local_attention, AttentionMatch.signature):
        if per_trial[0].output.name not in replaced:
            replaced.add(per_trial[0].output.name)
            (_replace_scores if per_trial[0].kind == SCORES else _replace_values)(graph, opset, per_trial)
    graph.cleanup()


def _unfolded(tensor: gs.Tensor) -> bool:
    """Whether the tensor may end an exported unfold: the output of a Gather or a Concat, or a Transpose of one."""
    producer = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if producer is not None and producer.op == "Transpose":
        producer = producer.inputs[0].inputs[0] if len(producer.inputs[0].inputs) == 1 else None
    return producer is not None and producer.op in UNFOLDING_OPS


def _layout(axes: Sequence[Axis], output_axes: Sequence[Axis | None]) -> tuple[list[int] | None, list[int]]:
    """How a result whose axes hold `axes` becomes a tensor laid out as `output_axes`: the Transpose
    perm where the kept axes come in another order (else None), then the positions of the summed
    axes kept with extent 1 (an Unsqueeze)."""
    kept = [a for a in output_axes if a is not None]
    perm = [list(axes).index(a) for a in kept]
    return (None if perm == sorted(perm) else perm), [i for i, a in enumerate(output_axes) if a is None]


def _laid_out(b: Builder, result: gs.Tensor, perm: list[int] | None, units: list[int], output: gs.Variable) -> None:
    """`result` transposed by `perm` and unsqueezed at `units` into `output` (one of them at least)."""
    if perm is not None:
        result = b.transpose(result, perm, out=None if units else output)
    if units:
        b.unsqueeze(result, units, out=output)


def _ordered(b: Builder, match: AttentionMatch, other: gs.Tensor, order: Sequence[Axis], trial_shapes: Sequence[Sequence[int]]) -> gs.Tensor:
    """`other` with its axes that run along `order` put in that order, unit axes after them: a
    Transpose only where axes longer than 1 move."""
    use = match.use
    along = [use.other_axes[match.view.axes.index(a)] for a in order]
    perm = along + [a for a in range(len(use.other_shape)) if a not in along]
    moved = [a for a in perm if any(shape[a] != 1 for shape in trial_shapes)]
    return b.transpose(other, perm) if moved != sorted(moved) else other


def _replace_scores(graph: gs.Graph, opset: int, per_trial: Sequence[AttentionMatch]) -> None:
    """The q·k as one LocalCorrelation of the queries `[N, C, *S]` with the keys, then the layout the sum had."""
    match = per_trial[0]
    view, window, rank = match.view, match.view.patches.window, match.view.rank
    keys, queries, output = (local(graph, t) for t in (view.patches.source, match.use.other, match.output))
    spatial = dims_across(*(m.view.patches.out_spatial for m in per_trial))
    dtype = output.dtype or match.output.dtype or np.float32
    consumer = output.inputs[0]
    consumer.outputs.clear()
    b = Builder(graph, opset, consumer.name or "LocalCorrelation", dtype=dtype)

    flat = _flat_queries(match, queries, per_trial)
    if flat is None:
        ordered = _ordered(b, match, queries, (BATCH, HEADS, HEAD_CHANNELS, *(("o", j) for j in range(rank))),
                           [m.use.other_shape for m in per_trial])
        target = [0, view.patches.channels, *(spatial if None not in spatial else [b.shape(keys, 2)])]
        key_shape = list(keys.shape) if keys.shape else [None] * (rank + 2)
        flat = gs.Variable(f"{output.name}/queries", queries.dtype, [key_shape[0], view.patches.channels, *key_shape[2:]])
        b.reshape(ordered, shape_vector(b, target), out=flat)  # type: ignore[arg-type]

    correlation = Correlation(
        first=tuple(-window.pads[j] for j in range(rank)),
        last=tuple((window.kernel_shape[j] - 1) * window.dilations[j] - window.pads[j] for j in range(rank)),
        step=tuple(window.dilations),
        groups=view.heads,
        reduction="sum",
    )
    perm, units = _layout((BATCH, HEADS, TAPS, *(("o", j) for j in range(rank))), match.use.output_axes)
    direct = perm is None and not units
    scores = emit_local_correlation(b, flat, keys, correlation, out=output if direct else None)
    if not direct:
        _laid_out(b, scores, perm, units, output)


def _flat_queries(match: AttentionMatch, queries: gs.Tensor, per_trial: Sequence[AttentionMatch]) -> gs.Tensor | None:
    """The `[N, C, *S]` tensor the code reshaped into the queries' `[N, G, C/G, *S, 1]`, when the
    queries are that Reshape with their axes in the view's order; else None."""
    use = match.use
    in_order = [a for a in use.other_axes if a is not None]
    if in_order != sorted(in_order) or len(queries.inputs) != 1 or queries.inputs[0].op != "Reshape":
        return None
    source = queries.inputs[0].inputs[0]
    trial_sources = [m.use.other.inputs[0].inputs[0] if m.use.other.inputs else None for m in per_trial]
    for m, trial_source in zip(per_trial, trial_sources):
        patches = m.view.patches
        if trial_source is None or static_shape(trial_source) != (patches.batch, patches.channels, *patches.out_spatial):
            return None
    return source


def _replace_values(graph: gs.Graph, opset: int, per_trial: Sequence[AttentionMatch]) -> None:
    """The weighted sum of unfolded values as one DynamicFilter with G groups, then the layout the sum had."""
    match = per_trial[0]
    view, window, rank = match.view, match.view.patches.window, match.view.rank
    values, weights, output = (local(graph, t) for t in (view.patches.source, match.use.other, match.output))
    spatial = dims_across(*(m.view.patches.out_spatial for m in per_trial))
    dtype = output.dtype or match.output.dtype or np.float32
    consumer = output.inputs[0]
    consumer.outputs.clear()
    b = Builder(graph, opset, consumer.name or DYNAMIC_FILTER, dtype=dtype)
    static = None not in spatial

    positions = tuple(("o", j) for j in range(rank))
    ordered = _ordered(b, match, weights, (BATCH, HEADS, TAPS, *positions), [m.use.other_shape for m in per_trial])
    taps = window.taps
    target = [0, view.heads, taps, *(spatial if static else [b.shape(ordered, 3, 3 + rank)])]
    batch = values.shape[0] if values.shape else None
    filters = gs.Variable(f"{output.name}/filters", weights.dtype, [batch, view.heads, taps, *spatial])
    b.reshape(ordered, shape_vector(b, target), out=filters)  # type: ignore[arg-type]

    attrs = window.attrs()
    filtered = b.op(DYNAMIC_FILTER, [values, filters], attrs, domain=DOMAIN)
    filtered.shape, filtered.dtype = [batch, view.patches.channels, *spatial], dtype
    add_function(graph, DYNAMIC_FILTER, attrs, opset)
    head_channels = view.patches.channels // view.heads
    perm, units = _layout((BATCH, HEADS, HEAD_CHANNELS, *positions), match.use.output_axes)
    direct = perm is None and not units
    target = [0, view.heads, head_channels, *(spatial if static else [b.shape(filtered, 2)])]
    heads = b.reshape(filtered, shape_vector(b, target), out=output if direct else None)  # type: ignore[arg-type]
    if not direct:
        heads.shape, heads.dtype = [batch, view.heads, head_channels, *spatial], dtype
        _laid_out(b, heads, perm, units, output)


