"""Recognition of local correlations written with `F.unfold` / `nn.Unfold` as one
`convlower.LocalCorrelation` (passes/local_correlation/recognize_unfold_correlation.py).

The idioms (models/correlation_idioms.py's `UnfoldCorrelation` and `UnfoldStereo`, and variations
written here) are exported for real by both torch exporters (TorchScript at opset 17, dynamo at
18), with static and with symbolic batch/H/W, recognized, run on onnxruntime as recognized (the
node through its model-local function) and lowered by every LocalCorrelation variant, and compared
with torch eager; symbolic exports run at two sizes. Look-alikes must not become a
LocalCorrelation, and must still compute what torch does. Exports are shared by module-scoped
fixtures, several layers to one export, so that the file stays quick.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

import convlower
from convlower.modelio import default_opset
from convlower.models.correlation_idioms import UnfoldCorrelation, UnfoldStereo
from convlower.passes import FAMILIES, RECOGNIZERS
from convlower.passes.local_functions import DOMAIN
from convlower.passes.local_correlation.recognize_unfold_correlation import recognize_unfold_correlations
from convlower.passes.dynamic_filter.recognize_unfold_filter import recognize_dynamic_filters
from convlower.passes.unfold.recognize_unfold import recognize_unfolds
from convlower.rewrite import import_graph
from convlower.shapes import infer_shapes
from tests.helpers import run
from tests.test_recognize import ATOL, RTOL, recognized_model

torch = pytest.importorskip("torch")
F = torch.nn.functional
nn = torch.nn

KERNEL = 3
DISPARITIES = 4
GROUPS = 2
CHANNELS = 8
SIZES = [(2, CHANNELS, 6, 10), (3, CHANNELS, 7, 5)]
"""Feature maps `[N, C, H, W]`: the export's, and another for symbolic exports."""
NAMES = ("f1", "f2")
SYMBOLIC = {name: {0: "batch", 2: "h", 3: "w"} for name in NAMES}
LOWERINGS = FAMILIES["localcorrelation"].variant_names


# --- the layers ---------------------------------------------------------------------------------------------


class Several(nn.Module):
    """Several correlation layers of the same two maps, one output each: one export for them all."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        super().__init__()
        self.names = list(layers)
        self.layers = nn.ModuleList(layers.values())

    def forward(self, f1, f2):
        return tuple(layer(f1, f2) for layer in self.layers)


class Written(nn.Module):
    """A correlation (or a look-alike) written as `body(f1, f2)`: each one a variation of the idioms."""

    def __init__(self, body: Callable) -> None:
        super().__init__()
        self.body = body

    def forward(self, f1, f2):
        return self.body(f1, f2)


def windows(f2, kernel: int = KERNEL, dilation: int = 1):
    """UnfoldCorrelation's view `[b, c, k*k, h, w]` of the second map's windows."""
    b, c, h, w = f2.shape
    return F.unfold(f2, kernel, dilation=dilation, padding=kernel // 2 * dilation).view(b, c, kernel * kernel, h, w)


def stereo_windows(right, pad: tuple[int, int, int, int] = (DISPARITIES - 1, 0, 0, 0), mode: str = "constant", value: float = 0.0):
    """UnfoldStereo's view `[b, c, D, h, w]` after an F.pad of the right map."""
    b, c, h, w = right.shape
    value_arg = {"value": value} if mode == "constant" else {}
    padded = F.pad(right, pad, mode=mode, **value_arg)
    return F.unfold(padded, (1, DISPARITIES)).view(b, c, DISPARITIES, h, w)


