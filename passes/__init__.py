"""The registry: the single place that lists which ops convlower lowers and how.

Each entry is an `OpFamily` from one pass module: how to read a node into a spec, and the variants
(registered implementations) the tuner chooses between.
"""

from __future__ import annotations

from typing import Callable

import onnx_graphsurgeon as gs

from .base import Builder, NotLowerable, OpFamily, SimpleVariant, Variant, spec_dict, spec_key

FAMILIES: dict[str, OpFamily] = {}

Recognizer = Callable[[gs.Graph, int], None]
RECOGNIZERS: list[Recognizer] = []
"""Rewrites of exported idioms into canonical nodes, run in order before planning.

A recognizer gets the graph and its default-domain opset and edits the graph in place. It must be
deterministic (planning and rewriting each import the model afresh) and must leave a graph that
onnxruntime still runs: a canonical op it introduces carries its model-local function.
"""


def register(family: OpFamily) -> OpFamily:
    """Add a family to the registry; ops are matched case-insensitively by type."""
    FAMILIES[family.op_type.lower()] = family
    return family


def register_recognizer(recognizer: Recognizer) -> Recognizer:
    RECOGNIZERS.append(recognizer)
    return recognizer


def family_for(op_type: str, domain: str = "") -> OpFamily | None:
    """The family that lowers nodes of this type and domain, or None."""
    family = FAMILIES.get(op_type.lower())
    if family is None or (family.domain or "") != (domain or ""):
        return None
    return family


__all__ = [
    "FAMILIES",
    "RECOGNIZERS",
    "Builder",
    "NotLowerable",
    "OpFamily",
    "SimpleVariant",
    "Variant",
    "family_for",
    "register",
    "register_recognizer",
    "spec_dict",
    "spec_key",
]

from . import conv  # noqa: E402,F401  (registers Conv)
from . import col2im, conv_transpose  # noqa: E402,F401
from . import dynamic_filter, unfold  # noqa: E402,F401  (registers DynamicFilter, Unfold and the F.unfold idiom recognizer)
from . import pixel_adaptive_conv, recognize_pac  # noqa: E402,F401  (registers PixelAdaptiveConv and its recognizer)
from . import local_correlation  # noqa: E402,F401  (registers LocalCorrelation)
# Cost volumes and local attention before the dynamic-filter recognizers: they consume shifted
# slices and unfolds reduced over channels, which those recognizers must not take as filters.
from . import recognize_volume_scatter, recognize_correlation_loop  # noqa: E402,F401  (slice-assignment volumes, pad-once shift loops)
from . import recognize_unfold_correlation, recognize_local_attention  # noqa: E402,F401  (unfold correlations, local attention q·k)
from . import recognize_shift_loop, recognize_stacked_shifts  # noqa: E402,F401  (shift-and-sum idioms)
from . import recognize_tensor_unfold  # noqa: E402,F401  (Tensor.unfold dynamic filters)

# Plain unfolds last: a recognizer that consumes an F.unfold (a dynamic filter, PAC) must see it first.
register_recognizer(unfold.recognize_unfolds)
