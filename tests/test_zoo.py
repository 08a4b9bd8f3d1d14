"""The model zoo: every family builds, exports to ONNX, runs on onnxruntime and matches torch eager.

The exported graphs are checked for the ops each family is in the zoo for; the unfold chain that
torch emits for `F.unfold` is pinned here because convlower's dynamic-filter recognizer matches it.

The main claim is checked deterministically, with the guard off (no whole-model timing to revert
on): every dynamic-filter zoo model and every idiom of `convlower.models.idioms` is recognized as
a canonical node, that node is replaced by a variant the tuner verified, and the lowered model
equals torch eager on the same inputs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper

import convlower.models
import convlower
from convlower.models import CORRELATION, DYNAMIC_FILTER, FAMILIES, MIN_OPSET, ZOO, load
from convlower.passes.local_functions import DOMAIN
from convlower.tune import ORIGINAL
from tests.helpers import op_types, run

torch = pytest.importorskip("torch")
idioms = pytest.importorskip("convlower.models.idioms")

# Ops each family's small model exports with, by either exporter.
UNFOLD = {"Pad", "Gather", "Transpose", "Reshape"}
EXPECTED_OPS = {
    "kpn_denoiser": {"Conv", "Softmax", "Mul", "ReduceSum"} | UNFOLD,
    "involution": {"Conv", "AveragePool", "Mul", "ReduceSum", "Gemm"} | UNFOLD,
    "resnet": {"Conv", "MaxPool", "Add", "ReduceMean", "Gemm"},
    "mobilenet": {"Conv", "Clip", "Add", "Gemm"},
    "tcn": {"Conv", "Relu", "Add"},
    "conv3d": {"Conv", "ReduceMean", "Gemm"},
    "unet": {"Conv", "MaxPool", "ConvTranspose", "Concat"},
    "carafe": {"Conv", "Softmax", "Einsum", "DepthToSpace"} | UNFOLD,
    "seed_filter": {"Einsum"} | UNFOLD,
    "stereo": {"Conv", "Mul", "Softmax"},
    "flow": {"Conv", "Gather", "ReduceSum"},
    "dcn_head": {"Conv", "DeformConv", "Sigmoid", "Relu"},
}
# A node each family must hold: (op type, attributes it has).
EXPECTED_NODE: dict[str, tuple[str, dict[str, Any]]] = {
    "resnet": ("Conv", {"kernel_shape": [1, 1], "strides": [2, 2]}),  # the projection shortcut
    "mobilenet": ("Conv", {"kernel_shape": [3, 3], "group": 48, "strides": [2, 2]}),  # depthwise
    "tcn": ("Conv", {"kernel_shape": [3], "dilations": [8]}),
    "conv3d": ("Conv", {"kernel_shape": [3, 3, 3], "strides": [1, 2, 2]}),
    "unet": ("ConvTranspose", {"kernel_shape": [2, 2], "strides": [2, 2]}),
}
# The dynamo exporter is slower (seconds a model): it runs on the families whose export differs
# in ways convlower cares about — the unfold idiom, and the causal Pad it folds into Conv pads.
DYNAMO = (*DYNAMIC_FILTER, "tcn", "dcn_head")


def export(name: str, path: Path, dynamo: bool) -> tuple[onnx.ModelProto, np.ndarray, dict[str, np.ndarray]]:
    """The small model of family `name` exported to `path`, its torch output, and its feeds."""
    module, inputs = ZOO[name]("small")
    return export_module(module, inputs, path, dynamo, MIN_OPSET.get(name, 18))


def export_module(
    module: torch.nn.Module, inputs: tuple, path: Path, dynamo: bool, opset: int = 18
) -> tuple[onnx.ModelProto, np.ndarray, dict[str, np.ndarray]]:
    """`module` exported by plain torch.onnx.export (opset 18 unless told) to `path`, its torch output, and its feeds."""
    names = [f"x{i}" for i in range(len(inputs))]
    torch.onnx.export(module, inputs, path, dynamo=dynamo, opset_version=opset, input_names=names, output_names=["y"])
    with torch.no_grad():
        expected = module(*inputs)
    feeds = {n: t.numpy() for n, t in zip(names, inputs)}
    return onnx.load(path), expected.numpy(), feeds


def attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def only_consumer(model: onnx.ModelProto, node: onnx.NodeProto) -> onnx.NodeProto:
    consumers = [n for n in model.graph.node if node.output[0] in n.input]
    assert len(consumers) == 1, f"{node.op_type} {node.name} feeds {[c.op_type for c in consumers]}"
    return consumers[0]


@pytest.mark.parametrize(
    "name, dynamo",
    [pytest.param(name, False, id=f"{name}-legacy") for name in FAMILIES]
    + [pytest.param(name, True, id=f"{name}-dynamo") for name in DYNAMO],
)
def test_family_exports_and_matches_torch(name: str, dynamo: bool, tmp_path: Path) -> None:
    model, expected, feeds = export(name, tmp_path / f"{name}.onnx", dynamo)
    onnx.checker.check_model(model, full_check=True)
    assert EXPECTED_OPS[name] <= set(op_types(model)), sorted(EXPECTED_OPS[name] - set(op_types(model)))
    if name in EXPECTED_NODE:
        op, attrs = EXPECTED_NODE[name]
        assert any(n.op_type == op and attrs.items() <= attributes(n).items() for n in model.graph.node), (op, attrs)
    (got,) = run(model, feeds)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_unfold_exports_as_a_pad_gather_gather_transpose_reshape_chain(dynamo: bool, tmp_path: Path) -> None:
    """F.unfold(x, K, padding=P) on [N, C, H, W]: Pad (P on H and W), Gather of the K row windows on
    axis 2 ([K, H_out] indices), Gather of the column windows on axis 4, Transpose (0, 1, 2, 4, 3, 5)
    to [N, C, K, K, H_out, W_out], Reshape (legacy adds a second Reshape for the `view`)."""
    model, _, _ = export("kpn_denoiser", tmp_path / "kpn.onnx", dynamo)  # small: K=3, a 16x16 image
    (pad,) = [n for n in model.graph.node if n.op_type == "Pad"]
    rows = only_consumer(model, pad)
    cols = only_consumer(model, rows)
    transpose = only_consumer(model, cols)
    assert [rows.op_type, cols.op_type, transpose.op_type] == ["Gather", "Gather", "Transpose"]
    assert (attributes(rows)["axis"], attributes(cols)["axis"]) == (2, 4)
    assert attributes(transpose)["perm"] == [0, 1, 2, 4, 3, 5]
    assert only_consumer(model, transpose).op_type == "Reshape"
    if dynamo:  # the legacy exporter computes the indices from Shape + Range at run time
        (indices,) = [t for t in model.graph.initializer if t.name == rows.input[1]]
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(indices), np.arange(3)[:, None] + np.arange(16))


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_causal_padding_is_a_pad_node_or_asymmetric_conv_pads(dynamo: bool, tmp_path: Path) -> None:
    model, _, _ = export("tcn", tmp_path / "tcn.onnx", dynamo)
    dilated = [attributes(n) for n in model.graph.node if n.op_type == "Conv" and attributes(n)["kernel_shape"] == [3]]
    left_pads = [2 * d for d in (1, 1, 2, 2, 4, 4, 8, 8)]  # (K - 1) * dilation, two convs per dilation
    if dynamo:
        assert [a["pads"] for a in dilated] == [[p, 0] for p in left_pads]
        assert "Pad" not in op_types(model)
    else:
        assert [a["pads"] for a in dilated] == [[0, 0]] * 8
        assert op_types(model).count("Pad") == 8


def test_import_does_not_import_torch() -> None:
    code = "import sys, convlower.models; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registry_lists_every_family_module() -> None:
    modules = {p.stem for p in Path(convlower.models.__file__).parent.glob("*.py")} - {"__init__", "builders", "common", "idioms", "correlation_idioms", "deform_idioms"}
    assert set(FAMILIES) == set(ZOO) == modules
    assert set(DYNAMIC_FILTER) | set(CORRELATION) <= set(FAMILIES)
    with pytest.raises(KeyError, match="unknown model family"):
        load("vgg")
    with pytest.raises(ValueError, match="unknown size"):
        ZOO["resnet"]("large")


def test_build_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    (first, first_inputs), (second, second_inputs) = ZOO["involution"]("small"), ZOO["involution"]("small")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not first.training
    for a, b in zip([*first.state_dict().values(), *first_inputs], [*second.state_dict().values(), *second_inputs]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", FAMILIES)
def test_family_optimizes_and_verifies(name: str) -> None:
    """Every zoo model, exported with convlower.export, optimizes into a verified model that still
    matches torch; dynamic-filter families are found as DynamicFilter nodes."""
    module, inputs = ZOO[name]("small")
    model = convlower.export(module, inputs, dynamo=False, opset=MIN_OPSET.get(name, 18))
    feeds = {i.name: t.numpy() for i, t in zip(model.graph.input, inputs)}
    result = convlower.optimize(model, inputs=feeds, provider="cpu", cache=None)
    report = result.report
    assert report.verification.get("passed") is not False, report.verification
    assert report.nodes
    if name in DYNAMIC_FILTER:
        assert "DynamicFilter" in {n.op for n in report.nodes}
    for node in report.nodes:
        # A choice dropped or changed for speed (in context, or by the guard) is fine; one reverted
        # because outputs disagreed is a wrong variant.
        for_speed = node.reason is not None and "disagree" not in node.reason and (
            node.reason.startswith("reverted") or "won alone" in node.reason
            or " chosen over " in node.reason)
        assert node.reason is None or for_speed, f"{node.name}: {node.reason}"
    with torch.no_grad():
        expected = module(*inputs).numpy()
    (got,) = run(result.model, feeds)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)


CANONICAL_OPS = {"DynamicFilter", "PixelAdaptiveConv"}


def assert_lowered_by_verified_variants(model: onnx.ModelProto, expected: np.ndarray, feeds: dict[str, np.ndarray]) -> None:
    """Optimize with the guard off: every canonical node is recognized from the idiom, replaced by a
    variant whose status is "ok" (it matched the node on the tuner's check), none is left in the
    model, and the lowered model equals torch eager (`expected`) on `feeds`."""
    result = convlower.optimize(model, provider="cpu", guard=False, cache=None)
    canonical = [n for n in result.report.nodes if n.op in CANONICAL_OPS]
    assert canonical, [(n.op, n.reason) for n in result.report.nodes]
    for node in canonical:
        statuses = {name: v.get("status") for name, v in node.variants.items()}
        assert node.recognized, node.name
        assert node.chosen != ORIGINAL, f"{node.name} kept: {node.reason}; variants {statuses}"
        assert node.variants[node.chosen]["status"] == "ok", (node.chosen, node.variants[node.chosen])
    assert not [n.op_type for n in result.model.graph.node if n.domain == DOMAIN]
    (got,) = run(result.model, feeds)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("name", DYNAMIC_FILTER)
def test_dynamic_filter_family_is_lowered_by_a_verified_variant(name: str, tmp_path: Path) -> None:
    model, expected, feeds = export(name, tmp_path / f"{name}.onnx", dynamo=False)
    assert_lowered_by_verified_variants(model, expected, feeds)


def idiom_case(name: str) -> tuple[torch.nn.Module, tuple, bool]:
    """(layer, inputs, dynamo) for each idiom of convlower.models.idioms, small; the exporter is
    the one whose graph the recognizer reads (Tensor.unfold with F.pad exports only by dynamo)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        image, taps = torch.randn(2, 3, 8, 7), torch.rand(2, 9, 8, 7)
        cases = {
            "UnfoldMulSum": lambda: (idioms.UnfoldMulSum(3), (image, taps), False),
            "UnfoldSignal": lambda: (idioms.UnfoldSignal(5), (torch.randn(2, 3, 16), torch.rand(2, 5, 16)), False),
            "TensorUnfold": lambda: (idioms.TensorUnfold(2, 3), (image, torch.rand(2, 1, 8, 7, 3, 3)), True),
            "ShiftLoop": lambda: (idioms.ShiftLoop(2, 3), (image, taps), False),
            "StackedShifts": lambda: (idioms.StackedShifts(3), (torch.randn(2, 2, 3, 8, 7), torch.rand(2, 2, 9, 3, 8, 7)), False),
            "PixelAdaptive": lambda: (idioms.PixelAdaptive(3, 4, 3), (image, torch.rand(2, 1, 3, 3, 8, 7)), False),
        }
        module, inputs, dynamo = cases[name]()
    return module.eval(), inputs, dynamo


@pytest.mark.parametrize("name", ["UnfoldMulSum", "UnfoldSignal", "TensorUnfold", "ShiftLoop", "StackedShifts", "PixelAdaptive"])
def test_idiom_is_lowered_by_a_verified_variant(name: str, tmp_path: Path) -> None:
    module, inputs, dynamo = idiom_case(name)
    model, expected, feeds = export_module(module, inputs, tmp_path / f"{name}.onnx", dynamo)
    assert_lowered_by_verified_variants(model, expected, feeds)


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_realistic_size_runs(name: str) -> None:
    module, inputs = ZOO[name]("realistic")
    with torch.no_grad():
        y = module(*inputs)
    assert y.shape[0] == inputs[0].shape[0] and torch.isfinite(y).all()
