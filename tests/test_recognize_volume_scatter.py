"""Recognition of cost volumes filled by slice assignment (passes/local_correlation/recognize_volume_scatter.py).

Real torch exports of GwcNet's volumes (`GroupwiseVolume`, `CorrelationVolume`, `StereoNet` in
models/correlation_idioms.py) and of variations written here, by both exporters (TorchScript at opset
17, dynamo at 18), with static and with symbolic batch, H and W: recognized as one
`convlower.LocalCorrelation` (and a Squeeze for the one-group `[B, D, H, W]` layout), run on
onnxruntime as recognized (through the node's model-local function) and lowered, and compared with
the export itself at the profiling shape and, for symbolic exports, at another shape. Several layers
share one export (one output each), since the dynamo exporter takes seconds per export. Look-alikes
must come out without a LocalCorrelation, their outputs unchanged.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

import convlower
from convlower.models.correlation_idioms import CorrelationVolume, GroupwiseVolume, StereoNet
from convlower.passes.local_functions import DOMAIN
from convlower.rewrite import import_graph
from tests.helpers import run
from tests.test_recognize import recognized_model

torch = pytest.importorskip("torch")
nn = torch.nn

ATOL = RTOL = 1e-5
CHANNELS, GROUPS, DISPARITIES = 8, 2, 4
PROFILE, OTHER = (1, CHANNELS, 4, 10), (3, CHANNELS, 7, 13)
"""Feature shapes: the one exports and optimize's profile use (H = C/G, which the wrong-axis
look-alike needs), and another for symbolic exports."""
SYMBOLIC = {name: {0: "batch", 2: "h", 3: "w"} for name in ("left", "right")}
EXPORTERS = [pytest.param(False, id="torchscript"), pytest.param(True, id="dynamo")]
CORRELATION_VARIANTS = ["shift_mul_reduce", "stacked_mul_reduce", "banded_matmul"]
GWC = {"displacement_first": [0, 0], "displacement_last": [0, -(DISPARITIES - 1)], "displacement_step": [1, -1], "scale": 1.0}
"""GwcNet's window: slot d is disparity d, B read d pixels to the left."""


# --- layers --------------------------------------------------------------------------------------------------------


class Several(nn.Module):
    """Several volumes of the same two maps, one output each: one export for them all."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, left, right):
        return tuple(layer(left, right) for layer in self.layers)


Write = tuple[int, int, int, int]
"""(slot, a, b, at): `volume[..., slot, :, at:at + n] = reduce(left[..., a:a + n] * right[..., b:b + n])`."""


class Writes(nn.Module):
    """A volume filled by hand, one `Write` after another, n = W - max(a, b, at) each: grouped
    `[B, G, slots, H, W]` (the product viewed `[B, G, C/G, H, n]`, reduced over axis `dim`, 2 unless
    told) or, `groups` None, `[B, slots, H, W]` (reduced over axis 1). `fill` the volume's initial
    value, `reduce` "mean", "sum" or "amax", `extra` added to every written value."""

    def __init__(self, writes: list[Write], slots: int = DISPARITIES, groups: int | None = GROUPS, fill: float = 0.0,
                 reduce: str = "mean", dim: int | None = None, extra: float = 0.0) -> None:
        super().__init__()
        self.writes, self.slots, self.groups, self.fill = writes, slots, groups, fill
        self.reduce, self.dim, self.extra = reduce, dim, extra

    def forward(self, left, right):
        batch, channels, h, w = left.shape
        shape = [batch, self.groups, self.slots, h, w] if self.groups else [batch, self.slots, h, w]
        volume = left.new_full(shape, self.fill) if self.fill else left.new_zeros(shape)
        for slot, a, b, at in self.writes:
            n = w - max(a, b, at)
            product = left[..., a : a + n] * right[..., b : b + n]
            if self.groups:
                product = product.view(batch, self.groups, channels // self.groups, h, n)
            cost = getattr(product, self.reduce)(dim=self.dim or (2 if self.groups else 1))
            if self.extra:
                cost = cost + self.extra
            if self.groups:
                volume[:, :, slot, :, at : at + n] = cost
            else:
                volume[:, slot, :, at : at + n] = cost
        return volume


def gwc_writes(disparities: list[int] | range = range(DISPARITIES)) -> list[Write]:
    """GwcNet's writes: disparity d into slot d at offset d."""
    return [(d, d, 0, d) for d in disparities]


