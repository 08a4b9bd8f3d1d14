"""ConvTranspose variants: each agrees with ConvTranspose itself across the whole attribute space.

References: the official ONNX conformance cases' expected outputs, and onnxruntime's own
ConvTranspose on the same model for hypothesis-generated nodes (ranks 1-3, strides, dilations,
pads, output_padding, output_shape, every auto_pad, group, bias, weights as initializers or
inputs, a dynamic batch). Real onnxruntime sessions, real files, no mocks.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, numpy_helper
from onnx.backend.test.case.node import collect_testcases

import convlower
from convlower.cli import main
from convlower.passes import NotLowerable, family_for
from convlower.passes.conv_transpose import ConvTransposeSpec, make_spec
from convlower.rewrite import remaining_ops
from convlower.testing import assert_equivalent
from tests.helpers import op_types, run, single_node_model

FAMILY = family_for("ConvTranspose")
VARIANTS = FAMILY.variant_names
LOWERED = [v for v in VARIANTS if v != "native"]

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    CONFORMANCE = [c for c in collect_testcases() if {n.op_type for n in c.model.graph.node} == {"ConvTranspose"}]


def spec_of(model: onnx.ModelProto) -> ConvTransposeSpec:
    """The spec of the model's one ConvTranspose node, read the way `lower` reads it."""
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model))
    node = next(n for n in graph.nodes if n.op == "ConvTranspose")
    return make_spec(node, model.opset_import[0].version)


def lowered(model: onnx.ModelProto, variant: str) -> onnx.ModelProto | None:
    """The model with its ConvTranspose replaced by `variant`, or None where the variant declines
    (then with exactly the reason its why_not gives)."""
    result = convlower.lower(model, {"ConvTranspose": variant})
    (outcome,) = result.nodes
    if outcome.variant is None:
        assert outcome.reason == FAMILY.variant(variant).why_not(spec_of(model)), outcome.reason
        return None
    onnx.checker.check_model(result.model, full_check=True)
    assert [v.name for v in result.model.graph.output] == [v.name for v in model.graph.output]
    if variant != "native":
        assert "ConvTranspose" not in op_types(result.model), op_types(result.model)
    return result.model


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    """Lowering reorders float sums: a float32 tolerance a little above its rounding."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


# ---- (a) the official ONNX conformance cases ---------------------------------------------------


def with_inputs_as_initializers(model: onnx.ModelProto, inputs: list[np.ndarray]) -> onnx.ModelProto:
    """A conformance case's model with every graph input but the first turned into an initializer
    holding the case's value (ConvTranspose's weights and bias, Col2Im's shapes)."""
    constant = onnx.ModelProto()
    constant.CopyFrom(model)
    graph = constant.graph
    for value, array in list(zip(graph.input, inputs))[1:]:
        graph.initializer.append(numpy_helper.from_array(array, value.name))
    del graph.input[1:]
    return constant


def test_every_conformance_case_is_collected() -> None:
    assert len(CONFORMANCE) >= 11, "collect_testcases() was called with an op filter earlier in this session"


