"""Recognition of the graphs torch.onnx.export writes for F.unfold idioms, by both exporters.

Models are plain torch code (seed 000's method_1, kernel-prediction and involution-style layers,
CARAFE-style reassembly, a plain F.unfold, F.fold); each is exported for real, recognized, run on
onnxruntime as recognized (the canonical nodes through their model-local functions) and lowered,
and compared with torch eager. Look-alikes must come out of recognition untouched.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper, numpy_helper

import convlower
from convlower.modelio import runtime_compatible
from convlower.passes import FAMILIES
from convlower.passes.local_functions import DOMAIN, attach_functions
from convlower.rewrite import import_graph
from tests.helpers import op_types, run

torch = pytest.importorskip("torch")
F = torch.nn.functional
nn = torch.nn


EXPORTERS = [pytest.param(False, 17, id="legacy-opset17"), pytest.param(True, 18, id="dynamo-opset18")]
ATOL = RTOL = 1e-4


# --- plain torch layers, written the way users write them ---------------------------------------------


class Method1(nn.Module):
    """Seed 000's method_1, with K an attribute (`round(filters.shape[1] ** 0.5)` fails under the
    TorchScript tracer, which sees shapes as tensors)."""

    K = 3

    def forward(self, feature_map, filters):
        N, C, H, W = feature_map.shape
        K = self.K
        unfolded = F.unfold(feature_map, K, padding=K // 2).view(N, C, K**2, H, W)
        return torch.einsum("nckhw,nkhw->nchw", unfolded, filters)


class KernelPrediction(nn.Module):
    """A kernel-prediction layer: softmax K x K filters per pixel, `unfold * filters .sum(dim)`."""

    def __init__(self, channels: int = 3, kernel: int = 5):
        super().__init__()
        self.kernel = kernel
        self.predict = nn.Conv2d(channels, kernel * kernel, 3, padding=1)

    def forward(self, x):
        n, c, h, w = x.shape
        filters = self.predict(x).softmax(dim=1)
        patches = F.unfold(x, self.kernel, padding=self.kernel // 2).view(n, c, self.kernel**2, h, w)
        return (patches * filters.unsqueeze(1)).sum(dim=2)


class GroupedStrided(nn.Module):
    """Involution-style: filters shared by channel groups, on a strided, dilated grid."""

    groups = 2

    def forward(self, x, weight):
        n, c = x.shape[:2]
        h, w = weight.shape[-2:]
        patches = F.unfold(x, 3, dilation=2, padding=2, stride=2).view(n, self.groups, c // self.groups, 9, h, w)
        return (patches * weight.view(n, self.groups, 1, 9, h, w)).sum(3).view(n, c, h, w)


class EinsumFilter(nn.Module):
    """`einsum(equation, unfold(x).view(n, c, k*k, h, w), filters)`, for equations that are dynamic filters."""

    def __init__(self, equation: str, filters_first: bool = False):
        super().__init__()
        self.equation, self.filters_first = equation, filters_first

    def forward(self, x, filters):
        n, c, h, w = x.shape
        patches = F.unfold(x, 3, padding=1).view(n, c, 9, h, w)
        operands = (filters, patches) if self.filters_first else (patches, filters)
        return torch.einsum(self.equation, *operands)


class MulReduce(nn.Module):
    """`reduce(unfold(x).view(n, c, 9, h, w) * filters, dim)`: a dynamic filter only for sum over dim 2."""

    def __init__(self, reduce: str = "sum", dim: int = 2):
        super().__init__()
        self.reduce, self.dim = reduce, dim

    def forward(self, x, filters):
        n, c, h, w = x.shape
        weighted = F.unfold(x, 3, padding=1).view(n, c, 9, h, w) * filters.unsqueeze(1)
        return getattr(weighted, self.reduce)(dim=self.dim)


class UnfoldLinear(nn.Module):
    """A plain F.unfold feeding a matmul (an im2col convolution written by hand)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3 * 6, 5))

    def forward(self, x):
        return F.unfold(x, (2, 3), dilation=(1, 2), padding=(1, 0), stride=(2, 1)).transpose(1, 2) @ self.weight


