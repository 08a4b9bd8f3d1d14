"""Neighbourhood micro-models (`convlower.context`) and optimize's `confirm="neighbours"`.

The neighbourhoods are cut from real models, run on onnxruntime, and compared with the same
tensors captured from the whole model (the intermediate tensors added as outputs of the whole
model, fed on into the micro-model).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from convlower.context import InNeighbourhood, NoNeighbourhood, neighbourhood
from convlower.modelio import load_model
from convlower.models.builders import conv_block, residual_chain
from convlower.optimize import NEAR_TIE, _confirm_in_context, optimize
from convlower.report import NodeReport, Report
from convlower.runner import Runner
from convlower.shapes import with_static_inputs
from convlower.tune import ORIGINAL, NodeTuning, VariantOutcome, choose
from convlower.verify import input_sets
from convlower.weights import external_tensors
from tests.test_guard import (  # noqa: F401 - extra_conv_variants is a fixture
    chain_model, extra_conv_variants, guard_report, heavy_conv_model, passthrough, slow_native, zero_times_heavy,
)

RNG = np.random.default_rng(0)
SHAPES = {"x": (2, 4, 6, 6)}


def weight(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * 0.3).astype(np.float32), name)


def residual_model() -> onnx.ModelProto:
    """c0 → r0 → c1 → a0(+x) → r1 → c2 → r2 → c3, on a [N, 4, H, W] input with a symbolic batch."""
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["t0"], name="c0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["t0"], ["t1"], name="r0"),
        helper.make_node("Conv", ["t1", "w1"], ["t2"], name="c1"),
        helper.make_node("Add", ["t2", "x"], ["t3"], name="a0"),
        helper.make_node("Relu", ["t3"], ["t4"], name="r1"),
        helper.make_node("Conv", ["t4", "w2"], ["t5"], name="c2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["t5"], ["t6"], name="r2"),
        helper.make_node("Conv", ["t6", "w3"], ["y"], name="c3"),
    ]
    weights = [weight("w0", (4, 4, 3, 3)), weight("w1", (4, 4, 1, 1)), weight("w2", (4, 4, 3, 3)), weight("w3", (4, 4, 1, 1))]
    graph = helper.make_graph(nodes, "residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "H", "W"])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def if_model() -> onnx.ModelProto:
    """c0 → r0, whose output an If's branches read from the outer scope: the then-branch runs a
    Conv (inner) on it, the else-branch passes it through; then c1 after the If."""
    then_branch = helper.make_graph([helper.make_node("Conv", ["t1", "wi"], ["u"], name="inner", pads=[1, 1, 1, 1])],
                                    "then", [], [helper.make_tensor_value_info("u", TensorProto.FLOAT, None)])
    else_branch = helper.make_graph([helper.make_node("Identity", ["t1"], ["v"])], "else", [],
                                    [helper.make_tensor_value_info("v", TensorProto.FLOAT, None)])
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["t0"], name="c0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["t0"], ["t1"], name="r0"),
        helper.make_node("If", ["flag"], ["t2"], name="branch", then_branch=then_branch, else_branch=else_branch),
        helper.make_node("Conv", ["t2", "w1"], ["y"], name="c1"),
    ]
    graph = helper.make_graph(
        nodes, "with_if",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6]), helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        [weight("w0", (4, 4, 3, 3)), weight("wi", (4, 4, 3, 3)), weight("w1", (4, 4, 1, 1))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def node_names(model: onnx.ModelProto) -> set[str]:
    return {node.name for node in model.graph.node}


def captured(model: onnx.ModelProto, feeds: dict[str, np.ndarray], values: list[onnx.ValueInfoProto]) -> dict[str, np.ndarray]:
    """The whole model's values of these tensors on `feeds`: each added as an output of a copy of it."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {o.name for o in probe.graph.output}
    probe.graph.output.extend(v for v in values if v.name not in outputs and v.name not in feeds)
    session = Runner("cpu").session(probe)
    return {**feeds, **dict(zip(session.output_names, session.run(feeds)))}


