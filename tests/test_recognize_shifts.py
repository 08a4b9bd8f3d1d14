"""Recognition of hand-written shift-and-sum loops and KPN stacked shifts as `convlower.DynamicFilter`.

Each idiom (`models/idioms.py`'s `ShiftLoop` and `StackedShifts`, and variations written here) is
exported for real by both torch exporters (TorchScript at opset 17, dynamo at opset 18), with static
and with symbolic batch and spatial dims, recognized, run on onnxruntime as recognized (through the
node's model-local function) and lowered, and compared with torch eager; symbolic exports are run
at two input sizes. Look-alikes must come out of recognition untouched.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import pytest

import convlower
from convlower.models.idioms import FilterNet, ShiftLoop, StackedShifts
from convlower.passes.local_functions import DOMAIN
from tests.helpers import op_types, run
from tests.test_recognize import ATOL, EXPORTERS, RTOL, canonical_nodes, recognized_model

torch = pytest.importorskip("torch")
F = torch.nn.functional
nn = torch.nn


LEGACY, DYNAMO = EXPORTERS[0].values, EXPORTERS[1].values
LOWERINGS = ["shift_sum", "conv_unfold"]
"""The variants every recognized static node is lowered to; symbolic ones take shift_sum (the
others need static spatial extents)."""


# --- exporting -------------------------------------------------------------------------------------


def export(
    module: nn.Module, inputs: tuple, dynamo: bool, path: Path, dynamic: dict[int, dict[int, str]] | None = None
) -> onnx.ModelProto:
    """The module exported by plain torch.onnx.export, inputs named in0, in1, ...; `dynamic` maps an
    input's index to {axis: dim name} for symbolic dims (dims with one name are one dim)."""
    module.eval()
    names = [f"in{i}" for i in range(len(inputs))]
    kwargs: dict = {}
    if dynamic and dynamo:
        dims: dict[str, object] = {}
        for axes in dynamic.values():
            for name in axes.values():
                dims.setdefault(name, torch.export.Dim(name, min=2 if name == "batch" else 6))
        kwargs["dynamic_shapes"] = tuple({a: dims[n] for a, n in dynamic.get(i, {}).items()} or None for i in range(len(inputs)))
    elif dynamic:
        kwargs["dynamic_axes"] = {names[i]: axes for i, axes in dynamic.items()}
    opset = DYNAMO[1] if dynamo else LEGACY[1]
    torch.onnx.export(module, inputs, path, dynamo=dynamo, opset_version=opset, input_names=names, output_names=["y"], **kwargs)
    return onnx.load(path)


def expected(module: nn.Module, inputs: tuple) -> np.ndarray:
    with torch.inference_mode():
        return module(*inputs).numpy()


def feeds(inputs: tuple) -> dict[str, np.ndarray]:
    return {f"in{i}": t.numpy() for i, t in enumerate(inputs)}


def assert_recognized(model: onnx.ModelProto) -> dict:
    """One DynamicFilter, the slices and the pad gone; its attributes."""
    recognized = recognized_model(model)
    (node,) = [n for n in recognized.graph.node if n.domain == DOMAIN]
    assert node.op_type == "DynamicFilter"
    ops = op_types(recognized)
    assert "Slice" not in ops and "Pad" not in ops, ops
    return {a.name: list(a.ints) for a in node.attribute}


def assert_equal_to_torch(model: onnx.ModelProto, module: nn.Module, sizes: list[tuple], lowerings: list[str]) -> None:
    """As recognized and as each lowering, the model equals torch eager on each of the input tuples `sizes`."""
    models = {"recognized": recognized_model(model)}
    for variant in lowerings:
        result = convlower.lower(model, [f"DynamicFilter={variant}"])
        assert [n.variant for n in result.nodes] == [variant], result.nodes
        assert not [n for n in result.model.graph.node if n.domain == DOMAIN]
        models[variant] = result.model
    for inputs in sizes:
        want = expected(module, inputs)
        for name, candidate in models.items():
            np.testing.assert_allclose(run(candidate, feeds(inputs))[0], want, atol=ATOL, rtol=RTOL, err_msg=name)


