"""Col2Im (fold) variants against the ONNX conformance cases, onnx.reference, onnxruntime and torch's F.fold.

onnxruntime's CPU Col2Im is wrong on dilated images that are not 2-D (`COL2IM_DILATION_BUG`), so
the generated cases check `shift_add` against onnx.reference, and `native` against the node
itself on onnxruntime (it re-emits that node). Real sessions, real files, no mocks.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx.backend.test.case.node import collect_testcases
from onnx.reference import ReferenceEvaluator

import convlower
from convlower.cli import main
from convlower.passes import NotLowerable, family_for
from convlower.passes.col2im import Col2ImSpec, make_spec, sliding_blocks
from tests.helpers import op_types, run, single_node_model
from tests.test_conv_transpose import with_inputs_as_initializers

FAMILY = family_for("Col2Im")
VARIANTS = FAMILY.variant_names

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    CONFORMANCE = [c for c in collect_testcases() if {n.op_type for n in c.model.graph.node} == {"Col2Im"}]


def spec_of(model: onnx.ModelProto) -> Col2ImSpec:
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model))
    return make_spec(next(n for n in graph.nodes if n.op == "Col2Im"), model.opset_import[0].version)


def lowered(model: onnx.ModelProto, variant: str) -> onnx.ModelProto:
    """The model with every Col2Im replaced by `variant` (both variants apply to every Col2Im spec)."""
    result = convlower.lower(model, {"Col2Im": variant})
    assert result.nodes and all(n.variant == variant for n in result.nodes), result.nodes
    onnx.checker.check_model(result.model, full_check=True)
    if variant == "shift_add":
        assert "Col2Im" not in op_types(result.model)
    return result.model


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


# ---- (a) the official ONNX conformance cases ---------------------------------------------------


def test_every_conformance_case_is_collected() -> None:
    assert len(CONFORMANCE) >= 5, "collect_testcases() was called with an op filter earlier in this session"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CONFORMANCE, ids=lambda c: c.name)
def test_conformance_case(case: Any, variant: str) -> None:
    for inputs, expected in case.data_sets:
        model = lowered(with_inputs_as_initializers(case.model, inputs), variant)
        (got,) = run(model, {case.model.graph.input[0].name: inputs[0]})
        assert_close(got, expected[0])


def test_shape_inputs_fed_at_run_time_are_not_lowerable() -> None:
    """The conformance cases feed image_shape and block_shape as graph inputs: then nothing is
    known at rewrite time, and `lower` leaves the node with the reason."""
    case = CONFORMANCE[0]
    (outcome,) = convlower.lower(case.model, {"Col2Im": "shift_add"}).nodes
    assert outcome.variant is None and "image_shape and block_shape must be constants" in outcome.reason


# ---- (b) hypothesis: the attribute space -------------------------------------------------------


@st.composite
def col2im_nodes(draw: st.DrawFn) -> tuple[onnx.ModelProto, np.ndarray]:
    """A Col2Im node of rank 1-3 with its columns, on a dynamic or a static batch."""
    rank = draw(st.integers(1, 3))
    ints = lambda lo, hi, n=rank: st.lists(st.integers(lo, hi), min_size=n, max_size=n)  # noqa: E731
    block, strides, dilations, pads = draw(ints(1, 3)), draw(ints(1, 3)), draw(ints(1, 2)), draw(ints(0, 2, 2 * rank))
    reach = [(k - 1) * d + 1 - p - q for k, d, p, q in zip(block, dilations, pads, pads[rank:])]
    image = [draw(st.integers(max(1, r), max(1, r) + (5 if rank < 3 else 3))) for r in reach]
    blocks = [sliding_blocks(*axis) for axis in zip(image, block, strides, dilations, pads, pads[rank:])]
    channels, batch = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    columns_shape = (batch, channels * math.prod(block), math.prod(blocks))
    dims = ("n" if draw(st.booleans()) else batch, *columns_shape[1:])
    shapes = [("image", np.array(image, np.int64)), ("block", np.array(block, np.int64))]
    attrs = {"strides": strides, "dilations": dilations, "pads": pads}
    model = single_node_model("Col2Im", [("x", dims), *shapes], rank + 2, attrs=attrs, opset=18)
    columns = np.random.default_rng(draw(st.integers(0, 2**16))).standard_normal(columns_shape).astype(np.float32)
    return model, columns


@settings(max_examples=100)
@given(node=col2im_nodes())
def test_variants_match_the_reference(node: tuple[onnx.ModelProto, np.ndarray]) -> None:
    """shift_add gives what onnx.reference gives; native gives what the node gives on onnxruntime."""
    model, columns = node
    feeds = {"x": columns}
    (reference,) = ReferenceEvaluator(model).run(None, feeds)
    assert_close(run(lowered(model, "shift_add"), feeds)[0], reference)
    assert_close(run(lowered(model, "native"), feeds)[0], run(model, feeds)[0])


def test_onnxruntime_still_miscomputes_dilated_3d_images() -> None:
    """The reason `conv_transpose.col2im` declines dilated 3-D nodes. If this fails, onnxruntime
    has fixed its N-D Col2Im: drop COL2IM_DILATION_BUG from that why_not."""
    image, block, dilations = [4, 4, 4], [2, 2, 2], [1, 2, 1]
    blocks = [sliding_blocks(i, k, 1, d, 0, 0) for i, k, d in zip(image, block, dilations)]
    columns = np.random.default_rng(0).standard_normal((1, 8, math.prod(blocks))).astype(np.float32)
    shapes = [("image", np.array(image, np.int64)), ("block", np.array(block, np.int64))]
    model = single_node_model("Col2Im", [("x", columns.shape), *shapes], 5, attrs={"dilations": dilations}, opset=18)
    (reference,) = ReferenceEvaluator(model).run(None, {"x": columns})
    assert not np.allclose(run(model, {"x": columns})[0], reference, atol=1e-3)
    assert_close(run(lowered(model, "shift_add"), {"x": columns})[0], reference)


def test_spec_resolves_defaults_and_checks_the_block_count() -> None:
    shapes = [("image", np.array([5, 5], np.int64)), ("block", np.array([2, 2], np.int64))]
    spec = spec_of(single_node_model("Col2Im", [("x", ("n", 12, 16)), *shapes], opset=18))
    assert (spec.channels, spec.blocks, spec.strides, spec.pads, spec.batch) == (3, (4, 4), (1, 1), (0, 0, 0, 0), None)
    with pytest.raises(NotLowerable, match="hold 15 blocks"):
        spec_of(single_node_model("Col2Im", [("x", (1, 12, 15)), *shapes], opset=18))
    with pytest.raises(NotLowerable, match="not a multiple of prod"):
        spec_of(single_node_model("Col2Im", [("x", (1, 10, 16)), *shapes], opset=18))


# ---- (c) torch's F.fold, exported and lowered ----------------------------------------------------


class Fold(torch.nn.Module):
    """F.fold with every option off its default, then a ReLU so the graph holds more than the fold."""

    def __init__(self, padding: tuple[int, int]) -> None:
        super().__init__()
        self.padding = padding

    def forward(self, columns: torch.Tensor) -> torch.Tensor:
        image = F.fold(columns, output_size=(7, 6), kernel_size=(2, 3), dilation=(1, 2), padding=self.padding, stride=(2, 1))
        return torch.relu(image)


@pytest.mark.parametrize(
    "dynamo, padding",
    # The TorchScript exporter writes Col2Im pads as [h, h, w, w] (ONNX wants [h, w, h, w]), so it
    # is only right, for onnxruntime as for convlower, with the same padding on both axes.
    [(True, (1, 0)), (False, (1, 1))],
    ids=["dynamo", "torchscript"],
)
def test_torch_fold_exports_and_lowers_to_shift_add(dynamo: bool, padding: tuple[int, int], tmp_path: Path) -> None:
    """F.fold exported at opset 18 is a Col2Im; lowered to shift_add it matches torch eager, on
    another batch size where the export made the batch dynamic."""
    fold = Fold(padding).eval()
    blocks = math.prod(sliding_blocks(*axis) for axis in zip((7, 6), (2, 3), (2, 1), (1, 2), padding, padding))
    path, target = tmp_path / "fold.onnx", tmp_path / "fold.lowered.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            fold, (torch.randn(2, 3 * 6, blocks),), str(path), opset_version=18, dynamo=dynamo,
            input_names=["columns"], output_names=["image"],
            **({} if dynamo else {"dynamic_axes": {"columns": {0: "batch"}, "image": {0: "batch"}}}),
        )
    assert "Col2Im" in op_types(onnx.load(path))
    code = main(["lower", str(path), "--variant", "Col2Im=shift_add", "--no-ops", "Col2Im", "-o", str(target)])
    assert code == 0
    columns = torch.randn(2 if dynamo else 3, 3 * 6, blocks)
    (got,) = run(onnx.load(target), {"columns": columns.numpy()})
    assert_close(got, fold(columns).numpy())


def test_cli_lower_with_a_col2im_left_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "fold_case.onnx"
    onnx.save(CONFORMANCE[0].model, source)
    assert main(["lower", str(source), "--variant", "Col2Im=shift_add", "--no-ops", "Col2Im"]) == 1
    assert "must be constants" in capsys.readouterr().err


def test_inspect_lists_both_variants(tmp_path: Path) -> None:
    shapes = [("image", np.array([4, 4], np.int64)), ("block", np.array([2, 2], np.int64))]
    source = tmp_path / "fold.onnx"
    onnx.save(single_node_model("Col2Im", [("x", (1, 8, 9)), *shapes], attrs={"pads": [0, 0, 0, 0]}, opset=18), source)
    (info,) = convlower.inspect_model(source)
    assert info.op == "Col2Im" and info.variants == {"native": None, "shift_add": None}
    assert tuple(info.spec["blocks"]) == (3, 3)


def test_shift_add_is_one_slice_pad_pair_per_block_offset() -> None:
    """The structure the docstring promises: K shifted terms summed, and no Col2Im."""
    shapes = [("image", np.array([6, 6], np.int64)), ("block", np.array([3, 2], np.int64))]
    model = single_node_model("Col2Im", [("x", (1, 12, 36)), *shapes], 4, attrs={"pads": [1, 0, 1, 1]}, opset=18)
    ops = op_types(lowered(model, "shift_add"))
    assert ops.count("Sum") == 1 and ops.count("Slice") == 6 and ops.count("Pad") <= 6