RECOGNIZED: dict[str, tuple[nn.Module, dict]] = {
    "groupwise": (GroupwiseVolume(DISPARITIES, GROUPS), GWC | {"groups": GROUPS, "reduction": "mean"}),
    "correlation": (CorrelationVolume(DISPARITIES), GWC | {"groups": 1, "reduction": "mean"}),
    "groupwise-sum": (GroupwiseVolume(DISPARITIES, GROUPS, "sum"), GWC | {"groups": GROUPS, "reduction": "sum"}),
    "correlation-sum": (CorrelationVolume(DISPARITIES, "sum"), GWC | {"groups": 1, "reduction": "sum"}),
    "written-in-reverse": (Writes(gwc_writes()[::-1]), GWC | {"groups": GROUPS, "reduction": "mean"}),
    "one-group-shuffled": (Writes([gwc_writes()[k] for k in (2, 0, 3, 1)], groups=None), GWC | {"groups": 1, "reduction": "mean"}),
    "descending-slots": (
        Writes([(DISPARITIES - 1 - d, d, 0, d) for d in range(DISPARITIES)]),
        {"displacement_first": [0, -(DISPARITIES - 1)], "displacement_last": [0, 0], "displacement_step": [1, 1], "scale": 1.0,
         "groups": GROUPS, "reduction": "mean"},
    ),
    "disparity-step-2": (
        Writes([(k, 2 * k, 0, 2 * k) for k in range(DISPARITIES)], reduce="sum"),
        {"displacement_first": [0, 0], "displacement_last": [0, -2 * (DISPARITIES - 1)], "displacement_step": [1, -2], "scale": 1.0,
         "groups": GROUPS, "reduction": "sum"},
    ),
    "right-against-left": (
        Writes([(d, d, 0, 0) for d in range(DISPARITIES)]),
        {"displacement_first": [0, 0], "displacement_last": [0, DISPARITIES - 1], "displacement_step": [1, 1], "scale": 1.0,
         "groups": GROUPS, "reduction": "mean"},
    ),
}
"""Volumes that are one LocalCorrelation, and its attributes. `right-against-left` writes
`left[..., d:] * right[..., :-d]` at `:-d`: A = right, B = left read d pixels to the right."""

LOOK_ALIKES: dict[str, nn.Module] = {
    "non-zero-fill": Writes(gwc_writes(), fill=0.5),
    "written-one-pixel-right": Writes([(d, d, 0, d + (d == 2)) for d in range(DISPARITIES)]),
    "unshifted-product": Writes([(d, d, d, d) for d in range(DISPARITIES)]),
    "missing-disparity": Writes(gwc_writes([0, 1, 3])),
    "repeated-disparity": Writes(gwc_writes([0, 1]) + [(2, 1, 0, 1), (3, 3, 0, 3)]),
    "reduced-over-rows": Writes(gwc_writes(), dim=3),
    "max-over-channels": Writes(gwc_writes(), reduce="amax"),
    "written-plus-a-constant": Writes(gwc_writes(), extra=1.0),
}
"""Volumes that differ from GwcNet's in one thing: a fill of 0.5; disparity 2 written one pixel
right of its window; both maps read at the same offset (no shift) but written from offset d; slot 2
never written; disparity 1 written again into slot 2; the product reduced over the rows (H = C/G);
a max over channels; 1 added to every value."""


# --- helpers -------------------------------------------------------------------------------------------------------


def export(module: nn.Module, shape: tuple[int, ...], dynamo: bool, symbolic: bool = False) -> onnx.ModelProto:
    """Both maps of feature `shape` through `module`, exported (dynamo at opset 18, TorchScript at 17),
    symbolic batch, H and W when `symbolic` (the example batch is then 2, as torch.export needs)."""
    module.eval()
    example = (max(shape[0], 2) if symbolic else shape[0], *shape[1:])
    return convlower.export(module, (torch.randn(*example), torch.randn(*example)), dynamo=dynamo, opset=18 if dynamo else 17,
                            dynamic_axes=SYMBOLIC if symbolic else None)


