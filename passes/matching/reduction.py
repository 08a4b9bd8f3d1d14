"""ReduceSum and ReduceMean read back: which reduction, over which axes, keeping them or not.

The axes are an attribute up to opset 12 (ReduceSum) or 17 (ReduceMean) and an input after; both
exporters write them as constants. A reduction counts only with explicit axes inside the rank:
empty axes reduce everything (or nothing, with `noop_with_empty_axes`), which no idiom means.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..base import constant_value

AXES_BECOME_INPUT = {"ReduceSum": 13, "ReduceMean": 18}
"""The opset from which each reduction takes its axes as an input rather than an attribute."""


@dataclass(frozen=True)
class Reduction:
    kind: str
    """"sum" or "mean"."""
    axes: frozenset[int]
    """The reduced axes, non-negative."""
    keepdims: bool


def read_reduction(node: gs.Node, rank: int, opset: int) -> Reduction | None:
    """The reduction a ReduceSum or ReduceMean node over a rank-`rank` input makes, or None when the
    node is neither or its axes are not constant, not inside the rank, or empty."""
    since = AXES_BECOME_INPUT.get(node.op)
    if since is None or int(node.attrs.get("noop_with_empty_axes", 0)):
        return None
    if opset >= since:
        axes = constant_value(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else None
    else:
        axes = node.attrs.get("axes")
    if axes is None or np.size(axes) == 0 or any(not -rank <= int(a) < rank for a in np.ravel(axes)):
        return None
    kind = "sum" if node.op == "ReduceSum" else "mean"
    return Reduction(kind, frozenset(int(a) % rank for a in np.ravel(axes)), bool(int(node.attrs.get("keepdims", 1))))


def reduce_sum_axes(node: gs.Node, rank: int, opset: int) -> frozenset[int] | None:
    """The axes a ReduceSum node sums over, or None (not a ReduceSum, or axes not read)."""
    reduction = read_reduction(node, rank, opset)
    return reduction.axes if reduction is not None and reduction.kind == "sum" else None
