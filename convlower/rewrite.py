"""Finding lowerable nodes and splicing variants in: the graph surgery that `lower` and `optimize` share.

`plan_nodes` reads every node a pass family knows into a spec (or the reason it cannot);
`apply_choices` replaces the chosen nodes with their variants' subgraphs, cleans up, toposorts,
and hands back a model that keeps the original's interface and passes onnx.checker's full check.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

import onnx
import onnx_graphsurgeon as gs

from convlower.passes import RECOGNIZERS, Builder, NotLowerable, OpFamily, family_for
from convlower.passes.base import onnx_nodes
from convlower.passes.local_functions import attach_functions

from .errors import VerificationError
from .modelio import default_opset, runtime_compatible
from .shapes import infer_shapes
from .weights import checkable, import_onnx, spill_new_weights


@dataclass
class PlannedNode:
    """One node a pass family knows, where it lives, its spec, and which variants apply."""

    name: str
    op: str
    family: OpFamily
    node: gs.Node
    graph: gs.Graph
    spec: Any = None
    reason: str | None = None
    nested: bool = False
    """In an If/Loop/Scan body rather than the main graph."""
    named_by_plan: bool = False
    """The node had no name, and planning gave it one."""
    why_not: dict[str, str | None] = field(default_factory=dict)

    @property
    def applicable(self) -> list[str]:
        return [name for name, why in self.why_not.items() if why is None]


def all_graphs(graph: gs.Graph) -> list[gs.Graph]:
    """The graph and every subgraph nested in it (If/Loop/Scan bodies), outermost first."""
    return [graph, *graph.subgraphs(recursive=True)]


def plan_nodes(graph: gs.Graph, opset: int) -> list[PlannedNode]:
    """Every node, in the graph or its control-flow bodies, that a registered family lowers."""
    planned = []
    for depth, owner in enumerate(all_graphs(graph)):
        for index, node in enumerate(owner.nodes):
            family = family_for(node.op, node.domain or "")
            if family is None:
                continue
            named_by_plan = not node.name
            if named_by_plan:
                node.name = f"{node.op}_{depth}_{index}"
            entry = PlannedNode(node.name, node.op, family, node, owner, nested=depth > 0, named_by_plan=named_by_plan)
            try:
                entry.spec = family.make_spec(node, opset)
            except NotLowerable as exc:
                entry.reason = str(exc)
                if entry.nested and "unknown" in entry.reason:
                    entry.reason += " (inside an If/Loop/Scan body, where ONNX shape inference did not reach)"
            else:
                entry.why_not = {v.name: v.why_not(entry.spec) for v in family.variants}
            planned.append(entry)
    return planned


def import_graph(model: onnx.ModelProto, *, recognize: bool = True) -> gs.Graph:
    """The model as a graphsurgeon graph, inferred shapes on its tensors, known idioms recognized
    (unless `recognize` is False: a model whose idioms were recognized already)."""
    graph = import_onnx(infer_shapes(model))
    if RECOGNIZERS and recognize:
        opset = default_opset(model)
        for recognize in RECOGNIZERS:
            recognize(graph, opset)
        sort_nodes(graph.cleanup())
    return graph


def sort_nodes(graph: gs.Graph) -> gs.Graph:
    """Toposort the nodes (and those of subgraphs and functions), not the function list: convlower's
    functions never call each other, and onnx-graphsurgeon 0.6.1 recurses forever sorting the
    functions of a graph that also has subgraphs (If/Loop/Scan bodies)."""
    return graph.toposort(mode="nodes")


def apply_choices(model: onnx.ModelProto, choices: Mapping[str, str], *, recognize: bool = True) -> onnx.ModelProto:
    """The model with each node named in `choices` replaced by that variant (node name -> variant).
    `recognize=False` skips the recognizers, for a model that is their output already."""
    graph = import_graph(model, recognize=recognize)
    opset = default_opset(model)
    planned = {p.name: p for p in plan_nodes(graph, opset)}
    for name, variant_name in choices.items():
        entry = planned[name]
        variant = entry.family.variant(variant_name)
        if variant is None or entry.spec is None or entry.why_not.get(variant_name) is not None:
            raise ValueError(f"variant {variant_name!r} does not apply to node {name!r}")
        inputs, outputs = list(entry.node.inputs), list(entry.node.outputs)
        entry.node.inputs.clear()
        entry.node.outputs.clear()
        dtype = outputs[0].dtype if outputs[0].dtype is not None else inputs[0].dtype
        builder = Builder(entry.graph, opset, name, dtype=dtype if dtype is not None else "float32")
        variant.build(builder, entry.spec, inputs, outputs)
    sort_nodes(graph.cleanup())
    return finish(model, graph)


def finish(original: onnx.ModelProto, graph: gs.Graph) -> onnx.ModelProto:
    """Export the graph as a model that keeps the original's interface, metadata and opsets."""
    spill_new_weights(original, graph)
    used_functions = {(n.domain, n.op) for n in graph.nodes}
    graph.functions = [f for f in graph.functions if (f.domain, f.name) in used_functions]
    model = gs.export_onnx(graph, do_type_check=False, opset_imports=list(original.opset_import))
    model.ir_version = original.ir_version
    attach_functions(model)
    model.producer_name = original.producer_name
    model.producer_version = original.producer_version
    model.domain = original.domain
    model.model_version = original.model_version
    model.doc_string = original.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(original.metadata_props)
    del model.graph.value_info[:]
    model = infer_shapes(model)
    for ours, theirs in ((model.graph.input, original.graph.input), (model.graph.output, original.graph.output)):
        by_name = {v.name: v for v in theirs}
        for value in ours:
            if value.name in by_name:
                value.CopyFrom(by_name[value.name])
    runtime_compatible(model)
    try:
        onnx.checker.check_model(checkable(model), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        if not _passes_checker(original):
            return model
        raise VerificationError(
            f"the rewritten model fails onnx.checker: {str(exc).splitlines()[0]}",
            "report this as a convlower bug, with the model",
        ) from exc
    return model


def _passes_checker(model: onnx.ModelProto) -> bool:
    """Whether the model passes onnx.checker's full check (a rewrite is held to its input's standard)."""
    try:
        onnx.checker.check_model(checkable(model), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
        return False
    return True


def unlowered_conv_ops(model: onnx.ModelProto) -> dict[str, int]:
    """Counts of the convolution ops (in any subgraph) that no pass family lowers: ConvInteger,
    QLinearConv, DeformConv, onnxruntime's fused and NHWC convs. A report names them, so that a
    quantized model reads as "nothing to lower", not as "no variant won"."""
    counts = Counter(node.op_type for node in onnx_nodes(model.graph)
                     if "conv" in node.op_type.lower() and family_for(node.op_type, node.domain or "") is None)
    return dict(sorted(counts.items()))


def remaining_ops(model: onnx.ModelProto, op_types: set[str]) -> list[str]:
    """Names of nodes (in any subgraph) whose type is in `op_types` (case-insensitive)."""
    wanted = {t.lower() for t in op_types}
    return [node.name or node.op_type for node in onnx_nodes(model.graph) if node.op_type.lower() in wanted]
