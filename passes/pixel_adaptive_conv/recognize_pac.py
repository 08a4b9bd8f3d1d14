"""Recognizing pixel-adaptive convolution as torch exports pacnet's `pacconv2d`.

pacnet (and the `PixelAdaptive` layer in models/idioms.py) writes

    cols = F.unfold(x, k, dilation=d, padding=p, stride=s)
    y = torch.einsum("ijklmn,ojkl->iomn", cols.view(n, c, k, k, h, w) * kernel, weight)
    y += bias.view(1, -1, 1, 1)                                  # optional

which both exporters (legacy opset 17, dynamo opset 18) emit as

    x ─ Pad ─ Gather(axis 2) ─ Gather(axis 4) ─ Transpose(0,1,2,4,3,5) ─ [Reshape ...] ─ T [N, C, kh, kw, Ho, Wo]
                                                                                         │
    kernel [N, G, kh, kw, Ho, Wo]   (G = 1 or C) ───────────────────────────────────── Mul
                                                                                         │
    weight [O, C, kh, kw] ────────────────────────── Einsum('ijklmn,ojkl->iomn') ─ [N, O, Ho, Wo]
                                                                                         │
    bias [1, O, 1, 1] or [O, 1, 1] (constant) ───────────────────────────────────── [Add] ─ y

(the legacy exporter adds Reshapes between the Transpose and the Mul; `find_unfolds` finds the
unfold, `axis_kinds` reads the view). Also recognized: the taps as one merged axis (`view(n, c, k*k,
h, w)`, kernel `[N, G, k*k, Ho, Wo]`, weight `[O, C, k*k]`); the channels split as grouped layers
write them (`view(n, g, c // g, k, k, h, w)`, kernel `[N, g, 1, k, k, Ho, Wo]`, weight
`[O, g, c // g, k, k]`: G = g); the weight's letters in any order. A constant weight is brought to
`[O, C, kh, kw]` in NumPy; a weight computed at run time (or given as a graph input) is supported
too, rearranged by Transpose/Reshape nodes.

Rewrite: one `convlower.PixelAdaptiveConv` node (X = the unfold's input, K = the kernel reshaped to
the canonical `[N, G, kh*kw, Ho, Wo]`, W, and B when the Add is folded) writing the Einsum's output,
or the Add's when its other operand is a constant bias of shape `[1, O, 1, 1]` or `[O, 1, 1]` and
the Einsum feeds nothing else. Under symbolic batch and spatial dims the static matcher runs at
trial sizes (`matches_at_every_size`) and the kernel's Reshape reads the varying dims at run time.

Left as they are: a kernel broadcast over the batch (or over any tap or spatial axis), a kernel
along the inner split of the channels only, an Einsum that keeps a kernel or channel axis or sums
a spatial one, an output in another axis order, a view that merges the spatial axes, and a bias
that is not a constant of those shapes (the Add then stays after the node).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable

import numpy as np
import onnx_graphsurgeon as gs

from ..base import Builder, Reshape, Transpose, attr_text, constant_value, rearranged, static_shape
from ..dynamic_filter import SlidingWindow, dims_or_shape, shape_vector
from ..local_functions import DOMAIN, add_function
from ..matching.symbolic import dims_across, local, matches_at_every_size
from ..matching.unfold import UnfoldMatch, same_dim, views_of, axis_kinds, find_unfolds
from . import OP_TYPE


@dataclass(frozen=True)
class PacMatch:
    """One exported PAC: the unfold, the kernel (axes `[N, G, taps..., Ho, Wo]`), the Einsum with
    the weight (whose axes `weight_perm` brings to `[O, C.., taps..]`), the optional folded bias, and
    the tensor the canonical node will write."""

    unfold: UnfoldMatch
    kernel: gs.Tensor
    groups: int
    einsum_output: gs.Tensor
    weight: gs.Tensor
    weight_perm: tuple[int, ...]
    out_channels: int
    bias: gs.Tensor | None
    output: gs.Tensor

    def signature(self) -> Hashable:
        """What must be the same at every trial size: the tensors it spans, its window and groups."""
        names = (self.unfold.source, self.kernel, self.einsum_output, self.weight, self.output)
        bias = self.bias.name if self.bias is not None else None
        return (*(t.name for t in names), bias, self.unfold.window, self.groups, self.weight_perm)


@dataclass(frozen=True)
class ViewLayout:
    """How a view of the unfold reads `[N, C, taps, Ho, Wo]`: the channels as one axis or split in
    two (`[G', C/G']`, as grouped layers write them), the taps as one merged axis or two."""

    channel_axes: int
    tap_axes: int

    @property
    def first_tap(self) -> int:
        return 1 + self.channel_axes


def _view_layout(match: UnfoldMatch, kinds: list[str]) -> ViewLayout | None:
    """The layout of a view whose axes are the batch, the channels, the taps and both spatial axes."""
    if kinds[1:3] == ["c_outer", "c_inner"]:
        channel_axes = 2
    elif kinds[1] == "c" or (kinds[1] == "unit" and match.channels == 1):
        channel_axes = 1
    else:
        return None
    layout = ViewLayout(channel_axes, len(kinds) - 3 - channel_axes)
    taps = kinds[layout.first_tap : layout.first_tap + layout.tap_axes]
    spatial = kinds[layout.first_tap + layout.tap_axes :]
    if layout.tap_axes not in (1, 2) or taps != ["k"] * layout.tap_axes or spatial != ["s", "s"]:
        return None
    return layout


def _kernel_groups(match: UnfoldMatch, view: gs.Tensor, layout: ViewLayout, mul: gs.Node) -> tuple[gs.Tensor, int] | None:
    """The Mul's other operand and its groups G, when it runs along the view's batch, taps and
    positions, and along the channels as one plane (G = 1), one per channel (G = C), or one per
    outer split of a split channel axis (G = G'); never along the inner split alone."""
    if len(mul.inputs) != 2 or sum(t is view for t in mul.inputs) != 1:
        return None
    kernel = mul.inputs[1] if mul.inputs[0] is view else mul.inputs[0]
    shape, view_shape = kernel.shape, view.shape
    if shape is None or len(shape) != len(view_shape) or not same_dim(shape[0], view_shape[0]):
        return None
    rest = layout.first_tap
    if any(not same_dim(k, v) for k, v in zip(shape[rest:], view_shape[rest:])):
        return None
    channels, along = list(shape[1:rest]), list(view_shape[1:rest])
    if all(d == 1 for d in channels):
        return kernel, 1
    if channels == along:
        return kernel, match.channels
    if layout.channel_axes == 2 and channels == [along[0], 1]:
        return kernel, int(along[0])
    return None


def _einsum_weight(einsum: gs.Node, product: gs.Tensor, layout: ViewLayout) -> tuple[gs.Tensor, tuple[int, ...], int] | None:
    """(weight, perm to `[O, C.., taps..]`, O) when the Einsum sums the product `[N, C.., taps.., Ho, Wo]`
    over its channel and tap axes against a weight `[O, C.., taps..]` (letters in any order), giving
    `[N, O, Ho, Wo]`."""
    equation = attr_text(einsum.attrs.get("equation", "")).replace(" ", "")
    if len(einsum.inputs) != 2 or "..." in equation or "->" not in equation:
        return None
    operands, output = equation.split("->")
    terms = operands.split(",")
    position = [i for i, t in enumerate(einsum.inputs) if t is product]
    if len(terms) != 2 or len(position) != 1 or any(len(set(t)) != len(t) for t in terms + [output]):
        return None
    product_term, weight_term = terms[position[0]], terms[1 - position[0]]
    weight = einsum.inputs[1 - position[0]]
    weight_shape = static_shape(weight)
    if len(product_term) != len(product.shape or ()) or weight_shape is None or len(weight_shape) != len(weight_term):
        return None
    summed = product_term[1 : layout.first_tap + layout.tap_axes]
    batch, spatial = product_term[0], product_term[layout.first_tap + layout.tap_axes :]
    new = [letter for letter in weight_term if letter not in product_term]
    if len(new) != 1 or sorted(weight_term) != sorted(new[0] + summed) or output != batch + new[0] + spatial:
        return None
    if any(d is None for d in weight_shape):
        return None
    perm = tuple(weight_term.index(letter) for letter in new[0] + summed)
    return weight, perm, int(weight_shape[weight_term.index(new[0])])  # type: ignore[arg-type]


def _folded_bias(graph: gs.Graph, einsum_output: gs.Tensor, out_channels: int) -> tuple[gs.Tensor, gs.Tensor] | None:
    """(bias, Add output) when the Einsum's only consumer adds a constant `[1, O, 1, 1]` or `[O, 1, 1]`."""
    if len(einsum_output.outputs) != 1 or einsum_output in graph.outputs:
        return None
    add = einsum_output.outputs[0]
    if add.op != "Add" or len(add.inputs) != 2 or sum(t is einsum_output for t in add.inputs) != 1:
        return None
    bias = add.inputs[1] if add.inputs[0] is einsum_output else add.inputs[0]
    value = constant_value(bias)
    if value is None or value.shape not in ((1, out_channels, 1, 1), (out_channels, 1, 1)):
        return None
    return bias, add.outputs[0]


def find_pacs(graph: gs.Graph, opset: int) -> list[PacMatch]:
    """Every exported PAC in a graph of static shapes (see the module docstring)."""
    found = []
    for match in find_unfolds(graph, opset):
        for view in views_of(match.columns):
            kinds = axis_kinds(match, view)
            layout = _view_layout(match, kinds) if kinds is not None else None
            if layout is None:
                continue
            for mul in [n for n in view.outputs if n.op == "Mul"]:
                kernel_groups = _kernel_groups(match, view, layout, mul)
                if kernel_groups is None:
                    continue
                product = mul.outputs[0]
                for einsum in [n for n in product.outputs if n.op == "Einsum"]:
                    weighted = _einsum_weight(einsum, product, layout)
                    if weighted is None:
                        continue
                    weight, perm, out_channels = weighted
                    einsum_output = einsum.outputs[0]
                    bias, output = _folded_bias(graph, einsum_output, out_channels) or (None, einsum_output)
                    found.append(PacMatch(match, *kernel_groups, einsum_output, weight, perm, out_channels, bias, output))
    return found


def recognize_pixel_adaptive_convs(graph: gs.Graph, opset: int) -> None:
    """Replace every exported PAC that holds at every input size with one `convlower.PixelAdaptiveConv`.
    A graph without an Einsum holds none: it is not bound to trial sizes at all."""
    if not any(node.op == "Einsum" for node in graph.nodes):
        return
    for per_trial in matches_at_every_size(graph, opset, find_pacs, PacMatch.signature):
        _replace(graph, opset, per_trial)
    graph.cleanup()


def _replace(graph: gs.Graph, opset: int, per_trial: list[PacMatch]) -> None:
    """Emit the canonical node into `graph` (the real one) for a match found at every trial."""
    match = per_trial[0]
    window: SlidingWindow = match.unfold.window
    output = local(graph, match.output)
    replaced = output.inputs[0]
    replaced.outputs.clear()
    b = Builder(graph, opset, replaced.name or OP_TYPE, dtype=output.dtype or np.float32)
    kernel = local(graph, match.kernel)
    out_spatial = dims_across(*(m.unfold.out_spatial for m in per_trial))
    spatial_axis = len(kernel.shape) - window.rank
    target = [0, match.groups, window.taps, *dims_or_shape(b, out_spatial, kernel, spatial_axis)]
    canonical_kernel = b.reshape(kernel, shape_vector(b, target))
    canonical_kernel.name = _stable_name(replaced, "kernel")
    canonical_kernel.shape = [kernel.shape[0], match.groups, window.taps, *kernel.shape[spatial_axis:]]
    canonical_kernel.dtype = kernel.dtype
    inputs = [local(graph, match.unfold.source), canonical_kernel, _canonical_weight(b, graph, match, replaced)]
    if match.bias is not None:
        inputs.append(b.const(constant_value(match.bias).reshape(match.out_channels), "bias"))  # type: ignore[union-attr]
    attrs = window.attrs()
    b.op(OP_TYPE, inputs, attrs, out=output, domain=DOMAIN)
    add_function(graph, OP_TYPE, attrs, opset)


def _stable_name(replaced: gs.Node, role: str) -> str:
    """The name of a run-time input the canonical node gets: made from the replaced node's name, so
    the same in every import of the model whatever else the import emits (optimize reads the
    input's shape at the profiling sizes from a statically bound import, by name)."""
    return f"{replaced.name or OP_TYPE}/{role}"


def _canonical_weight(b: Builder, graph: gs.Graph, match: PacMatch, replaced: gs.Node) -> gs.Tensor:
    """The weight as `[O, C, kh, kw]`: rearranged in NumPy when constant, else by nodes; as it is
    when it already has that layout."""
    weight = local(graph, match.weight)
    target = (match.out_channels, match.unfold.channels, *match.unfold.window.kernel_shape)
    steps: list[Reshape | Transpose] = []
    if match.weight_perm != tuple(sorted(match.weight_perm)):
        steps.append(Transpose(match.weight_perm))
    if len(match.weight_perm) != len(target):
        steps.append(Reshape(target))
    if not steps:
        return weight
    rearranged_weight = rearranged(b, weight, *steps)
    if isinstance(rearranged_weight, gs.Variable):
        rearranged_weight.name = _stable_name(replaced, "weight")
        rearranged_weight.shape, rearranged_weight.dtype = list(target), weight.dtype
    return rearranged_weight


