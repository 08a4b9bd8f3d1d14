"""Recognition of deformable convolutions written as one GridSample per tap as one ONNX DeformConv
(passes/deform_conv/recognize_tap_grid_sample.py).

The idiom (models/deform_idioms.py's `PerTapGridSample`, with its knobs: offset layout, Einsum or
1x1 Conv contraction, align_corners, strides, dilations, pads, bias, mask) sits in a small net that
predicts offsets and masks by a Conv from the image, as DCN heads do; it is exported for real by
both torch exporters at opset 19, with a static and a symbolic batch, recognized, and the
recognized model run on onnxruntime (its DeformConv kernel) and lowered by every DeformConv
variant, compared with torch eager and with the pure-torch `convlower.ops.deform_conv2d`.
Look-alikes must not become a DeformConv and must still compute what torch does. One export per
exporter holds every layer, so the file stays quick.
"""

from __future__ import annotations

import functools
import io
import warnings

import numpy as np
import onnx
import pytest

import convlower
from convlower.models.deform_idioms import PerTapGridSample
from convlower.ops import deform_conv2d
from convlower.passes import FAMILIES
from convlower.passes.deform_conv.recognize_tap_grid_sample import recognize_tap_grid_samples
from convlower.rewrite import finish, import_graph
from tests.helpers import op_types, run

torch = pytest.importorskip("torch")
F = torch.nn.functional
nn = torch.nn

CHANNELS, OUT = 6, 5
SIZES = [(2, CHANNELS, 9, 11), (3, CHANNELS, 9, 11)]
"""The export's input, and another batch for the symbolic export (same C, H, W)."""
VARIANTS = FAMILIES["deformconv"].variant_names
ATOL = 1e-4

LAYERS = {
    "dcnv2_einsum": dict(),
    "dcnv1_conv1x1": dict(modulated=False, contraction="conv"),
    "split_offsets_strided_dilated_aligned": dict(offset_layout="split", stride=2, dilation=2, padding=2, align_corners=True),
    "no_bias_unpadded": dict(bias=False, padding=0),
}


class DeformableLayer(nn.Module):
    """Offsets (and a sigmoid mask) predicted by a Conv from the image, then the per-tap layer."""

    def __init__(self, modulated: bool = True, **idiom) -> None:
        super().__init__()
        stride, padding, dilation = idiom.get("stride", 1), idiom.get("padding", 1), idiom.get("dilation", 1)
        self.modulated = modulated
        self.predict = nn.Conv2d(CHANNELS, 27 if modulated else 18, 3, stride=stride, padding=padding, dilation=dilation)
        nn.init.normal_(self.predict.weight, std=0.3)
        self.dcn = PerTapGridSample(CHANNELS, OUT, **idiom)

    def parts(self, x):
        predicted = self.predict(x)
        offset = predicted[:, :18]
        return offset, (predicted[:, 18:].sigmoid() if self.modulated else None)

    def forward(self, x):
        offset, mask = self.parts(x)
        return self.dcn(x, offset, mask)

    def reference(self, x):
        """The same layer through convlower.ops.deform_conv2d (torchvision's semantics)."""
        offset, mask = self.parts(x)
        if self.dcn.offset_layout == "split":
            offset = torch.stack((offset[:, :9], offset[:, 9:]), 2).flatten(1, 2)
        return deform_conv2d(x, offset, self.dcn.weight, self.dcn.bias, stride=self.dcn.stride, padding=self.dcn.padding,
                             dilation=self.dcn.dilation, mask=mask)


