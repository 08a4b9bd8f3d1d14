"""Stacked shifts, as kernel-prediction burst denoisers write them, recognized as one `convlower.DynamicFilter`.

KPN's `KernelConv._convolution` (`models/idioms.py`'s `StackedShifts`) filters a burst
`[B, frames, C, H, W]` with per-frame kernels `[B, frames, K, C or 1, H, W]`:

    padded = F.pad(frames, [k // 2] * 4)
    stack = [padded[..., i:i + h, j:j + w] for i in range(k) for j in range(k)]
    torch.sum(kernels.mul(torch.stack(stack, dim=2)), dim=2)

Both torch exporters write it as

    burst ──► Pad(zeros, H and W only) ──► Slice ─► Slice ──► Unsqueeze(2) ─┐  (one chain per tap)
                                                              Concat(axis 2) ─► Mul ◄── kernels
                                                                    ReduceSum(axes [2], keepdims 0) ─► y

with the stack on any axis s: the axes before it lead (batch-like), axis s of a slice is the
channel axis, the axes after it are spatial (ranks 1 to 3). The slices must be exactly the taps of
one sliding window (`shifted_slices.kernel_window`), in any order along the stack; the kernels must
have the stack's shape, except that their channel axis may be 1 (one kernel shared by the colour
channels), and the sum must run over the stack axis only.

Rewrite (the leading axes fold into the batch):

    burst ──► Reshape [-1, C, *S] ─────────────────────────────────────────► X [B*frames, C, *S]
    kernels ──► Reshape [-1, K, G, *S_out] ─► [Gather(axis 1, taps in row-major order)]
            ──► Transpose(0, 2, 1, ...) ───────────────────────────────────► F [B*frames, G, K, *S_out]
    DynamicFilter(X, F) ──► Reshape [B, frames, C, *S_out] ──► y                (G = C or 1)

Under symbolic dims the matcher runs at trial sizes (`symbolic.matches_at_every_size`), and the
Reshape targets read the dims that vary between trials from the tensors' shapes at run time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..base import Builder
from ..local_functions import DOMAIN, add_function
from ..matching.shifted_slices import has_sliced_pad, kernel_window, only_use, shifted_slice, unsqueezed_axes
from ..matching.symbolic import dims_across, local, matches_at_every_size
from ..matching.reduction import reduce_sum_axes
from . import OP_TYPE as DYNAMIC_FILTER, SlidingWindow, shape_vector


@dataclass(frozen=True)
class StackedShiftsMatch:
    """`output` = the burst filtered by `kernels`, the stack on axis `axis`."""

    output: gs.Tensor
    burst: gs.Tensor
    kernels: gs.Tensor
    axis: int
    window: SlidingWindow
    order: tuple[int, ...]
    """The stack position of each tap, taps in row-major order."""
    burst_shape: tuple[int, ...]
    kernel_shape: tuple[int, ...]
    out_spatial: tuple[int, ...]

    @property
    def groups(self) -> int:
        return self.kernel_shape[self.axis + 1]


def _stack(tensor: gs.Tensor, graph: gs.Graph, opset: int) -> tuple[gs.Node, int] | None:
    """The Concat of Unsqueezes on one new axis that makes `tensor`, and that axis."""
    if len(tensor.inputs) != 1 or tensor.inputs[0].op != "Concat" or not only_use(tensor, graph) or tensor.shape is None:
        return None
    concat = tensor.inputs[0]
    axis = int(concat.attrs.get("axis", 0)) % len(tensor.shape)
    for part in concat.inputs:
        producer = part.inputs[0] if len(part.inputs) == 1 else None
        if producer is None or not only_use(part, graph):
            return None
        axes = unsqueezed_axes(producer, opset)
        if axes is None or [a % len(tensor.shape) for a in axes] != [axis]:
            return None
    return concat, axis


def _match(reduce: gs.Node, graph: gs.Graph, opset: int) -> StackedShiftsMatch | None:
    product = reduce.inputs[0]
    if len(product.inputs) != 1 or product.inputs[0].op != "Mul" or not only_use(product, graph):
        return None
    if int(reduce.attrs.get("keepdims", 1)) != 0:
        return None
    mul = product.inputs[0]
    for stacked, kernels in (mul.inputs, mul.inputs[::-1]):
        found = _stack(stacked, graph, opset)
        if found is None:
            continue
        concat, axis = found
        slices = [shifted_slice(part.inputs[0].inputs[0], axis + 1, opset) for part in concat.inputs]
        if any(s is None for s in slices) or axis < 1 or reduce_sum_axes(reduce, len(stacked.shape), opset) != frozenset({axis}):
            continue
        window_taps = kernel_window(slices)  # type: ignore[arg-type]
        if window_taps is None:
            continue
        window, taps = window_taps
        shape = slices[0].shape  # type: ignore[union-attr]
        stack_shape = shape[:axis] + [len(slices)] + shape[axis:]
        kernel_shape = kernels.shape
        if kernel_shape is None or len(kernel_shape) != len(stack_shape) or any(not isinstance(d, int) for d in kernel_shape):
            continue
        shared = list(kernel_shape[: axis + 1]) + [stack_shape[axis + 1]] + list(kernel_shape[axis + 2 :])
        if shared != stack_shape or kernel_shape[axis + 1] not in (1, stack_shape[axis + 1]):
            continue
        order = [0] * window.taps
        for position, tap in enumerate(taps):
            order[tap] = position
        burst = slices[0].source  # type: ignore[union-attr]
        return StackedShiftsMatch(
            reduce.outputs[0], burst, kernels, axis, window, tuple(order),
            tuple(int(d) for d in burst.shape), tuple(kernel_shape), slices[0].lengths,  # type: ignore[union-attr]
        )
    return None


def find_stacked_shifts(graph: gs.Graph, opset: int) -> list[StackedShiftsMatch]:
    """Every weighted sum over a stack of a zero-padded burst's shifted slices."""
    matches = [_match(n, graph, opset) for n in graph.nodes if n.op == "ReduceSum" and len(n.outputs) == 1]
    return [m for m in matches if m is not None]


