"""The guard, the choice rule and the tuning cache: decisions fed controlled numbers, or premises that
hold by orders of magnitude.

No test here asserts on wall-clock time. Where a decision depends on timing, either the decision
function gets the numbers directly (`choose`), or the slow side does hundreds of times more work
than the fast side, counted from the graph (`slow_native`), so that the premise "this is slower"
holds on any machine under any load.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import convlower
from convlower.cache import TuningCache
from convlower.models.builders import conv_block
from convlower.measure import Measurements, model_digest
from convlower.optimize import (
    CONFIRM_MIN_GAIN, GUARD_ROUNDS, MAX_CONTENDERS, MODEL_MIN_GAIN, MODEL_POLICY, NEAR_TIE, RESOLVABLE_GAIN, _cached,
    _confirm_in_context, _contenders, _guard, _units,
)
from convlower.passes import FAMILIES, Builder, SimpleVariant
from convlower.passes.conv import ConvSpec, build_native, why_not_native
from convlower.report import NodeReport, Report
from convlower.rewrite import apply_choices, import_graph, plan_nodes, remaining_ops
from convlower.runner import Runner
from convlower.shapes import with_static_inputs
from convlower.testing import assert_equivalent
from convlower.tune import MIN_GAIN, ORIGINAL, NodeTuning, VariantOutcome, choose, tuning_key
from convlower.verify import DEFAULT_TOLERANCES, input_sets

RNG = np.random.default_rng(0)
OFFSET = 0.05
"""What the deliberately wrong variant adds to the Conv's output: 50x float32's tolerance."""


Extra = Callable[[Builder, gs.Tensor], gs.Tensor]


def native_then(extra: Extra) -> Callable:
    """A Conv variant's build: the native Conv into a temporary, plus `extra(b, x)` into the output."""

    def build(b: Builder, spec: ConvSpec, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]) -> None:
        exact = gs.Variable(f"{b.prefix}/exact", dtype=outputs[0].dtype, shape=outputs[0].shape)
        build_native(b, spec, inputs, [exact])
        b.add(exact, extra(b, inputs[0]), out=outputs[0])

    return build


def plus_offset() -> SimpleVariant:
    """Deliberately wrong: the Conv's output plus OFFSET everywhere."""
    return SimpleVariant("plus_offset", why_not_native, native_then(lambda b, x: b.scalar(OFFSET)), "wrong on purpose")


def zero_times_heavy(size: int, chain: int) -> Extra:
    """0 · sum(M^(chain+1)) with M = Q·tanh(mean(x)), Q a fixed orthogonal size x size matrix:
    exactly zero (every power of M stays within [-1, 1], so the sum is finite), but `chain`
    MatMuls of size³ multiply-adds each on a matrix that depends on the input, so onnxruntime
    cannot fold them at session creation
    (`test_the_slow_variant_is_not_folded_and_does_orders_of_magnitude_more_work`)."""
    q = np.linalg.qr(np.random.default_rng(1).standard_normal((size, size)))[0].astype(np.float32)

    def extra(b: Builder, x: gs.Tensor) -> gs.Tensor:
        scale = b.op("Tanh", [b.op("ReduceMean", [x], {"keepdims": 0})])
        matrix = b.mul(b.const(q, "orthogonal"), scale)
        power = matrix
        for _ in range(chain):
            power = b.matmul(power, matrix)
        return b.mul(b.op("ReduceSum", [power], {"keepdims": 0}), b.scalar(0.0))

    return extra


def slow_native(size: int, chain: int) -> SimpleVariant:
    """Exactly the Conv, plus `chain` input-dependent size x size MatMuls whose result is multiplied by zero."""
    return SimpleVariant("slow_native", why_not_native, native_then(zero_times_heavy(size, chain)), "slow on purpose")


@pytest.fixture
def extra_conv_variants(monkeypatch: pytest.MonkeyPatch):
    """Register extra Conv variants for one test; the registry is restored after it."""

    def register(*variants: SimpleVariant) -> None:
        family = FAMILIES["conv"]
        monkeypatch.setitem(FAMILIES, "conv", replace(family, variants=family.variants + tuple(variants)))

    return register


def conv_macs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> int:
    """Multiply-adds of every Conv in the main graph at these input shapes."""
    graph = import_graph(with_static_inputs(model, shapes))
    total = 0
    for node in graph.nodes:
        if node.op == "Conv":
            _, in_per_group, *kernel = node.inputs[1].shape
            total += int(np.prod(node.outputs[0].shape)) * in_per_group * int(np.prod(kernel))
    return total


