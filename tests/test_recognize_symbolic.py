"""F.unfold idioms exported the usual way for image models: symbolic batch, height and width.

Both exporters then compute the unfold's Gather indices and the views' Reshape targets from
`Shape` at run time. Each idiom is exported with symbolic dims by each exporter, recognized, and
the recognized model and its lowerings must keep the symbolic dims and equal torch eager at two
input sizes other than the export's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

import convlower
from convlower.models.idioms import UnfoldMulSum, UnfoldSignal
from convlower.passes import FAMILIES
from convlower.passes.local_functions import DOMAIN
from convlower.passes.matching.symbolic import trial_bindings
from tests.helpers import run
from tests.test_recognize import ATOL, EXPORTERS, RTOL, EinsumFilter, Method1, MulReduce, canonical_nodes, recognized_model

torch = pytest.importorskip("torch")
F = torch.nn.functional
nn = torch.nn



class StridedGroups(nn.Module):
    """Involution-style: filters predicted on a stride-2 grid, shared by two channel groups, over a
    dilated window; the filters' extent follows the input's through the strided Conv."""

    groups = 2

    def __init__(self, channels: int = 4):
        super().__init__()
        self.predict = nn.Conv2d(channels, self.groups * 9, 3, stride=2, padding=1)

    def forward(self, x):
        n, c = x.shape[:2]
        weight = self.predict(x)
        h, w = weight.shape[-2:]
        patches = F.unfold(x, 3, dilation=2, padding=2, stride=2).view(n, self.groups, c // self.groups, 9, h, w)
        return (patches * weight.view(n, self.groups, 1, 9, h, w)).sum(3).view(n, c, h, w)


class PlainUnfold(nn.Module):
    """A plain F.unfold feeding a matmul: im2col written by hand, over a symbolic number of columns."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3 * 9, 5))

    def forward(self, x):
        return F.unfold(x, 3, padding=1).transpose(1, 2) @ self.weight


def export_symbolic(module: nn.Module, inputs: tuple, axes: list[dict[int, str]], dynamo: bool, opset: int, path: Path) -> onnx.ModelProto:
    """`module` exported with the given axes of each input symbolic (named as given)."""
    module.eval()
    names = [f"in{i}" for i in range(len(inputs))]
    if dynamo:
        dims: dict[str, object] = {}
        shapes = tuple({axis: dims.setdefault(name, torch.export.Dim(name, min=2)) for axis, name in spec.items()} for spec in axes)
        torch.onnx.export(module, inputs, path, dynamo=True, opset_version=opset, input_names=names,
                          output_names=["y"], dynamic_shapes=shapes)
    else:
        torch.onnx.export(module, inputs, path, dynamo=False, opset_version=opset, input_names=names, output_names=["y"],
                          dynamic_axes={name: spec for name, spec in zip(names, axes)})
    return onnx.load(path)


def input_dims(model: onnx.ModelProto) -> list[list[str | int]]:
    return [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input]


def assert_equal_at_sizes(module: nn.Module, model: onnx.ModelProto, sizes: list[tuple]) -> None:
    for inputs in sizes:
        with torch.inference_mode():
            expected = module(*inputs).numpy()
        feeds = {f"in{i}": t.numpy() for i, t in enumerate(inputs)}
        np.testing.assert_allclose(run(model, feeds)[0], expected, atol=ATOL, rtol=RTOL)


def assert_recognized_under_symbolic_dims(
    module: nn.Module, model: onnx.ModelProto, op: str, sizes: list[tuple], must_apply: set[str]
) -> list[str]:
    """The idiom is one canonical `op` node; the recognized model and every variant that applies
    keep the model's symbolic input dims and equal torch at each of `sizes`. Returns the variants
    that applied."""
    nodes = canonical_nodes(model)
    assert [n.op for n in nodes] == [op], [n.op for n in nodes]
    assert "Gather" not in {n.op for n in nodes[0].inputs[0].outputs}
    recognized = recognized_model(model)
    assert input_dims(recognized) == input_dims(model)
    assert_equal_at_sizes(module, recognized, sizes)
    applied = []
    for variant in FAMILIES[op.lower()].variant_names:
        result = convlower.lower(model, [f"{op}={variant}"])
        if not result.lowered:
            continue
        applied.append(variant)
        assert not [n for n in result.model.graph.node if n.domain == DOMAIN]
        assert input_dims(result.model) == input_dims(model), variant
        assert_equal_at_sizes(module, result.model, sizes)
    assert must_apply <= set(applied), applied
    return applied