def feeds(shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(sum(shape))
    return {name: rng.standard_normal(shape, dtype=np.float32) for name in ("left", "right")}


EXPORTED: dict[tuple[int, tuple[int, ...]], list[np.ndarray]] = {}
"""The outputs of each export (by id) at each shape, computed once: several tests compare with them."""


def exported_outputs(exported: onnx.ModelProto, shape: tuple[int, ...]) -> list[np.ndarray]:
    key = (id(exported), shape)
    if key not in EXPORTED:
        EXPORTED[key] = run(exported, feeds(shape))
    return EXPORTED[key]


def assert_equal_to_export(candidate: onnx.ModelProto, exported: onnx.ModelProto, shapes: list[tuple[int, ...]]) -> None:
    for shape in shapes:
        for index, (got, want) in enumerate(zip(run(candidate, feeds(shape)), exported_outputs(exported, shape), strict=True)):
            np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL, err_msg=f"output {index} at {shape}")


def correlations(model: onnx.ModelProto) -> list[gs.Node | None]:
    """Per output of the recognized model, the LocalCorrelation that computes it (through the Identity
    dynamo exports end with and the Squeeze of a one-group layout), or None."""
    found = []
    for output in import_graph(model).outputs:
        node = output.inputs[0] if output.inputs else None
        while node is not None and node.op in ("Identity", "Squeeze"):
            node = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
        found.append(node if node is not None and node.domain == DOMAIN and node.op == "LocalCorrelation" else None)
    return found


def assert_no_scatter_left(model: onnx.ModelProto) -> None:
    assert not [n.op_type for n in model.graph.node if n.op_type in ("ScatterND", "ScatterElements")]


def lowered(model: onnx.ModelProto, variant: str) -> onnx.ModelProto:
    """The model with every LocalCorrelation lowered to `variant`."""
    result = convlower.lower(model, [f"LocalCorrelation={variant}"])
    assert result.nodes and {n.variant for n in result.nodes} == {variant}, result.nodes
    assert not [n for n in result.model.graph.node if n.domain == DOMAIN]
    return result.model


def dim_params(values) -> list[list[str]]:
    return [[d.dim_param for d in v.type.tensor_type.shape.dim] for v in values]


def assert_keeps_symbolic_dims(written: onnx.ModelProto, exported: onnx.ModelProto) -> None:
    """The written model declares its inputs and outputs as the export did, batch, h and w symbolic."""
    assert dim_params(written.graph.input) == dim_params(exported.graph.input) == [["batch", "", "h", "w"]] * 2
    assert [v.type for v in written.graph.output] == [v.type for v in exported.graph.output]


# --- static dims: GwcNet's volumes, their variations and their look-alikes in one export --------------------------------


DYNAMO_SUBSET = ["groupwise", "correlation-sum", "descending-slots", "disparity-step-2", "non-zero-fill",
                 "written-one-pixel-right", "missing-disparity"]
"""What the dynamo export holds: its scatters differ from TorchScript's, not what is read from them,
and it takes seconds per volume."""


@pytest.fixture(scope="module", params=EXPORTERS)
def static_export(request: pytest.FixtureRequest) -> tuple[list[str], onnx.ModelProto, onnx.ModelProto]:
    """Volumes of RECOGNIZED, then of LOOK_ALIKES (all of them, or for dynamo DYNAMO_SUBSET), exported at
    PROFILE: their names, the export, and the model as recognized."""
    layers = {name: layer for name, (layer, _) in RECOGNIZED.items()} | LOOK_ALIKES
    names = [name for name in layers if not request.param or name in DYNAMO_SUBSET]
    model = export(Several([layers[name] for name in names]), PROFILE, dynamo=request.param)
    return names, model, recognized_model(model)


