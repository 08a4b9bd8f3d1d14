"""ONNX models built directly with onnx.helper, for the demo and tests that need no torch."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def conv_block(channels: int = 16, size: int = 32, batch: int | str = "N", opset: int = 17, seed: int = 0) -> onnx.ModelProto:
    """A small CNN block: 3x3 conv, ReLU, depthwise 3x3 stride 2, ReLU, 1x1 conv.

    The batch dim is symbolic (named `batch`) unless an int is given.
    """
    rng = np.random.default_rng(seed)

    def weight(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        fan_in = int(np.prod(shape[1:]))
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), name)

    c = channels
    initializers = [
        weight("w1", (c, 3, 3, 3)), numpy_helper.from_array(rng.standard_normal(c).astype(np.float32) * 0.1, "b1"),
        weight("w2", (c, 1, 3, 3)),
        weight("w3", (2 * c, c, 1, 1)), numpy_helper.from_array(rng.standard_normal(2 * c).astype(np.float32) * 0.1, "b3"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="dwconv2", group=c, strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["y"], name="pwconv3"),
    ]
    graph = helper.make_graph(
        nodes, "conv_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 2 * c, size // 2, size // 2])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="convlower.models")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def residual_chain(channels: int = 64, height: int = 8, width: int = 80, blocks: int = 6, batch: int | str = "N",
                   opset: int = 17, seed: int = 0) -> onnx.ModelProto:
    """A CRNN-style backbone stage: `blocks` times [1x1 Conv → Relu → 3x3 depthwise Conv → 1x1 Conv
    → residual Add → Relu] on a [N, C, H, W] feature map, each 1x1 Conv followed by a fusable op.

    onnxruntime's CPU provider runs such chains in its blocked NCHWc layout and fuses each Conv
    with the Relu or Add after it, so a node that is faster alone (a 1x1 Conv lowered to MatMul)
    can make the whole model slower: the model to check context-aware choices on.
    """
    rng = np.random.default_rng(seed)
    c = channels

    def weight(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32), name)

    nodes, initializers, x = [], [], "x"
    for i in range(blocks):
        initializers += [weight(f"b{i}.expand", (c, c, 1, 1)), weight(f"b{i}.depthwise", (c, 1, 3, 3)),
                         weight(f"b{i}.project", (c, c, 1, 1))]
        nodes += [
            helper.make_node("Conv", [x, f"b{i}.expand"], [f"b{i}.e"], name=f"block{i}/expand"),
            helper.make_node("Relu", [f"b{i}.e"], [f"b{i}.er"]),
            helper.make_node("Conv", [f"b{i}.er", f"b{i}.depthwise"], [f"b{i}.d"], name=f"block{i}/depthwise", group=c, pads=[1, 1, 1, 1]),
            helper.make_node("Conv", [f"b{i}.d", f"b{i}.project"], [f"b{i}.p"], name=f"block{i}/project"),
            helper.make_node("Add", [f"b{i}.p", x], [f"b{i}.sum"]),
            helper.make_node("Relu", [f"b{i}.sum"], [f"b{i}.out"]),
        ]
        x = f"b{i}.out"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(
        nodes, "residual_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, c, height, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, c, height, width])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="convlower.models")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model
