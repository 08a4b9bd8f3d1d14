"""Recognition under symbolic dims: match an idiom at several concrete sizes, rewrite it once for all.

Exports with symbolic batch and spatial dims compute what recognizers must read — Gather indices,
Slice ends, Reshape targets — from `Shape` at run time:

    Shape(x) -> Gather(2) -> Sub -> Range -> Unsqueeze -> Add(k * dilation) -> Gather(Pad(x), ., axis=2)

Nothing in the graph says that such an index is `k * dilation + p * stride` for every input size.
Rather than reason about the arithmetic, convlower binds the model's symbolic input dims to trial
sizes (distinct sizes for distinct dims, several trials), lets ONNX shape inference with data
propagation fold the shapes (then `folded_value` folds, with onnx.reference, the shape arithmetic
inference does not follow, such as Div), and runs a recognizer's static matcher on each bound
copy. Matchers use `folded_value` at static shapes too, for indices and pads. A match
counts only where the same match (the same tensors, the same window) is found at every trial; the
rewrite is then emitted into the real graph, shape-generic, with the dims that vary between trials
read at run time.

    matches = matches_at_every_size(graph, opset, find_unfolds, signature)
    for per_trial in matches:                      # [match at trial 1, match at trial 2, ...]
        source = local(graph, per_trial[0].source)
        out = dims_across(*(m.out_spatial for m in per_trial))   # None where symbolic
"""

from __future__ import annotations

import math
from typing import Callable, Hashable, Iterable, Sequence, TypeVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx.reference import ReferenceEvaluator
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from convlower.shapes import UNNAMED_DIM_PARAMS, infer_shapes

from ..base import Dim, constant_value, static_shape
from ..local_functions import attach_functions

M = TypeVar("M")

SHAPE_ARITHMETIC = frozenset({
    "Add", "Sub", "Mul", "Div", "Mod", "Neg", "Abs", "Max", "Min", "Range", "Unsqueeze", "Squeeze", "Concat", "Cast",
    "Reshape", "Gather", "Slice", "Identity", "ConstantOfShape", "Transpose", "Expand", "Equal", "Less", "Greater",
    "Not", "Where",
})
"""Ops the exporters use to compute indices, sizes and shapes from Shape; folded with onnx.reference."""
MAX_FOLDED_RANGE = 1 << 20
"""The longest Range folded: index arithmetic is as long as a spatial axis, never more."""


def folded_value(tensor: gs.Tensor, opset: int, depth: int = 16) -> np.ndarray | None:
    """The value of a tensor computed only from constants and static dims, else None.

    Covers initializers, Constant nodes, `Shape` (and `Gather` of a `Shape`) where the dims read are
    static, and small integer arithmetic on those.
    """
    value = constant_value(tensor)
    if value is not None or depth == 0 or len(tensor.inputs) != 1:
        return value
    node = tensor.inputs[0]
    if node.op == "Shape":
        dims = _shape_dims(node)
        return None if dims is None or None in dims else np.asarray(dims, dtype=np.int64)
    if node.op == "Gather" and node.inputs[0].inputs and node.inputs[0].inputs[0].op == "Shape":
        dims, index = _shape_dims(node.inputs[0].inputs[0]), folded_value(node.inputs[1], opset, depth - 1)
        if dims is None or index is None:
            return None
        picked = np.asarray(np.asarray(dims, dtype=object)[index])
        return None if any(d is None for d in np.ravel(picked)) else picked.astype(np.int64)
    if node.op not in SHAPE_ARITHMETIC or (node.domain or "") not in ("", "ai.onnx"):
        return None
    inputs = [folded_value(t, opset, depth - 1) if t.name else np.empty(0) for t in node.inputs]
    if any(v is None for v in inputs):
        return None
    if node.op == "Range" and abs(float((inputs[1] - inputs[0]) / inputs[2])) > MAX_FOLDED_RANGE:
        return None
    values = {t.name: v for t, v in zip(node.inputs, inputs) if t.name}
    try:
        return ReferenceEvaluator(OnnxExporter.export_node(node), opsets={"": opset}).run(None, values)[0]
    except Exception:  # noqa: BLE001 - onnx.reference raises many kinds; an unfoldable value is just unknown
        return None


