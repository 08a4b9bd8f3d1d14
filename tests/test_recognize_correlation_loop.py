"""Recognition of pad-once correlation loops as `convlower.LocalCorrelation` (passes/local_correlation/recognize_correlation_loop.py).

`PaddedShiftLoop` and `FlowNet("shift_loop")` (models/correlation_idioms.py), and variations written
here, are exported for real by both torch exporters (`convlower.export`: TorchScript at opset 17,
dynamo at 18), with static and with symbolic batch and spatial dims, recognized, run on onnxruntime
as recognized (the node through its model-local function) and lowered, and compared with torch
eager and with the export itself; symbolic exports run at two sizes. Look-alikes come out of
recognition untouched, and the shift-and-sum recognizer and this one leave each other's loops alone.
Exports are shared by module-scoped fixtures: dynamo exports take seconds each.
"""

from __future__ import annotations

import itertools
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

import convlower
from convlower.models.correlation_idioms import FlowNet, PaddedShiftLoop
from convlower.models.idioms import ShiftLoop
from convlower.passes import FAMILIES
from convlower.passes.local_functions import DOMAIN
from convlower.passes.local_correlation.recognize_correlation_loop import find_correlation_loops
from convlower.passes.dynamic_filter.recognize_shift_loop import recognize_shift_loops
from convlower.shapes import infer_shapes
from tests.helpers import op_types, run
from tests.test_recognize import canonical_nodes, recognized_model

torch = pytest.importorskip("torch")
F = torch.nn.functional
nn = torch.nn

ATOL = RTOL = 1e-4
LEGACY, DYNAMO = False, True
EXPORTERS = [pytest.param(LEGACY, id="legacy"), pytest.param(DYNAMO, id="dynamo")]
VARIANTS = FAMILIES["localcorrelation"].variant_names
CHANNELS = 8
SIZES = {1: [(2, 10), (3, 13)], 2: [(2, 6, 10), (3, 9, 7)]}
"""Per rank, (batch, *spatial) of the export (and the profiling shape) and of another run."""
AXES = {1: {0: "batch", 2: "w"}, 2: {0: "batch", 2: "h", 3: "w"}}
LOOP_GONE = {"Pad", "Slice", "ReduceMean", "ReduceSum"}


def export(module: nn.Module, inputs: tuple, dynamo: bool, axes: dict[int, str] | None = None) -> onnx.ModelProto:
    """The module exported by `convlower.export`; `axes` names the symbolic dims of every input."""
    module.eval()
    names = _input_names(module)
    dynamic = {name: axes for name in names} if axes else None
    return convlower.export(module, inputs, dynamo=dynamo, opset=18 if dynamo else 17, dynamic_axes=dynamic)


def _input_names(module: nn.Module) -> list[str]:
    return ["first", "second"] if isinstance(module, FlowNet) else ["f1", "f2"]


def pair(rank: int, which: int = 0, channels: int = CHANNELS, seed: int = 0) -> tuple:
    """Two feature maps at SIZES[rank][which]."""
    batch, *spatial = SIZES[rank][which]
    generator = torch.Generator().manual_seed(seed + which)
    return tuple(torch.randn(batch, channels, *spatial, generator=generator) for _ in range(2))


def feeds(module: nn.Module, inputs: tuple) -> dict[str, np.ndarray]:
    return {name: t.numpy() for name, t in zip(_input_names(module), inputs)}


def expected(module: nn.Module, inputs: tuple) -> np.ndarray:
    with torch.inference_mode():
        return module(*inputs).numpy()


def correlation_attrs(model: onnx.ModelProto) -> dict:
    """The one LocalCorrelation recognition leaves (the loop gone); its attributes."""
    (node,) = canonical_nodes(model)
    assert node.op == "LocalCorrelation"
    assert not LOOP_GONE & set(op_types(recognized_model(model))), op_types(recognized_model(model))
    return dict(node.attrs)


def window(first: int, last: int, step: int, rank: int, groups: int = 1, reduction: str = "mean") -> dict:
    return {
        "displacement_first": [first] * rank, "displacement_last": [last] * rank, "displacement_step": [step] * rank,
        "groups": groups, "reduction": reduction, "scale": 1.0,
    }


