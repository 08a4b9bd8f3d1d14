"""Recognition of dynamic filters written with `Tensor.unfold` patches (passes/dynamic_filter/recognize_tensor_unfold.py).

Real torch exports, run on onnxruntime as recognized (the DynamicFilter through its model-local
function) and lowered to shift_sum, compared with torch eager. What each exporter can export
(torch 2.13): dynamo every form, static or symbolic; TorchScript only the unpadded form, with static
spatial dims (a symbolic batch is fine): `F.pad(x).unfold(...)`, and any unfold of a symbolic axis,
fail with "ONNX export of operator Unfold, input size not accessible" (checked below).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

import convlower
from convlower.modelio import runtime_compatible
from convlower.models.idioms import TensorUnfold
from convlower.passes.local_functions import DOMAIN, attach_functions
from convlower.rewrite import import_graph
from tests.helpers import run

torch = pytest.importorskip("torch")
F = torch.nn.functional
nn = torch.nn


ATOL = RTOL = 1e-4
KERNEL = 3
CHANNELS = 2
SPATIAL = {1: ((9,), (12,)), 2: ((7, 6), (9, 10)), 3: ((5, 6, 4), (6, 5, 7))}
"""Per rank, the spatial extents of the export and of a second run (symbolic exports)."""
CASES = [
    pytest.param(1, 1, 1, id="1d-s1-shared"),
    pytest.param(1, 2, CHANNELS, id="1d-s2-per-channel"),
    pytest.param(2, 1, CHANNELS, id="2d-s1-per-channel"),
    pytest.param(2, 2, 1, id="2d-s2-shared"),
    pytest.param(3, 1, 1, id="3d-s1-shared"),
    pytest.param(3, 2, CHANNELS, id="3d-s2-per-channel"),
]
"""(rank, stride, filter groups): every rank with both strides, and shared and per-channel filters."""


# --- torch layers --------------------------------------------------------------------------------------------


class Unpadded(nn.Module):
    """`Tensor.unfold` without padding (the form the TorchScript exporter can export), reduced over the
    taps by `reduce`: a sum written several ways, or a look-alike."""

    def __init__(self, rank: int, stride: int = 1, reduce: str = "sum") -> None:
        super().__init__()
        self.rank, self.stride, self.reduce = rank, stride, reduce

    def forward(self, x, filters):
        patches = x
        for axis in range(2, 2 + self.rank):
            patches = patches.unfold(axis, KERNEL, self.stride)
        return reduced(patches, filters, self.rank, self.reduce)


class Padded(nn.Module):
    """`F.pad(x, pads, mode, value).unfold(..)` weighted and reduced by `reduce`."""

    def __init__(self, rank: int = 2, reduce: str = "sum", mode: str = "constant", value: float = 0.0) -> None:
        super().__init__()
        self.rank, self.reduce, self.mode, self.value = rank, reduce, mode, value

    def forward(self, x, filters):
        value = self.value if self.mode == "constant" else None
        patches = F.pad(x, [KERNEL // 2] * 2 * self.rank, mode=self.mode, value=value)
        for axis in range(2, 2 + self.rank):
            patches = patches.unfold(axis, KERNEL, 1)
        return reduced(patches, filters, self.rank, self.reduce)


def reduced(patches, filters, rank: int, reduce: str):
    taps = tuple(range(-rank, 0))
    letters = "ijk"[:rank] + "uvw"[:rank]
    if reduce == "einsum":
        return torch.einsum(f"nc{letters},n{letters}->nc{letters[:rank]}", patches, filters)
    if reduce == "einsum_channels_last":
        return torch.einsum(f"nc{letters},nc{letters}->n{letters[:rank]}c", patches, filters)
    weighted = filters * patches if reduce == "filters_first" else patches * filters
    if reduce in ("sum", "filters_first"):
        return weighted.sum(taps)
    if reduce == "sum_dim":
        return weighted.sum(dim=taps[::-1])
    if reduce == "sum_chain":
        for _ in taps:
            weighted = weighted.sum(-1)
        return weighted
    if reduce == "keepdim":
        return weighted.sum(taps, keepdim=True)
    if reduce == "max":
        return weighted.amax(taps)
    if reduce == "mean":
        return weighted.mean(taps)
    if reduce == "with_channels":
        return weighted.sum((1, *taps))
    if reduce == "one_tap_axis":
        return weighted.sum(-1)
    raise ValueError(reduce)


class Predicted(nn.Module):
    """One input: a strided conv predicts `groups` filters per output position from x, as kernel
    prediction networks do, laid out as Tensor.unfold code wants them (`[N, G, *S_out, k, ..]`), and
    `layer` applies them. Symbolic exports use it, so the filters' extents follow x's."""

    def __init__(self, layer: nn.Module, rank: int, stride: int, groups: int, padded: bool) -> None:
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[rank - 1]
        self.rank, self.groups, self.layer = rank, groups, layer
        self.predict = conv(CHANNELS, groups * KERNEL**rank, KERNEL, stride=stride, padding=KERNEL // 2 if padded else 0)

    def forward(self, x):
        f = self.predict(x)
        r = self.rank
        f = f.view(f.shape[0], self.groups, *(KERNEL,) * r, *f.shape[2:])
        return self.layer(x, f.permute(0, 1, *range(2 + r, 2 + 2 * r), *range(2, 2 + r)))


# --- helpers ---------------------------------------------------------------------------------------------------


def out_extent(size: int, stride: int, padded: bool) -> int:
    return (size + 2 * (KERNEL // 2) * padded - KERNEL) // stride + 1


def case_inputs(rank: int, stride: int, groups: int, padded: bool) -> tuple:
    """x `[2, C, *S]` and filters `[2, G, *S_out, k, ..]`."""
    spatial = SPATIAL[rank][0]
    out = [out_extent(s, stride, padded) for s in spatial]
    return torch.randn(2, CHANNELS, *spatial), torch.randn(2, groups, *out, *(KERNEL,) * rank)


def export(module: nn.Module, inputs: tuple, dynamo: bool, path: Path, symbolic: tuple[int, ...] = ()) -> onnx.ModelProto:
    """torch.onnx.export (dynamo at opset 18, TorchScript at 17); `symbolic` lists the first input's
    axes to export as symbolic dims (the filters, where they are an input, keep theirs static)."""
    module.eval()
    names = ["x", "f"][: len(inputs)]
    kwargs: dict = {}
    if symbolic and dynamo:
        dims = {a: torch.export.Dim("batch" if a == 0 else f"s{a - 2}") for a in symbolic}
        kwargs["dynamic_shapes"] = (dims, *[None] * (len(inputs) - 1))
    elif symbolic:
        kwargs["dynamic_axes"] = {"x": {a: "batch" if a == 0 else f"s{a - 2}" for a in symbolic}, "y": {0: "batch"}}
    torch.onnx.export(module, inputs, path, dynamo=dynamo, opset_version=18 if dynamo else 17,
                      input_names=names, output_names=["y"], **kwargs)
    return onnx.load(path)


def eager(module: nn.Module, inputs: tuple) -> np.ndarray:
    with torch.inference_mode():
        return module(*inputs).numpy()


def feeds(inputs: tuple) -> dict[str, np.ndarray]:
    return {name: t.numpy() for name, t in zip(["x", "f"], inputs)}


def idiom_leftovers(graph: gs.Graph) -> list[str]:
    """Nodes of the idiom still in a recognized graph: Pad, Gather, Slice or Concat of float data
    (the unfolds) and the Mul, ReduceSum or Einsum of the weighting."""
    idiom = ("Pad", "Gather", "Slice", "Concat", "Mul", "ReduceSum", "Einsum")
    return [n.op for n in graph.nodes if n.op in idiom and n.inputs[0].dtype == np.float32]


def as_model(graph: gs.Graph) -> onnx.ModelProto:
    """A recognized graph as a model onnxruntime runs (canonical nodes carried by their functions)."""
    return runtime_compatible(attach_functions(gs.export_onnx(graph, do_type_check=False)))


def assert_recognized(
    model: onnx.ModelProto, rank: int, stride: int, groups: int, padded: bool, runs: list[tuple[dict, np.ndarray]]
) -> onnx.ModelProto:
    """One DynamicFilter on x with the window of the idiom, nothing of the idiom left; the model as
    recognized and lowered to shift_sum equals torch at every run."""
    graph = import_graph(model)
    nodes = [n for n in graph.nodes if n.domain == DOMAIN]
    assert [n.op for n in nodes] == ["DynamicFilter"], [n.op for n in nodes]
    (node,) = nodes
    pad = KERNEL // 2 if padded else 0
    assert node.attrs == {"kernel_shape": [KERNEL] * rank, "strides": [stride] * rank, "dilations": [1] * rank, "pads": [pad] * 2 * rank}
    assert node.inputs[0].name == "x" and node.inputs[1].shape[1:3] == [groups, KERNEL**rank]
    assert idiom_leftovers(graph) == []
    recognized = as_model(graph)
    lowered = convlower.lower(model, ["DynamicFilter=shift_sum"])
    assert [n.variant for n in lowered.nodes] == ["shift_sum"]
    assert not [n for n in lowered.model.graph.node if n.domain == DOMAIN]
    for inputs, expected in runs:
        np.testing.assert_allclose(run(recognized, inputs)[0], expected, atol=ATOL, rtol=RTOL)
        np.testing.assert_allclose(run(lowered.model, inputs)[0], expected, atol=ATOL, rtol=RTOL)
    return recognized


def symbolic_dims(model: onnx.ModelProto, name: str) -> list[str]:
    """The names of an input's symbolic dims ("" for a static dim)."""
    (value,) = [v for v in model.graph.input if v.name == name]
    return [d.dim_param for d in value.type.tensor_type.shape.dim]