def _shape_dims(shape_node: gs.Node) -> list[Dim] | None:
    """What a Shape node reads (start/end applied): ints where static, None where not."""
    dims = static_shape(shape_node.inputs[0])
    if dims is None:
        return None
    start, end = shape_node.attrs.get("start", 0), shape_node.attrs.get("end", len(dims))
    return list(dims[start:end])


FOLDED_INPUTS = {"Reshape": (1,), "Slice": (1, 2, 3, 4), "Gather": (1,), "Pad": (1,), "Expand": (1,), "Tile": (1,),
                 "Unsqueeze": (1,), "Squeeze": (1,), "ReduceSum": (1,), "ConstantOfShape": (0,)}
"""Inputs that carry shapes, sizes, indices or axes: in a trial graph, folded to constants where they
are computed from shapes, so that inference sees them."""

TRIAL_BATCH = (2, 3)
"""Sizes a symbolic first axis (the batch, by convention) takes in the trials."""
TRIAL_BASE = (64, 96)
"""Sizes other symbolic dims start from in the trials; each further distinct dim adds `TRIAL_STEP`.
Multiples of 32, so that down- and up-sampling stages of image nets still line up."""
TRIAL_STEP = 32
LARGE_CONSTANT = 4096
"""Constants larger than this many elements (weights) travel to the trials as shapes only."""


def has_symbolic_inputs(graph: gs.Graph) -> bool:
    return any(not _is_static(d) for t in graph.inputs for d in (t.shape or ()))


def _is_static(dim: object) -> bool:
    return isinstance(dim, (int, np.integer)) and int(dim) >= 0


def trial_bindings(graph: gs.Graph) -> list[dict[str, tuple[int, ...]]]:
    """Input shapes for each trial. Symbolic dims that share a name share a size, and so do the dims
    of twin inputs axis by axis (`_twin_keys`); every other symbolic dim (another name, or unnamed)
    gets a size of its own. A dim first seen on an input's axis 0 is a batch and takes
    `TRIAL_BATCH` sizes."""
    keys = _twin_keys(graph)
    first_axis: dict[object, int] = {}
    for tensor in graph.inputs:
        for axis, dim in enumerate(tensor.shape or ()):
            if not _is_static(dim):
                first_axis.setdefault(keys[tensor.name, axis], axis)
    bindings = []
    for trial, batch in enumerate(TRIAL_BATCH):
        size = {key: batch if axis == 0 else TRIAL_BASE[trial] + TRIAL_STEP * index
                for index, (key, axis) in enumerate(first_axis.items())}
        bindings.append({
            tensor.name: tuple(int(d) if _is_static(d) else size[keys[tensor.name, axis]] for axis, d in enumerate(tensor.shape))
            for tensor in graph.inputs if tensor.shape is not None
        })
    return bindings


def _twin_keys(graph: gs.Graph) -> dict[tuple[str, int], object]:
    """Per symbolic (input, axis), the key of the size it takes: its name, else the input and axis;
    an input's twin takes the earlier input's keys axis by axis. Twins are inputs of one rank with
    the same static dims at the same axes (a stereo pair, two video frames): the dynamo exporter
    with `Dim.AUTO` names each frame's height and width apart (`s95`, `s97`), since the model
    accepts sizes that differ and meet after a stride; bound apart, they meet nowhere and no idiom
    between them matches. Equal sizes are one valid binding of such inputs. A name resolves once,
    where it is first seen, and keeps that key wherever it appears again."""
    keys: dict[tuple[str, int], object] = {}
    resolved: dict[object, object] = {}
    first_of_pattern: dict[tuple, gs.Tensor] = {}
    for tensor in graph.inputs:
        if tensor.shape is None:
            continue
        twin = first_of_pattern.setdefault(tuple(int(d) if _is_static(d) else None for d in tensor.shape), tensor)
        for axis, dim in enumerate(tensor.shape):
            if _is_static(dim):
                continue
            own = _dim_key(tensor, axis, dim)
            keys[tensor.name, axis] = resolved.setdefault(own, own if twin is tensor else keys[twin.name, axis])
    return keys


