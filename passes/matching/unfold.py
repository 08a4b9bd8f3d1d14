"""The exported F.unfold, read back: where recognizers of unfold idioms start.

Both torch exporters (dynamo and TorchScript, opset 17+) write `F.unfold(x, k, dilation, padding,
stride)` as

    Pad(x) -> Gather(axis=2, index[kh, ho]) -> Gather(axis=4, index[kw, wo]) -> Transpose(0,1,2,4,3,5)

with `index[k, p] = k * dilation + p * stride`, giving T `[N, C, Kh, Kw, Ho, Wo]`; one Reshape or
more then make the `[N, C*K, L]` of F.unfold or the user's view of it. At static dims the dynamo
exporter stores the indices as initializers; the TorchScript one, and both under symbolic dims,
compute them from `Shape(x)` with Range and Add:

    Shape(x) -> Gather -> Add(pads) -> Sub(reach - 1) -> Range -> Unsqueeze -> Add([[0], [d], [2d]]) -> index

The matchers read static shapes and fold that arithmetic (`folded_value`); under symbolic dims
recognizers run them at trial sizes (`symbolic.matches_at_every_size`).

- `find_unfolds`: every exported unfold (`UnfoldMatch`: the source, the window, T);
- `views_of`, `axis_kinds`: the user's views of T and what each axis holds (batch, channels or their
  split, kernel taps, positions);
- `filter_uses`, `einsum_use`: a view weighted by another tensor and summed
  (`einsum(...)` or `(view * w).sum(axes)`), which recognizers of filters, correlations and
  attention tell apart by the axes summed.

Anything that differs -- a non-zero or non-constant pad, indices of another pattern -- is no match.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..base import attr_text, constant_value, static_shape
from ..dynamic_filter import SlidingWindow
from .reduction import reduce_sum_axes
from .symbolic import folded_value

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


# --- views of T and their weighted sums ---------------------------------------------------------------


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


def filter_uses(view: gs.Tensor, opset: int) -> list[FilterUse]:
    uses: list[FilterUse] = []
    for node in view.outputs:
        if node.op == "Einsum":
            use = einsum_use(node, view)
            uses.extend([use] if use else [])
        elif node.op == "Mul":
            uses.extend(_mul_sum_uses(node, view, opset))
    return uses