def symbolic_runs(module: nn.Module, rank: int, sizes: tuple[int, int] = (0, 1)) -> list:
    """Feeds and torch's output at batch 2 and 3, at the given entries of SPATIAL."""
    runs = []
    for batch, which in zip((2, 3), sizes):
        x = torch.randn(batch, CHANNELS, *SPATIAL[rank][which])
        runs.append(({"x": x.numpy()}, eager(module, (x,))))
    return runs


# --- recognized: static dims ------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank, stride, groups", CASES)
def test_padded_dynamo_static(rank: int, stride: int, groups: int, tmp_path: Path) -> None:
    """TensorUnfold as in the model zoo: Pad -> (Gather -> Transpose) per axis -> Mul -> ReduceSum."""
    module, inputs = TensorUnfold(rank, KERNEL, stride), case_inputs(rank, stride, groups, padded=True)
    model = export(module, inputs, True, tmp_path / "m.onnx")
    assert_recognized(model, rank, stride, groups, True, [(feeds(inputs), eager(module, inputs))])


@pytest.mark.parametrize(
    "rank, stride, groups, dynamo",
    [pytest.param(*case.values, False, id=f"legacy-{case.id}") for case in CASES] + [pytest.param(2, 2, CHANNELS, True, id="dynamo-2d-s2")],
)
def test_unpadded_static(rank: int, stride: int, groups: int, dynamo: bool, tmp_path: Path) -> None:
    """Without F.pad: TorchScript stacks one Slice per window position (every case); dynamo gathers
    as in the padded form, less the Pad (one case)."""
    module, inputs = Unpadded(rank, stride), case_inputs(rank, stride, groups, padded=False)
    model = export(module, inputs, dynamo, tmp_path / "m.onnx")
    if not dynamo:
        assert "Gather" not in {n.op_type for n in model.graph.node}
    assert_recognized(model, rank, stride, groups, False, [(feeds(inputs), eager(module, inputs))])


