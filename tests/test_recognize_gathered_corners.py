"""Recognition of deformable convolutions exported as gathered bilinear corners and an im2col Conv
(passes/deform_conv/recognize_gathered_corners.py).

The models are not ours: `deform_conv2d_onnx_exporter` 1.2.0's exports of `torchvision.ops.DeformConv2d`
(GatherND and GatherElements modes; tests/fixtures/make_deform_exporter_fixtures.py writes them, with
torchvision's own outputs). Each holds a DCNv2 layer and a strided, dilated layer with two weight groups
and two offset groups. Recognized, they must hold one DeformConv per layer with the layer's geometry,
and equal torchvision's kernel as recognized and under every DeformConv variant. Look-alikes, each one
edit away from a real export, must be left alone and still compute what they did.
"""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import convlower
from convlower.passes import FAMILIES
from convlower.passes.deform_conv.recognize_gathered_corners import recognize_gathered_corners
from convlower.rewrite import finish, import_graph
from tests.helpers import op_types, run

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
MODES = ["gathernd", "gatherelements"]
LAYERS = ("dcnv2", "strided")
VARIANTS = FAMILIES["deformconv"].variant_names
ATOL = 1e-5


def exported(mode: str) -> onnx.ModelProto:
    return onnx.load(str(FIXTURES / f"deform_exporter_{mode}.onnx"))


def torchvision_io() -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / "deform_exporter_io.npz"))


def recognized(model: onnx.ModelProto) -> onnx.ModelProto:
    return finish(model, import_graph(model))


@pytest.fixture(scope="module", params=MODES)
def recognized_fixture(request) -> onnx.ModelProto:
    return recognized(exported(request.param))


def test_the_fixtures_compute_torchvisions_outputs() -> None:
    io = torchvision_io()
    for mode in MODES:
        for name, got in zip(LAYERS, run(exported(mode), {"x": io["x"]})):
            np.testing.assert_allclose(got, io[name], atol=ATOL, err_msg=f"{mode} {name}")


def test_every_layer_becomes_one_deform_conv(recognized_fixture) -> None:
    ops = op_types(recognized_fixture)
    assert ops.count("DeformConv") == 2
    assert not {"GatherND", "GatherElements", "Floor", "Clip", "Sum"} & set(ops)


def test_recognition_reads_each_layers_geometry(recognized_fixture) -> None:
    nodes = {n.output[0]: (n, {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute})
             for n in recognized_fixture.graph.node if n.op_type == "DeformConv"}
    dcnv2, attrs = nodes["dcnv2"]
    assert attrs["strides"] == [1, 1] and attrs["pads"] == [1, 1, 1, 1] and attrs["group"] == 1 and attrs["offset_group"] == 1
    assert len(dcnv2.input) == 5, "the sigmoid mask is the node's mask"
    strided, attrs = nodes["strided"]
    assert attrs["strides"] == [2, 2] and attrs["dilations"] == [2, 2] and attrs["pads"] == [2, 2, 2, 2]
    assert attrs["group"] == 2 and attrs["offset_group"] == 2 and len(strided.input) == 4


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_recognized_model_equals_torchvision(recognized_fixture, variant: str) -> None:
    io = torchvision_io()
    lowered = convlower.lower(recognized_fixture, {"DeformConv": variant}).model
    for name, got in zip(LAYERS, run(lowered, {"x": io["x"]})):
        np.testing.assert_allclose(got, io[name], atol=ATOL, err_msg=name)


# --- look-alikes: one edit away from a real export ----------------------------------------------------------


def _edited(mode: str, edit: str) -> onnx.ModelProto:
    model = exported(mode)
    if edit == "edge_padding":  # the padded image repeats its border: taps off the image read it, not zero
        for node in model.graph.node:
            if node.op_type == "Pad":
                del node.attribute[:]
                node.attribute.append(onnx.helper.make_attribute("mode", "edge"))
    elif edit == "half_pixel_positions":  # the regular grid p_0 + p_k moved by half a pixel: no Conv's taps
        for node in model.graph.node:
            if node.op_type == "Constant" and any(node.output[0] in n.input for n in model.graph.node if n.op_type == "Add"):
                value = numpy_helper.to_array(node.attribute[0].t)
                if value.ndim == 6 and value.dtype == np.float32:
                    node.attribute[0].t.CopyFrom(numpy_helper.from_array(value + 0.5))
    return model


@pytest.mark.parametrize("edit", ["edge_padding", "half_pixel_positions"])
@pytest.mark.parametrize("mode", MODES)
def test_look_alikes_are_left_as_they_are(mode: str, edit: str) -> None:
    model = _edited(mode, edit)
    result = recognized(model)
    assert "DeformConv" not in op_types(result)
    io = torchvision_io()
    edited_outputs = run(model, {"x": io["x"]})
    assert not np.allclose(edited_outputs[0], io["dcnv2"], atol=1e-3), "the edit must change what the layer computes"
    for want, got in zip(edited_outputs, run(result, {"x": io["x"]})):
        np.testing.assert_allclose(got, want, atol=ATOL)


@pytest.mark.parametrize("mode", MODES)
def test_below_opset_19_the_layer_becomes_a_carrier_that_runs(mode: str) -> None:
    """The exporter's minimum is opset 12: there the layer becomes a convlower.DeformConv carrier."""
    model = exported(mode)
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = 12
    result = recognized(model)
    carriers = [n for n in result.graph.node if n.op_type == "DeformConv"]
    assert carriers and all(n.domain == "convlower" for n in carriers)
    assert not {"GatherND", "GatherElements"} & set(op_types(result))
    io = torchvision_io()
    for want, got in zip(run(model, {"x": io["x"]}), run(result, {"x": io["x"]})):
        np.testing.assert_allclose(got, want, atol=ATOL)


def test_below_the_carriers_opset_nothing_is_recognized() -> None:
    graph = import_graph(exported("gathernd"), recognize=False)
    before = len(graph.nodes)
    recognize_gathered_corners(graph, 10)
    assert len(graph.nodes) == before