def test_static_volumes_are_one_local_correlation_each(static_export: tuple[list[str], onnx.ModelProto, onnx.ModelProto]) -> None:
    """Each exporter, static dims: every volume of RECOGNIZED is a LocalCorrelation of the two maps with
    its window, groups and reduction, none of LOOK_ALIKES is; as recognized and lowered, equal to the export."""
    names, model, recognized = static_export
    found = dict(zip(names, correlations(recognized), strict=True))
    assert [name for name, node in found.items() if node is not None] == [name for name in names if name in RECOGNIZED]
    for name, node in found.items():
        if node is not None:
            assert node.attrs == RECOGNIZED[name][1], name
            maps = ["right", "left"] if name == "right-against-left" else ["left", "right"]
            assert [t.name for t in node.inputs] == maps, name
    assert_equal_to_export(recognized, model, [PROFILE])
    assert_equal_to_export(lowered(recognized, "banded_matmul"), model, [PROFILE])


def test_look_alikes_keep_their_scatters(static_export: tuple[list[str], onnx.ModelProto, onnx.ModelProto]) -> None:
    """A look-alike's volume is still what its scatters leave (an Identity of it in dynamo exports)."""
    names, _, recognized = static_export
    outputs = dict(zip(names, import_graph(recognized).outputs, strict=True))
    producers = {name: outputs[name].inputs[0].op for name in names if name in LOOK_ALIKES}
    assert set(producers.values()) <= {"ScatterND", "ScatterElements", "Identity"}, producers


# --- symbolic batch, H and W ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=EXPORTERS)
def symbolic_export(request: pytest.FixtureRequest) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """GwcNet's two volumes exported with symbolic batch, H and W; and the model as recognized."""
    model = export(Several([RECOGNIZED["groupwise"][0], RECOGNIZED["correlation"][0]]), PROFILE, request.param, symbolic=True)
    return model, recognized_model(model)


def test_symbolic_volumes_are_one_local_correlation_each(symbolic_export: tuple[onnx.ModelProto, onnx.ModelProto]) -> None:
    """Each exporter, symbolic dims: both volumes recognized, no scatter left, equal to the export at two
    sizes as recognized and with each lowering; lowered, the model declares its inputs and outputs as
    the export did."""
    model, recognized = symbolic_export
    assert [node.attrs if node else None for node in correlations(recognized)] == [RECOGNIZED[n][1] for n in ("groupwise", "correlation")]
    assert_no_scatter_left(recognized)
    assert_equal_to_export(recognized, model, [PROFILE, OTHER])
    assert_keeps_symbolic_dims(lowered(model, "banded_matmul"), model)
    for variant in CORRELATION_VARIANTS:
        assert_equal_to_export(lowered(recognized, variant), model, [PROFILE, OTHER])


def test_recognition_is_deterministic(symbolic_export: tuple[onnx.ModelProto, onnx.ModelProto]) -> None:
    """Planning and rewriting each import the model afresh: both must find the same graph."""
    assert recognized_model(symbolic_export[0]) == symbolic_export[1]


def test_optimize_recognizes_a_symbolic_export_at_one_profile(symbolic_export: tuple[onnx.ModelProto, onnx.ModelProto]) -> None:
    """`convlower.optimize` at one profiling shape: both volumes recognized and tuned; the model it writes
    keeps the symbolic dims and equals the export at the profile and at another shape."""
    model = symbolic_export[0]
    result = convlower.optimize(model, input_shapes={"left": PROFILE, "right": PROFILE}, guard=False, cache=None, threads=1,
                                variants=["LocalCorrelation=banded_matmul,stacked_mul_reduce"])
    assert [n.op for n in result.report.nodes if n.recognized] == ["LocalCorrelation"] * 2
    assert not [n for n in result.model.graph.node if n.domain == DOMAIN]
    assert_no_scatter_left(result.model)
    assert_keeps_symbolic_dims(result.model, model)
    assert_equal_to_export(result.model, model, [PROFILE, OTHER])


def test_optimize_a_symbolic_stereo_net() -> None:
    """GwcNet's volume between a shared encoder and a 3-D conv head (`StereoNet`), TorchScript, symbolic
    batch, H and W: optimized at one profile, equal to the export at another."""
    module = StereoNet("groupwise", channels=CHANNELS, max_disparity=DISPARITIES, groups=GROUPS)
    images, other = (1, 3, 8, 20), (2, 3, 14, 26)
    model = export(module, images, dynamo=False, symbolic=True)
    result = convlower.optimize(model, input_shapes={"left": images, "right": images}, guard=False, cache=None, threads=1,
                                variants=["LocalCorrelation=banded_matmul"])
    assert [n.op for n in result.report.nodes if n.recognized] == ["LocalCorrelation"]
    assert_no_scatter_left(result.model)
    assert_equal_to_export(result.model, model, [images, other])