@pytest.mark.parametrize("weights", ["input", "initializer"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CONFORMANCE, ids=lambda c: c.name)
def test_conformance_case(case: Any, variant: str, weights: str) -> None:
    """Every applicable variant reproduces the case's expected output, with the weights fed as the
    case feeds them (graph inputs) and as initializers (as exported models carry them)."""
    for inputs, expected in case.data_sets:
        model = case.model if weights == "input" else with_inputs_as_initializers(case.model, inputs)
        candidate = lowered(model, variant)
        if candidate is None:
            continue
        names = [i.name for i in model.graph.input]
        (got,) = run(candidate, dict(zip(names, inputs)))
        assert_close(got, expected[0])


def test_subpixel_and_col2im_cover_the_strided_cases() -> None:
    """The cases the fast variants must decline are exactly the ones they are not built for."""
    declined = {
        case.name: [v for v in LOWERED if FAMILY.variant(v).why_not(spec_of(case.model))] for case in CONFORMANCE
    }
    assert declined["test_convtranspose_pads"] == []
    assert declined["test_convtranspose_autopad_same"] == []
    assert declined["test_convtranspose_dilations"] == ["subpixel"]
    assert declined["test_convtranspose_3d"] == ["subpixel"]


# ---- (b) hypothesis: the attribute space against onnxruntime's ConvTranspose --------------------


@dataclass
class Node:
    """One generated ConvTranspose node and how its operands reach it."""

    batch: int
    in_channels: int
    out_per_group: int
    group: int
    in_spatial: list[int]
    kernel: list[int]
    attrs: dict[str, Any]
    bias: str  # "none", "initializer", "input"
    weights: str  # "initializer", "input"
    dynamic_batch: bool
    seed: int = 0

    def model_and_feeds(self, dtype: np.dtype = np.dtype(np.float32), opset: int = 18) -> tuple[onnx.ModelProto, dict]:
        rng = np.random.default_rng(self.seed)
        x = rng.standard_normal((self.batch, self.in_channels, *self.in_spatial)).astype(dtype)
        w = rng.standard_normal((self.in_channels, self.out_per_group, *self.kernel)).astype(dtype)
        b = rng.standard_normal(self.out_per_group * self.group).astype(dtype)
        x_dims = ("batch" if self.dynamic_batch else self.batch, *x.shape[1:])
        inputs: list = [("x", x_dims), ("w", w if self.weights == "initializer" else w.shape)]
        if self.bias != "none":
            inputs.append(("b", b if self.bias == "initializer" else b.shape))
        elem_type = onnx.helper.np_dtype_to_tensor_dtype(dtype)
        attrs = dict(self.attrs, group=self.group) if self.group > 1 else self.attrs
        model = single_node_model(
            "ConvTranspose", inputs, len(x.shape), attrs=attrs, opset=opset, elem_type=elem_type
        )
        return model, {"x": x, "w": w, "b": b}


@st.composite
def nodes(draw: st.DrawFn) -> Node:
    """ConvTranspose nodes over every attribute, small enough to run in milliseconds.

    Pads, output_padding and output_shape range a little past what onnxruntime accepts
    (output_padding up to the ONNX bound max(stride, dilation) - 1, output_shape up to two past
    in·stride + extent - 1), so the refusals are generated too.
    """
    rank = draw(st.integers(1, 3))
    ints = lambda lo, hi: st.lists(st.integers(lo, hi), min_size=rank, max_size=rank)  # noqa: E731
    group = draw(st.sampled_from([1, 1, 2]))
    kernel = draw(ints(1, 4 if rank < 3 else 3))
    strides, dilations = draw(ints(1, 3)), draw(ints(1, 2))
    in_spatial = draw(ints(1, 5 if rank < 3 else 3))
    attrs: dict[str, Any] = {"strides": strides}
    if draw(st.booleans()):
        attrs["dilations"] = dilations
    else:
        dilations = [1] * rank
    if draw(st.booleans()):
        attrs["output_padding"] = [draw(st.integers(0, max(s, d) - 1)) for s, d in zip(strides, dilations)]
    if draw(st.booleans()):
        attrs["kernel_shape"] = kernel
    padding = draw(st.sampled_from(["pads", "default", "output_shape", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    if padding == "pads":
        attrs["pads"] = draw(st.lists(st.integers(0, 3), min_size=2 * rank, max_size=2 * rank))
    elif padding == "output_shape":
        extents = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
        attrs["output_shape"] = [draw(st.integers(1, n * s + e + 1)) for n, s, e in zip(in_spatial, strides, extents)]
        if draw(st.booleans()):
            attrs["auto_pad"] = draw(st.sampled_from(["SAME_UPPER", "SAME_LOWER"]))
    elif padding != "default":
        attrs["auto_pad"] = padding
    return Node(
        batch=draw(st.integers(1, 2)),
        in_channels=group * draw(st.integers(1, 2)),
        out_per_group=draw(st.integers(1, 3)),
        group=group,
        in_spatial=in_spatial,
        kernel=kernel,
        attrs=attrs,
        bias=draw(st.sampled_from(["none", "initializer", "input"])),
        weights=draw(st.sampled_from(["initializer", "input"])),
        dynamic_batch=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def onnxruntime_output(model: onnx.ModelProto, feeds: dict) -> np.ndarray | None:
    """The node's output on onnxruntime, or None where onnxruntime refuses the node."""
    try:
        return run(model, feeds)[0]
    except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidArgument):
        return None


@settings(max_examples=150)
@given(node=nodes())
def test_every_variant_matches_onnxruntime(node: Node) -> None:
    """Where onnxruntime runs the node, every applicable variant gives its output; where it
    refuses the node, the spec refuses it too, with a reason."""
    ort.set_default_logger_severity(4)
    model, feeds = node.model_and_feeds()
    expected = onnxruntime_output(model, feeds)
    if expected is None:
        with pytest.raises(NotLowerable):
            spec_of(model)
        return
    spec = spec_of(model)
    assert spec.out_spatial == expected.shape[2:]
    assert spec.batch == (None if node.dynamic_batch else node.batch)
    for variant in VARIANTS:
        candidate = lowered(model, variant)
        if candidate is not None:
            (got,) = run(candidate, feeds)
            assert_close(got, expected)


@pytest.mark.parametrize("variant", VARIANTS)
def test_float16_constants_follow_the_node_dtype(variant: str) -> None:
    """A float16 node lowers to float16 initializers only, and matches onnxruntime's float16 ConvTranspose."""
    node = Node(2, 4, 3, 2, [5, 4], [4, 3], {"strides": [2, 2], "pads": [1, 1, 1, 0]}, "initializer", "initializer", True)
    model, feeds = node.model_and_feeds(np.dtype(np.float16))
    candidate = lowered(model, variant)
    float_inits = [t for t in candidate.graph.initializer if t.data_type not in (TensorProto.INT64,)]
    assert float_inits and all(t.data_type == TensorProto.FLOAT16 for t in float_inits)
    (got,) = run(candidate, feeds)
    np.testing.assert_allclose(got.astype(np.float32), run(model, feeds)[0].astype(np.float32), rtol=1e-2, atol=2e-2)


# ---- (c) what the spec resolves, and why variants decline --------------------------------------


def spec_for(attrs: dict[str, Any], in_spatial: tuple = (4,), kernel: tuple = (3,), opset: int = 18) -> ConvTransposeSpec:
    w = np.ones((2, 3, *kernel), np.float32)
    return spec_of(single_node_model("ConvTranspose", [("x", (1, 2, *in_spatial)), ("w", w)], attrs=attrs, opset=opset))


def test_one_canonical_spec_for_equivalent_nodes() -> None:
    """output_shape, SAME_* and explicit pads that place the same values give the same spec key."""
    explicit = spec_for({"strides": [2], "pads": [1, 0]})
    assert spec_for({"strides": [2], "output_shape": [8]}).key() == explicit.key()
    assert spec_for({"strides": [2], "auto_pad": "SAME_LOWER"}).key() == explicit.key()
    assert explicit.out_spatial == (8,) and explicit.pads == (1, 0) and explicit.output_padding == (0,)
    upper = spec_for({"strides": [2], "auto_pad": "SAME_UPPER"})
    assert upper.pads == (0, 1) and upper.out_spatial == (8,)
    past_the_extent = spec_for({"strides": [3], "output_shape": [13]})
    assert past_the_extent.pads == (0, 0) and past_the_extent.output_padding == (1,)
    assert spec_for({"strides": [3], "pads": [0, 1], "output_padding": [2]}).output_padding == (1,)


@pytest.mark.parametrize(
    "attrs, reason",
    [
        ({"strides": [1], "dilations": [3], "output_padding": [2]}, "not below the stride 1: onnxruntime refuses"),
        ({"strides": [3], "output_shape": [15]}, "reaches past in·stride + extent - 1 = 14"),
        ({"strides": [2], "auto_pad": "VALID", "pads": [1, 1]}, "both set"),
        ({"strides": [2], "pads": [5, 4]}, "the output is empty"),
    ],
)
def test_nodes_onnxruntime_refuses_are_not_lowerable(attrs: dict[str, Any], reason: str) -> None:
    with pytest.raises(NotLowerable, match=re.escape(reason)):
        spec_for(attrs)
    model = single_node_model("ConvTranspose", [("x", (1, 2, 4)), ("w", np.ones((2, 3, 3), np.float32))], attrs=attrs)
    ort.set_default_logger_severity(4)
    assert onnxruntime_output(model, {"x": np.ones((1, 2, 4), np.float32)}) is None


def test_not_lowerable_shapes() -> None:
    with pytest.raises(NotLowerable, match="1 to 3"):
        spec_for({}, in_spatial=(2, 2, 2, 2), kernel=(1, 1, 1, 1))
    dynamic_weight = single_node_model("ConvTranspose", [("x", (1, 2, 4)), ("w", (2, 3, "k"))])
    with pytest.raises(NotLowerable, match="weight's shape must be static"):
        spec_of(dynamic_weight)
    with pytest.raises(NotLowerable, match="dynamic spatial dim"):
        spec_for({"output_shape": [6]}, in_spatial=("length",))


@pytest.mark.parametrize(
    "attrs, in_spatial, kernel, opset, declined",
    [
        ({"strides": [2, 2]}, (3, 3), (2, 2), 17, {"col2im": "Col2Im exists from opset 18; the model is opset 17"}),
        ({"dilations": [2]}, (4,), (3,), 18, {"subpixel": "stride 1 on every axis"}),
        ({"strides": [2], "dilations": [2]}, (4,), (3,), 18, {"subpixel": "dilations [2]"}),
        (
            {"strides": [2, 1, 1], "dilations": [1, 1, 2]}, (2, 2, 2), (2, 2, 2), 18,
            {"col2im": "miscomputes dilated images", "subpixel": "dilations [1, 1, 2]"},
        ),
        ({"strides": [2, 2]}, ("h", "w"), (2, 2), 18, {v: "dynamic spatial dims" for v in LOWERED}),
    ],
)
def test_why_variants_decline(attrs: dict, in_spatial: tuple, kernel: tuple, opset: int, declined: dict[str, str]) -> None:
    spec = spec_for(attrs, in_spatial, kernel, opset)
    reasons = {v.name: v.why_not(spec) for v in FAMILY.variants}
    assert {name for name, why in reasons.items() if why} == set(declined)
    for name, words in declined.items():
        assert words in reasons[name]


def test_dynamic_spatial_dims_keep_native_with_resolved_pads() -> None:
    """SAME_UPPER on symbolic H, W: pads resolve without the sizes, and native reproduces the node."""
    w = np.random.default_rng(1).standard_normal((2, 3, 3, 3)).astype(np.float32)
    attrs = {"strides": [2, 2], "auto_pad": "SAME_UPPER"}
    model = single_node_model("ConvTranspose", [("x", ("n", 2, "h", "w")), ("w", w)], 4, attrs=attrs)
    spec = spec_of(model)
    assert spec.pads == (0, 0, 1, 1) and spec.out_spatial == (None, None)
    x = np.random.default_rng(2).standard_normal((2, 2, 5, 3)).astype(np.float32)
    assert_close(run(lowered(model, "native"), {"x": x})[0], run(model, {"x": x})[0])


# ---- (d) the command line, inspect, and the tuner ------------------------------------------------


def decoder_model(opset: int = 18) -> onnx.ModelProto:
    """One UNet-style upsampling step (k2 s2 with bias) on a dynamic batch."""
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((8, 4, 2, 2)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    inputs = [("x", ("n", 8, 6, 6)), ("w", w), ("b", b)]
    return single_node_model("ConvTranspose", inputs, 4, attrs={"strides": [2, 2]}, opset=opset)


@pytest.mark.parametrize("variant", LOWERED)
def test_cli_lower_with_no_ops_left_exits_0(variant: str, tmp_path: Path) -> None:
    source, target = tmp_path / "decoder.onnx", tmp_path / "lowered.onnx"
    onnx.save(decoder_model(), source)
    code = main(["lower", str(source), "--variant", f"ConvTranspose={variant}", "--no-ops", "ConvTranspose", "-o", str(target)])
    assert code == 0
    assert not remaining_ops(onnx.load(target), {"ConvTranspose"})
    assert_equivalent(str(source), str(target), input_shapes={"x": (2, 8, 6, 6)})


def test_cli_lower_with_a_node_left_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "decoder17.onnx"
    onnx.save(decoder_model(opset=17), source)
    code = main(["lower", str(source), "--variant", "ConvTranspose=col2im", "--no-ops", "ConvTranspose"])
    assert code == 1
    assert "Col2Im exists from opset 18" in capsys.readouterr().err
    assert not (tmp_path / "decoder17.convlower.onnx").exists()


def test_inspect_lists_the_spec_and_every_variant(tmp_path: Path) -> None:
    source = tmp_path / "decoder17.onnx"
    onnx.save(decoder_model(opset=17), source)
    (info,) = convlower.inspect_model(source)
    assert info.op == "ConvTranspose" and tuple(info.spec["out_spatial"]) == (12, 12)
    assert set(info.variants) == set(VARIANTS)
    assert info.variants["col2im"].startswith("Col2Im exists from opset 18")


def test_the_tuner_times_every_applicable_variant() -> None:
    result = convlower.optimize(decoder_model(), input_shapes={"x": (1, 8, 6, 6)}, provider="cpu", cache=None, guard=False)
    (node,) = [n for n in result.report.nodes if n.op == "ConvTranspose"]
    assert {name for name, outcome in node.variants.items() if outcome["status"] == "ok"} >= set(LOWERED)