IMAGE = {0: "batch", 2: "height", 3: "width"}


@pytest.mark.parametrize("dynamo, opset", EXPORTERS)
def test_seed_000_method_1(dynamo: bool, opset: int, tmp_path: Path) -> None:
    module = Method1()
    model = export_symbolic(module, (torch.randn(2, 2, 12, 11), torch.rand(2, 9, 12, 11)), [IMAGE, IMAGE], dynamo, opset, tmp_path / "m.onnx")
    sizes = [(torch.randn(1, 2, 7, 9), torch.rand(1, 9, 7, 9)), (torch.randn(3, 2, 16, 5), torch.rand(3, 9, 16, 5))]
    assert_recognized_under_symbolic_dims(module, model, "DynamicFilter", sizes, {"shift_sum"})


@pytest.mark.parametrize("dynamo, opset", EXPORTERS)
def test_kernel_prediction_mul_sum(dynamo: bool, opset: int, tmp_path: Path) -> None:
    module = UnfoldMulSum(5, dilation=2)
    model = export_symbolic(module, (torch.randn(2, 3, 12, 10), torch.rand(2, 25, 12, 10)), [IMAGE, IMAGE], dynamo, opset, tmp_path / "k.onnx")
    sizes = [(torch.randn(1, 3, 9, 14), torch.rand(1, 25, 9, 14)), (torch.randn(2, 3, 20, 6), torch.rand(2, 25, 20, 6))]
    (node,) = canonical_nodes(model)
    assert node.attrs == {"kernel_shape": [5, 5], "strides": [1, 1], "dilations": [2, 2], "pads": [4, 4, 4, 4]}
    assert_recognized_under_symbolic_dims(module, model, "DynamicFilter", sizes, {"shift_sum"})


@pytest.mark.parametrize("dynamo, opset", EXPORTERS)
def test_filter_groups_on_a_strided_dilated_grid(dynamo: bool, opset: int, tmp_path: Path) -> None:
    module = StridedGroups()
    model = export_symbolic(module, (torch.randn(2, 4, 12, 10),), [IMAGE], dynamo, opset, tmp_path / "g.onnx")
    (node,) = canonical_nodes(model)
    assert node.attrs == {"kernel_shape": [3, 3], "strides": [2, 2], "dilations": [2, 2], "pads": [2, 2, 2, 2]}
    assert node.inputs[1].shape[1:3] == [2, 9]
    sizes = [(torch.randn(1, 4, 9, 14),), (torch.randn(3, 4, 16, 7),)]
    assert_recognized_under_symbolic_dims(module, model, "DynamicFilter", sizes, {"shift_sum"})


@pytest.mark.parametrize(
    "equation, filter_shape",
    [
        ("nckhw,nckhw->nchw", (2, 4, 9, 6, 5)),  # a filter per channel
        ("nckhw,nkhw->nhwc", (2, 9, 6, 5)),  # channels-last output
        ("nckhw,nkshw->ncshw", (2, 9, 4, 6, 5)),  # CARAFE: 4 filters per position over one unfold
    ],
)
@pytest.mark.parametrize("dynamo, opset", EXPORTERS)
def test_einsum_forms(equation: str, filter_shape: tuple, dynamo: bool, opset: int, tmp_path: Path) -> None:
    module = EinsumFilter(equation)
    filter_axes = {0: "batch", len(filter_shape) - 2: "height", len(filter_shape) - 1: "width"}
    model = export_symbolic(module, (torch.randn(2, 4, 6, 5), torch.randn(filter_shape)), [IMAGE, filter_axes], dynamo, opset, tmp_path / "e.onnx")

    def inputs(n: int, h: int, w: int) -> tuple:
        return torch.randn(n, 4, h, w), torch.randn(n, *filter_shape[1:-2], h, w)

    assert_recognized_under_symbolic_dims(module, model, "DynamicFilter", [inputs(1, 7, 9), inputs(3, 4, 8)], {"shift_sum"})