@pytest.mark.parametrize(
    "reduce, dynamo",
    [pytest.param(r, False, id=f"legacy-{r}") for r in ("sum_dim", "sum_chain", "keepdim", "filters_first", "einsum", "einsum_channels_last")]
    + [pytest.param(r, True, id=f"dynamo-{r}") for r in ("sum_chain", "einsum")],
)
def test_ways_of_summing_the_taps(reduce: str, dynamo: bool, tmp_path: Path) -> None:
    """`.sum(dim=(-1, -2))`, `.sum(-1).sum(-1)`, `keepdim=True` (kept axes restored by Unsqueeze),
    `filters * patches`, an einsum whose filters lack the channel axis, and one with per-channel filters and a channels-last
    output (a Transpose after the DynamicFilter). The ReduceSum after the unfolds is the same in both
    exporters' graphs, so dynamo exports only the chain and an einsum."""
    groups = CHANNELS if reduce == "einsum_channels_last" else 1
    module, (x, f) = Unpadded(2, 1, reduce), case_inputs(2, 1, groups, padded=False)
    inputs = (x, f[:, 0]) if reduce == "einsum" else (x, f)
    model = export(module, inputs, dynamo, tmp_path / "m.onnx")
    assert_recognized(model, 2, 1, groups, False, [(feeds(inputs), eager(module, inputs))])


