"""The registry: the single place that lists which ops convlower lowers and how.

A family is one op with its spec and variants (registered implementations the tuner chooses
between); a recognizer rewrites an exported idiom into a family's canonical node. Each family is a
module, or a package that holds its recognizers beside it:

    conv.py, conv_transpose.py, col2im.py,     standard ops, no recognizer
    deform_conv/                               DeformConv               + recognize_tap_grid_sample,
                                                 recognize_gathered_corners
    unfold/                                    convlower.Unfold         + recognize_unfold
    dynamic_filter/                            convlower.DynamicFilter  + recognize_unfold_filter,
                                                 recognize_shift_loop, recognize_stacked_shifts,
                                                 recognize_tensor_unfold
    pixel_adaptive_conv/                       convlower.PixelAdaptiveConv + recognize_pac
    local_correlation/                         convlower.LocalCorrelation  + recognize_volume_scatter,
                                                 recognize_correlation_loop, recognize_unfold_correlation,
                                                 recognize_local_attention
    matching/                                  readers of exported patterns that recognizers share
    base.py, local_functions.py                specs, variants, Builder; canonical ops' function bodies
"""

from __future__ import annotations

from typing import Callable

import onnx_graphsurgeon as gs

from . import col2im, conv, conv_transpose, deform_conv, dynamic_filter, local_correlation, pixel_adaptive_conv, unfold
from .base import Builder, NotLowerable, OpFamily, SimpleVariant, Variant, spec_dict, spec_key
from .deform_conv import recognize_gathered_corners, recognize_tap_grid_sample
from .dynamic_filter import recognize_shift_loop, recognize_stacked_shifts, recognize_tensor_unfold, recognize_unfold_filter
from .local_correlation import (
    recognize_correlation_loop,
    recognize_local_attention,
    recognize_unfold_correlation,
    recognize_volume_scatter,
)
from .local_functions import DOMAIN
from .pixel_adaptive_conv import recognize_pac
from .unfold import recognize_unfold

FAMILIES: dict[str, OpFamily] = {
    family.op_type.lower(): family
    for family in (
        conv.FAMILY,
        col2im.FAMILY,
        conv_transpose.FAMILY,
        deform_conv.FAMILY,
        dynamic_filter.FAMILY,
        unfold.FAMILY,
        pixel_adaptive_conv.FAMILY,
        local_correlation.FAMILY,
    )
}
"""Every family by op type, lower-cased (ops are matched case-insensitively)."""

Recognizer = Callable[[gs.Graph, int], None]
RECOGNIZERS: list[Recognizer] = [
    recognize_tap_grid_sample.recognize_tap_grid_samples,
    recognize_gathered_corners.recognize_gathered_corners,
    recognize_unfold_filter.recognize_dynamic_filters,
    recognize_pac.recognize_pixel_adaptive_convs,
    # Cost volumes and local attention before the shift and Tensor.unfold filter recognizers: they
    # consume shifted slices and unfolds reduced over channels, which those must not take as filters.
    recognize_volume_scatter.recognize_scatter_volumes,
    recognize_correlation_loop.recognize_correlation_loops,
    recognize_unfold_correlation.recognize_unfold_correlations,
    recognize_local_attention.recognize_local_attention,
    recognize_shift_loop.recognize_shift_loops,
    recognize_stacked_shifts.recognize_stacked_shifts,
    recognize_tensor_unfold.recognize_tensor_unfold_filters,
    # Plain unfolds last: a recognizer that consumes an F.unfold (a dynamic filter, PAC) must see it first.
    recognize_unfold.recognize_unfolds,
]
"""Rewrites of exported idioms into canonical nodes, run in this order before planning.

A recognizer gets the graph and its default-domain opset and edits the graph in place. It must be
deterministic (planning and rewriting each import the model afresh) and must leave a graph that
onnxruntime still runs: a canonical op it introduces carries its model-local function.
"""


def family_for(op_type: str, domain: str = "") -> OpFamily | None:
    """The family that lowers nodes of this type and domain, or None."""
    family = FAMILIES.get(op_type.lower())
    if family is None:
        return None
    if (family.domain or "") == (domain or "") or (family.carried_by_function and domain == DOMAIN):
        return family
    return None


__all__ = [
    "FAMILIES",
    "RECOGNIZERS",
    "Builder",
    "NotLowerable",
    "OpFamily",
    "SimpleVariant",
    "Variant",
    "family_for",
    "spec_dict",
    "spec_key",
]