def _dim_key(tensor: gs.Tensor, axis: int, dim: object) -> object:
    return dim if isinstance(dim, str) and dim not in UNNAMED_DIM_PARAMS else (tensor.name, axis)


def trial_graphs(graph: gs.Graph, opset: int) -> list[gs.Graph]:
    """Copies of `graph` with every symbolic input dim bound to trial sizes, shapes inferred with
    ONNX data propagation, so that Reshape targets computed from Shape become static and index
    arithmetic folds. Tensors keep their names. Empty when the inputs are all static, or when a
    binding does not infer (the idioms are then left as they are)."""
    if not has_symbolic_inputs(graph):
        return []
    model, weights = _shapes_model(graph, opset)
    trials = []
    for binding in trial_bindings(graph):
        trial = gs.import_onnx(_bound(model, graph, binding))
        if not all(_is_static_shape(t.shape) for t in trial.inputs):
            return []
        if _fold_shape_inputs(trial, opset):
            trial = gs.import_onnx(infer_shapes(_exported(trial)))
        _restore_weights(trial, weights)
        trials.append(trial)
    return trials


def _bound(model: onnx.ModelProto, graph: gs.Graph, binding: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """The model at one trial binding, shapes inferred. Shapes the exporter recorded in terms of
    the input dims' names (the dynamo exporter records `batch`, `H`, ...) take the trial sizes, so
    inference starts from what the exporter knew, not from nothing."""
    sizes = {dim: size for t in graph.inputs for dim, size in zip(t.shape or (), binding.get(t.name, ()))
             if isinstance(dim, str) and dim not in UNNAMED_DIM_PARAMS}
    bound = onnx.ModelProto()
    bound.CopyFrom(model)
    for value in list(bound.graph.input) + list(bound.graph.value_info) + list(bound.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in sizes:
                dim.dim_value = sizes[dim.dim_param]
    for value in bound.graph.input:
        if value.name in binding:
            for dim, size in zip(value.type.tensor_type.shape.dim, binding[value.name]):
                dim.dim_value = size
    return infer_shapes(bound)


def _fold_shape_inputs(trial: gs.Graph, opset: int) -> bool:
    """Replace the shape-carrying inputs that a trial's static dims determine with constants (the
    exporters compute them from Shape with arithmetic that data propagation does not follow, such
    as Div); True when any was replaced."""
    folded: dict[str, gs.Constant | None] = {}
    for node in trial.nodes:
        for index in FOLDED_INPUTS.get(node.op, ()):
            tensor = node.inputs[index] if index < len(node.inputs) else None
            if tensor is None or not tensor.name or isinstance(tensor, gs.Constant):
                continue
            if tensor.name not in folded:
                value = folded_value(tensor, opset)
                folded[tensor.name] = None if value is None else gs.Constant(f"{tensor.name}/folded", np.asarray(value))
            if folded[tensor.name] is not None:
                node.inputs[index] = folded[tensor.name]
    replaced = any(c is not None for c in folded.values())
    if replaced:
        trial.cleanup()
    return replaced


def _is_static_shape(shape: Sequence[object] | None) -> bool:
    return shape is not None and all(_is_static(d) for d in shape)


def _shapes_model(graph: gs.Graph, opset: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The graph as a model for shape inference, and the large constants (weights) it holds as
    inputs of their shape instead: only their shapes matter to inference, and copying them would
    cost memory (or break protobuf's 2 GB limit)."""
    copy = graph.copy()
    weights = {}
    for tensor in list(copy.tensors().values()):
        if isinstance(tensor, gs.Constant) and tensor.values.size > LARGE_CONSTANT:
            weights[tensor.name] = tensor.values
            stand_in = gs.Variable(tensor.name, dtype=tensor.values.dtype, shape=list(tensor.values.shape))
            _replace_input(tensor, stand_in)
            copy.inputs.append(stand_in)
    model = _exported(copy)
    if not any(o.domain in ("", "ai.onnx") for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("", opset))
    return model, weights


def _replace_input(old: gs.Tensor, new: gs.Tensor) -> None:
    """Every node that reads `old` reads `new` instead."""
    for node in list(old.outputs):
        for index, tensor in enumerate(list(node.inputs)):
            if tensor is old:
                node.inputs[index] = new


def _exported(graph: gs.Graph) -> onnx.ModelProto:
    """The graph as a model whose canonical nodes carry their function overloads again (graphsurgeon
    drops them; ONNX shape inference refuses a model with two bodies of one function otherwise)."""
    return attach_functions(gs.export_onnx(graph, do_type_check=False))


def _restore_weights(trial: gs.Graph, weights: dict[str, np.ndarray]) -> None:
    """Put the weights back as constants in a trial graph (sharing the arrays, not copying them),
    so that matchers that read constant values see them."""
    if not weights:
        return
    tensors = trial.tensors()
    for name, values in weights.items():
        stand_in = tensors[name]
        constant = gs.Constant(name, values)
        _replace_input(stand_in, constant)
    trial.inputs = [t for t in trial.inputs if t.name not in weights]


def matches_at_every_size(
    graph: gs.Graph,
    opset: int,
    find: Callable[[gs.Graph, int], Iterable[M]],
    signature: Callable[[M], Hashable],
) -> list[list[M]]:
    """Matches of `find` that hold at every size, one list per match: `[match]` from `graph`
    itself when its inputs are static, else `[match at trial 1, match at trial 2, ...]` for each
    signature (the tensors a match spans and its parameters) found at every trial."""
    if not has_symbolic_inputs(graph):
        return [[m] for m in find(graph, opset)]
    per_trial = [{signature(m): m for m in find(trial, opset)} for trial in trial_graphs(graph, opset)]
    if not per_trial:
        return []
    return [[found[key] for found in per_trial] for key in per_trial[0] if all(key in found for found in per_trial)]


def dims_across(*shapes: Sequence[int]) -> tuple[int | None, ...]:
    """Per axis, the size when it is the same at every trial, None where it varies (symbolic)."""
    return tuple(dims[0] if all(d == dims[0] for d in dims) else None for dims in zip(*shapes))


def local(graph: gs.Graph, tensor: gs.Tensor) -> gs.Tensor:
    """`graph`'s own tensor with the same name as `tensor` (which may belong to a trial graph)."""
    return graph.tensors()[tensor.name]


def reshape_parts(
    per_trial: Sequence[Sequence[int]], batches: Sequence[int], spatials: Sequence[Sequence[int]],
    batch: gs.Tensor, extent: Sequence[int | gs.Tensor],
) -> list[int | gs.Tensor] | None:
    """A Reshape target that holds at every size, from the target found at each trial: per axis a
    static size, the batch, one spatial axis of the output, or (once) all of them merged (-1).
    None when an axis is none of these."""
    parts: list[int | gs.Tensor] = []
    for dims in zip(*per_trial):
        spatial = [i for i in range(len(extent)) if all(d == s[i] for d, s in zip(dims, spatials))]
        if all(d == dims[0] for d in dims):
            parts.append(int(dims[0]))
        elif all(d == n for d, n in zip(dims, batches)):
            parts.append(batch)
        elif spatial:
            parts.append(extent[spatial[0]])
        elif all(d == math.prod(s) for d, s in zip(dims, spatials)) and -1 not in parts:
            parts.append(-1)
        else:
            return None
    return parts