@pytest.mark.parametrize("dynamo, opset", EXPORTERS)
def test_one_dimensional_signal_viewed_as_an_image(dynamo: bool, opset: int, tmp_path: Path) -> None:
    module = UnfoldSignal(9)
    signal = {0: "batch", 2: "time"}
    model = export_symbolic(module, (torch.randn(2, 3, 40), torch.rand(2, 9, 40)), [signal, signal], dynamo, opset, tmp_path / "s.onnx")
    sizes = [(torch.randn(1, 3, 25), torch.rand(1, 9, 25)), (torch.randn(3, 3, 64), torch.rand(3, 9, 64))]
    assert_recognized_under_symbolic_dims(module, model, "DynamicFilter", sizes, {"shift_sum"})


@pytest.mark.parametrize("dynamo, opset", EXPORTERS)
def test_plain_unfold(dynamo: bool, opset: int, tmp_path: Path) -> None:
    module = PlainUnfold()
    model = export_symbolic(module, (torch.randn(2, 3, 9, 10),), [IMAGE], dynamo, opset, tmp_path / "u.onnx")
    sizes = [(torch.randn(1, 3, 5, 12),), (torch.randn(3, 3, 11, 4),)]
    assert_recognized_under_symbolic_dims(module, model, "Unfold", sizes, {"slice_concat"})


def test_optimize_keeps_symbolic_dims_and_equals_torch_at_another_size(tmp_path: Path) -> None:
    """One profiling shape: the written model keeps the symbolic dims and runs at any size."""
    module = UnfoldMulSum(3)
    model = export_symbolic(module, (torch.randn(2, 3, 12, 10), torch.rand(2, 9, 12, 10)), [IMAGE, IMAGE], True, 18, tmp_path / "k.onnx")
    result = convlower.optimize(model, input_shapes={"in0": (1, 3, 16, 16), "in1": (1, 9, 16, 16)}, cache=None, guard=False)
    (node,) = result.report.nodes
    assert node.op == "DynamicFilter" and node.recognized and node.chosen != "original"
    assert input_dims(result.model) == input_dims(model)
    sizes = [(torch.randn(1, 3, 16, 16), torch.rand(1, 9, 16, 16)), (torch.randn(2, 3, 24, 8), torch.rand(2, 9, 24, 8))]
    assert_equal_at_sizes(module, result.model, sizes)


@pytest.mark.parametrize("dynamo, opset", EXPORTERS)
@pytest.mark.parametrize(
    "module, filter_shape, filter_axes",
    [
        pytest.param(MulReduce("mean"), (2, 9, 6, 5), IMAGE, id="mean-not-sum"),
        pytest.param(MulReduce("amax"), (2, 9, 6, 5), IMAGE, id="max-not-sum"),
        pytest.param(MulReduce("sum", dim=3), (2, 9, 6, 5), IMAGE, id="sum-over-rows"),
        pytest.param(MulReduce("sum", dim=(1, 2)), (2, 9, 6, 5), IMAGE, id="sum-over-channels-too"),
        pytest.param(MulReduce("sum"), (1, 9, 6, 5), {2: "height", 3: "width"}, id="filters-broadcast-over-batch"),
    ],
)
def test_look_alikes_are_left_alone(module: nn.Module, filter_shape: tuple, filter_axes: dict, dynamo: bool, opset: int, tmp_path: Path) -> None:
    inputs = (torch.randn(2, 4, 6, 5), torch.randn(filter_shape))
    model = export_symbolic(module, inputs, [IMAGE, filter_axes], dynamo, opset, tmp_path / "m.onnx")
    assert [n.op for n in canonical_nodes(model)] == ["Unfold"]
    assert convlower.lower(model, ["DynamicFilter=shift_sum"]).nodes == []


