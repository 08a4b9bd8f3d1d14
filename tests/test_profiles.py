"""Shape profiles: tuning for several input sizes at once, as TensorRT's optimization profiles.

An input named several times with `--input-shape` (or given a list of shapes in the API) makes
one profile per shape; every node is tuned at each, a variant replaces a node only where it is not
slower at any, the guard checks every profile, and the written model records what it was tuned for.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import convlower
from convlower.cli import main
from convlower.errors import UsageError
from convlower.models.builders import conv_block
from convlower.shapes import shape_profiles
from convlower.testing import assert_equivalent
from convlower.tune import MIN_GAIN, ORIGINAL, NodeTuning, VariantOutcome, choose_across

SMALL, LARGE = (1, 3, 8, 8), (1, 3, 16, 16)


def test_profiles_take_each_inputs_shapes_in_order() -> None:
    assert shape_profiles(None) == [{}]
    assert shape_profiles({"x": SMALL}) == [{"x": SMALL}]
    assert shape_profiles({"x": [SMALL, LARGE], "scale": (2,)}) == [{"x": SMALL, "scale": (2,)}, {"x": LARGE, "scale": (2,)}]
    with pytest.raises(UsageError, match="named different numbers of times"):
        shape_profiles({"x": [SMALL, LARGE], "y": [SMALL, LARGE, LARGE]})


def tuning(original_ms: float, **variants: float) -> NodeTuning:
    return NodeTuning(original_ms, {name: VariantOutcome("ok", ms=ms) for name, ms in variants.items()})


def test_a_variant_must_not_be_slower_at_any_profile() -> None:
    faster_small_slower_large = [tuning(1.0, im2col=0.5), tuning(4.0, im2col=4.4)]
    assert choose_across(faster_small_slower_large) == ORIGINAL
    faster_at_both = [tuning(1.0, im2col=0.5, einsum=0.45), tuning(4.0, im2col=3.0, einsum=4.1)]
    assert choose_across(faster_at_both) == "im2col", "einsum is faster at one profile but slower at the other"
    a_tie_is_not_a_gain = [tuning(1.0, im2col=1.0 - MIN_GAIN / 4), tuning(4.0, im2col=4.0)]
    assert choose_across(a_tie_is_not_a_gain) == ORIGINAL


def test_a_variant_rejected_at_one_profile_is_not_chosen() -> None:
    rejected = [tuning(1.0, im2col=0.5), NodeTuning(4.0, {"im2col": VariantOutcome("rejected", reason="disagrees")})]
    assert choose_across(rejected) == ORIGINAL


def test_a_recognized_node_takes_its_best_variant_across_profiles() -> None:
    tunings = [tuning(1.0, shift_sum=1.2, unfold_einsum=0.9), tuning(4.0, shift_sum=4.0, unfold_einsum=6.0)]
    assert choose_across(tunings, recognized=True) == "shift_sum", "the smaller geometric-mean ratio"


@pytest.fixture(scope="module")
def block_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A conv block whose batch, height and width are all symbolic."""
    model = conv_block(channels=4, size=8)
    for value in list(model.graph.input) + list(model.graph.output):
        for dim, name in zip(value.type.tensor_type.shape.dim[2:], ("H", "W") if value in model.graph.input else ("h", "w")):
            dim.dim_param = name
    del model.graph.value_info[:]
    path = tmp_path_factory.mktemp("profiles") / "block.onnx"
    onnx.save(model, path)
    return path


def test_optimize_tunes_every_node_at_every_profile_and_records_them(block_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = block_path.with_name("two.onnx")
    code = main(["optimize", str(block_path), "-o", str(out), "--no-cache", "--variants", "conv=im2col,pointwise_matmul",
                 "--input-shape", "x:1x3x8x8", "--input-shape", "x:1x3x16x16"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(out.with_suffix(".json").read_text())
    assert [p["shapes"] for p in report["profiles"]] == [{"x": list(SMALL)}, {"x": list(LARGE)}]
    tuned = [n for n in report["nodes"] if n["original_ms"] is not None]
    assert len(tuned) == 3 and [p["shape"] for p in tuned[0]["profiles"]] == ["1x3x8x8", "1x3x16x16"]
    assert all(len(n["profiles"]) == 2 and all(p["original_ms"] > 0 for p in n["profiles"]) for n in tuned)
    assert report["tuning"]["distinct_specs"] == 6, "three convs, each at two sizes"
    if report["verification"].get("unchanged") is False:
        assert {t["profile"] for t in report["guard"]["timings"]} == {0, 1}
        assert all("speedup" in p and len(p["interval"]) == 2 for p in report["profiles"])
    written = onnx.load(out)
    metadata = {p.key: p.value for p in written.metadata_props}
    assert metadata["convlower.version"] == convlower.__version__
    assert json.loads(metadata["convlower.profiles"]) == [{"x": list(SMALL)}, {"x": list(LARGE)}]
    assert_equivalent(onnx.load(block_path), written, input_shapes={"x": (2, 3, 12, 12)})


def test_the_api_takes_a_list_of_shapes(block_path: Path) -> None:
    result = convlower.optimize(str(block_path), input_shapes={"x": [SMALL, LARGE]}, cache=None, variants=["conv=im2col"], guard=False)
    assert len(result.report.profiles) == 2
    assert all(n.profiles is not None and len(n.profiles) == 2 for n in result.report.nodes if n.original_ms is not None)


def test_the_guard_checks_every_profile(block_path: Path) -> None:
    """The guard times the written model at each profile; its checks carry the profile index."""
    from tests.test_guard import guard_report, random_feeds
    from convlower.optimize import _guard
    from convlower.runner import Runner

    model = onnx.load(block_path)
    lowered = convlower.lower(model, {"conv": "im2col"}).model
    runner = Runner("cpu")
    report = guard_report(runner, {"conv1": ("im2col", 1.0, 0.5)})
    profiles = [{"x": SMALL}, {"x": LARGE}]
    _guard(model, lowered, {"conv1": "im2col"}, report, runner, profiles, {}, [random_feeds(model, p) for p in profiles], None, None)
    assert report.verification["passed"] is True
    assert [t["profile"] for t in report.guard_timings][:2] == [0, 1]


@pytest.mark.parametrize("command", ["verify", "bench"])
def test_one_shape_per_input_elsewhere(block_path: Path, command: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = [command, str(block_path)] + ([str(block_path)] if command == "verify" else [])
    assert main(args + ["--input-shape", "x:1x3x8x8", "--input-shape", "x:1x3x16x16"]) == 2
    assert "names 'x' twice" in capsys.readouterr().err


def test_mismatched_profile_counts_are_a_usage_error(block_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["optimize", str(block_path), "--no-cache", "--input-shape", "x:1x3x8x8", "--input-shape", "x:1x3x16x16",
                 "--input-shape", "nope:1"])
    assert code == 2
    assert np.char.count(capsys.readouterr().err, "error:") == 1