def random_feeds(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    return input_sets(model, input_shapes=shapes, runs=1)[0]


def run_guard(original: onnx.ModelProto, optimized: onnx.ModelProto, choices: dict[str, str], report: Report, runner: Runner,
              shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """The guard at one profile, on random inputs."""
    return _guard(original, optimized, choices, report, runner, [shapes], {}, [random_feeds(original, shapes)], None, None)


def guard_report(runner: Runner, gains: dict[str, tuple[str, float, float]]) -> Report:
    """A report whose nodes chose variants with the given (variant, original ms, variant ms): the
    guard reverts by these predicted gains, not by anything it measures per node."""
    report = Report(runner.provider, runner.device, None)
    for name, (variant, original_ms, variant_ms) in gains.items():
        report.nodes.append(NodeReport(name, "Conv", "", None, variant, original_ms, {variant: {"status": "ok", "ms": variant_ms}}))
    return report


@pytest.fixture(scope="module")
def block() -> onnx.ModelProto:
    return conv_block(channels=16, size=32)


BLOCK_SHAPES = {"x": (1, 3, 32, 32)}
BLOCK_SLOW = (320, 3)
"""3 MatMuls of 320³: 98M multiply-adds against the block's 0.6M, 160x the work."""


# --- the premise of the slow tests ------------------------------------------------------------

def test_the_slow_variant_is_not_folded_and_does_orders_of_magnitude_more_work(
    block: onnx.ModelProto, extra_conv_variants, tmp_path: Path
) -> None:
    extra_conv_variants(slow_native(*BLOCK_SLOW))
    slow = apply_choices(block, {"conv1": "slow_native"})
    size, chain = BLOCK_SLOW
    assert chain * size**3 >= 100 * conv_macs(block, BLOCK_SHAPES)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "as_run.onnx")
    ort.InferenceSession(slow.SerializeToString(), options, providers=["CPUExecutionProvider"])
    as_run = onnx.load(str(tmp_path / "as_run.onnx"))
    assert sum(n.op_type.endswith("MatMul") for n in as_run.graph.node) == chain, "onnxruntime folded the slow chain"
    assert_equivalent(block, slow, input_shapes=BLOCK_SHAPES)


# --- the guard ----------------------------------------------------------------------------------

def test_guard_reverts_a_choice_that_makes_the_model_slower(block: onnx.ModelProto, extra_conv_variants) -> None:
    extra_conv_variants(slow_native(*BLOCK_SLOW))
    runner = Runner("cpu")
    report = guard_report(runner, {"conv1": ("slow_native", 1.0, 0.5)})
    slow = apply_choices(block, {"conv1": "slow_native"})
    kept = run_guard(block, slow, {"conv1": "slow_native"}, report, runner, BLOCK_SHAPES)
    assert kept is block
    assert report.reverted == ["conv1"] and report.nodes[0].chosen == ORIGINAL
    assert report.nodes[0].reason.startswith("reverted from slow_native: the optimized model was not shown 1% faster")
    verification = report.verification
    assert verification["passed"] is True and verification["unchanged"] is True
    assert verification["max_abs_err"] < 1e-5 and "not faster" in verification["reason"]
    assert "outputs agreed but the optimized model was not faster" in report.summary()
    assert "wrote the input unchanged" in report.summary() and "end to end" not in report.summary()
    low, high = report.guard_timings[-1]["interval"]
    assert low > 1 and report.guard_timings[-1]["confidence"] == 0.95, "the slow candidate's whole interval is above 1"


def test_guard_keeps_a_faster_model_and_reports_the_interval(block: onnx.ModelProto, extra_conv_variants) -> None:
    """The slow model as the original and the block as its optimized form: kept at once, with the
    paired ratio's interval wholly below 1 - MODEL_MIN_GAIN in the report and the summary."""
    extra_conv_variants(slow_native(*BLOCK_SLOW))
    runner = Runner("cpu")
    report = guard_report(runner, {"conv1": ("slow_native", 1.0, 0.5)})
    slow = apply_choices(block, {"conv1": "slow_native"})
    assert run_guard(slow, block, {"conv1": "slow_native"}, report, runner, BLOCK_SHAPES) is block
    assert report.reverted == [] and report.verification["unchanged"] is False
    (check,) = json.loads(report.to_json())["guard"]["timings"]
    assert check["interval"][0] <= check["ratio"] <= check["interval"][1] < 1 - MODEL_MIN_GAIN
    assert check["rounds"] >= MODEL_POLICY.min_rounds
    assert "x end to end" in report.summary() and "95% interval" in report.summary()


def chain_model(names: Sequence[str]) -> onnx.ModelProto:
    """Tiny 3x3 Convs one after another (4 channels, 8x8), with a Tanh between."""
    nodes, previous = [], "x"
    for index, name in enumerate(names):
        nodes.append(helper.make_node("Conv", [previous, f"w{index}"], [f"c{index}"], name=name, pads=[1, 1, 1, 1]))
        previous = f"t{index}" if index < len(names) - 1 else "y"
        nodes.append(helper.make_node("Tanh", [f"c{index}"], [previous]))
    weights = [numpy_helper.from_array((RNG.standard_normal((4, 4, 3, 3)) * 0.2).astype(np.float32), f"w{i}") for i in range(len(names))]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_guard_reverts_least_predicted_gain_first_then_all_once_the_budget_is_spent(extra_conv_variants) -> None:
    """Five choices, each making the model ~450x slower (2 MatMuls of 128³ per 9k-multiply-add
    Conv): the guard reverts the three of least predicted gain one round at a time, then the
    remaining two at once."""
    extra_conv_variants(slow_native(128, 2))
    names = ["a", "b", "c", "d", "e"]
    model = chain_model(names)
    assert 2 * 128**3 >= 100 * conv_macs(model, {"x": (1, 4, 8, 8)}) / len(names)
    predicted = {"a": 0.5, "b": 0.1, "c": 0.9, "d": 0.3, "e": 0.7}
    runner = Runner("cpu")
    report = guard_report(runner, {name: ("slow_native", 1.0, 1.0 - gain) for name, gain in predicted.items()})
    choices = {name: "slow_native" for name in names}
    kept = run_guard(model, apply_choices(model, choices), choices, report, runner, {"x": (1, 4, 8, 8)})
    assert kept is model
    assert len(names) > GUARD_ROUNDS + 1, "some choices must be left when the budget is spent"
    one_by_one = sorted(names, key=predicted.__getitem__)[:GUARD_ROUNDS]
    at_once = [name for name in names if name not in one_by_one]
    assert one_by_one == ["b", "d", "a"]
    assert report.reverted == one_by_one + at_once, "least predicted gain first, then the rest in node order"
    reasons = {n.name: n.reason for n in report.nodes}
    for name in one_by_one:
        assert "not shown 1% faster" in reasons[name]
    for name in at_once:
        assert "revert budget is spent" in reasons[name]
    assert all(n.chosen == ORIGINAL for n in report.nodes)
    assert report.verification["passed"] is True and report.verification["unchanged"] is True


def test_a_choice_that_wins_alone_but_loses_in_the_whole_model_is_not_kept(extra_conv_variants) -> None:
    """Two groups whose choice (the ~450x slower slow_native) the per-node numbers say wins: each
    is timed in the whole model against the model without it, loses, and goes back to the
    original with the in-context ratio as its reason; the guard then has nothing to check."""
    extra_conv_variants(slow_native(128, 2))
    model = chain_model(["a", "b", "c"])
    runner = Runner("cpu")
    report = guard_report(runner, {"a": ("slow_native", 1.0, 0.5), "b": ("slow_native", 1.0, 0.6)})
    choices = {"a": "slow_native", "b": "slow_native"}
    kept = _confirm_in_context(model, choices, {"group a": ["a"], "group b": ["b"], "group c": ["c"]}, report, runner,
                               [random_feeds(model, {"x": (1, 4, 8, 8)})])
    assert kept == {}
    for node in report.nodes:
        assert node.chosen == ORIGINAL and node.reason.startswith("slow_native won alone but not in the whole model")
        assert node.context["kept"] is False and node.context["interval"][0] > 1
        assert node.to_dict()["context"] == node.context
    assert report.nodes[0].context is report.nodes[1].context and report.nodes[0].context["groups"] == 2, \
        "both groups were measured together, once"
    assert "together with 1 other group(s)" in report.nodes[0].reason
    assert report.confirmation["together"]["kept"] is False and report.confirmation["groups"] == 2
    assert report.predicted_speedup is None, "nothing kept, nothing predicted"
    report.verification = {"unchanged": True}
    assert "0 of 2 node(s) lowered (2 won alone but not in the whole model); no choice held in the whole model" in report.summary()


def test_a_choice_that_loses_in_context_is_not_dueled(extra_conv_variants) -> None:
    """slow_native was chosen alone and a variant came within NEAR_TIE of it; slow_native loses
    against the model without it, so the group goes back to the original at once: duels are for
    groups that are kept."""
    extra_conv_variants(slow_native(96, 1), replace(slow_native(160, 3), name="slower_native"))
    model = chain_model(["a", "b"])
    runner = Runner("cpu")
    report = guard_report(runner, {"a": ("slow_native", 1.0, 0.5)})
    report.nodes[0].variants["slower_native"] = {"status": "ok", "ms": 0.5 * (1 + NEAR_TIE / 2)}
    kept = _confirm_in_context(model, {"a": "slow_native"}, {"group a": ["a"]}, report, runner,
                               [random_feeds(model, {"x": (1, 4, 8, 8)})])
    node = report.nodes[0]
    assert kept == {} and node.chosen == ORIGINAL
    assert "duels" not in node.context and node.context["interval"][0] > 1
    assert node.reason.startswith("slow_native won alone but not in the whole model")


def heavy_conv_model() -> onnx.ModelProto:
    """One 3x3 Conv, 64 channels at 32x32: 38M multiply-adds, a millisecond or so."""
    weights = numpy_helper.from_array((RNG.standard_normal((64, 64, 3, 3)) * 0.05).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="a", pads=[1, 1, 1, 1])], "heavy",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 32, 32])], [weights])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def passthrough(name: str, extra: Extra | None = None) -> SimpleVariant:
    """Timing stand-ins, not Convs: the input passed through (plus `extra`, which is zero), far
    cheaper than the heavy Conv. Confirmation only times; the tuner is what checks outputs."""

    def build(b: Builder, spec: ConvSpec, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]) -> None:
        b.add(inputs[0], extra(b, inputs[0]) if extra else b.scalar(0.0), out=outputs[0])

    return SimpleVariant(name, why_not_native, build, "a timing stand-in")