def assert_equal(model: onnx.ModelProto, module: nn.Module, runs: list[tuple], variants: list[str]) -> None:
    """As recognized and lowered to each of `variants`, the model equals torch eager and the export
    itself on each input tuple of `runs`."""
    candidates = {"recognized": recognized_model(model)}
    for variant in variants:
        result = convlower.lower(model, [f"LocalCorrelation={variant}"])
        assert [n.variant for n in result.nodes] == [variant], result.nodes
        assert not [n for n in result.model.graph.node if n.domain == DOMAIN]
        candidates[variant] = result.model
    for inputs in runs:
        want = expected(module, inputs)
        np.testing.assert_allclose(run(model, feeds(module, inputs))[0], want, atol=ATOL, rtol=RTOL, err_msg="export")
        for name, candidate in candidates.items():
            np.testing.assert_allclose(run(candidate, feeds(module, inputs))[0], want, atol=ATOL, rtol=RTOL, err_msg=name)


def declared(model: onnx.ModelProto) -> list:
    return [v.type for v in (*model.graph.input, *model.graph.output)]


def assert_left_alone(model: onnx.ModelProto) -> None:
    """No canonical node at all: neither this recognizer nor a dynamic-filter one took the loop."""
    assert not canonical_nodes(model)
    assert convlower.lower(model, ["LocalCorrelation=shift_mul_reduce"]).nodes == []


# --- PaddedShiftLoop, as the repositories write it -----------------------------------------------------------


LOOPS = {
    "cat-mean-2d": (dict(max_displacement=1), window(-1, 1, 1, 2)),
    "stack-sum-1d-step2": (dict(max_displacement=4, step=2, join="stack", reduction="sum", rank=1), window(-4, 4, 2, 1, reduction="sum")),
    "grouped-stack-2d": (dict(max_displacement=1, groups=2, join="stack"), window(-1, 1, 1, 2, groups=2)),
    "grouped-cat-sum-1d": (dict(max_displacement=2, groups=4, join="cat", reduction="sum", rank=1), window(-2, 2, 1, 1, groups=4, reduction="sum")),
}
"""name: (PaddedShiftLoop's arguments, the LocalCorrelation's attributes): FlowNet's cat of kept means,
FlowNetC's displacement step with a stack of unkept sums, GwcNet's group-wise layout [B, G, K, *S],
and group-wise costs concatenated displacement-major [B, K·G, *S]."""
LOWERING = dict(zip(LOOPS, itertools.cycle(VARIANTS)))
"""The variant each loop is also lowered to (each variant covered by each exporter; every variant
is checked against the definition in tests/test_local_correlation.py)."""


@pytest.fixture(scope="module")
def exports() -> Callable[[str, bool, bool], tuple[nn.Module, onnx.ModelProto]]:
    """(module, export) of LOOPS[name] by one exporter, static or symbolic, exported once per module."""
    made: dict[tuple[str, bool, bool], tuple[nn.Module, onnx.ModelProto]] = {}

    def get(name: str, dynamo: bool, symbolic: bool) -> tuple[nn.Module, onnx.ModelProto]:
        if (name, dynamo, symbolic) not in made:
            arguments = LOOPS[name][0]
            module = PaddedShiftLoop(**arguments)
            rank = arguments.get("rank", 2)
            made[name, dynamo, symbolic] = module, export(module, pair(rank), dynamo, AXES[rank] if symbolic else None)
        return made[name, dynamo, symbolic]

    return get


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("name", LOOPS)
def test_symbolic_loop_becomes_one_local_correlation(name: str, dynamo: bool, exports) -> None:
    """Symbolic batch and spatial dims: one LocalCorrelation with the loop's window, the model's
    inputs and outputs declared as the export declared them, equal to torch and to the export at
    the export's size and at another."""
    module, model = exports(name, dynamo, True)
    rank = module.rank
    assert correlation_attrs(model) == LOOPS[name][1]
    lowered = convlower.lower(model, [f"LocalCorrelation={LOWERING[name]}"]).model
    assert declared(lowered) == declared(model)
    assert_equal(model, module, [pair(rank, 0), pair(rank, 1)], [LOWERING[name]])


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("name", ["cat-mean-2d", "grouped-stack-2d"])
def test_static_loop_becomes_one_local_correlation(name: str, dynamo: bool, exports) -> None:
    module, model = exports(name, dynamo, False)
    assert correlation_attrs(model) == LOOPS[name][1]
    assert_equal(model, module, [pair(module.rank)], VARIANTS)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_optimize_flownet_keeps_symbolic_dims_and_equals_the_export(dynamo: bool) -> None:
    """FlowNet("shift_loop"): the correlation of two encoded frames, concatenated with the first
    (the TorchScript exporter merges both cats into one Concat: the costs are a run of its inputs).
    optimize at one profiling shape; the written model keeps the symbolic dims and equals the export
    and torch at that shape and at another."""
    module = FlowNet("shift_loop", channels=CHANNELS, max_displacement=1)
    images = [tuple(torch.randn(batch, 3, 2 * h, 2 * w) for _ in range(2)) for batch, h, w in SIZES[2]]
    model = export(module, images[0], dynamo, AXES[2])
    assert correlation_attrs(model) == window(-1, 1, 1, 2)
    assert "Concat" in op_types(recognized_model(model))
    shapes = {name: tuple(t.shape) for name, t in zip(_input_names(module), images[0])}
    result = convlower.optimize(model, input_shapes=shapes, cache=None, guard=False, provider="cpu")
    (node,) = [n for n in result.report.nodes if n.op == "LocalCorrelation"]
    assert node.recognized
    assert declared(result.model) == declared(model)
    assert [[d.dim_param for d in v.type.tensor_type.shape.dim] for v in result.model.graph.input] == [["batch", "", "h", "w"]] * 2
    assert_equal(result.model, module, images, [])