# --- recognized: symbolic dims -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rank, stride, groups", CASES)
def test_padded_dynamo_symbolic_batch_and_spatial(rank: int, stride: int, groups: int, tmp_path: Path) -> None:
    """Symbolic batch and every spatial dim: the Gather indices are computed from Shape at run time."""
    module = Predicted(TensorUnfold(rank, KERNEL, stride), rank, stride, groups, padded=True)
    x = torch.randn(2, CHANNELS, *SPATIAL[rank][0])
    model = export(module, (x,), True, tmp_path / "m.onnx", symbolic=(0, *range(2, 2 + rank)))
    recognized = assert_recognized(model, rank, stride, groups, True, symbolic_runs(module, rank))
    wanted = ["batch", "", *(f"s{j}" for j in range(rank))]
    assert symbolic_dims(recognized, "x") == wanted
    assert symbolic_dims(convlower.lower(model, ["DynamicFilter=shift_sum"]).model, "x") == wanted


@pytest.mark.parametrize("rank, stride, groups", CASES)
def test_unpadded_legacy_symbolic_batch(rank: int, stride: int, groups: int, tmp_path: Path) -> None:
    """TorchScript with a symbolic batch (its only symbolic dim that exports)."""
    module = Predicted(Unpadded(rank, stride), rank, stride, groups, padded=False)
    x = torch.randn(2, CHANNELS, *SPATIAL[rank][0])
    model = export(module, (x,), False, tmp_path / "m.onnx", symbolic=(0,))
    recognized = assert_recognized(model, rank, stride, groups, False, symbolic_runs(module, rank, sizes=(0, 0)))
    assert symbolic_dims(recognized, "x")[0] == "batch"


def test_optimize_finds_and_lowers_a_symbolic_export(tmp_path: Path) -> None:
    module = Predicted(TensorUnfold(2, KERNEL, 1), 2, 1, 1, padded=True)
    model = export(module, (torch.randn(2, CHANNELS, 7, 6),), True, tmp_path / "m.onnx", symbolic=(0, 2, 3))
    result = convlower.optimize(model, input_shapes={"x": (2, CHANNELS, 7, 6)}, guard=False, cache=None,
                                variants=["DynamicFilter=shift_sum"])
    (node,) = [n for n in result.report.nodes if n.op == "DynamicFilter"]
    assert node.recognized and node.chosen == "shift_sum"
    assert not [n for n in result.model.graph.node if n.domain == DOMAIN or n.op_type == "Gather"]
    assert symbolic_dims(result.model, "x") == ["batch", "", "s0", "s1"]
    for inputs, expected in symbolic_runs(module, 2):
        np.testing.assert_allclose(run(result.model, inputs)[0], expected, atol=ATOL, rtol=RTOL)


# --- what the TorchScript exporter cannot export ------------------------------------------------------------------