class Fold(nn.Module):
    def forward(self, columns):
        return F.fold(columns, (6, 7), 3, padding=1)


# --- helpers -------------------------------------------------------------------------------------------


def export(module: nn.Module, inputs: tuple, dynamo: bool, opset: int, path: Path) -> tuple[onnx.ModelProto, dict, np.ndarray]:
    """The module exported by plain torch.onnx.export, its feeds, and torch eager's output."""
    module.eval()
    names = [f"in{i}" for i in range(len(inputs))]
    torch.onnx.export(module, inputs, path, dynamo=dynamo, opset_version=opset, input_names=names, output_names=["y"])
    with torch.inference_mode():
        expected = module(*inputs).numpy()
    return onnx.load(path), {n: t.numpy() for n, t in zip(names, inputs)}, expected


def canonical_nodes(model: onnx.ModelProto) -> list[gs.Node]:
    return [n for n in import_graph(model).nodes if n.domain == DOMAIN]


def recognized_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as recognition leaves it, canonical nodes carried by their functions."""
    return runtime_compatible(attach_functions(gs.export_onnx(import_graph(model), do_type_check=False)))


def assert_recognized_and_equal(
    model: onnx.ModelProto, feeds: dict, expected: np.ndarray, op: str, variants: list[str]
) -> list[gs.Node]:
    """The model holds canonical `op` nodes that run as recognized and as each variant, equal to torch."""
    nodes = canonical_nodes(model)
    assert nodes and {n.op for n in nodes} == {op}, [n.op for n in nodes]
    np.testing.assert_allclose(run(recognized_model(model), feeds)[0], expected, atol=ATOL, rtol=RTOL)
    for variant in variants:
        result = convlower.lower(model, [f"{op}={variant}"])
        assert [n.variant for n in result.nodes] == [variant] * len(nodes), result.nodes
        assert not [n for n in result.model.graph.node if n.domain == DOMAIN]
        np.testing.assert_allclose(run(result.model, feeds)[0], expected, atol=ATOL, rtol=RTOL, err_msg=variant)
    return nodes


def assert_left_alone(model: onnx.ModelProto) -> None:
    assert not canonical_nodes(model)
    assert convlower.lower(model, ["DynamicFilter=shift_sum"]).nodes == []


# --- recognized ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dynamo, opset", EXPORTERS)
def test_seed_000_method_1_becomes_one_dynamic_filter(dynamo: bool, opset: int, tmp_path: Path) -> None:
    inputs = (torch.randn(3, 2, 12, 11), torch.rand(3, 9, 12, 11))
    model, feeds, expected = export(Method1(), inputs, dynamo, opset, tmp_path / "m1.onnx")
    (node,) = assert_recognized_and_equal(model, feeds, expected, "DynamicFilter", FAMILIES["dynamicfilter"].variant_names)
    assert node.attrs == {"kernel_shape": [3, 3], "strides": [1, 1], "dilations": [1, 1], "pads": [1, 1, 1, 1]}
    assert node.inputs[0].name == "in0"


@pytest.mark.parametrize("dynamo, opset", EXPORTERS)
def test_kernel_prediction_layer_with_a_dynamic_batch(dynamo: bool, opset: int, tmp_path: Path) -> None:
    module, x = KernelPrediction().eval(), torch.randn(2, 3, 10, 9)
    path = tmp_path / "kpn.onnx"
    if dynamo:
        torch.onnx.export(module, (x,), path, dynamo=True, opset_version=opset, input_names=["x"], output_names=["y"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},))
    else:
        torch.onnx.export(module, (x,), path, dynamo=False, opset_version=opset, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    model = onnx.load(path)
    (node,) = canonical_nodes(model)
    assert node.attrs["kernel_shape"] == [5, 5] and node.inputs[1].shape[1:] == [1, 25, 10, 9]
    for variant in ("shift_sum", "nhwc_shift_sum"):
        lowered = convlower.lower(model, [f"DynamicFilter={variant}"]).model
        for batch in (1, 4):
            x = torch.randn(batch, 3, 10, 9)
            with torch.inference_mode():
                expected = module(x).numpy()
            np.testing.assert_allclose(run(lowered, {"x": x.numpy()})[0], expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("dynamo, opset", EXPORTERS)
def test_grouped_strided_dilated_layer(dynamo: bool, opset: int, tmp_path: Path) -> None:
    inputs = (torch.randn(2, 6, 9, 8), torch.randn(2, 2 * 9, 5, 4))
    model, feeds, expected = export(GroupedStrided(), inputs, dynamo, opset, tmp_path / "grouped.onnx")
    (node,) = assert_recognized_and_equal(model, feeds, expected, "DynamicFilter", ["shift_sum", "conv_unfold"])
    assert node.attrs == {"kernel_shape": [3, 3], "strides": [2, 2], "dilations": [2, 2], "pads": [2, 2, 2, 2]}
    assert node.inputs[1].shape[1:3] == [2, 9]


@pytest.mark.parametrize(
    "equation, filter_shape, groups",
    [
        ("nckhw,nckhw->nchw", (2, 4, 9, 6, 5), 4),  # a filter per channel
        ("nckhw,nkhw->nhwc", (2, 9, 6, 5), 1),  # channels-last output
        ("nkhw,nckhw->nchw", (2, 9, 6, 5), 1),  # operands swapped
        ("nckhw,nkshw->ncshw", (2, 9, 4, 6, 5), 4),  # CARAFE: 4 filters per position over one unfold
    ],
)
def test_einsum_forms(equation: str, filter_shape: tuple, groups: int, tmp_path: Path) -> None:
    inputs = (torch.randn(2, 4, 6, 5), torch.randn(filter_shape))
    module = EinsumFilter(equation, filters_first=equation.startswith("nkhw,"))
    model, feeds, expected = export(module, inputs, True, 18, tmp_path / "einsum.onnx")
    (node,) = assert_recognized_and_equal(model, feeds, expected, "DynamicFilter", ["shift_sum"])
    assert node.inputs[1].shape[1] == groups


@pytest.mark.parametrize("dynamo, opset", EXPORTERS)
def test_plain_unfold_becomes_unfold_with_faster_variants(dynamo: bool, opset: int, tmp_path: Path) -> None:
    inputs = (torch.randn(2, 3, 9, 10),)
    model, feeds, expected = export(UnfoldLinear(), inputs, dynamo, opset, tmp_path / "unfold.onnx")
    (node,) = assert_recognized_and_equal(model, feeds, expected, "Unfold", FAMILIES["unfold"].variant_names)
    assert node.attrs == {"kernel_shape": [2, 3], "strides": [2, 1], "dilations": [1, 2], "pads": [1, 0, 1, 0]}


@pytest.mark.parametrize("dynamo, opset", EXPORTERS)
def test_fold_is_exported_as_col2im(dynamo: bool, opset: int, tmp_path: Path) -> None:
    """F.fold needs no recognizer: both exporters write the standard Col2Im (opset 18)."""
    inputs = (torch.randn(2, 2 * 9, 42),)
    model, feeds, expected = export(Fold(), inputs, dynamo, max(opset, 18), tmp_path / "fold.onnx")
    assert "Col2Im" in op_types(model)
    np.testing.assert_allclose(run(model, feeds)[0], expected, atol=ATOL, rtol=RTOL)


def test_lowering_another_op_keeps_recognized_nodes_running(tmp_path: Path) -> None:
    """The recognized DynamicFilter stays when only Conv is lowered: the rewritten model must carry
    its function, overload and `convlower` opset import (`attach_functions` after graph export)."""
    model, feeds, expected = export(KernelPrediction(), (torch.randn(1, 3, 8, 7),), False, 17, tmp_path / "kpn.onnx")
    result = convlower.lower(model, ["Conv=im2col"])
    assert [n.op for n in result.lowered] == ["Conv"]
    assert "DynamicFilter" in op_types(result.model)
    np.testing.assert_allclose(run(result.model, feeds)[0], expected, atol=ATOL, rtol=RTOL)


def test_two_idioms_with_different_windows_get_one_function_each(tmp_path: Path) -> None:
    class Two(nn.Module):
        def forward(self, x, f):
            n, c, h, w = x.shape
            near = (F.unfold(x, 3, padding=1).view(n, c, 9, h, w) * f.unsqueeze(1)).sum(2)
            far = (F.unfold(x, 3, padding=2, dilation=2).view(n, c, 9, h, w) * f.unsqueeze(1)).sum(2)
            return near * far

    model, feeds, expected = export(Two(), (torch.randn(1, 2, 7, 7), torch.randn(1, 9, 7, 7)), False, 17, tmp_path / "two.onnx")
    recognized = recognized_model(model)
    assert sorted(f.overload for f in recognized.functions) == ["k3x3_s1x1_d1x1_p1x1x1x1", "k3x3_s1x1_d2x2_p2x2x2x2"]
    np.testing.assert_allclose(run(recognized, feeds)[0], expected, atol=ATOL, rtol=RTOL)


# --- left alone -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dynamo, opset", EXPORTERS)
@pytest.mark.parametrize(
    "module, filter_shape",
    [
        pytest.param(MulReduce("mean"), (2, 9, 6, 5), id="mean-not-sum"),
        pytest.param(MulReduce("sum", dim=3), (2, 9, 6, 5), id="sum-over-rows"),
        pytest.param(MulReduce("sum"), (1, 9, 6, 5), id="filters-broadcast-over-batch"),
        pytest.param(EinsumFilter("nckhw,nkhw->nckw"), (2, 9, 6, 5), id="einsum-sums-rows"),
        pytest.param(EinsumFilter("nckhw,ck->nchw"), (4, 9), id="einsum-static-filter"),
    ],
)
def test_look_alikes_are_left_alone(module: nn.Module, filter_shape: tuple, dynamo: bool, opset: int, tmp_path: Path) -> None:
    model, _, _ = export(module, (torch.randn(2, 4, 6, 5), torch.randn(filter_shape)), dynamo, opset, tmp_path / "m.onnx")
    assert [n.op for n in canonical_nodes(model)] == ["Unfold"]
    assert convlower.lower(model, ["DynamicFilter=shift_sum"]).nodes == []


def _method_1_model(tmp_path: Path) -> onnx.ModelProto:
    model, _, _ = export(Method1(), (torch.randn(2, 2, 6, 5), torch.rand(2, 9, 6, 5)), True, 18, tmp_path / "m1.onnx")
    return model


def test_a_pad_with_a_non_zero_value_is_left_alone(tmp_path: Path) -> None:
    model = _method_1_model(tmp_path)
    (pad,) = [n for n in model.graph.node if n.op_type == "Pad"]
    model.graph.initializer.append(numpy_helper.from_array(np.array(0.5, np.float32), "half"))
    pad.input.append("half")
    assert_left_alone(model)


def test_gather_indices_of_another_pattern_are_left_alone(tmp_path: Path) -> None:
    model = _method_1_model(tmp_path)
    gather = next(n for n in model.graph.node if n.op_type == "Gather")
    index = next(t for t in model.graph.initializer if t.name == gather.input[1])
    index.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(index)[::-1].copy(), index.name))
    assert_left_alone(model)


def test_a_reflect_pad_is_left_alone(tmp_path: Path) -> None:
    model = _method_1_model(tmp_path)
    (pad,) = [n for n in model.graph.node if n.op_type == "Pad"]
    pad.attribute.remove(next(a for a in pad.attribute if a.name == "mode"))
    pad.attribute.append(helper.make_attribute("mode", "reflect"))
    assert_left_alone(model)


def test_recognition_is_deterministic(tmp_path: Path) -> None:
    model = _method_1_model(tmp_path)
    assert recognized_model(model) == recognized_model(model)