class Several(nn.Module):
    """Several layers on one image, one output each: one export for them all."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        super().__init__()
        self.names, self.layers = list(layers), nn.ModuleList(layers.values())

    def forward(self, x):
        return tuple(layer(x) for layer in self.layers)


def export(module: nn.Module, dynamo: bool, symbolic: bool, opset: int = 19) -> onnx.ModelProto:
    x = torch.randn(*SIZES[0])
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            shapes = {"x": {0: torch.export.Dim("batch", min=1, max=64)}} if symbolic else None
            torch.onnx.export(module, (x,), buffer, dynamo=True, opset_version=opset, input_names=["x"],
                              output_names=module.names, dynamic_shapes=shapes, verbose=False)
        else:
            axes = {"x": {0: "batch"}} if symbolic else None
            torch.onnx.export(module, (x,), buffer, dynamo=False, opset_version=opset, input_names=["x"],
                              output_names=module.names, dynamic_axes=axes)
    return onnx.load_from_string(buffer.getvalue())


def recognized(model: onnx.ModelProto) -> onnx.ModelProto:
    return finish(model, import_graph(model))


@functools.cache
def several() -> Several:
    torch.manual_seed(0)
    return Several({name: DeformableLayer(**config) for name, config in LAYERS.items()}).eval()


EXPORTS = [(False, False), (True, False), (False, True), (True, True)]
EXPORT_IDS = ["torchscript", "dynamo", "torchscript-symbolic", "dynamo-symbolic"]


@pytest.fixture(scope="module", params=EXPORTS, ids=EXPORT_IDS)
def exported(request) -> tuple[onnx.ModelProto, onnx.ModelProto, bool]:
    dynamo, symbolic = request.param
    model = export(several(), dynamo, symbolic)
    return model, recognized(model), symbolic


def test_the_idiom_computes_deform_conv2d() -> None:
    x = torch.randn(*SIZES[0])
    with torch.no_grad():
        for name, layer in zip(several().names, several().layers):
            torch.testing.assert_close(layer(x), layer.reference(x), atol=ATOL, rtol=1e-4, msg=name)


def test_every_layer_becomes_one_deform_conv(exported) -> None:
    _, model, _ = exported
    ops = op_types(model)
    assert ops.count("DeformConv") == len(LAYERS) and "GridSample" not in ops
    assert "Einsum" not in ops


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_recognized_model_equals_torch(exported, variant: str) -> None:
    _, model, symbolic = exported
    lowered = convlower.lower(model, {"DeformConv": variant}).model
    for size in SIZES if symbolic else SIZES[:1]:
        x = torch.randn(*size)
        with torch.no_grad():
            expected = [layer.reference(x).numpy() for layer in several().layers]
        got = run(lowered, {"x": x.numpy()})
        for name, want, have in zip(several().names, expected, got):
            np.testing.assert_allclose(have, want, atol=ATOL, rtol=1e-4, err_msg=f"{name} at {size}")


def test_recognition_reads_the_geometry_of_each_layer(exported) -> None:
    _, model, _ = exported
    nodes = {n.output[0]: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
             for n in model.graph.node if n.op_type == "DeformConv"}
    assert nodes["split_offsets_strided_dilated_aligned"]["strides"] == [2, 2]
    assert nodes["split_offsets_strided_dilated_aligned"]["dilations"] == [2, 2]
    assert nodes["split_offsets_strided_dilated_aligned"]["pads"] == [2, 2, 2, 2]
    assert nodes["no_bias_unpadded"]["pads"] == [0, 0, 0, 0]
    inputs = {n.output[0]: list(n.input) for n in model.graph.node if n.op_type == "DeformConv"}
    assert len(inputs["dcnv1_conv1x1"]) < 5 and inputs["no_bias_unpadded"][3] == ""


# --- look-alikes ---------------------------------------------------------------------------------------------


class LookAlike(nn.Module):
    """Each forward is close to the idiom and is not a deformable convolution."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.predict = nn.Conv2d(CHANNELS, 18, 3, padding=1)
        self.dcn = PerTapGridSample(CHANNELS, OUT, padding_mode="border" if kind == "border" else "zeros")
        self.names = [kind]

    def forward(self, x):
        offset = self.predict(x)
        if self.kind == "scaled_offsets":
            return self.dcn(x, offset * 2)
        if self.kind == "two_warps":  # two flow warps of one image, both at the identity grid, mixed by a 1x1 conv
            h, w = x.shape[2:]
            ys = torch.linspace(-1, 1, h).view(1, h, 1).expand(1, h, w)
            xs = torch.linspace(-1, 1, w).view(1, 1, w).expand(1, h, w)
            warps = [F.grid_sample(x, torch.stack((xs + offset[:, 2 * i] / w, ys + offset[:, 2 * i + 1] / h), -1),
                                   align_corners=True) for i in range(2)]
            return F.conv2d(torch.cat(warps, 1), self.dcn.weight[:, :, :2, 0].permute(0, 2, 1).reshape(OUT, -1, 1, 1))
        if self.kind == "rectified_samples":  # a ReLU on each sample before the contraction: not linear
            return self.dcn.contract([s.relu() for s in self.dcn.sample(x, offset)])
        return self.dcn(x, offset)


@pytest.mark.parametrize("kind", ["border", "scaled_offsets", "two_warps", "rectified_samples"])
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_look_alikes_are_left_as_they_are(kind: str, dynamo: bool) -> None:
    torch.manual_seed(1)
    module = LookAlike(kind).eval()
    model = export(module, dynamo, symbolic=False)
    result = recognized(model)
    assert "DeformConv" not in op_types(result)
    x = torch.randn(*SIZES[0])
    with torch.no_grad():
        expected = module(x).numpy()
    np.testing.assert_allclose(run(result, {"x": x.numpy()})[0], expected, atol=ATOL, rtol=1e-4)


def test_below_opset_19_each_layer_becomes_a_carrier_that_runs() -> None:
    """Ports export at torch's default opsets (17, 18), where ONNX has no DeformConv: each layer
    becomes a convlower.DeformConv carrier, which onnxruntime runs by its function body."""
    model = export(several(), dynamo=False, symbolic=False, opset=17)
    result = recognized(model)
    carriers = [n for n in result.graph.node if n.op_type == "DeformConv"]
    assert len(carriers) == len(LAYERS) and all(n.domain == "convlower" for n in carriers)
    assert "GridSample" not in op_types(result)
    x = np.random.default_rng(4).standard_normal(SIZES[0]).astype(np.float32)
    for want, got in zip(run(model, {"x": x}), run(result, {"x": x})):
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-4)


def test_below_grid_samples_opset_nothing_is_recognized() -> None:
    model = export(several(), dynamo=False, symbolic=False)
    graph = import_graph(model, recognize=False)
    before = len(graph.nodes)
    recognize_tap_grid_samples(graph, 15)
    assert len(graph.nodes) == before