def _signature(match: StackedShiftsMatch) -> tuple:
    return match.output.name, match.burst.name, match.kernels.name, match.axis, match.window, match.order, match.groups


def _folded(b: Builder, tensor: gs.Tensor, dims: tuple[int | None, ...], axis: int, name: str) -> gs.Tensor:
    """`tensor` `[*lead, *rest]` (rest from `axis` on) as `[-1, *rest]`: a constant target where
    `rest` is static at every trial, else read at run time."""
    rest = dims[axis:]
    if all(d is not None for d in rest):
        target: gs.Tensor | list[int] = [-1, *rest]  # type: ignore[list-item]
    else:
        target = shape_vector(b, [-1, b.shape(tensor, axis)])
    lead = dims[:axis]
    batch = math.prod(lead) if all(d is not None for d in lead) else None  # type: ignore[arg-type]
    shape = [batch, *(d if d is not None else tensor.shape[axis + i] for i, d in enumerate(rest))]
    return b.reshape(tensor, target, out=gs.Variable(name, tensor.dtype, shape))


def _rewrite(graph: gs.Graph, opset: int, per_trial: list[StackedShiftsMatch]) -> None:
    """Emit the DynamicFilter for one match (found at every trial size) into the real graph. The
    tensors around it are named after the output, so that a static-shape import of the same model
    (optimize's shape probe) names them alike."""
    match = per_trial[0]
    output, burst, kernels = (local(graph, t) for t in (match.output, match.burst, match.kernels))
    burst_dims = dims_across(*(m.burst_shape for m in per_trial))
    kernel_dims = dims_across(*(m.kernel_shape for m in per_trial))
    output.inputs.clear()
    dtype = output.dtype or np.float32
    name = f"{output.name}/{DYNAMIC_FILTER}"
    b = Builder(graph, opset, name, dtype=dtype)
    axis = match.axis
    x = _folded(b, burst, burst_dims, axis, f"{name}/X") if axis > 1 else burst
    planes = _folded(b, kernels, kernel_dims, axis, f"{name}/kernels") if axis > 1 else kernels
    if list(match.order) != list(range(match.window.taps)):
        taps = gs.Variable(f"{name}/taps", planes.dtype, planes.shape)
        planes = b.op("Gather", [planes, b.ints(match.order)], {"axis": 1}, out=taps)
    perm = [0, 2, 1, *range(3, len(planes.shape))]
    filters = b.transpose(planes, perm, out=gs.Variable(f"{name}/F", planes.dtype, [planes.shape[p] for p in perm]))
    attrs = match.window.attrs()
    if axis == 1:
        b.op(DYNAMIC_FILTER, [x, filters], attrs, domain=DOMAIN, out=output)
    else:
        y = gs.Variable(f"{name}/Y", dtype, [x.shape[0], x.shape[1], *filters.shape[3:]])
        b.op(DYNAMIC_FILTER, [x, filters], attrs, domain=DOMAIN, out=y)
        out_dims = burst_dims[: axis + 1] + dims_across(*(m.out_spatial for m in per_trial))
        if all(d is not None for d in out_dims):
            target: gs.Tensor | list[int] = list(out_dims)  # type: ignore[arg-type]
        else:
            target = shape_vector(b, [b.shape(burst, 0, axis + 1), b.shape(y, 2)])
        b.reshape(y, target, out=output)
    add_function(graph, DYNAMIC_FILTER, attrs, opset)


def recognize_stacked_shifts(graph: gs.Graph, opset: int) -> None:
    """Replace every exported stacked-shifts filter (KPN bursts) with one `convlower.DynamicFilter` node."""
    if not has_sliced_pad(graph):
        return
    for per_trial in matches_at_every_size(graph, opset, find_stacked_shifts, _signature):
        _rewrite(graph, opset, per_trial)
    graph.cleanup()