def test_a_near_tie_that_is_faster_in_the_model_takes_the_kept_group(extra_conv_variants) -> None:
    """Both stand-ins beat the heavy Conv by far, so the chosen one (with 2 MatMuls of 96³ that
    come to zero) is kept; the plain pass-through came within NEAR_TIE of it alone, meets it in
    the model, wins the duel, and is the variant the group is confirmed with."""
    extra_conv_variants(passthrough("with_matmuls", zero_times_heavy(96, 1)), passthrough("plain"))
    model = heavy_conv_model()
    runner = Runner("cpu")
    report = guard_report(runner, {"a": ("with_matmuls", 1.0, 0.5)})
    report.nodes[0].variants["plain"] = {"status": "ok", "ms": 0.5 * (1 + NEAR_TIE / 2)}
    kept = _confirm_in_context(model, {"a": "with_matmuls"}, {"group a": ["a"]}, report, runner,
                               [random_feeds(model, {"x": (1, 64, 32, 32)})])
    node = report.nodes[0]
    duel = node.context["duels"]["plain"]
    assert duel["against"] == "with_matmuls" and duel["won"] is True and duel["interval"][1] < 1
    assert kept == {"a": "plain"} and node.chosen == "plain" and node.context["variant"] == "plain"
    assert node.context["kept"] is True and node.context["interval"][1] < 1 - CONFIRM_MIN_GAIN
    assert node.context["first"]["interval"][1] < 1 - CONFIRM_MIN_GAIN, "kept on two measurements, the second reported"
    assert node.reason.startswith("plain chosen over with_matmuls")