def split_taps(f1, f2, kernel: int = KERNEL, dilation: int = 1):
    """The view `[b, c, k, k, h, w]`: taps per window axis, output `[b, k, k, h, w]`."""
    b, c, h, w = f2.shape
    cols = F.unfold(f2, kernel, dilation=dilation, padding=kernel // 2 * dilation).view(b, c, kernel, kernel, h, w)
    return (cols * f1[:, :, None, None]).sum(1)


def grouped(f1, f2):
    """GwcNet's group-wise correlation over unfolded windows: `[b, G, K, h, w]`, the mean per group."""
    b, c, h, w = f2.shape
    cols = windows(f2).view(b, GROUPS, c // GROUPS, KERNEL * KERNEL, h, w)
    return (cols * f1.view(b, GROUPS, c // GROUPS, 1, h, w)).mean(2)


VARIATIONS: dict[str, tuple[Callable, dict]] = {
    # name: (layer body, the LocalCorrelation expected: attributes, and which maps are A and B)
    "mean": (lambda f1, f2: (windows(f2) * f1[:, :, None]).mean(1),
             {"first": [-1, -1], "last": [1, 1], "step": [1, 1], "reduction": "mean"}),
    "keepdim": (lambda f1, f2: (f1.unsqueeze(2) * windows(f2)).sum(1, keepdim=True),
                {"first": [-1, -1], "last": [1, 1], "step": [1, 1]}),
    "einsum": (lambda f1, f2: torch.einsum("bckhw,bchw->bkhw", windows(f2), f1),
               {"first": [-1, -1], "last": [1, 1], "step": [1, 1]}),
    "einsum_channels_last": (lambda f1, f2: torch.einsum("bchw,bckhw->bhwk", f1, windows(f2)),
                             {"first": [-1, -1], "last": [1, 1], "step": [1, 1]}),
    "split_taps": (split_taps, {"first": [-1, -1], "last": [1, 1], "step": [1, 1]}),
    "split_taps_flipped": (lambda f1, f2: split_taps(f1, f2, kernel=5).flip(1, 2), {"first": [2, 2], "last": [-2, -2], "step": [-1, -1]}),
    "one_tap_axis_flipped": (lambda f1, f2: split_taps(f1, f2, dilation=2).flip(2), {"first": [-2, 2], "last": [2, -2], "step": [2, -2]}),
    "merged_taps_flipped": (lambda f1, f2: (windows(f2) * f1[:, :, None]).sum(1).flip(1),
                            {"first": [1, 1], "last": [-1, -1], "step": [-1, -1]}),
    "dilated": (lambda f1, f2: (windows(f2, dilation=2) * f1[:, :, None]).sum(1), {"first": [-2, -2], "last": [2, 2], "step": [2, 2]}),
    "groups": (grouped, {"first": [-1, -1], "last": [1, 1], "step": [1, 1], "groups": GROUPS, "reduction": "mean"}),
    "pad_on_the_right": (lambda f1, f2: (f1.unsqueeze(2) * stereo_windows(f2, (0, DISPARITIES - 1, 0, 0))).sum(1),
                         {"first": [0, 0], "last": [0, DISPARITIES - 1], "step": [1, 1]}),
    "pad_split": (lambda f1, f2: (f1.unsqueeze(2) * stereo_windows(f2, (1, DISPARITIES - 2, 0, 0))).sum(1),
                  {"first": [0, -1], "last": [0, DISPARITIES - 2], "step": [1, 1]}),
    "maps_swapped": (lambda f1, f2: (windows(f1) * f2[:, :, None]).sum(1),
                     {"first": [-1, -1], "last": [1, 1], "step": [1, 1], "a": "f2", "b": "f1"}),
    "flip_of_rows_kept": (lambda f1, f2: (f1.unsqueeze(2) * stereo_windows(f2)).sum(1).flip(2),
                          {"first": [0, -(DISPARITIES - 1)], "last": [0, 0], "step": [1, 1], "after": ["Slice"]}),
}
"""Variations of the idioms: each is recognized, its flip folded where it reverses taps only
(a flip of rows stays a Slice after the correlation). Each differs from the others in its unfold,
product or sum: the dynamo exporter merges equal subexpressions, and a flip of a sum that is also
used unflipped stays a Slice."""

LOOK_ALIKES: dict[str, Callable] = {
    "sum_over_taps": lambda f1, f2: (windows(f2) * f1[:, :, None]).sum(2),
    "sum_over_channels_and_taps": lambda f1, f2: (windows(f2) * f1[:, :, None]).sum((1, 2)),
    "max_over_channels": lambda f1, f2: (windows(f2) * f1[:, :, None]).amax(1),
    "reflect_pad": lambda f1, f2: (f1.unsqueeze(2) * stereo_windows(f2, mode="reflect")).sum(1),
    "replicate_pad": lambda f1, f2: (f1.unsqueeze(2) * stereo_windows(f2, mode="replicate")).sum(1),
    "non_zero_fill": lambda f1, f2: (f1.unsqueeze(2) * stereo_windows(f2, value=0.5)).sum(1),
    "map_broadcast_over_the_batch": lambda f1, f2: (windows(f2) * f1[:1, :, None]).sum(1),
    "two_unfolds": lambda f1, f2: (windows(f2) * windows(f1)).sum(1),
    "strided": lambda f1, f2: (F.unfold(f2, KERNEL, padding=1, stride=2).view(f2.shape[0], CHANNELS, KERNEL**2, 3, 5)
                               * f1[:, :, None, ::2, ::2]).sum(1),
}
"""Products of unfolded windows that are not a local correlation of two maps of one shape, or mean
something else at the border: none may become a LocalCorrelation."""


# --- exporting, checking ----------------------------------------------------------------------------------------


def maps(size: tuple[int, ...], seed: int = 0) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(size, generator=generator) for _ in NAMES)


def export(module: nn.Module, dynamo: bool, symbolic: bool) -> onnx.ModelProto:
    """`convlower.export` (dynamo at opset 18, TorchScript at 17) at the first of SIZES."""
    return convlower.export(module.eval(), maps(SIZES[0]), dynamo=dynamo, opset=18 if dynamo else 17,
                            input_names=NAMES, dynamic_axes=SYMBOLIC if symbolic else None)


def eager(module: nn.Module, inputs: tuple) -> list[np.ndarray]:
    with torch.inference_mode():
        outputs = module(*inputs)
    return [t.numpy() for t in (outputs if isinstance(outputs, tuple) else (outputs,))]


def assert_equal_to_torch(model: onnx.ModelProto, module: nn.Module, sizes: list[tuple[int, ...]]) -> None:
    """Every output of `model` equals torch's at each size."""
    for seed, size in enumerate(sizes):
        inputs = maps(size, seed)
        got = run(model, {name: t.numpy() for name, t in zip(NAMES, inputs)})
        for name, g, e in zip([o.name for o in model.graph.output], got, eager(module, inputs)):
            np.testing.assert_allclose(g, e, atol=ATOL, rtol=RTOL, err_msg=f"{name} at {size}")


def correlation_behind(graph: gs.Graph, output: str) -> tuple[gs.Node, list[str]]:
    """The LocalCorrelation an output is computed from, and the ops between them (output first)."""
    tensor, between = graph.tensors()[output], []
    while tensor.inputs:
        node = tensor.inputs[0]
        if node.op == "LocalCorrelation":
            return node, between
        between.append(node.op)
        tensor = node.inputs[0]
    raise AssertionError(f"{output} comes from no LocalCorrelation (through {between})")


def assert_correlation(graph: gs.Graph, output: str, expected: dict) -> gs.Node:
    """The output is one LocalCorrelation of the expected maps and window, then layout ops only."""
    node, between = correlation_behind(graph, output)
    assert node.attrs["displacement_first"] == expected["first"], output
    assert node.attrs["displacement_last"] == expected["last"], output
    assert node.attrs["displacement_step"] == expected["step"], output
    assert node.attrs["groups"] == expected.get("groups", 1), output
    assert node.attrs["reduction"] == expected.get("reduction", "sum"), output
    assert [t.name for t in node.inputs] == [expected.get("a", "f1"), expected.get("b", "f2")], output
    layout = [op for op in between if op not in ("Squeeze", "Reshape", "Transpose")]
    assert layout == expected.get("after", []), (output, between)
    return node


def output_names(model: onnx.ModelProto) -> list[str]:
    return [o.name for o in model.graph.output]


def symbolic_dims(model: onnx.ModelProto) -> list[list[str | int]]:
    """Each input's and output's dims: the name of a symbolic dim, the size of a static one."""
    return [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*model.graph.input, *model.graph.output]]


# --- the idioms, as models/correlation_idioms.py writes them ------------------------------------------------------


IDIOMS = {"flow": (UnfoldCorrelation(KERNEL), {"first": [-1, -1], "last": [1, 1], "step": [1, 1]}),
          "stereo": (UnfoldStereo(DISPARITIES), {"first": [0, 0], "last": [0, -(DISPARITIES - 1)], "step": [1, -1]})}
"""UnfoldCorrelation's symmetric window; UnfoldStereo's left pad and flip: disparity d <-> δ = -d."""
BOTH = Several({name: layer for name, (layer, _) in IDIOMS.items()})


@pytest.fixture(scope="module", params=[False, True], ids=["legacy", "dynamo"])
def exporter(request) -> bool:
    return request.param


@functools.cache
def idioms_model(dynamo: bool, symbolic: bool) -> onnx.ModelProto:
    """BOTH exported once per exporter and kind of dims, for every test that reads it."""
    return export(BOTH, dynamo, symbolic)


@pytest.fixture(scope="module", params=[False, True], ids=["static", "symbolic"])
def idioms_export(request, exporter: bool) -> tuple[onnx.ModelProto, bool]:
    return idioms_model(exporter, request.param), request.param


def test_idioms_become_one_local_correlation_each(idioms_export: tuple[onnx.ModelProto, bool]) -> None:
    """UnfoldCorrelation and UnfoldStereo: one LocalCorrelation each, the unfolds, products, sums
    and the flip gone (neither the DynamicFilter nor the plain Unfold recognizer takes them); as
    recognized and as every lowering (banded_matmul alone under symbolic dims, where each lowering
    recognizes anew at trial sizes), equal to torch, at two sizes where the dims are symbolic, which
    the models keep. Recognition is deterministic."""
    model, symbolic = idioms_export
    graph = import_graph(model)
    for name, output in zip(IDIOMS, output_names(model)):
        assert_correlation(graph, output, IDIOMS[name][1])
    assert [n.op for n in graph.nodes if n.domain == DOMAIN] == ["LocalCorrelation"] * 2
    assert not [n.op for n in graph.nodes if n.op in ("Gather", "Pad", "Mul", "ReduceSum", "Slice", "Transpose")]
    recognized = recognized_model(model)
    assert recognized == recognized_model(model)
    sizes = SIZES if symbolic else SIZES[:1]
    assert_equal_to_torch(recognized, BOTH, sizes)
    for variant in ["banded_matmul"] if symbolic else LOWERINGS:
        lowered = convlower.lower(model, [f"LocalCorrelation={variant}"])
        assert [o.variant for o in lowered.nodes] == [variant] * 2
        assert not [n for n in lowered.model.graph.node if n.domain == DOMAIN]
        assert_equal_to_torch(lowered.model, BOTH, sizes)
    if symbolic:
        wanted = [["batch", CHANNELS, "h", "w"]] * 2
        assert symbolic_dims(recognized)[:2] == wanted and symbolic_dims(lowered.model)[:2] == wanted


def test_optimize_lowers_a_symbolic_export() -> None:
    """`convlower.optimize` at one profiling shape: both correlations recognized and lowered, the
    model written keeps its symbolic dims and equals torch at another shape too."""
    model = idioms_model(True, True)
    result = convlower.optimize(model, input_shapes={name: SIZES[0] for name in NAMES}, guard=False, cache=None,
                                threads=1, variants=["LocalCorrelation=shift_mul_reduce"])
    nodes = [n for n in result.report.nodes if n.op == "LocalCorrelation"]
    assert len(nodes) == 2 and all(n.recognized and n.chosen == "shift_mul_reduce" for n in nodes)
    assert not [n for n in result.model.graph.node if n.domain == DOMAIN or n.op_type == "Transpose"]  # nor the unfolds
    assert symbolic_dims(result.model)[:2] == [["batch", CHANNELS, "h", "w"]] * 2
    assert_equal_to_torch(result.model, BOTH, SIZES)


# --- variations -------------------------------------------------------------------------------------------------


VARIED = Several({name: Written(body) for name, (body, _) in VARIATIONS.items()})


@pytest.fixture(scope="module")
def variations_export(exporter: bool) -> onnx.ModelProto:
    return export(VARIED, exporter, False)


def test_variations_are_recognized(variations_export: onnx.ModelProto) -> None:
    """Mean, keepdim, einsum (an output order of its own: a Transpose), taps on two axes, flips of
    either or both tap axes, dilation, channel groups, pads on the other side or split, the maps
    the other way round: each one LocalCorrelation with the window its pads and flips make, equal
    to torch as recognized and as lowered (banded_matmul: the lowering that reads the most of the
    node's shape; the op's own tests check every lowering against its definition)."""
    graph = import_graph(variations_export)
    for name, output in zip(VARIATIONS, output_names(variations_export)):
        assert_correlation(graph, output, VARIATIONS[name][1])
    assert [n.op for n in graph.nodes if n.domain == DOMAIN] == ["LocalCorrelation"] * len(VARIATIONS)
    assert_equal_to_torch(recognized_model(variations_export), VARIED, SIZES[:1])
    lowered = convlower.lower(variations_export, ["LocalCorrelation=banded_matmul"])
    assert [o.variant for o in lowered.nodes] == ["banded_matmul"] * len(VARIATIONS)
    assert_equal_to_torch(lowered.model, VARIED, SIZES[:1])


# --- look-alikes --------------------------------------------------------------------------------------------------


LOOKING_ALIKE = Several({name: Written(body) for name, body in LOOK_ALIKES.items()})


@pytest.fixture(scope="module")
def look_alikes_export(exporter: bool) -> onnx.ModelProto:
    return export(LOOKING_ALIKE, exporter, False)


def test_look_alikes_are_left_alone(look_alikes_export: onnx.ModelProto) -> None:
    """A sum over the taps (or over channels and taps), a max, reflect/replicate/non-zero padding,
    a map broadcast over the batch, a product of two unfolds, a strided window: no
    LocalCorrelation, and the model as recognized (the plain Unfold recognizer takes the unfolds
    it can) still equals torch."""
    graph = import_graph(look_alikes_export)
    assert "LocalCorrelation" not in {n.op for n in graph.nodes}
    assert_equal_to_torch(recognized_model(look_alikes_export), LOOKING_ALIKE, SIZES[:1])


def test_this_recognizer_alone_leaves_look_alikes_untouched(look_alikes_export: onnx.ModelProto) -> None:
    """Run by itself on the exported graph, the recognizer changes nothing."""
    graph = gs.import_onnx(infer_shapes(look_alikes_export))
    before = [(n.op, [t.name for t in n.inputs], [t.name for t in n.outputs]) for n in graph.nodes]
    recognize_unfold_correlations(graph, default_opset(look_alikes_export))
    assert [(n.op, [t.name for t in n.inputs], [t.name for t in n.outputs]) for n in graph.nodes] == before


def test_runs_between_the_dynamic_filter_and_the_plain_unfold_recognizers() -> None:
    """The DynamicFilter recognizer (a sum over the taps) may run first: it never takes a sum over
    channels. The plain Unfold recognizer must run after this one, or it would take the unfold."""
    order = RECOGNIZERS.index
    assert order(recognize_dynamic_filters) < order(recognize_unfold_correlations) < order(recognize_unfolds)