# --- variations written by hand ------------------------------------------------------------------------------


def row_major(offsets: range) -> list[tuple[int, int]]:
    return [(i, j) for i in offsets for j in offsets]


class HandCorrelation(nn.Module):
    """A 2-D pad-once correlation written out: `F.pad(f2, pads, mode, value)`, then for each (i, j)
    of `offsets`, in that order, `padded[:, :, i:i + h + longer, j:j + w + longer]` times `other`
    ("f1", cropped like the window; "window": the window itself; "f2": the unpadded map itself),
    reduced by `reduce` ("mean", "sum", "amax"; "none" keeps the product) over `dim` with keepdim,
    joined by `join` ("cat" on axis 1; "add": summed over the displacements)."""

    def __init__(self, offsets: list[tuple[int, int]], pads: tuple[int, ...] = (1, 1, 1, 1), mode: str = "constant",
                 value: float = 0.0, reduce: str = "mean", dim: int = 1, other: str = "f1", longer: int = 0,
                 join: str = "cat") -> None:
        super().__init__()
        self.offsets, self.pads, self.mode, self.value, self.reduce, self.dim = offsets, pads, mode, value, reduce, dim
        self.other, self.longer, self.join = other, longer, join

    def forward(self, f1, f2):
        h, w = f1.shape[2:]
        fill = {"value": self.value} if self.mode == "constant" else {}
        padded = F.pad(f2, list(self.pads), mode=self.mode, **fill)
        rows, columns = h + self.longer, w + self.longer
        costs = []
        for i, j in self.offsets:
            shifted = padded[:, :, i : i + rows, j : j + columns]
            other = {"f1": f1[:, :, :rows, :columns] if self.longer else f1, "window": shifted, "f2": f2}[self.other]
            product = other * shifted
            costs.append(product if self.reduce == "none" else getattr(product, self.reduce)(self.dim, keepdim=True))
        if self.join == "add":
            total = costs[0]
            for cost in costs[1:]:
                total = total + cost
            return total
        return torch.cat(costs, 1)


WINDOW_3x3 = row_major(range(3))


def test_descending_displacements_are_a_negative_step() -> None:
    """GwcNet's disparity order written pad-once: the right map padded on the left by D - 1, the
    slice at D - 1 - d is disparity d (displacement -d): first (0, 0), last (0, -(D - 1)), step (1, -1)."""
    disparities = 4
    module = HandCorrelation([(0, disparities - 1 - d) for d in range(disparities)], pads=(disparities - 1, 0, 0, 0))
    model = export(module, pair(2), LEGACY, AXES[2])
    assert correlation_attrs(model) == {**window(0, 0, 1, 2), "displacement_last": [0, -3], "displacement_step": [1, -1]}
    assert_equal(model, module, [pair(2, 0), pair(2, 1)], ["banded_matmul"])


def test_a_map_correlated_with_itself() -> None:
    """Autocorrelation, `f2 * shifted(f2)`: a correlation of the map with itself, A = B."""
    module = HandCorrelation(WINDOW_3x3, other="f2")
    model = export(module, pair(2), LEGACY)
    correlation_attrs(model)
    (node,) = canonical_nodes(model)
    assert node.inputs[0].name == node.inputs[1].name == "f2"
    assert_equal(model, module, [pair(2)], ["stacked_mul_reduce"])