def test_when_nothing_wins_together_one_measurement_answers_for_every_group(extra_conv_variants) -> None:
    """Three groups whose choice is ~450x slower: all together lose in the whole model, and that
    one measurement sends all three back, instead of one (or two) per group."""
    extra_conv_variants(slow_native(128, 2))
    model = chain_model(["a", "b", "c"])
    runner = Runner("cpu")
    report = guard_report(runner, {name: ("slow_native", 1.0, 0.5) for name in "abc"})
    measure = Measurements.in_memory()
    kept = _confirm_in_context(model, dict.fromkeys("abc", "slow_native"), {f"group {n}": [n] for n in "abc"}, report, runner,
                               [random_feeds(model, {"x": (1, 4, 8, 8)})], measurements=measure)
    assert kept == {} and measure.timed == 1
    assert all(n.chosen == ORIGINAL and "together with 2 other group(s)" in n.reason for n in report.nodes)


def two_heavy_convs() -> onnx.ModelProto:
    """Two 3x3 Convs of 64 channels at 32x32 (different weights' shapes: two tuning groups)."""
    w1 = numpy_helper.from_array((RNG.standard_normal((64, 64, 3, 3)) * 0.05).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((RNG.standard_normal((64, 64, 5, 5)) * 0.05).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="a", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["h", "w2"], ["y"], name="b", pads=[2, 2, 2, 2])]
    graph = helper.make_graph(nodes, "heavy2", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 32, 32])], [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_set_that_wins_is_split_and_a_warm_cache_answers_again_without_timing(extra_conv_variants, tmp_path: Path) -> None:
    """Both heavy Convs replaced by a pass-through (far cheaper): together they win, so each group
    is confirmed on its own, twice (3 + 2 measurements). The same confirmation with the same file
    cache times nothing and keeps the same choices."""
    extra_conv_variants(passthrough("plain"))
    model = two_heavy_convs()
    runner = Runner("cpu")
    feeds = [random_feeds(model, {"x": (1, 64, 32, 32)})]

    def confirm() -> tuple[dict[str, str], Report, Measurements]:
        report = guard_report(runner, {"a": ("plain", 1.0, 0.1), "b": ("plain", 2.0, 0.1)})
        store = TuningCache.open(str(tmp_path / "tuning.json"))
        measure = Measurements(store, model_digest(model), ["x 1x64x32x32"], ["cpu", runner.device])
        kept = _confirm_in_context(model, {"a": "plain", "b": "plain"}, {"group a": ["a"], "group b": ["b"]}, report,
                                   runner, feeds, measurements=measure)
        store.save()
        return kept, report, measure

    kept, report, measure = confirm()
    assert kept == {"a": "plain", "b": "plain"} and measure.timed == 5 and measure.cached == 0
    assert report.confirmation["together"]["kept"] is True
    assert all(n.context["kept"] and "groups" not in n.context and "first" in n.context for n in report.nodes)
    again, report_again, measure_again = confirm()
    assert again == kept and measure_again.timed == 0 and measure_again.cached == 5
    assert [n.context["ratio"] for n in report_again.nodes] == [n.context["ratio"] for n in report.nodes]
    assert all(n.context.get("cached") for n in report_again.nodes)


def test_groups_too_small_to_resolve_are_confirmed_last_as_one() -> None:
    model_ms = 100.0
    gain = {"big": 10.0, "medium": RESOLVABLE_GAIN * model_ms, "tiny": 0.1, "small": RESOLVABLE_GAIN * model_ms * 0.9}
    order = sorted(gain, key=gain.__getitem__, reverse=True)
    assert _units(order, gain, model_ms) == [["big"], ["medium"], ["small", "tiny"]]
    assert _units(["big"], gain, model_ms) == [["big"]]


def contender_report(recognized: bool = False, **variants: float | None) -> NodeReport:
    """A node whose original took 1 ms and that chose `best`; None marks a rejected variant."""
    outcomes = {name: {"status": "ok", "ms": ms} if ms is not None else {"status": "rejected", "reason": "wrong"}
                for name, ms in variants.items()}
    return NodeReport("n", "Conv", "", None, "best", 1.0, outcomes, recognized=recognized)


def test_contenders_are_the_verified_variants_within_the_near_tie_margin_fastest_first() -> None:
    near, far = 0.5 * (1 + NEAR_TIE / 2), 0.5 * (1 + 2 * NEAR_TIE)
    node = contender_report(best=0.5, native=0.5, second=near, third=0.5 * (1 + NEAR_TIE / 4), far=far, wrong=None)
    assert _contenders(node) == ["best", "second", "third"][:MAX_CONTENDERS], "the registry's order"
    assert _contenders(contender_report(best=0.5, far=far)) == ["best"]


def test_a_contender_slower_than_the_original_is_left_out_unless_the_node_was_recognized() -> None:
    """A node with an original of its own keeps it rather than take a variant slower than it;
    a recognized node has no original to keep, so only the margin counts."""
    assert _contenders(contender_report(best=0.99, close=1.05)) == ["best"]
    assert _contenders(contender_report(recognized=True, best=0.99, close=1.05)) == ["best", "close"]


def test_at_several_profiles_a_contender_must_be_near_at_every_one() -> None:
    node = contender_report(best=0.5, steady=0.52, uneven=0.51)
    node.profiles = [
        {"original_ms": 1.0, "variants": {"best": {"status": "ok", "ms": 0.5}, "steady": {"status": "ok", "ms": 0.52},
                                          "uneven": {"status": "ok", "ms": 0.51}}},
        {"original_ms": 4.0, "variants": {"best": {"status": "ok", "ms": 2.0}, "steady": {"status": "ok", "ms": 2.1},
                                          "uneven": {"status": "ok", "ms": 3.0}}},
    ]
    assert _contenders(node) == ["best", "steady"]


def test_the_prediction_multiplies_the_ratios_of_the_groups_kept_in_context() -> None:
    report = guard_report(Runner("cpu"), {"a": ("im2col", 1.0, 0.5), "b": ("im2col", 1.0, 0.5), "c": ("im2col", 2.0, 1.0)})
    report.original_ms = 10.0
    assert report.predicted_speedup == report.isolated_predicted_speedup == pytest.approx(10 / 8)
    shared = {"ratio": 0.8, "interval": [0.75, 0.85], "kept": True}
    report.nodes[0].context = report.nodes[1].context = shared
    report.nodes[2].context = {"ratio": 0.9, "interval": [0.85, 0.95], "kept": True}
    assert report.predicted_speedup == pytest.approx(1 / (0.8 * 0.9)), "one factor per group, not per node"
    assert report.isolated_predicted_speedup == pytest.approx(10 / 8)
    low, high = report.predicted_interval
    assert low < report.predicted_speedup < high
    assert low == pytest.approx(1 / (0.8 * 0.9) / np.exp(np.hypot(np.log(0.85 / 0.8), np.log(0.95 / 0.9))))
    assert report.to_dict()["model"]["predicted_interval"] == [low, high]


def test_guard_with_nothing_to_check_runs_nothing(block: onnx.ModelProto) -> None:
    runner = Runner("cpu")
    report = guard_report(runner, {"conv": (ORIGINAL, 1.0, 1.0)})
    assert run_guard(block, block, {}, report, runner, BLOCK_SHAPES) is block
    assert report.verification == {"unchanged": True} and report.original_ms is None
    assert "no variant beat the original; wrote the input unchanged" in report.summary()


def test_guard_reverts_a_wrong_model_and_says_the_outputs_disagreed(block: onnx.ModelProto) -> None:
    runner = Runner("cpu")
    report = guard_report(runner, {"conv1": ("im2col", 1.0, 0.5)})
    wrong = onnx.ModelProto()
    wrong.CopyFrom(block)
    wrong.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((16, 3, 3, 3), np.float32), "w1"))
    kept = run_guard(block, wrong, {"conv1": "im2col"}, report, runner, BLOCK_SHAPES)
    assert kept is block and report.nodes[0].chosen == ORIGINAL and "disagree" in report.nodes[0].reason
    verification = report.verification
    assert verification["passed"] is False and verification["unchanged"] is True
    assert verification["failed_outputs"] == ["y"] and verification["max_abs_err"] > 0.1
    assert verification["reason"].startswith("max abs err ") and verification["reason"].endswith(" at y")


