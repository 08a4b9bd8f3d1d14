"""DeformConv variants against the ONNX conformance cases, a NumPy oracle from the definition,
onnx.reference and onnxruntime's own kernel, over the attribute space (hypothesis).

Offsets are drawn wide on purpose: taps land between pixels, on borders and far outside the image,
where bilinear sampling reads zeros.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx.backend.test.case.node import collect_testcases
from onnx.reference import ReferenceEvaluator

import convlower
from convlower.cli import main
from convlower.errors import UsageError
from convlower.ops import deform_conv2d
from convlower.passes import family_for
from convlower.passes.col2im import sliding_blocks
from convlower.passes.deform_conv import carry_below_opset_19
from convlower.passes.local_functions import attach_functions
from tests.helpers import op_types, run, single_node_model
from tests.oracles import deform_conv

FAMILY = family_for("DeformConv")
VARIANTS = FAMILY.variant_names
LOWERINGS = [name for name in VARIANTS if name != "native"]

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    CONFORMANCE = [c for c in collect_testcases() if {n.op_type for n in c.model.graph.node} == {"DeformConv"}]


def lowered(model: onnx.ModelProto, variant: str) -> onnx.ModelProto:
    result = convlower.lower(model, {"DeformConv": variant})
    assert result.nodes and all(n.variant == variant for n in result.nodes), result.nodes
    onnx.checker.check_model(result.model, full_check=True)
    if variant != "native":
        assert "DeformConv" not in op_types(result.model)
    return result.model


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


# ---- (a) the official ONNX conformance cases ---------------------------------------------------


def test_every_conformance_case_is_collected() -> None:
    assert len(CONFORMANCE) >= 4, "collect_testcases() was called with an op filter earlier in this session"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CONFORMANCE, ids=lambda c: c.name)
def test_conformance_case(case: Any, variant: str) -> None:
    names = [i.name for i in case.model.graph.input]
    for inputs, expected in case.data_sets:
        (got,) = run(lowered(case.model, variant), dict(zip(names, inputs)))
        assert_close(got, expected[0])


# ---- (b) hypothesis: the attribute space, against the oracle and onnxruntime ------------------


@st.composite
def deform_conv_nodes(draw: st.DrawFn) -> tuple[onnx.ModelProto, dict[str, np.ndarray], dict[str, Any]]:
    """A 2-D DeformConv: kernels 1-3, strides and dilations 1-2, asymmetric pads 0-2, groups and
    offset groups that divide the channels, bias and mask each optional, a dynamic or static batch;
    offsets up to ±(image size), so taps fall between pixels, on borders and outside."""
    ints = lambda lo, hi, n=2: st.lists(st.integers(lo, hi), min_size=n, max_size=n)  # noqa: E731
    kernel, strides, dilations, pads = draw(ints(1, 3)), draw(ints(1, 2)), draw(ints(1, 2)), draw(ints(0, 2, 4))
    group, offset_group = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2]))
    channels = group * offset_group * draw(st.integers(1, 2))
    out_channels = group * draw(st.integers(1, 2))
    reach = [(k - 1) * d + 1 - p - q for k, d, p, q in zip(kernel, dilations, pads, pads[2:])]
    image = [draw(st.integers(max(1, r), max(1, r) + 4)) for r in reach]
    output = [sliding_blocks(*axis) for axis in zip(image, kernel, strides, dilations, pads, pads[2:])]
    batch = draw(st.integers(1, 2))
    taps = kernel[0] * kernel[1]
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    spread = draw(st.sampled_from([0.0, 0.5, 3.0])) * max(image)
    arrays = {
        "x": rng.standard_normal((batch, channels, *image)).astype(np.float32),
        "w": rng.standard_normal((out_channels, channels // group, *kernel)).astype(np.float32),
        "offset": (rng.standard_normal((batch, offset_group * taps * 2, *output)) * spread).astype(np.float32),
        "b": rng.standard_normal(out_channels).astype(np.float32),
        "mask": rng.random((batch, offset_group * taps, *output)).astype(np.float32),
    }
    bias, mask = draw(st.booleans()), draw(st.booleans())
    batch_dim: Any = "n" if draw(st.booleans()) else batch
    inputs = [("x", (batch_dim, channels, *image)), ("w", arrays["w"]), ("offset", (batch_dim, offset_group * taps * 2, *output)),
              ("b" if bias else "", arrays["b"]), ("mask" if mask else "", (batch_dim, offset_group * taps, *output))]
    while not inputs[-1][0]:
        inputs.pop()
    attrs = {"kernel_shape": kernel, "strides": strides, "dilations": dilations, "pads": pads, "group": group,
             "offset_group": offset_group}
    model = single_node_model("DeformConv", inputs, 4, attrs=attrs, opset=19)
    feeds = {name: arrays[name] for name in ("x", "offset", "mask") if name in {i[0] for i in inputs}}
    expected = deform_conv(arrays["x"], arrays["w"], arrays["offset"], arrays["b"] if bias else None,
                           arrays["mask"] if mask else None, strides=strides, dilations=dilations, pads=pads,
                           group=group, offset_group=offset_group)
    return model, feeds, {"expected": expected}


@settings(max_examples=60)
@given(node=deform_conv_nodes())
def test_every_variant_matches_the_oracle_and_onnxruntimes_kernel(node) -> None:
    model, feeds, found = node
    native = run(model, feeds)[0]
    assert_close(native, found["expected"].astype(np.float32))
    for variant in VARIANTS:
        assert_close(run(lowered(model, variant), feeds)[0], native)


@settings(max_examples=15)
@given(node=deform_conv_nodes())
def test_the_oracle_agrees_with_onnx_reference(node) -> None:
    """The NumPy oracle, written from the definition, against onnx.reference's implementation
    (which normalizes for GridSample by size - 1: images at least 2 pixels on each axis)."""
    model, feeds, found = node
    if min(feeds["x"].shape[2:]) < 2:
        return
    (reference,) = ReferenceEvaluator(model).run(None, feeds)
    assert_close(reference, found["expected"].astype(np.float32))


@settings(max_examples=30)
@given(node=deform_conv_nodes())
def test_the_carrier_below_opset_19_equals_onnxruntimes_kernel(node) -> None:
    """The same node at opset 18, as the convlower.DeformConv carrier: its function body (sizes read
    at run time) and every lowering of it equal onnxruntime's DeformConv; `native` does not apply."""
    model, feeds, _ = node
    native = run(model, feeds)[0]
    carried = onnx.ModelProto()
    carried.CopyFrom(model)
    next(o for o in carried.opset_import if o.domain in ("", "ai.onnx")).version = 18
    attach_functions(carry_below_opset_19(carried))
    assert carried.graph.node[0].domain == "convlower"
    assert_close(run(carried, feeds)[0], native)
    for variant in LOWERINGS:
        assert_close(run(lowered(carried, variant), feeds)[0], native)
    (outcome,) = convlower.lower(carried, {"DeformConv": "native"}).nodes
    assert outcome.variant is None and "DeformConv needs opset 19" in outcome.reason


