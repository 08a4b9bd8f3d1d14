"""Regions of an exported graph read as functions: found by structure, confirmed by running them.

Some idioms are large arithmetic regions whose every node could be written several ways: a
bilinear sampler spelled out with Gather, Floor and Clip; a contraction with the weights written as
an Einsum, a Conv over an im2col layout, or a sum of 1x1 convolutions. A recognizer finds such a
region's boundary by structure (which tensors go in, which comes out), then cuts it out as a model
of its own (`region_model`) and runs it with onnxruntime on probe inputs (`run_region`) to read or
confirm what it computes: the probe, not the spelling, decides. Such a check is numeric, so it is
made on random inputs well away from any special case, with a tolerance for float32 rounding only.

    leaves = cone_leaves([grid], POSITION_OPS)          # the non-constant tensors the grid reads
    model = region_model(graph, [offset], [grid])
    (value,) = run_region(model, {offset.name: probe})
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from convlower.modelio import runtime_compatible

from ..base import constant_value
from .symbolic import _exported

POSITION_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Neg", "Floor", "Gather", "Slice", "Split", "Unsqueeze", "Squeeze", "Concat",
    "Reshape", "Transpose", "Flatten", "Cast", "Expand", "Tile", "Identity", "Shape", "Range", "Constant",
    "ConstantOfShape",
})
"""Ops that compute sampling positions from offsets: elementwise arithmetic, indexing and layout.
A walk back from a position stops at any other op (the Conv that predicts the offsets, a Sigmoid
that bounds a mask): that tensor is a leaf, an input of the region."""


def is_constant(tensor: gs.Tensor) -> bool:
    return constant_value(tensor) is not None


def cone_leaves(outputs: Iterable[gs.Tensor], through: frozenset[str], stop: Iterable[gs.Tensor] = ()) -> list[gs.Tensor]:
    """The non-constant tensors that `outputs` are computed from, walking back only through nodes
    whose op is in `through` and not past the tensors in `stop` (which count as leaves)."""
    stops = {id(t) for t in stop}
    leaves: dict[int, gs.Tensor] = {}
    seen: set[int] = set()
    pending = list(outputs)
    while pending:
        tensor = pending.pop()
        if id(tensor) in seen or tensor.is_empty() or is_constant(tensor):
            continue
        seen.add(id(tensor))
        producer = tensor.inputs[0] if len(tensor.inputs) == 1 else None
        if id(tensor) in stops or producer is None or producer.op not in through or (producer.domain or "") != "":
            leaves[id(tensor)] = tensor
            continue
        pending.extend(producer.inputs)
    return list(leaves.values())


def region_model(graph: gs.Graph, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Tensor]) -> onnx.ModelProto | None:
    """The nodes that compute `outputs` from `inputs` and constants, as a model of their own; None
    where they read any other tensor. Inputs keep their dtype and take any shape."""
    region = graph.copy()
    tensors = region.tensors()
    region.inputs = [tensors[t.name] for t in inputs]
    region.outputs = [tensors[t.name] for t in outputs]
    for tensor, original in zip(region.inputs, inputs):
        tensor.inputs.clear()
        tensor.dtype, tensor.shape = original.dtype or np.float32, None
    region.cleanup(remove_unused_graph_inputs=False)
    given = {t.name for t in region.inputs}
    for node in region.nodes:
        for tensor in node.inputs:
            if not tensor.is_empty() and not tensor.inputs and tensor.name not in given and not isinstance(tensor, gs.Constant):
                return None
    for tensor in region.outputs:
        tensor.shape = None
    return _exported(region)


def run_region(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The region's outputs on onnxruntime's CPU provider, feeds cast to the inputs' dtypes."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(runtime_compatible(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    dtypes = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in model.graph.input}
    return session.run(None, {name: np.asarray(value, dtypes[name]) for name, value in feeds.items()})