class PaddedFirst(nn.Module):
    """The input padded by F.pad before an unpadded F.unfold: a dynamic filter only for zero padding."""

    def __init__(self, mode: str, value: float = 0.0):
        super().__init__()
        self.mode, self.value = mode, value

    def forward(self, x, filters):
        n, c, h, w = x.shape
        padded = F.pad(x, (1, 1, 1, 1), mode=self.mode, value=self.value) if self.mode == "constant" else F.pad(x, (1, 1, 1, 1), mode=self.mode)
        return (F.unfold(padded, 3).view(n, c, 9, h, w) * filters.unsqueeze(1)).sum(2)


@pytest.mark.parametrize("dynamo, opset", EXPORTERS)
@pytest.mark.parametrize("mode, value", [("constant", 0.0), ("constant", 0.5), ("reflect", 0.0), ("replicate", 0.0)])
def test_padding_stays_what_it_was(mode: str, value: float, dynamo: bool, opset: int, tmp_path: Path) -> None:
    """The unfold itself does not pad: the filter runs over the padded tensor with no padding of
    its own, whatever F.pad did (a zero pad may instead be folded into the window)."""
    module = PaddedFirst(mode, value)
    model = export_symbolic(module, (torch.randn(2, 4, 6, 5), torch.randn(2, 9, 6, 5)), [IMAGE, IMAGE], dynamo, opset, tmp_path / "p.onnx")
    sizes = [(torch.randn(1, 4, 7, 9), torch.rand(1, 9, 7, 9)), (torch.randn(3, 4, 5, 8), torch.rand(3, 9, 5, 8))]
    assert_recognized_under_symbolic_dims(module, model, "DynamicFilter", sizes, {"shift_sum"})
    (node,) = canonical_nodes(model)
    if mode != "constant" or value:
        assert node.attrs["pads"] == [0, 0, 0, 0]
        assert node.inputs[0].inputs[0].op == "Pad"


class WideKernelPrediction(nn.Module):
    """Filters predicted by a conv whose weights exceed `symbolic.LARGE_CONSTANT`: trial graphs hold
    such weights as shapes only, and must put them back for the matchers."""

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(3, 64, 3, padding=1)
        self.predict = nn.Conv2d(64, 9, 3, padding=1)

    def forward(self, x):
        n, c, h, w = x.shape
        filters = self.predict(self.features(x).relu()).softmax(1)
        return (F.unfold(x, 3, padding=1).view(n, c, 9, h, w) * filters.unsqueeze(1)).sum(2)


@pytest.mark.parametrize("dynamo, opset", EXPORTERS)
def test_a_net_with_large_weights(dynamo: bool, opset: int, tmp_path: Path) -> None:
    from convlower.passes.matching.symbolic import LARGE_CONSTANT

    module = WideKernelPrediction()
    assert module.predict.weight.numel() > LARGE_CONSTANT
    model = export_symbolic(module, (torch.randn(2, 3, 12, 10),), [IMAGE], dynamo, opset, tmp_path / "w.onnx")
    sizes = [(torch.randn(1, 3, 9, 14),), (torch.randn(2, 3, 16, 6),)]
    assert_recognized_under_symbolic_dims(module, model, "DynamicFilter", sizes, {"shift_sum", "conv_unfold"})


def test_trial_bindings_bind_twin_inputs_alike() -> None:
    """Inputs of one rank and the same static dims (a stereo pair that dynamo's `Dim.AUTO` names apart)
    take equal trial sizes axis by axis; a shared name keeps its own size; other inputs bind apart."""
    def graph(*shapes: list) -> gs.Graph:
        return gs.Graph(inputs=[gs.Variable(f"x{i}", np.float32, shape) for i, shape in enumerate(shapes)])

    for binding in trial_bindings(graph(["s3", 3, "s95", "s51"], ["s3", 3, "s97", "s50"], ["s3", 9, "s7", "s8"])):
        assert binding["x0"] == binding["x1"]
        assert binding["x0"][2:] != binding["x2"][2:] and binding["x0"][2] != binding["x0"][3]
    for binding in trial_bindings(graph(["n", 3, "h", "w"], ["n", 3, "w", "h"])):
        assert binding["x1"] == (binding["x0"][0], 3, binding["x0"][3], binding["x0"][2])