LOOK_ALIKES = {
    "reflect-pad": HandCorrelation(WINDOW_3x3, mode="reflect"),
    "replicate-pad": HandCorrelation(WINDOW_3x3, mode="replicate"),
    "non-zero-fill": HandCorrelation(WINDOW_3x3, value=0.5),
    "sum-over-the-window": HandCorrelation(WINDOW_3x3, reduce="none", join="add"),
    "mean-over-rows": HandCorrelation(WINDOW_3x3, dim=2),
    "max-over-channels": HandCorrelation(WINDOW_3x3, reduce="amax"),
    "skipped-displacement": HandCorrelation([o for o in WINDOW_3x3 if o != (2, 1)]),
    "repeated-displacement": HandCorrelation(WINDOW_3x3[:-1] + [(1, 1)]),
    "shorter-slices": HandCorrelation(WINDOW_3x3, longer=-1),
    "window-times-itself": HandCorrelation(WINDOW_3x3, other="window"),
    "column-major-order": HandCorrelation([(i, j) for j in range(3) for i in range(3)]),
}
"""What differs from the op (or is not known to be it): B not zero outside, a reduction over the
displacements or over rows or by max, a window with a hole or a repeat, windows shorter than B, no
A to correlate with, displacements in an order one LocalCorrelation does not write."""


@pytest.mark.parametrize("name", LOOK_ALIKES)
def test_look_alikes_are_left_alone_legacy(name: str) -> None:
    model = export(LOOK_ALIKES[name], pair(2), LEGACY)
    assert {"Slice", "Pad"} <= set(op_types(model))
    assert_left_alone(model)


class Several(nn.Module):
    """Several layers on the same inputs, one output each: one dynamo export for them all."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, f1, f2):
        return tuple(layer(f1, f2) for layer in self.layers)


DYNAMO_LOOK_ALIKES = ["reflect-pad", "non-zero-fill"]
"""The look-alikes whose exported form differs most by exporter, the Pad (its mode, its fill); the
others differ from the op in the slices, the reduction or the join, which both exporters write
alike (and a symbolic dynamo export takes seconds per layer)."""


def test_look_alikes_are_left_alone_dynamo_symbolic() -> None:
    """Those look-alikes in one symbolic dynamo export, the padded map shared by all."""
    layers = [LOOK_ALIKES[name] for name in DYNAMO_LOOK_ALIKES]
    model = export(Several(layers), pair(2), DYNAMO, AXES[2])
    assert len(model.graph.output) == len(layers)
    assert_left_alone(model)


def test_an_extra_use_of_a_cost_leaves_the_loop_alone() -> None:
    """A cost the net also uses elsewhere would be computed twice: the loop stays."""

    class Reused(nn.Module):
        def forward(self, f1, f2):
            padded = F.pad(f2, [1, 1, 1, 1])
            costs = [(f1 * padded[:, :, i : i + f1.shape[2], j : j + f1.shape[3]]).mean(1, keepdim=True) for i, j in WINDOW_3x3]
            return torch.cat(costs, 1), costs[4]

    assert_left_alone(export(Reused(), pair(2), LEGACY))


# --- the shift-and-sum recognizer and this one -----------------------------------------------------------------


def raw_graph(model: onnx.ModelProto) -> gs.Graph:
    """The exported graph with shapes inferred and nothing recognized."""
    return gs.import_onnx(infer_shapes(model))


def test_shift_and_sum_loops_are_not_correlations() -> None:
    """A DynamicFilter shift loop (taps times filter channels, added) is no correlation loop, and
    stays the shift-and-sum recognizer's."""
    module = ShiftLoop(2, 3)
    x, filters = torch.randn(2, 3, 6, 5), torch.randn(2, 9, 6, 5)
    model = convlower.export(module, (x, filters), dynamo=False, opset=17)
    assert find_correlation_loops(raw_graph(model), 17) == []
    assert [n.op for n in canonical_nodes(model)] == ["DynamicFilter"]


def test_correlation_loops_are_not_shift_and_sum_loops(exports) -> None:
    """The shift-and-sum recognizer alone leaves a correlation loop as it is."""
    _, model = exports("cat-mean-2d", LEGACY, False)
    graph = raw_graph(model)
    nodes = len(graph.nodes)
    recognize_shift_loops(graph, 17)
    assert len(graph.nodes) == nodes and not [n for n in graph.nodes if n.domain == DOMAIN]