# --- a deliberately wrong variant -----------------------------------------------------------------

def test_a_wrong_variant_is_rejected_by_the_tuner_with_its_error(block: onnx.ModelProto, extra_conv_variants) -> None:
    extra_conv_variants(plus_offset())
    report = convlower.optimize(block, provider="cpu", cache=None, guard=False, variants=["conv=im2col,plus_offset"],
                               input_shapes=BLOCK_SHAPES).report
    atol, rtol = DEFAULT_TOLERANCES["float32"]
    for node in report.nodes:
        outcome = node.variants["plus_offset"]
        assert outcome["status"] == "rejected", f"{node.name}: {outcome}"
        assert outcome["max_abs_err"] == pytest.approx(OFFSET, abs=1e-5)
        assert outcome["reason"].startswith("output disagrees with the original node: ")
        assert "max abs err 0.05 " in outcome["reason"] and f"atol {atol:g}, rtol {rtol:g}" in outcome["reason"]
        assert node.chosen != "plus_offset"
    written = json.loads(report.to_json())
    assert all(n["variants"]["plus_offset"]["status"] == "rejected" for n in written["nodes"])


def test_a_wrong_choice_applied_directly_is_caught_by_the_guard(block: onnx.ModelProto, extra_conv_variants) -> None:
    """pwconv3 writes the model's output, so the guard sees the offset itself."""
    extra_conv_variants(plus_offset())
    runner = Runner("cpu")
    report = guard_report(runner, {"pwconv3": ("plus_offset", 1.0, 0.5)})
    wrong = apply_choices(block, {"pwconv3": "plus_offset"})
    kept = run_guard(block, wrong, {"pwconv3": "plus_offset"}, report, runner, BLOCK_SHAPES)
    assert kept is block and report.reverted == ["pwconv3"]
    verification = report.verification
    assert verification["passed"] is False and verification["unchanged"] is True
    assert verification["failed_outputs"] == ["y"]
    assert verification["max_abs_err"] == pytest.approx(OFFSET, abs=1e-5)
    assert verification["reason"] == "max abs err 0.05 at y"
    assert report.nodes[0].reason == "reverted from plus_offset: the optimized model's outputs disagree with the original's: max abs err 0.05 at y"
    summary = report.summary()
    assert "0 of 1 node(s) lowered (1 reverted); outputs disagreed (max abs err 0.05 at y); wrote the input unchanged" in summary
    written = json.loads(report.to_json())["verification"]
    assert written["passed"] is False and written["unchanged"] is True and written["failed_outputs"] == ["y"]