def assert_keeps_symbolic_dims(model: onnx.ModelProto, names: set[str]) -> None:
    """Recognized and lowered, the model's inputs keep the symbolic dims `names` and its inputs and
    outputs are declared as the export declared them."""
    lowered = convlower.lower(model, ["DynamicFilter=shift_sum"]).model
    assert {d.dim_param for v in lowered.graph.input for d in v.type.tensor_type.shape.dim if d.dim_param} == names
    for ours, theirs in ((lowered.graph.input, model.graph.input), (lowered.graph.output, model.graph.output)):
        assert [v.type for v in ours] == [v.type for v in theirs]


def assert_left_alone(model: onnx.ModelProto) -> None:
    assert not canonical_nodes(model)
    assert convlower.lower(model, ["DynamicFilter=shift_sum"]).nodes == []


# --- hand-written shift loops ----------------------------------------------------------------------


def loop_inputs(rank: int, kernel: int, batch: int = 2, size: int = 0) -> tuple:
    spatial = [7 + size, 6 + size, 5 + size][:rank]
    return torch.randn(batch, 3, *spatial), torch.randn(batch, kernel**rank, *spatial)


LOOP_SPATIAL = {1: {2: "w"}, 2: {2: "h", 3: "w"}, 3: {2: "d", 3: "h", 4: "w"}}