# ---- (c) where the lowerings do not apply, and the command line ---------------------------------


def test_a_3d_deform_conv_is_described_but_not_lowered() -> None:
    model = single_node_model("DeformConv", [("x", (1, 2, 4, 4, 4)), ("w", np.ones((2, 2, 1, 1, 1), np.float32)),
                                             ("offset", (1, 3, 4, 4, 4))], 5, attrs={"kernel_shape": [1, 1, 1]}, opset=19)
    outcomes = convlower.lower(model, {"DeformConv": "gather_im2col"}).nodes
    assert outcomes[0].variant is None and "3-D DeformConv: the lowerings are 2-D" in outcomes[0].reason


def test_lower_no_ops_deform_conv_writes_a_model_without_it(tmp_path) -> None:
    """`convlower lower --no-ops DeformConv`: the model runs where DeformConv does not, and equals the original."""
    case = next(c for c in CONFORMANCE if c.name == "test_deform_conv_with_mask_bias")
    source, out = tmp_path / "dcn.onnx", tmp_path / "dcn.lowered.onnx"
    onnx.save(case.model, source)
    assert main(["lower", str(source), "--variant", "DeformConv=gather_im2col", "-o", str(out), "--no-ops", "DeformConv"]) == 0
    written = onnx.load(str(out))
    assert "DeformConv" not in op_types(written)
    names = [i.name for i in case.model.graph.input]
    inputs, expected = case.data_sets[0]
    assert_close(run(written, dict(zip(names, inputs)))[0], expected[0])


