"""An exported F.unfold still used as columns: a `convlower.Unfold` node.

    Pad(x) -> Gather(axis 2) -> Gather(axis 4) -> Transpose(0,1,2,4,3,5) -> Reshape(...)
      becomes  convlower.Unfold(x) -> Reshape([N, C, *kernel, *S_out])

Registered after every recognizer that consumes an unfold (dynamic filters, PAC, correlations,
attention), so it takes only what they left: im2col written by hand, unfold-then-matmul layers.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from ..base import Builder
from ..dynamic_filter import output_extents, shape_vector
from ..local_functions import DOMAIN, add_function
from ..matching.symbolic import dims_across, local, matches_at_every_size
from ..matching.unfold import UnfoldMatch, find_unfolds, has_unfold_transpose
from . import OP_TYPE


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
