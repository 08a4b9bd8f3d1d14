"""A node's fusable neighbourhood as a micro-model: timing a choice where onnxruntime's fusions apply.

A node timed alone (`convlower.tune.micro_model`) is not the node onnxruntime runs. On CPU it
fuses a Conv with the activation, BatchNormalization or residual Add after it and keeps chains of
Conv in its blocked NCHWc layout, so a 1x1 Conv lowered to MatMul inside such a chain loses both
and pays layout conversions. Timing the whole model with and without a choice sees that, at the
cost of a whole-model run per round; the neighbourhood is the small model in between: the node
with the fused group it belongs to and the Conv-like ops next to it.

    producer side                          the node                 consumer side
    Conv ─► [BN] ─► [Add ◄─ skip] ─► [act] ─► node ─► [BN] ─► [Add ◄─ skip] ─► [act] ─► Conv ─► [act]

`neighbourhood` walks back from each named node through activations, BatchNormalization and one
Add or Mul (only into an operand made by a Conv-like op or BN: the fused partner, not the skip
path) to the Conv-like op that made the data, and forward through the same ops to the next
Conv-like op and the ops fused after it, `depth` Conv-like ops each way. Constant nodes feeding the kept nodes come along, so a
constant operand stays constant (onnxruntime folds a constant Add or Mul into the Conv); every
other tensor from outside becomes a graph input with its inferred shape, and every tensor made
inside and used outside (or a graph output) becomes an output, so nothing is dead code.
Weights are the model's initializers, shared rather than copied: an external weight stays a
reference to its data file, as in `convlower.tune.micro_model`.

`InNeighbourhood` holds a group's neighbourhood at each profile and runs it with any choices
applied, for optimize's confirmation to time variants in (`convlower.optimize._confirm_in_context`).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import onnx
import onnx_graphsurgeon as gs

from convlower.passes import family_for

from .modelio import default_opset
from .rewrite import apply_choices, finish, import_graph, plan_nodes, sort_nodes
from .runner import Runner
from .verify import input_sets

ACTIVATIONS = frozenset({"Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu"})
"""Element-wise activations onnxruntime fuses into the Conv before them (or runs in NCHWc beside it)."""
NORMALIZATIONS = frozenset({"BatchNormalization"})
JOINS = frozenset({"Add", "Mul"})
"""Two-operand ops onnxruntime fuses into a Conv: the residual Add, a constant bias Add or scale Mul."""


class NoNeighbourhood(ValueError):
    """A neighbourhood cannot be cut for the named nodes; the message says why."""


def neighbourhood(model: onnx.ModelProto, node_names: list[str], depth: int = 1) -> onnx.ModelProto:
    """A standalone model of the named main-graph nodes and their fusable neighbourhood (see the
    module docstring), `depth` Conv-like ops back and forward from each.

    `model` should have static input shapes (`convlower.shapes.with_static_inputs`): the boundary
    tensors' shapes are those shape inference finds. Node names are as `plan_nodes` names them
    (the names optimize reports). Raises NoNeighbourhood for a node that is not in the main graph
    (in an If/Loop/Scan body, or absent) and for a boundary tensor whose type or rank is unknown.
    """
    graph = import_graph(model)
    planned = plan_nodes(graph, default_opset(model))  # names the unnamed Conv-like nodes as optimize does
    nested = {entry.name for entry in planned if entry.nested}
    by_name = {node.name: node for node in graph.nodes if node.name}
    for name in node_names:
        if name in nested:
            raise NoNeighbourhood(f"node {name!r} is inside an If/Loop/Scan body: neighbourhoods are cut from the main graph only")
        if name not in by_name:
            raise NoNeighbourhood(f"node {name!r} is not in the model's main graph")
    main = set(map(id, graph.nodes))
    kept: dict[int, gs.Node] = {}
    for name in node_names:
        node = by_name[name]
        kept[id(node)] = node
        _walk_back(node, depth, main, kept)
        _walk_forward(node, depth, main, kept)
    for node in list(kept.values()):
        for tensor in node.inputs:
            producer = _producer(tensor, main)
            if producer is not None and producer.op == "Constant":
                kept[id(producer)] = producer
    return finish(model, _cut(graph, [n for n in graph.nodes if id(n) in kept]))


class InNeighbourhood:
    """A group's neighbourhood at each profile, to time choices in: one micro-model per static
    model given (one per profile) holding the neighbourhoods of all of `node_names`, with random
    inputs (`convlower.verify.input_sets`, seeded). Raises NoNeighbourhood as `neighbourhood` does."""

    method = "neighbours"

    def __init__(self, static_models: Sequence[onnx.ModelProto], node_names: Sequence[str], runner: Runner,
                 *, depth: int = 1, seed: int = 1234):
        self.runner = runner
        self.models = [neighbourhood(model, list(node_names), depth) for model in static_models]
        self.feeds = [input_sets(model, runs=1, seed=seed)[0] for model in self.models]
        self.inside = [{node.name for node in model.graph.node} for model in self.models]

    def runs(self, choices: Mapping[str, str]) -> list[Callable[[], object]]:
        """Per profile, a zero-argument run of the neighbourhood with the choices that fall inside
        it applied (a choice elsewhere in the model does not change it)."""
        found = []
        for model, feeds, inside in zip(self.models, self.feeds, self.inside):
            applied = {name: variant for name, variant in choices.items() if name in inside}
            session = self.runner.session(apply_choices(model, applied) if applied else model, what="the neighbourhood")
            found.append(session.runner_for(feeds))
        return found


def _conv_like(node: gs.Node) -> bool:
    return family_for(node.op, node.domain or "") is not None


def _producer(tensor: gs.Tensor, main: set[int]) -> gs.Node | None:
    """The main-graph node that makes `tensor`, or None for an input, an initializer or an outer value."""
    if isinstance(tensor, gs.Constant) or len(tensor.inputs) != 1 or id(tensor.inputs[0]) not in main:
        return None
    return tensor.inputs[0]


def _walk_back(node: gs.Node, depth: int, main: set[int], kept: dict[int, gs.Node]) -> None:
    """The fused group that made `node`'s data input, back to `depth` Conv-like ops: through
    activations and BatchNormalization, and through one Add/Mul per group into the operands a
    Conv-like op or BatchNormalization made (a skip path is left as an input)."""

    def back(tensor: gs.Tensor, convs_left: int, joined: bool) -> None:
        producer = _producer(tensor, main)
        if producer is None or id(producer) in kept:
            return
        if _conv_like(producer):
            kept[id(producer)] = producer
            if convs_left > 1:
                back(producer.inputs[0], convs_left - 1, False)
        elif producer.op in ACTIVATIONS or producer.op in NORMALIZATIONS:
            kept[id(producer)] = producer
            back(producer.inputs[0], convs_left, joined)
        elif producer.op in JOINS and not joined:
            kept[id(producer)] = producer
            for operand in producer.inputs:
                made_by = _producer(operand, main)
                if made_by is not None and (_conv_like(made_by) or made_by.op in NORMALIZATIONS):
                    back(operand, convs_left, True)

    if node.inputs and depth > 0:
        back(node.inputs[0], depth, False)


def _walk_forward(node: gs.Node, depth: int, main: set[int], kept: dict[int, gs.Node]) -> None:
    """The ops after `node` that onnxruntime fuses with it (activations, BatchNormalization, one
    Add/Mul per group) and the next Conv-like ops after them, `depth` of them along each path."""

    def forward(source: gs.Node, convs_left: int, joined: bool) -> None:
        for tensor in source.outputs:
            for consumer in tensor.outputs:
                if id(consumer) not in main or id(consumer) in kept:
                    continue
                if _conv_like(consumer):
                    if convs_left > 0:
                        kept[id(consumer)] = consumer
                        forward(consumer, convs_left - 1, False)
                elif consumer.op in ACTIVATIONS or consumer.op in NORMALIZATIONS:
                    kept[id(consumer)] = consumer
                    forward(consumer, convs_left, joined)
                elif consumer.op in JOINS and not joined:
                    kept[id(consumer)] = consumer
                    forward(consumer, convs_left, True)

    forward(node, depth, False)


def _cut(graph: gs.Graph, nodes: list[gs.Node]) -> gs.Graph:
    """A graph of `nodes` (taken out of `graph`, which is left broken): every tensor they read
    that none of them makes becomes an input, every tensor they make that is used elsewhere or is
    a graph output becomes an output."""
    inside = set(map(id, nodes))
    made = {id(t) for node in nodes for t in node.outputs}
    outputs_of_graph = set(map(id, graph.outputs))
    boundary: dict[str, gs.Variable] = {}
    for node in nodes:
        for index, tensor in enumerate(node.inputs):
            if tensor.is_empty() or id(tensor) in made or isinstance(tensor, gs.Constant):
                continue
            if tensor.shape is None or tensor.dtype is None:
                raise NoNeighbourhood(f"the type or rank of {tensor.name!r}, an input of the neighbourhood, is unknown")
            if tensor.name not in boundary:
                boundary[tensor.name] = gs.Variable(tensor.name, dtype=tensor.dtype, shape=tensor.shape)
            node.inputs[index] = boundary[tensor.name]
    outputs = [t for node in nodes for t in node.outputs
               if id(t) in outputs_of_graph or any(id(consumer) not in inside for consumer in t.outputs)]
    cut = gs.Graph(nodes=nodes, inputs=list(boundary.values()), outputs=outputs, name=f"{graph.name}_neighbourhood",
                   opset=graph.opset, import_domains=graph.import_domains, functions=graph.functions)
    return sort_nodes(cut)