@pytest.mark.parametrize(
    "rank, kernel, use_sum, dynamo, opset",
    [
        pytest.param(1, 3, False, *LEGACY, id="r1-k3-add-legacy"),
        pytest.param(1, 5, True, *DYNAMO, id="r1-k5-stack_sum-dynamo"),
        pytest.param(2, 3, True, *LEGACY, id="r2-k3-stack_sum-legacy"),
        pytest.param(2, 3, False, *DYNAMO, id="r2-k3-add-dynamo"),
        pytest.param(2, 5, False, *LEGACY, id="r2-k5-add-legacy"),
        pytest.param(2, 5, True, *DYNAMO, id="r2-k5-stack_sum-dynamo"),
        pytest.param(3, 3, False, *LEGACY, id="r3-k3-add-legacy"),
    ],
)
def test_shift_loop_becomes_one_dynamic_filter(rank: int, kernel: int, use_sum: bool, dynamo: bool, opset: int, tmp_path: Path) -> None:
    """Ranks 1 to 3, K 3 and 5, both accumulations, each exporter (static dims; the symbolic test
    below covers both exporters at ranks 1 and 2)."""
    module, inputs = ShiftLoop(rank, kernel, use_sum), loop_inputs(rank, kernel)
    model = export(module, inputs, dynamo, tmp_path / "loop.onnx")
    attrs = assert_recognized(model)
    assert attrs == {"kernel_shape": [kernel] * rank, "strides": [1] * rank, "dilations": [1] * rank, "pads": [kernel // 2] * 2 * rank}
    assert_equal_to_torch(model, module, [inputs], LOWERINGS)


@pytest.mark.parametrize("dynamo, opset", EXPORTERS)
@pytest.mark.parametrize("rank, use_sum", [(1, True), (2, False)], ids=["r1-stack_sum", "r2-add"])
def test_shift_loop_with_symbolic_dims(rank: int, use_sum: bool, dynamo: bool, opset: int, tmp_path: Path) -> None:
    module, inputs = ShiftLoop(rank, 3, use_sum), loop_inputs(rank, 3)
    axes = {0: "batch", **LOOP_SPATIAL[rank]}
    model = export(module, inputs, dynamo, tmp_path / "loop.onnx", {0: axes, 1: axes})
    assert_recognized(model)
    assert_keeps_symbolic_dims(model, set(axes.values()))
    assert_equal_to_torch(model, module, [inputs, loop_inputs(rank, 3, batch=3, size=4)], ["shift_sum"])


class HandShifts(nn.Module):
    """A 2-D shift loop written out tap by tap: `padded[:, :, i:i+h, j:j+w] * filters[:, c:c+1]` for
    each ((i, j), c) given (every `stride`-th position, as many as the filters have), combined by `combine` ("add": `out = out + term`; "sum": `torch.stack`
    and `.sum(0)`; "max": `.amax(0)`); `crop` shortens the first slice to one row."""

    def __init__(self, taps: list[tuple[tuple[int, int], int]], pad: int = 1, mode: str = "constant", value: float = 0.0,
                 combine: str = "add", crop: bool = False, stride: int = 1) -> None:
        super().__init__()
        self.taps, self.pad, self.mode, self.value, self.combine, self.crop = taps, pad, mode, value, combine, crop
        self.stride = stride

    def forward(self, x, filters):
        value = {"value": self.value} if self.mode == "constant" else {}
        padded = F.pad(x, [self.pad] * 4, mode=self.mode, **value)
        h, w = filters.shape[2:]
        s = self.stride
        terms = []
        for n, ((i, j), c) in enumerate(self.taps):
            rows = 1 if self.crop and n == 0 else h
            window = padded[:, :, i : i + s * (rows - 1) + 1 : s, j : j + s * (w - 1) + 1 : s]
            terms.append(window * filters[:, c : c + 1])
        if self.combine == "sum":
            return torch.stack(terms).sum(0)
        if self.combine == "max":
            return torch.stack(terms).amax(0)
        out = terms[0]
        for term in terms[1:]:
            out = out + term
        return out


ROW_MAJOR_3x3 = [((i, j), 3 * i + j) for i, j in itertools.product(range(3), repeat=2)]


def test_taps_in_any_order_of_accumulation(tmp_path: Path) -> None:
    """The sum is commutative: taps accumulated in shuffled order are the same filter, no reordering."""
    taps = [ROW_MAJOR_3x3[k] for k in (4, 0, 8, 2, 6, 1, 7, 3, 5)]
    module, inputs = HandShifts(taps), loop_inputs(2, 3)
    model = export(module, inputs, False, tmp_path / "shuffled.onnx")
    assert_recognized(model)
    assert "Gather" not in op_types(recognized_model(model))
    assert_equal_to_torch(model, module, [inputs], LOWERINGS)


def test_shift_loop_inside_a_filter_net(tmp_path: Path) -> None:
    """Filters predicted from the image by a Conv and a softmax, as kernel-prediction nets do."""
    module, inputs = FilterNet("shift_loop", channels=3, kernel_size=3), (torch.randn(2, 3, 8, 7),)
    model = export(module, inputs, False, tmp_path / "net.onnx")
    assert_recognized(model)
    assert_equal_to_torch(model, module, [inputs], LOWERINGS)


def test_one_sum_node_accumulates_like_adds(tmp_path: Path) -> None:
    """Neither exporter writes a variadic Sum for `+`, but other tools do: the exported Add chain
    replaced by one Sum of the terms is the same filter."""
    module, inputs = ShiftLoop(2, 3), loop_inputs(2, 3)
    model = export(module, inputs, False, tmp_path / "loop.onnx")
    adds = [n for n in model.graph.node if n.op_type == "Add" and n.input[1].startswith("/Mul")]
    terms = [adds[0].input[0]] + [n.input[1] for n in adds]
    for node in adds:
        model.graph.node.remove(node)
    model.graph.node.append(onnx.helper.make_node("Sum", terms, ["y"]))
    assert len(terms) == 9 and "Add" not in op_types(model)
    assert_recognized(model)
    assert_equal_to_torch(model, module, [inputs], LOWERINGS)


def test_filter_channels_in_another_order_are_gathered(tmp_path: Path) -> None:
    """Tap (i, j) weighted by channel 3*j + i (column-major): the filter channels are reordered."""
    taps = [((i, j), 3 * j + i) for i, j in itertools.product(range(3), repeat=2)]
    module, inputs = HandShifts(taps, combine="sum"), loop_inputs(2, 3)
    model = export(module, inputs, False, tmp_path / "column_major.onnx")
    assert_recognized(model)
    assert "Gather" in op_types(recognized_model(model))
    assert_equal_to_torch(model, module, [inputs], LOWERINGS)


def test_spaced_offsets_are_a_dilation(tmp_path: Path) -> None:
    taps = [((2 * i, 2 * j), 3 * i + j) for i, j in itertools.product(range(3), repeat=2)]
    module, inputs = HandShifts(taps, pad=2), loop_inputs(2, 3)
    model = export(module, inputs, False, tmp_path / "dilated.onnx")
    assert assert_recognized(model) == {"kernel_shape": [3, 3], "strides": [1, 1], "dilations": [2, 2], "pads": [2, 2, 2, 2]}
    assert_equal_to_torch(model, module, [inputs], LOWERINGS)


def test_strided_slices_are_a_stride(tmp_path: Path) -> None:
    module, inputs = HandShifts(ROW_MAJOR_3x3, stride=2), (torch.randn(2, 3, 7, 6), torch.randn(2, 9, 4, 3))
    model = export(module, inputs, False, tmp_path / "strided.onnx")
    assert assert_recognized(model) == {"kernel_shape": [3, 3], "strides": [2, 2], "dilations": [1, 1], "pads": [1, 1, 1, 1]}
    assert_equal_to_torch(model, module, [inputs], LOWERINGS)


@pytest.mark.parametrize(
    "module, filter_batch",
    [
        pytest.param(HandShifts(ROW_MAJOR_3x3[:-1]), 2, id="missing-tap"),
        pytest.param(HandShifts(ROW_MAJOR_3x3 + [((1, 1), 4)]), 2, id="duplicated-tap"),
        pytest.param(HandShifts(ROW_MAJOR_3x3, value=0.5), 2, id="non-zero-pad"),
        pytest.param(HandShifts(ROW_MAJOR_3x3, mode="reflect"), 2, id="reflect-pad"),
        pytest.param(HandShifts(ROW_MAJOR_3x3, mode="replicate", combine="sum"), 2, id="replicate-pad"),
        pytest.param(HandShifts(ROW_MAJOR_3x3, crop=True), 2, id="slices-of-different-extents"),
        pytest.param(HandShifts(ROW_MAJOR_3x3, combine="max"), 2, id="max-not-sum"),
        pytest.param(HandShifts(ROW_MAJOR_3x3), 1, id="filters-broadcast-over-batch"),
        pytest.param(HandShifts(ROW_MAJOR_3x3, pad=2), 2, id="window-not-the-conv-output"),
    ],
)
def test_shift_loop_look_alikes_are_left_alone(module: nn.Module, filter_batch: int, tmp_path: Path) -> None:
    inputs = (torch.randn(2, 3, 7, 6), torch.randn(filter_batch, 9, 7, 6))
    assert_left_alone(export(module, inputs, False, tmp_path / "look_alike.onnx"))


@pytest.mark.parametrize("mode, value", [("constant", 0.5), ("reflect", 0.0)], ids=["non-zero-pad", "reflect-pad"])
def test_pads_other_than_zeros_are_left_alone_in_dynamo_exports(mode: str, value: float, tmp_path: Path) -> None:
    """The dynamo exporter writes the pad value as an input and the mode as an attribute."""
    inputs = (torch.randn(2, 3, 7, 6), torch.randn(2, 9, 7, 6))
    assert_left_alone(export(HandShifts(ROW_MAJOR_3x3, mode=mode, value=value), inputs, True, tmp_path / "look_alike.onnx"))


# --- stacked shifts (KPN bursts) --------------------------------------------------------------------


BURST_AXES = {0: {0: "batch", 3: "h", 4: "w"}, 1: {0: "batch", 4: "h", 5: "w"}}
"""Symbolic dims of a burst `[B, frames, C, H, W]` and its kernels `[B, frames, K, C, H, W]`."""


def burst_inputs(kernel: int, shared: bool, batch: int = 2, size: int = 0, kernel_batch: int | None = None) -> tuple:
    frames = torch.randn(batch, 2, 3, 7 + size, 6 + size)
    kernels = torch.randn(kernel_batch or batch, 2, kernel * kernel, 1 if shared else 3, 7 + size, 6 + size)
    return frames, kernels


@pytest.mark.parametrize("dynamo, opset", EXPORTERS)
@pytest.mark.parametrize("kernel, shared", [(3, False), (5, True)], ids=["k3-per-channel", "k5-shared-by-channels"])
def test_stacked_shifts_become_one_dynamic_filter(kernel: int, shared: bool, dynamo: bool, opset: int, tmp_path: Path) -> None:
    module, inputs = StackedShifts(kernel), burst_inputs(kernel, shared)
    model = export(module, inputs, dynamo, tmp_path / "kpn.onnx")
    attrs = assert_recognized(model)
    assert attrs == {"kernel_shape": [kernel] * 2, "strides": [1, 1], "dilations": [1, 1], "pads": [kernel // 2] * 4}
    (node,) = canonical_nodes(model)
    assert node.inputs[0].shape == [4, 3, 7, 6] and node.inputs[1].shape == [4, 1 if shared else 3, kernel**2, 7, 6]
    assert_equal_to_torch(model, module, [inputs], LOWERINGS)


@pytest.mark.parametrize("dynamo, opset", EXPORTERS)
def test_stacked_shifts_with_symbolic_dims(dynamo: bool, opset: int, tmp_path: Path) -> None:
    module, inputs = StackedShifts(3), burst_inputs(3, False)
    model = export(module, inputs, dynamo, tmp_path / "kpn.onnx", BURST_AXES)
    assert_recognized(model)
    assert_keeps_symbolic_dims(model, {"batch", "h", "w"})
    assert_equal_to_torch(model, module, [inputs, burst_inputs(3, False, batch=3, size=3)], ["shift_sum"])


class StackedVariant(nn.Module):
    """StackedShifts with the taps stacked in `order`, each slice passed through `each`, summed over `dim`."""

    def __init__(self, order: list[int], each=None, dim: int = 2) -> None:
        super().__init__()
        self.order, self.each, self.dim = order, each, dim

    def forward(self, frames, kernels):
        h, w = frames.shape[-2:]
        padded = F.pad(frames, [1] * 4)
        shifts = [padded[..., i : i + h, j : j + w] for i in range(3) for j in range(3)]
        stack = [self.each(shifts[k]) if self.each else shifts[k] for k in self.order]
        return torch.sum(kernels.mul(torch.stack(stack, dim=2)), dim=self.dim)


def test_stacked_in_another_order_gathers_the_kernels(tmp_path: Path) -> None:
    module, inputs = StackedVariant([8, 7, 6, 5, 4, 3, 2, 1, 0]), burst_inputs(3, False)
    model = export(module, inputs, True, tmp_path / "reversed.onnx")
    assert_recognized(model)
    assert "Gather" in op_types(recognized_model(model))
    assert_equal_to_torch(model, module, [inputs], LOWERINGS)


@pytest.mark.parametrize(
    "module, kernel_batch",
    [
        pytest.param(StackedVariant(list(range(9)), each=torch.tanh), None, id="sum-of-something-else"),
        pytest.param(StackedVariant(list(range(8)) + [4]), None, id="duplicated-tap"),
        pytest.param(StackedVariant(list(range(9)), dim=3), None, id="sum-over-channels"),
        pytest.param(StackedShifts(3), 1, id="kernels-broadcast-over-batch"),
    ],
)
def test_stacked_look_alikes_are_left_alone(module: nn.Module, kernel_batch: int | None, tmp_path: Path) -> None:
    model = export(module, burst_inputs(3, False, kernel_batch=kernel_batch), False, tmp_path / "look_alike.onnx")
    assert_left_alone(model)


# --- the whole pipeline ------------------------------------------------------------------------------


def test_optimize_a_symbolic_burst_denoiser(tmp_path: Path) -> None:
    module, inputs = StackedShifts(3), burst_inputs(3, True)
    model = export(module, inputs, False, tmp_path / "kpn.onnx", BURST_AXES)
    result = convlower.optimize(model, input_shapes={"in0": (2, 2, 3, 7, 6), "in1": (2, 2, 9, 1, 7, 6)}, guard=False, cache=None)
    assert [n["op"] for n in result.report.to_dict()["nodes"]] == ["DynamicFilter"]
    for other in (inputs, burst_inputs(3, True, batch=3, size=2)):
        np.testing.assert_allclose(run(result.model, feeds(other))[0], expected(module, other), atol=ATOL, rtol=RTOL)