@pytest.mark.parametrize("padded, symbolic", [(True, ()), (False, (0, 2))], ids=["padded", "symbolic-spatial"])
def test_legacy_exporter_cannot_export_padded_or_symbolic_spatial_unfolds(padded: bool, symbolic: tuple, tmp_path: Path) -> None:
    module = TensorUnfold(1, KERNEL, 1) if padded else Unpadded(1)
    with pytest.raises(torch.onnx.errors.SymbolicValueError, match="Unfold, input size not accessible"):
        export(module, case_inputs(1, 1, 1, padded), False, tmp_path / "m.onnx", symbolic=symbolic)


# --- look-alikes: left as they are -------------------------------------------------------------------------------


LOOK_ALIKES = [
    pytest.param("max", False, id="max-not-sum"),
    pytest.param("mean", False, id="mean-not-sum"),
    pytest.param("with_channels", False, id="sum-over-channels-too"),
    pytest.param("one_tap_axis", False, id="sum-over-one-tap-axis"),
    pytest.param("sum", True, id="filters-broadcast-over-batch"),
]
OTHER_PADDINGS = [("reflect", 0.0), ("replicate", 0.0), ("constant", 0.5)]


class Several(nn.Module):
    """Several layers applied to the same inputs, one output each: one dynamo export for them all."""

    def __init__(self, layers: list[nn.Module], shared_by_the_batch: list[bool]) -> None:
        super().__init__()
        self.layers, self.shared = nn.ModuleList(layers), shared_by_the_batch

    def forward(self, x, filters):
        return tuple(layer(x, filters[:1] if shared else filters) for layer, shared in zip(self.layers, self.shared))


def assert_left_alone(model: onnx.ModelProto) -> None:
    assert not [n for n in import_graph(model).nodes if n.domain == DOMAIN]
    assert convlower.lower(model, ["DynamicFilter=shift_sum"]).nodes == []


@pytest.mark.parametrize("reduce, shared_by_the_batch", LOOK_ALIKES)
def test_look_alikes_are_left_alone_legacy(reduce: str, shared_by_the_batch: bool, tmp_path: Path) -> None:
    x, f = case_inputs(2, 1, 1, padded=False)
    model = export(Unpadded(2, 1, reduce), (x, f[:1] if shared_by_the_batch else f), False, tmp_path / "m.onnx")
    assert {"Slice", "Concat"} <= {n.op_type for n in model.graph.node}
    assert_left_alone(model)


def test_look_alikes_are_left_alone_dynamo(tmp_path: Path) -> None:
    """All the look-alikes above over one set of patches (so the patches also have several users)."""
    reduces, shared = zip(*(case.values for case in LOOK_ALIKES))
    module = Several([Unpadded(2, 1, r) for r in reduces], list(shared))
    model = export(module, case_inputs(2, 1, 1, padded=False), True, tmp_path / "m.onnx")
    assert len(model.graph.output) == len(LOOK_ALIKES)
    assert_left_alone(model)


def test_other_padding_is_left_alone(tmp_path: Path) -> None:
    """reflect, replicate, and zeros-but-0.5 padding (only dynamo exports padded unfolds): not a Conv pad."""
    module = Several([Padded(2, "sum", mode, value) for mode, value in OTHER_PADDINGS], [False] * len(OTHER_PADDINGS))
    model = export(module, case_inputs(2, 1, 1, padded=True), True, tmp_path / "m.onnx")
    assert [n.op_type for n in model.graph.node].count("Pad") == len(OTHER_PADDINGS)
    assert_left_alone(model)


def test_their_zero_padded_twin_is_recognized_deterministically(tmp_path: Path) -> None:
    """The padding look-alikes differ from this model in the Pad alone; recognition is deterministic."""
    module, inputs = Padded(2, "sum"), case_inputs(2, 1, 1, padded=True)
    model = export(module, inputs, True, tmp_path / "m.onnx")
    recognized = assert_recognized(model, 2, 1, 1, True, [(feeds(inputs), eager(module, inputs))])
    assert recognized == as_model(import_graph(model))