# --- the summary line for each verification record ------------------------------------------------

SUMMARIES = [
    ({"passed": True, "unchanged": False, "max_abs_err": 1e-6, "max_rel_err": 1e-6}, "im2col", (2.0, 1.0),
     "1 of 1 node(s) lowered; 2.00x end to end (2.000 -> 1.000 ms); verified; on CPUExecutionProvider (cpu)"),
    ({"passed": True, "unchanged": True, "max_abs_err": 0.0, "max_rel_err": 0.0, "reason": "..."}, ORIGINAL, (1.0, 2.0),
     "0 of 1 node(s) lowered (1 reverted); outputs agreed but the optimized model was not faster (2.000 vs 1.000 ms); "
     "wrote the input unchanged; on CPUExecutionProvider (cpu)"),
    ({"passed": False, "unchanged": True, "max_abs_err": 0.5, "max_rel_err": 2.0, "failed_outputs": ["y"],
      "reason": "max abs err 0.5 at y"}, ORIGINAL, (None, None),
     "0 of 1 node(s) lowered (1 reverted); outputs disagreed (max abs err 0.5 at y); wrote the input unchanged; "
     "on CPUExecutionProvider (cpu)"),
    ({"unchanged": True}, ORIGINAL, (None, None),
     "0 of 1 node(s) lowered; no variant beat the original; wrote the input unchanged; on CPUExecutionProvider (cpu)"),
    ({"skipped": True}, "im2col", (None, None),
     "1 of 1 node(s) lowered; end-to-end timing skipped; NOT verified (guard off); on CPUExecutionProvider (cpu)"),
]