@pytest.mark.parametrize("variant", LOWERINGS)
def test_the_lowered_model_runs_on_openvino_which_lacks_deform_conv(tmp_path, variant: str) -> None:
    """OpenVINO's ONNX frontend does not convert DeformConv; the model `lower --no-ops DeformConv`
    writes runs there and equals onnxruntime's kernel on the original (a torch DCNv2 block)."""
    ov = pytest.importorskip("openvino", reason="OpenVINO is not installed (`pip install -e '.[dev]'` brings it): "
                                                "the check on a runtime without DeformConv needs it")
    torch.manual_seed(2)
    block = DeformableBlock(channels=5, out_channels=4).eval()
    x = torch.randn(1, 5, 9, 11)
    source, out = tmp_path / "dcn.onnx", tmp_path / "dcn.lowered.onnx"
    onnx.save(convlower.export(block, (x,), opset=19), source)
    assert main(["lower", str(source), "--variant", f"DeformConv={variant}", "-o", str(out), "--no-ops", "DeformConv"]) == 0
    core = ov.Core()
    with pytest.raises(Exception, match="DeformConv|OpConversionFailure"):
        core.compile_model(core.read_model(str(source)), "CPU")
    # f32: on CPUs with bf16 units OpenVINO otherwise computes in bfloat16
    compiled = core.compile_model(core.read_model(str(out)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    feeds = {onnx.load(str(source)).graph.input[0].name: x.numpy()}
    assert_close(compiled(feeds)[0], run(onnx.load(str(source)), feeds)[0])


# ---- (d) convlower.ops.deform_conv2d: eager semantics, gradients, both exporters ----------------


@settings(max_examples=20)
@given(node=deform_conv_nodes())
def test_the_torch_op_computes_the_oracle(node) -> None:
    """`convlower.ops.deform_conv2d` (torchvision's signature) on the same draws, symmetric pads only."""
    model, feeds, found = node
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in model.graph.node[0].attribute}
    pads = attrs["pads"]
    if pads[:2] != pads[2:]:
        return
    weight = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w"))
    bias = next((onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "b"), None)
    mask = feeds.get("mask")
    got = deform_conv2d(torch.from_numpy(feeds["x"]), torch.from_numpy(feeds["offset"]), torch.from_numpy(weight),
                        None if bias is None else torch.from_numpy(bias), stride=attrs["strides"], padding=pads[:2],
                        dilation=attrs["dilations"], mask=None if mask is None else torch.from_numpy(mask))
    assert_close(got.numpy(), found["expected"].astype(np.float32))


def test_the_torch_op_has_gradients() -> None:
    rng = np.random.default_rng(3)
    x = torch.tensor(rng.standard_normal((1, 2, 5, 5)), requires_grad=True)
    offset = torch.tensor(rng.uniform(-1.3, 1.3, (1, 18, 5, 5)) + 0.25, requires_grad=True)
    weight = torch.tensor(rng.standard_normal((3, 2, 3, 3)), requires_grad=True)
    mask = torch.tensor(rng.random((1, 9, 5, 5)), requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: deform_conv2d(t[0], t[1], t[2], padding=1, mask=t[3]), (x, offset, weight, mask))


class DeformableBlock(torch.nn.Module):
    """A DCNv2 block as detection heads write it: a Conv predicts offsets and a sigmoid mask."""

    def __init__(self, channels: int = 4, out_channels: int = 6, modulated: bool = True) -> None:
        super().__init__()
        self.modulated = modulated
        self.predict = torch.nn.Conv2d(channels, 27 if modulated else 18, 3, padding=1)
        self.weight = torch.nn.Parameter(torch.randn(out_channels, channels, 3, 3) * 0.3)
        self.bias = torch.nn.Parameter(torch.randn(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        predicted = self.predict(x)
        mask = torch.sigmoid(predicted[:, 18:]) if self.modulated else None
        return deform_conv2d(x, predicted[:, :18] * 2, self.weight, self.bias, padding=1, mask=mask)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("modulated", [False, True], ids=["dcnv1", "dcnv2"])
def test_deform_conv2d_exports_to_one_deform_conv_node(dynamo: bool, modulated: bool) -> None:
    torch.manual_seed(0)
    block = DeformableBlock(modulated=modulated).eval()
    x = torch.randn(1, 4, 7, 9)
    model = convlower.export(block, (x,), dynamo=dynamo, opset=19)
    (node,) = [n for n in model.graph.node if n.op_type == "DeformConv"]
    assert node.domain == "" and len(node.input) == (5 if modulated else 4)
    with torch.no_grad():
        expected = block(x).numpy()
    assert_close(run(model, {model.graph.input[0].name: x.numpy()})[0], expected)
    for variant in LOWERINGS:
        assert_close(run(lowered(model, variant), {model.graph.input[0].name: x.numpy()})[0], expected)


@pytest.mark.parametrize("dynamo, opset", [(False, 12), (False, 18), (True, 18)], ids=["torchscript-12", "torchscript-18", "dynamo-18"])
@pytest.mark.parametrize("modulated", [False, True], ids=["dcnv1", "dcnv2"])
def test_deform_conv2d_below_opset_19_exports_a_carrier(dynamo: bool, opset: int, modulated: bool) -> None:
    """Below opset 19 (torch's default is 18) deform_conv2d exports as a convlower.DeformConv carrier,
    which onnxruntime runs by its function body, and which lowers like DeformConv."""
    torch.manual_seed(1)
    block = DeformableBlock(modulated=modulated).eval()
    x = torch.randn(1, 4, 7, 9)
    model = convlower.export(block, (x,), dynamo=dynamo, opset=opset)
    (node,) = [n for n in model.graph.node if n.op_type == "DeformConv"]
    assert node.domain == "convlower" and [f.name for f in model.functions] == ["DeformConv"]
    with torch.no_grad():
        expected = block(x).numpy()
    feeds = {model.graph.input[0].name: x.numpy()}
    assert_close(run(model, feeds)[0], expected)
    for variant in LOWERINGS:
        if variant == "grid_sample" and opset < 16:
            continue
        assert_close(run(lowered(model, variant), feeds)[0], expected)


def test_the_carriers_body_takes_any_image_size() -> None:
    """The function body reads every size at run time: one export with symbolic height and width."""
    torch.manual_seed(2)
    block = DeformableBlock().eval()
    axes = {"x": {2: "height", 3: "width"}}
    model = convlower.export(block, (torch.randn(1, 4, 7, 9),), dynamo=False, opset=17, dynamic_axes=axes)
    for size in [(5, 6), (11, 8)]:
        x = torch.randn(1, 4, *size)
        with torch.no_grad():
            assert_close(run(model, {"x": x.numpy()})[0], block(x).numpy())


def test_deform_conv2d_below_the_carriers_opset_is_a_clear_error() -> None:
    block = DeformableBlock().eval()
    with pytest.raises(UsageError, match="opset=11 or later"):
        convlower.export(block, (torch.randn(1, 4, 5, 5),), dynamo=False, opset=10)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("modulated", [False, True], ids=["dcnv1", "dcnv2"])
def test_torchvision_deform_conv2d_exports_to_one_deform_conv_node(dynamo: bool, modulated: bool) -> None:
    """torchvision.ops.DeformConv2d through convlower.export: one DeformConv, equal to torchvision's kernel."""
    torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed (the project's torch pin has no "
                                                            "matching build here; README, Deformable convolution)")

    class TorchvisionBlock(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.predict = torch.nn.Conv2d(4, 27 if modulated else 18, 3, stride=2, padding=1)
            self.dcn = torchvision.ops.DeformConv2d(4, 6, 3, stride=2, padding=1, groups=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            predicted = self.predict(x)
            return self.dcn(x, predicted[:, :18] * 2, predicted[:, 18:].sigmoid() if modulated else None)

    torch.manual_seed(3)
    block = TorchvisionBlock().eval()
    x = torch.randn(1, 4, 9, 12)
    model = convlower.export(block, (x,), dynamo=dynamo, opset=19)
    (node,) = [n for n in model.graph.node if n.op_type == "DeformConv"]
    assert len([i for i in node.input if i]) == (5 if modulated else 4)
    with torch.no_grad():
        expected = block(x).numpy()
    feeds = {model.graph.input[0].name: x.numpy()}
    assert_close(run(model, feeds)[0], expected)
    for variant in LOWERINGS:
        assert_close(run(lowered(model, variant), feeds)[0], expected)