def test_optimize_a_dynamo_stereo_net_whose_frames_have_dims_of_their_own() -> None:
    """dynamo with `Dim.AUTO` names each frame's height and width apart (the net accepts frames whose
    sizes differ and meet after the encoder's stride), so recognizers bind the two frames to equal trial
    sizes (symbolic._twin_keys): optimized at one profile, the volume is found, and the model equals the
    export at frames of unequal sizes that the tuner never saw."""
    module = StereoNet("groupwise", channels=CHANNELS, max_disparity=DISPARITIES, groups=GROUPS).eval()
    images = (2, 3, 8, 20)
    auto = {axis: torch.export.Dim.AUTO for axis in (0, 2, 3)}
    model = torch.onnx.export(module, (torch.randn(images), torch.randn(images)), dynamo=True, opset_version=18,
                              input_names=["left", "right"], dynamic_shapes=(auto, auto), verbose=False).model_proto
    assert dim_params(model.graph.input)[0][2:] != dim_params(model.graph.input)[1][2:], "the frames share dim names"
    result = convlower.optimize(model, input_shapes={"left": images, "right": images}, guard=False, cache=None, threads=1,
                                variants=["LocalCorrelation=banded_matmul"])
    assert [n.op for n in result.report.nodes if n.recognized] == ["LocalCorrelation"]
    assert_no_scatter_left(result.model)
    rng = np.random.default_rng(3)
    unequal = {"left": rng.standard_normal((1, 3, 14, 26), dtype=np.float32),
               "right": rng.standard_normal((1, 3, 13, 25), dtype=np.float32)}
    for got, want in zip(run(result.model, unequal), run(model, unequal), strict=True):
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)


# --- other spatial ranks -----------------------------------------------------------------------------------------------


class SequenceVolume(nn.Module):
    """The one-group volume of two sequences `[B, C, T]`: `volume[:, i, i:] = (left[..., i:] * right[..., :-i]).mean(1)`."""

    def forward(self, left, right):
        volume = left.new_zeros([left.shape[0], DISPARITIES, left.shape[2]])
        for i in range(DISPARITIES):
            volume[:, i, i:] = (left[..., i:] * right[..., : left.shape[2] - i]).mean(1)
        return volume


class FlowVolume(nn.Module):
    """A 3x3 window of downward and rightward displacements (row-major), one group, summed:
    `volume[:, 3*i + j, :H-i, :W-j] = (left[:, :, :H-i, :W-j] * right[:, :, i:, j:]).sum(1)`."""

    def forward(self, left, right):
        h, w = left.shape[2:]
        volume = left.new_zeros([left.shape[0], 9, h, w])
        for i in range(3):
            for j in range(3):
                volume[:, 3 * i + j, : h - i, : w - j] = (left[:, :, : h - i, : w - j] * right[:, :, i:, j:]).sum(1)
        return volume


@pytest.mark.parametrize(
    "module, shape, attrs",
    [
        pytest.param(SequenceVolume(), (2, CHANNELS, 11), {"displacement_first": [0], "displacement_last": [-(DISPARITIES - 1)],
                                                           "displacement_step": [-1], "reduction": "mean"}, id="1d-sequence"),
        pytest.param(FlowVolume(), (2, CHANNELS, 5, 7), {"displacement_first": [0, 0], "displacement_last": [2, 2],
                                                         "displacement_step": [1, 1], "reduction": "sum"}, id="2d-window"),
    ],
)
def test_other_ranks_and_windows(module: nn.Module, shape: tuple[int, ...], attrs: dict) -> None:
    """TorchScript, static dims: a 1-D volume, and a 2-D window of displacements written one slot per offset."""
    model = export(module, shape, dynamo=False)
    recognized = recognized_model(model)
    (node,) = correlations(recognized)
    assert node is not None and node.attrs == attrs | {"groups": 1, "scale": 1.0}
    assert_equal_to_export(recognized, model, [shape])
    assert_equal_to_export(lowered(recognized, "stacked_mul_reduce"), model, [shape])
