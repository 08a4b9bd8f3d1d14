"""Small builders shared by the tests: single-node models, running them on onnxruntime, and the
hypothesis strategy for sliding windows."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from hypothesis import strategies as st

from convlower.modelio import runtime_compatible
from convlower.passes.dynamic_filter import SlidingWindow


def single_node_model(
    op_type: str,
    inputs: Sequence[tuple[str, np.ndarray | tuple[int | str | None, ...]]],
    output_rank: int | None = None,
    *,
    attrs: dict[str, Any] | None = None,
    opset: int = 17,
    domain: str = "",
    elem_type: int = onnx.TensorProto.FLOAT,
) -> onnx.ModelProto:
    """A model with one node. Each input is (name, array) for an initializer or (name, shape) for a
    graph input; an empty name is an omitted optional input. The output's shape is left to inference."""
    graph_inputs, initializers, names = [], [], []
    for name, value in inputs:
        names.append(name)
        if not name:
            continue
        if isinstance(value, np.ndarray):
            initializers.append(numpy_helper.from_array(value, name))
        else:
            graph_inputs.append(helper.make_tensor_value_info(name, elem_type, list(value)))
    node = helper.make_node(op_type, names, ["y"], name=f"{op_type.lower()}_node", domain=domain, **(attrs or {}))
    out_shape = None if output_rank is None else [None] * output_rank
    graph = helper.make_graph(
        [node], "single", graph_inputs, [helper.make_tensor_value_info("y", elem_type, out_shape)], initializers
    )
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    return runtime_compatible(model)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of `model` on onnxruntime's CPU provider."""
    session = ort.InferenceSession(runtime_compatible(model).SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


@st.composite
def windows(draw: st.DrawFn, rank: int, slack: int = 3) -> tuple[SlidingWindow, tuple[int, ...]]:
    """A window of this rank (kernels 1..3, strides and dilations 1..2, asymmetric pads 0..2) and
    spatial extents it fits, up to `slack` more than the least; small, so rank 3 stays cheap."""
    small = st.integers(1, 2)
    window = SlidingWindow(
        tuple(draw(st.integers(1, 3)) for _ in range(rank)),
        tuple(draw(small) for _ in range(rank)),
        tuple(draw(small) for _ in range(rank)),
        tuple(draw(st.integers(0, 2)) for _ in range(2 * rank)),
    )
    minimum = [max(1, window.reach(i) - window.pads[i] - window.pads[i + rank]) for i in range(rank)]
    return window, tuple(draw(st.integers(m, m + slack)) for m in minimum)
