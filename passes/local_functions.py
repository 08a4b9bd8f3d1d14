"""Model-local ONNX functions: how convlower's canonical ops (`convlower.DynamicFilter`,
`convlower.Unfold`) run on onnxruntime before any variant replaces them.

A canonical node is a custom-domain node, so onnxruntime runs it only through a model-local
`FunctionProto` of the same domain and name. Its body is a shape-generic lowering specialised to
the node's attributes (the number of kernel taps shapes the body), so a model holds one body per
attribute set, told apart by `FunctionProto.overload` / `NodeProto.overload` (IR 10).

onnx-graphsurgeon drops both overload fields on import and export. `attach_functions` therefore
derives everything from the nodes' attributes alone: it is idempotent, and running it on a model
after any graph surgery restores bodies and overloads that the surgery lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import onnx
import onnx_graphsurgeon as gs
from onnx import helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from .base import Builder, onnx_nodes

DOMAIN = "convlower"
DOMAIN_VERSION = 1
MIN_FUNCTION_IR_VERSION = 10
"""The IR version that introduced function overloads."""

BodyBuilder = Callable[[Builder, Mapping[str, Any], Sequence[gs.Variable], Sequence[gs.Variable]], None]
"""Emits a function body for one attribute set: (builder, resolved attributes, inputs, outputs)."""


@dataclass(frozen=True)
class CanonicalOp:
    """One canonical op of the convlower domain and how to build its function body.

    `resolve_attrs` returns the attributes with every default filled in and raises ValueError for
    invalid ones; `overload` names an attribute set (equal names, equal bodies).
    """

    op_type: str
    input_names: tuple[str, ...]
    resolve_attrs: Callable[[Mapping[str, Any]], dict[str, Any]]
    overload: Callable[[Mapping[str, Any]], str]
    build_body: BodyBuilder

    def function(self, attrs: Mapping[str, Any], opset: int) -> gs.Function:
        """The body for these attributes as a graphsurgeon function (attributes kept as defaults)."""
        resolved = self.resolve_attrs(attrs)
        function = gs.Function(self.op_type, domain=DOMAIN, opset=opset, attrs=dict(resolved))
        function.inputs = [gs.Variable(name) for name in self.input_names]
        function.outputs = [gs.Variable("Y")]
        builder = Builder(function, opset, self.op_type)
        self.build_body(builder, resolved, function.inputs, function.outputs)
        return function.cleanup().toposort()

    def function_proto(self, attrs: Mapping[str, Any], opset: int) -> onnx.FunctionProto:
        proto = OnnxExporter.export_function(self.function(attrs, opset))
        proto.overload = self.overload(attrs)
        return proto


CANONICAL_OPS: dict[str, CanonicalOp] = {}


def register_canonical_op(op: CanonicalOp) -> CanonicalOp:
    CANONICAL_OPS[op.op_type] = op
    return op


def node_attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def attach_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every canonical convlower node its model-local function (in place; idempotent).

    Each node's overload is set from its attributes, one body per distinct attribute set is built
    at the model's opset, bodies no node calls are dropped, and the model's IR version is raised to
    where overloads exist (onnxruntime 1.31 reads it). Raises ValueError for a canonical node whose
    attributes are invalid.
    """
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    wanted: dict[tuple[str, str], onnx.FunctionProto] = {}
    for node in onnx_nodes(model.graph):
        op = CANONICAL_OPS.get(node.op_type) if node.domain == DOMAIN else None
        if op is None:
            continue
        attrs = node_attrs(node)
        try:
            node.overload = op.overload(attrs)
        except ValueError as exc:
            raise ValueError(f"{DOMAIN}.{node.op_type} node {node.name!r}: {exc}") from exc
        key = (node.op_type, node.overload)
        if key not in wanted:
            wanted[key] = op.function_proto(attrs, opset)
    kept = [f for f in model.functions if not (f.domain == DOMAIN and f.name in CANONICAL_OPS)]
    del model.functions[:]
    model.functions.extend(kept + [wanted[key] for key in sorted(wanted)])
    if wanted:
        model.ir_version = max(model.ir_version, MIN_FUNCTION_IR_VERSION)
        if not any(o.domain == DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    return model


def add_function(graph: gs.Graph, op_type: str, attrs: Mapping[str, Any], opset: int) -> None:
    """Give a graphsurgeon graph the body a canonical node with these attributes calls.

    graphsurgeon has no overloads, so a graph whose canonical nodes use several attribute sets
    needs `attach_functions` on the exported model to tell their bodies apart.
    """
    op = CANONICAL_OPS[op_type]
    resolved = op.resolve_attrs(attrs)
    if any(f.domain == DOMAIN and f.name == op_type and f.attrs == resolved for f in graph.functions):
        return
    graph.functions.append(op.function(resolved, opset))