@pytest.mark.parametrize(("verification", "chosen", "timing", "expected"), SUMMARIES)
def test_the_summary_line_says_what_the_guard_found_and_what_was_written(
    verification: dict, chosen: str, timing: tuple[float | None, float | None], expected: str
) -> None:
    report = Report("CPUExecutionProvider", "cpu", None, verification=verification)
    report.nodes.append(NodeReport("n", "Conv", "", None, chosen, 2.0, {"im2col": {"status": "ok", "ms": 1.0}}))
    if "passed" in verification and verification["unchanged"]:
        report.reverted.append("n")
    report.original_ms, report.optimized_ms = timing
    assert report.summary() == expected
    assert report.to_dict()["verification"] == verification


# --- choose(): the margin and the recognized-node rule -----------------------------------------------

def tuning(original_ms: float, **variants: VariantOutcome) -> NodeTuning:
    return NodeTuning(original_ms, dict(variants))


def test_choose_needs_the_margin() -> None:
    assert MIN_GAIN == 0.03
    assert choose(tuning(1.0, im2col=VariantOutcome("ok", 0.98))) == ORIGINAL, "2% faster is noise"
    assert choose(tuning(1.0, im2col=VariantOutcome("ok", 0.96))) == "im2col", "4% faster is a gain"
    assert choose(tuning(1.0, im2col=VariantOutcome("ok", 1.5))) == ORIGINAL


def test_choose_takes_the_fastest_verified_variant_and_never_native() -> None:
    outcomes = {
        "native": VariantOutcome("ok", 0.1),
        "im2col": VariantOutcome("ok", 0.8),
        "einsum": VariantOutcome("ok", 0.6),
        "shift_matmul": VariantOutcome("rejected", 0.2, 0.05, "output disagrees"),
        "depthwise_shift": VariantOutcome("not_applicable", reason="group != channels"),
    }
    assert choose(tuning(1.0, **outcomes)) == "einsum"
    assert choose(tuning(1.0, native=VariantOutcome("ok", 0.1))) == ORIGINAL


def test_a_recognized_node_takes_its_fastest_variant_even_when_slower() -> None:
    """A recognized node's 'original' is its function body, a stand-in for the exported idiom."""
    slower = tuning(1.0, shift_sum=VariantOutcome("ok", 1.5), conv_unfold=VariantOutcome("ok", 2.0))
    assert choose(slower) == ORIGINAL
    assert choose(slower, recognized=True) == "shift_sum"
    assert choose(tuning(1.0, shift_sum=VariantOutcome("rejected", 0.5)), recognized=True) == ORIGINAL
    kernel = tuning(1.0, native=VariantOutcome("ok", 0.2), grid_sample=VariantOutcome("ok", 0.4))
    assert choose(kernel, recognized=True) == "grid_sample", "a function body's native stands in for the idiom"
    assert choose(kernel, recognized=True, standard_op=True) == "native", "a standard op's native is the runtime's kernel"


# --- the cache key ---------------------------------------------------------------------------------