def assert_same_as_in_the_whole_model(model: onnx.ModelProto, micro: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    """The micro-model, fed the whole model's values of its inputs, computes the whole model's
    values of its outputs."""
    values = captured(model, feeds, [*micro.graph.input, *micro.graph.output])
    got = Runner("cpu").session(micro).run({i.name: values[i.name] for i in micro.graph.input})
    assert len(got) == len(micro.graph.output)
    for output, array in zip(micro.graph.output, got):
        np.testing.assert_allclose(array, values[output.name], rtol=1e-5, atol=1e-5, err_msg=output.name)


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return with_static_inputs(residual_model(), SHAPES)


def test_a_conv_in_a_chain_takes_the_fused_ops_and_the_convs_on_either_side(model: onnx.ModelProto) -> None:
    """c1: back through r0 to c0; forward through the residual Add and r1 to c2, with the Relu fused into it."""
    micro = neighbourhood(model, ["c1"])
    assert node_names(micro) == {"c0", "r0", "c1", "a0", "r1", "c2", "r2"}
    assert [i.name for i in micro.graph.input] == ["x"]
    assert [o.name for o in micro.graph.output] == ["t6"], "r2's output is what c3, outside, reads"
    assert [d.dim_value for d in micro.graph.input[0].type.tensor_type.shape.dim] == list(SHAPES["x"])
    assert_same_as_in_the_whole_model(model, micro, input_sets(model, runs=1)[0])


def test_depth_counts_conv_like_ops_each_way(model: onnx.ModelProto) -> None:
    assert node_names(neighbourhood(model, ["c1"], depth=2)) == {"c0", "r0", "c1", "a0", "r1", "c2", "r2", "c3"}
    assert node_names(neighbourhood(model, ["c3"], depth=1)) == {"c2", "r2", "c3"}
    assert node_names(neighbourhood(model, ["c0"], depth=0)) == {"c0", "r0"}


def test_the_skip_operand_of_an_add_is_an_input_not_a_path_back(model: onnx.ModelProto) -> None:
    """c2's data comes from r1 ← a0 ← (c1, x): back through the Add into c1's operand only; the
    intermediate t1 that c1 reads and the skip x are inputs, fed from the whole model."""
    micro = neighbourhood(model, ["c2"])
    assert node_names(micro) == {"c1", "a0", "r1", "c2", "r2", "c3"}
    assert sorted(i.name for i in micro.graph.input) == ["t1", "x"]
    assert [o.name for o in micro.graph.output] == ["y"]
    assert_same_as_in_the_whole_model(model, micro, input_sets(model, runs=1, seed=3)[0])


def test_a_group_s_members_share_one_micro_model() -> None:
    """Two 1x1 Convs far apart in residual_chain: one micro-model of two separate pieces."""
    model = with_static_inputs(residual_chain(channels=4, height=4, width=6, blocks=3), {"x": (1, 4, 4, 6)})
    micro = neighbourhood(model, ["block0/expand", "block2/project"])
    assert {n.name for n in micro.graph.node if n.op_type == "Conv"} == {"block0/expand", "block0/depthwise",
                                                                         "block2/depthwise", "block2/project"}
    assert sorted(n.op_type for n in micro.graph.node if n.op_type != "Conv") == ["Add", "Relu", "Relu"]
    assert sorted(i.name for i in micro.graph.input) == ["b1.out", "b2.er", "x"]
    assert sorted(o.name for o in micro.graph.output) == ["b0.d", "b2.out"]
    assert_same_as_in_the_whole_model(model, micro, input_sets(model, runs=1, seed=5)[0])


def test_a_neighbour_in_an_if_body_reads_the_conv_s_output_from_outside() -> None:
    """c0's activation feeds the If (its branches read it from the outer scope): it becomes an
    output of the neighbourhood. c1 reads the If's output: it is an input there."""
    model = if_model()
    first = neighbourhood(model, ["c0"])
    assert node_names(first) == {"c0", "r0"} and [o.name for o in first.graph.output] == ["t1"]
    after = neighbourhood(model, ["c1"])
    assert node_names(after) == {"c1"} and [i.name for i in after.graph.input] == ["t2"]
    for flag in (True, False):
        feeds = {"x": RNG.standard_normal((1, 4, 6, 6)).astype(np.float32), "flag": np.array(flag)}
        assert_same_as_in_the_whole_model(model, first, feeds)
        assert_same_as_in_the_whole_model(model, after, feeds)


def test_a_node_inside_an_if_body_or_absent_has_no_neighbourhood() -> None:
    with pytest.raises(NoNeighbourhood, match="inside an If/Loop/Scan body"):
        neighbourhood(if_model(), ["inner"])
    with pytest.raises(NoNeighbourhood, match="not in the model's main graph"):
        neighbourhood(if_model(), ["no_such_node"])


def test_a_neighbourhood_refers_to_external_weights_rather_than_copying_them(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save_model(conv_block(channels=512, size=8), path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=1024)
    assert (tmp_path / "m.onnx.data").stat().st_size > 2_000_000
    proto = with_static_inputs(load_model(path), {"x": (1, 3, 8, 8)})
    micro = neighbourhood(proto, ["pwconv3"])
    assert node_names(micro) == {"dwconv2", "relu2", "pwconv3"}
    assert micro.ByteSize() < 10_000
    assert {"w3", "b3"} <= {t.name for t in external_tensors(micro)}
    feeds = {"x": RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)}
    assert_same_as_in_the_whole_model(load_model(path), micro, feeds)


def test_a_neighbourhood_times_the_choice_against_itself_without_it(model: onnx.ModelProto) -> None:
    from convlower.runner import PairedPolicy, time_paired

    where = InNeighbourhood([model], ["c1"], Runner("cpu"))
    (without,), (with_choice,) = where.runs({}), where.runs({"c1": "im2col"})
    paired = time_paired(without, with_choice, PairedPolicy(min_rounds=3, max_rounds=3))
    assert paired.rounds == 3 and paired.a.median_ms > 0 and paired.b.median_ms > 0
    assert paired.low <= paired.ratio <= paired.high


def test_a_choice_that_loses_in_its_neighbourhood_is_not_kept(extra_conv_variants) -> None:  # noqa: F811
    """As in the whole model (test_guard): the ~450x slower slow_native loses, now in its
    group's neighbourhood, and goes back to the original with the ratio measured there. (With
    several groups, all of them are first measured together in the whole model.)"""
    extra_conv_variants(slow_native(128, 2))
    model = chain_model(["a", "b", "c"])
    runner = Runner("cpu")
    report = guard_report(runner, {"a": ("slow_native", 1.0, 0.5)})
    kept = _confirm_in_context(model, {"a": "slow_native"}, {"group a": ["a"], "group b": ["b"], "group c": ["c"]},
                               report, runner, [input_sets(model, runs=1)[0]], "neighbours")
    assert kept == {}
    for node in report.nodes:
        assert node.chosen == ORIGINAL and node.reason.startswith("slow_native won alone but not in its neighbourhood")
        assert node.context["method"] == "neighbours" and node.context["kept"] is False
        assert node.context["interval"][0] > 1 and node.context["saved_ms"] < 0


def test_a_near_tie_that_is_faster_in_the_neighbourhood_takes_the_kept_group(extra_conv_variants) -> None:  # noqa: F811
    """The duel of near variants (test_guard) takes place in the neighbourhood too."""
    extra_conv_variants(passthrough("with_matmuls", zero_times_heavy(96, 1)), passthrough("plain"))
    model = heavy_conv_model()
    runner = Runner("cpu")
    report = guard_report(runner, {"a": ("with_matmuls", 1.0, 0.5)})
    report.nodes[0].variants["plain"] = {"status": "ok", "ms": 0.5 * (1 + NEAR_TIE / 2)}
    kept = _confirm_in_context(model, {"a": "with_matmuls"}, {"group a": ["a"]}, report, runner, [input_sets(model, runs=1)[0]], "neighbours")
    node = report.nodes[0]
    assert node.context["method"] == "neighbours"
    duel = node.context["duels"]["plain"]
    assert duel["against"] == "with_matmuls" and duel["won"] is True and duel["interval"][1] < 1
    assert kept == {"a": "plain"} and node.chosen == "plain"
    assert node.reason == "plain chosen over with_matmuls, which was faster alone: plain was faster in its neighbourhood"


def test_a_group_in_an_if_body_is_confirmed_in_the_whole_model(extra_conv_variants) -> None:  # noqa: F811
    extra_conv_variants(slow_native(128, 2))
    model = if_model()
    runner = Runner("cpu")
    report = guard_report(runner, {"inner": ("slow_native", 1.0, 0.5)})
    feeds = {"x": RNG.standard_normal((1, 4, 6, 6)).astype(np.float32), "flag": np.array(True)}
    assert _confirm_in_context(model, {"inner": "slow_native"}, {"g": ["inner"]}, report, runner, [feeds], "neighbours") == {}
    assert report.nodes[0].context["method"] == "model"
    assert report.nodes[0].reason.startswith("slow_native won alone but not in the whole model")


def test_the_prediction_takes_the_neighbourhoods_saved_ms_off_the_whole_model() -> None:
    """Two groups kept in their neighbourhoods (1.0 and 0.5 ms saved) and one in the whole model
    (ratio 0.8): the whole model at 10 ms is predicted at 0.8 x (10 - 1.5) ms, and the interval
    takes the saved ms' spans in quadrature."""
    report = Report("CPUExecutionProvider", "cpu", None)
    for name, context in (("a", {"ratio": 0.5, "interval": [0.4, 0.6], "a_median_ms": 2.0, "kept": True, "method": "neighbours", "saved_ms": 1.0}),
                          ("b", {"ratio": 0.5, "interval": [0.5, 0.5], "a_median_ms": 1.0, "kept": True, "method": "neighbours", "saved_ms": 0.5}),
                          ("c", {"ratio": 0.8, "interval": [0.8, 0.8], "kept": True, "method": "model"})):
        node = NodeReport(name, "Conv", "", None, "im2col", 1.0, {"im2col": {"status": "ok", "ms": 0.5}})
        node.context = context
        report.nodes.append(node)
    report.original_ms = 10.0
    assert report.predicted_speedup == pytest.approx(1 / (0.8 * 8.5 / 10)), "saved ms off the guard's median; model ratios multiply"
    low, high = report.predicted_interval
    assert low == pytest.approx(1 / (0.8 * 8.7 / 10)) and high == pytest.approx(1 / (0.8 * 8.3 / 10)), "a saves 0.8-1.2 ms"
    report.original_ms = None
    assert report.predicted_speedup is None and report.predicted_interval is None, "no whole-model median, no prediction"


def test_optimize_confirms_in_neighbourhoods_and_writes_a_verified_model() -> None:
    """Every group whose choice won alone is confirmed in its neighbourhood; what is kept, the
    guard verifies; the written model computes what the input does."""
    source = residual_chain(channels=16, height=4, width=16, blocks=2)
    result = optimize(source, input_shapes={"x": (1, 16, 4, 16)}, cache=None, provider="cpu", confirm="neighbours")
    report = result.report
    won_alone = [n for n in report.nodes if n.original_ms is not None
                 and choose(NodeTuning(n.original_ms, {k: VariantOutcome(**v) for k, v in n.variants.items()})) != ORIGINAL]
    assert all(n.context and n.context["method"] == "neighbours" and "saved_ms" in n.context for n in won_alone)
    assert {n.name for n in report.nodes if n.context} == {n.name for n in won_alone}
    kept = [n for n in report.nodes if n.chosen != ORIGINAL]
    assert all(n.context["kept"] for n in kept)
    assert "confirm_seconds" in report.tuning
    if kept:
        assert report.verification["passed"] is True and report.predicted_speedup is not None
    else:
        assert report.verification["unchanged"] is True
    x = RNG.standard_normal((1, 16, 4, 16)).astype(np.float32)
    np.testing.assert_allclose(Runner("cpu").session(result.model).run({"x": x})[0], Runner("cpu").session(source).run({"x": x})[0],
                               rtol=1e-4, atol=1e-4)


def test_optimize_refuses_an_unknown_confirmation() -> None:
    from convlower.errors import UsageError

    with pytest.raises(UsageError, match="not a confirmation method"):
        optimize(conv_block(channels=4, size=8), cache=None, provider="cpu", confirm="nearby")


def convlower_cli(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "convlower", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_confirm_neighbours_and_a_bad_value(tmp_path: Path) -> None:
    onnx.save(conv_block(channels=4, size=8), tmp_path / "m.onnx")
    done = convlower_cli("optimize", "m.onnx", "--no-cache", "--provider", "cpu", "--confirm", "neighbours", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "m.convlower.json").read_text())
    assert report["verification"].get("passed") is not False
    # one group's choice is confirmed in its neighbourhood; several groups measured together, in the whole model
    assert all(n["context"]["method"] == ("model" if n["context"].get("groups", 1) > 1 else "neighbours")
               for n in report["nodes"] if "context" in n)
    bad = convlower_cli("optimize", "m.onnx", "--no-cache", "--confirm", "nearby", "-o", "bad.onnx", cwd=tmp_path)
    err = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(err) == 1 and "--confirm" in err[0] and "nearby" in err[0]
    both = convlower_cli("optimize", "m.onnx", "--no-cache", "--confirm", "model", "--no-confirm", "-o", "both.onnx", cwd=tmp_path)
    assert both.returncode == 2 and len(both.stderr.strip().splitlines()) == 1


def test_the_summary_says_where_the_choices_lost() -> None:
    report = guard_report(Runner("cpu"), {"a": ("im2col", 1.0, 0.5)})
    report.nodes[0].context = {"ratio": 1.2, "kept": False, "method": "neighbours", "saved_ms": -0.1}
    report.nodes[0].chosen = ORIGINAL
    report.verification = {"unchanged": True}
    assert "1 won alone but not in their neighbourhoods); no choice held in their neighbourhoods" in report.summary()