def test_the_cache_misses_when_threads_provider_device_or_onnxruntime_change(block: onnx.ModelProto, tmp_path: Path) -> None:
    path = tmp_path / "tuning.json"
    shapes = {"x": (2, 3, 32, 32)}
    report = convlower.optimize(block, provider="cpu", threads=1, cache=str(path), guard=False, input_shapes=shapes).report
    assert report.tuning["timed"] == 3
    (conv1,) = [p for p in plan_nodes(import_graph(block), 17) if p.name == "conv1"]
    key = tuning_key(conv1.spec, shapes)
    environment = [report.provider, report.device, report.onnxruntime, report.threads]
    stored = TuningCache.open(path)
    hit = _cached(stored, key, environment, conv1, {})
    assert hit is not None and hit.cached
    assert hit.original_ms == report.nodes[0].original_ms
    assert {name: o.to_dict() for name, o in hit.outcomes.items()} == {
        name: v for name, v in report.nodes[0].variants.items() if v.get("status") in ("ok", "rejected")}
    for index, changed in enumerate(["CUDAExecutionProvider", "another cpu", "0.0.1", 2]):
        other = list(environment)
        other[index] = changed
        assert _cached(stored, key, other, conv1, {}) is None, f"a cache hit with {changed!r} in place of {environment[index]!r}"
    again = convlower.optimize(block, provider="cpu", threads=2, cache=str(path), guard=False, input_shapes=shapes).report
    assert again.tuning["timed"] == 3 and again.tuning["cached"] == 0, "another thread count must be tuned afresh"


# --- Loop and Scan bodies ------------------------------------------------------------------------

def info(name: str, shape: list[int] | None, elem_type: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


def loop_model() -> onnx.ModelProto:
    """Three rounds of h = tanh(conv(h)), the Conv inside the Loop body with its weight from outside."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Conv", ["h_in", "w"], ["c"], name="loop_conv", pads=[1, 1, 1, 1]),
         helper.make_node("Tanh", ["c"], ["h_out"])],
        "loop_body", [info("i", [], TensorProto.INT64), info("cond_in", [], TensorProto.BOOL), info("h_in", [1, 4, 8, 8])],
        [info("cond_out", [], TensorProto.BOOL), info("h_out", [1, 4, 8, 8])],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "", "x"], ["y"], name="loop", body=body)], "loop_model",
        [info("x", [1, 4, 8, 8])], [info("y", [1, 4, 8, 8])],
        [numpy_helper.from_array(np.array(3, np.int64), "trips"),
         numpy_helper.from_array((RNG.standard_normal((4, 4, 3, 3)) * 0.3).astype(np.float32), "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def scan_model() -> onnx.ModelProto:
    """A Conv (with bias) on each of three frames in a Scan body, summed into a state and stacked."""
    body = helper.make_graph(
        [helper.make_node("Conv", ["x_t", "w", "bias"], ["c"], name="scan_conv", pads=[1, 1, 1, 1]),
         helper.make_node("Add", ["acc_in", "c"], ["acc_out"]),
         helper.make_node("Identity", ["c"], ["c_out"])],
        "scan_body", [info("acc_in", [1, 4, 8, 8]), info("x_t", [1, 4, 8, 8])],
        [info("acc_out", [1, 4, 8, 8]), info("c_out", [1, 4, 8, 8])],
    )
    graph = helper.make_graph(
        [helper.make_node("Scan", ["acc0", "frames"], ["acc", "ys"], name="scan", body=body, num_scan_inputs=1)],
        "scan_model", [info("acc0", [1, 4, 8, 8]), info("frames", [3, 1, 4, 8, 8])],
        [info("acc", [1, 4, 8, 8]), info("ys", [3, 1, 4, 8, 8])],
        [numpy_helper.from_array((RNG.standard_normal((4, 4, 3, 3)) * 0.3).astype(np.float32), "w"),
         numpy_helper.from_array(RNG.standard_normal(4).astype(np.float32), "bias")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize(("make", "name"), [(loop_model, "loop_conv"), (scan_model, "scan_conv")])
def test_a_conv_inside_a_loop_or_scan_body_is_planned_and_lowered(make, name: str) -> None:
    model = make()
    (node,) = convlower.optimize(model, provider="cpu", cache=None, guard=False).report.nodes
    assert node.name == name and node.reason is None and node.shape == "1x4x8x8"
    assert node.variants["im2col"]["status"] == "ok"
    lowered = convlower.lower(model, ["conv=im2col"])
    assert [(n.name, n.variant) for n in lowered.nodes] == [(name, "im2col")]
    assert remaining_ops(lowered.model, {"Conv"}) == [] and remaining_ops(model, {"Conv"}) == [name]
    assert_equivalent(model, lowered.model)
