"""optimize: tuning choices, the cache, the CLI, and models from other exporters (the guard: test_guard.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import convlower
from convlower.cli import main
from convlower.models.builders import conv_block
from convlower.optimize import MODEL_MIN_GAIN
from convlower.report import Report
from convlower.runner import Runner
from convlower.testing import assert_equivalent
from convlower.tune import MIN_GAIN, ORIGINAL

RNG = np.random.default_rng(0)


def weight(name: str, shape: tuple[int, ...], dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * 0.2).astype(dtype), name)


@pytest.fixture(scope="module")
def block() -> onnx.ModelProto:
    return conv_block(channels=16, size=32)


def test_choices_follow_the_timings_and_the_model_is_not_slower(block: onnx.ModelProto) -> None:
    result = convlower.optimize(block, provider="cpu", cache=None)
    report = result.report
    assert report.provider == "CPUExecutionProvider"
    assert [n.name for n in report.nodes] == ["conv1", "dwconv2", "pwconv3"]
    for node in report.nodes:
        timed = {name: v["ms"] for name, v in node.variants.items() if v.get("status") == "ok" and name != "native"}
        assert timed, f"no variant of {node.name} was timed"
        assert node.variants["native"]["ms"] == node.original_ms, "native is the original node"
        if node.reason and (node.reason.startswith("reverted") or "won alone" in node.reason):
            assert node.chosen == ORIGINAL
            continue
        fastest = min(timed.values())
        if fastest >= node.original_ms * (1 - MIN_GAIN):
            assert node.chosen == ORIGINAL, f"{node.name}: native is as fast, yet {node.chosen} was chosen"
        else:
            assert node.chosen in timed
    assert_kept_or_unchanged(report)
    if any(n.chosen != ORIGINAL for n in report.nodes):
        assert report.optimized_ms <= report.original_ms * (1 - MODEL_MIN_GAIN)
    assert_equivalent(block, result.model)
    onnx.checker.check_model(result.model, full_check=True)


def assert_kept_or_unchanged(report: Report) -> None:
    """The guard's record agrees with the nodes: lowered nodes mean an optimized model whose
    outputs agreed and that was kept; none mean the input was written unchanged. Whichever it was,
    no choice the tuner verified node by node may make the whole model disagree."""
    verification = report.verification
    assert verification.get("passed") is not False, f"verified choices made the model disagree: {verification}"
    if any(n.chosen != ORIGINAL for n in report.nodes):
        assert verification["passed"] is True and verification["unchanged"] is False
    else:
        assert verification["unchanged"] is True


def test_identical_specs_are_tuned_once() -> None:
    w = weight("w", (4, 4, 3, 3))
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["a"], name="first", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "w"], ["y"], name="second", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(nodes, "twice", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    report = convlower.optimize(model, provider="cpu", cache=None, guard=False).report
    assert report.tuning["distinct_specs"] == 1 and report.tuning["timed"] == 1
    assert len(report.nodes) == 2 and report.verification == {"skipped": True}


def test_second_run_uses_the_cache(block: onnx.ModelProto, tmp_path: Path) -> None:
    cache = tmp_path / "tuning.json"
    first = convlower.optimize(block, provider="cpu", cache=str(cache), guard=False).report
    assert first.tuning["timed"] == 3 and cache.is_file()
    second = convlower.optimize(block, provider="cpu", cache=str(cache), guard=False).report
    assert second.tuning["timed"] == 0 and second.tuning["cached"] == 3
    assert all(n.cached for n in second.nodes)
    assert [n.chosen for n in second.nodes] == [n.chosen for n in first.nodes]


def test_a_foreign_cache_file_is_ignored_and_kept(block: onnx.ModelProto, tmp_path: Path) -> None:
    cache = tmp_path / "tuning.json"
    cache.write_text('{"something": "else"}')
    with pytest.warns(UserWarning, match="is not a convlower tuning cache"):
        report = convlower.optimize(block, provider="cpu", cache=str(cache), guard=False).report
    assert report.tuning["timed"] == 3
    assert cache.read_text() == '{"something": "else"}'


def test_cli_optimize_writes_model_and_report(block: onnx.ModelProto, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "block.onnx"
    onnx.save(block, source)
    before = source.read_bytes()
    assert main(["optimize", str(source), "--provider", "cpu", "--no-cache", "--input-shape", "x:2x3x32x32"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-2]
    assert "node(s) lowered" in summary and "on CPUExecutionProvider" in summary
    assert source.read_bytes() == before
    model_path, report_path = tmp_path / "block.convlower.onnx", tmp_path / "block.convlower.json"
    report = json.loads(report_path.read_text())
    assert set(report) >= {"provider", "device", "onnxruntime", "nodes", "model", "verification"}
    assert report["provider"] == "CPUExecutionProvider" and report["onnxruntime"] == ort.__version__
    node = report["nodes"][0]
    assert set(node) >= {"name", "op", "spec", "chosen", "variants"}
    assert node["spec"]["group"] == 1 and "native" in node["variants"]
    verification = report["verification"]
    assert verification.get("passed") is not False
    if verification["unchanged"]:
        assert "wrote the input unchanged" in summary
    else:
        assert verification["passed"] is True and "; verified; " in summary
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "N", "the symbolic batch dim must survive"


def test_cli_optimize_bad_variant_filter(block: onnx.ModelProto, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "block.onnx"
    onnx.save(block, source)
    assert main(["optimize", str(source), "--variants", "conv=nope"]) == 2
    assert main(["optimize", str(source), "--variants", "Frobnicate=x"]) == 2
    assert not (tmp_path / "block.convlower.onnx").exists()


def if_model() -> onnx.ModelProto:
    """A Conv in each branch of an If, with weights from the outer graph."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    branch_out = helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 4, 8, 8])
    then = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["b"], name="then_conv", pads=[1, 1, 1, 1])],
                             "then", [], [branch_out])
    other = helper.make_graph([helper.make_node("Conv", ["x", "w", "bias"], ["b"], name="else_conv", pads=[1, 1, 1, 1])],
                              "else", [], [branch_out])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then, else_branch=other)], "if_model",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []), x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [weight("w", (4, 4, 3, 3)), weight("bias", (4,))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_nodes_inside_control_flow_are_planned_and_lowered() -> None:
    model = if_model()
    report = convlower.optimize(model, provider="cpu", cache=None).report
    assert {n.name for n in report.nodes} == {"then_conv", "else_conv"}
    lowered = convlower.lower(model, ["conv=im2col"])
    assert [n.variant for n in lowered.nodes] == ["im2col", "im2col"]
    for cond in (True, False):
        assert_equivalent(model, lowered.model, inputs={"cond": np.array(cond), "x": RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)})


def third_party_model() -> onnx.ModelProto:
    """What other exporters write: opset 11, weights in Constant nodes, BatchNormalization after
    Conv, a quantized ConvInteger that must be left alone, no node names, outputs without the
    shape field that onnx.checker wants at this IR version."""
    w = helper.make_node("Constant", [], ["w"], value=weight("w_value", (6, 3, 3, 3)))
    conv = helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1])
    bn = helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["n"])
    relu = helper.make_node("Relu", ["n"], ["y"])
    qx = helper.make_node("Cast", ["xq_in"], ["xq"], to=TensorProto.UINT8)
    conv_int = helper.make_node("ConvInteger", ["xq", "wq"], ["yq"])
    initializers = [
        weight("scale", (6,)), weight("shift", (6,)), weight("mean", (6,)),
        numpy_helper.from_array(np.ones(6, np.float32), "var"),
        numpy_helper.from_array(RNG.integers(0, 4, (2, 1, 2, 2)).astype(np.uint8), "wq"),
    ]
    graph = helper.make_graph(
        [w, conv, bn, relu, qx, conv_int], "third_party",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 12, 12]),
         helper.make_tensor_value_info("xq_in", TensorProto.INT32, [1, 1, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None), helper.make_tensor_value_info("yq", TensorProto.INT32, None)],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=6)


def test_models_from_other_exporters_do_not_crash_or_change() -> None:
    model = third_party_model()
    result = convlower.optimize(model, provider="cpu", cache=None, input_shapes={"x": (2, 3, 12, 12)})
    assert [n.op for n in result.report.nodes] == ["Conv"]
    assert "ConvInteger" in [n.op_type for n in result.model.graph.node]
    assert_equivalent(model, result.model, input_shapes={"x": (2, 3, 12, 12)})
    lowered = convlower.lower(model, ["conv=shift_matmul"])
    assert lowered.lowered and "Conv" not in [n.op_type for n in lowered.model.graph.node]
    assert_equivalent(model, lowered.model, input_shapes={"x": (2, 3, 12, 12)})


def test_float16_model() -> None:
    w = weight("w", (4, 3, 3, 3), np.float16)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv16", strides=[2, 2])], "half",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 3, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    result = convlower.optimize(model, provider="cpu", cache=None)
    assert_kept_or_unchanged(result.report)
    assert_equivalent(model, result.model)
    for name, variant in result.report.nodes[0].variants.items():
        assert variant["status"] in {"ok", "not_applicable"}, f"{name}: {variant}"


@pytest.mark.parametrize("opset", range(11, 22))
def test_every_opset_from_11_to_21(opset: int) -> None:
    model = conv_block(channels=4, size=8, opset=opset)
    result = convlower.optimize(model, provider="cpu", cache=None, input_shapes={"x": (1, 3, 8, 8)})
    assert_kept_or_unchanged(result.report)
    for name in ("im2col", "shift_matmul", "einsum", "pointwise_matmul", "depthwise_shift"):
        lowered = convlower.lower(model, {"conv": name})
        if name == "einsum" and opset < 12:
            assert not lowered.lowered and "opset" in lowered.nodes[0].reason
            continue
        assert lowered.lowered, f"{name} applied to nothing"
        assert_equivalent(model, lowered.model, input_shapes={"x": (2, 3, 8, 8)})


def test_cli_optimize_on_cuda_without_a_gpu_is_a_usage_error(block: onnx.ModelProto, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if Runner("auto", quiet=True).provider != "CPUExecutionProvider":
        pytest.skip("CUDA loads here")
    source = tmp_path / "block.onnx"
    onnx.save(block, source)
    assert main(["optimize", str(source), "--provider", "cuda", "--no-cache"]) == 2
    assert "--provider cuda" in capsys.readouterr().err
    assert not (tmp_path / "block.convlower.onnx").exists()


def test_a_variant_with_a_caveat_is_tuned_only_when_named() -> None:
    """Unfold's conv_unfold spreads NaN/inf across a window: left out of tuning, saying why,
    unless the user names it in --variants."""
    from convlower.passes.local_functions import DOMAIN, attach_functions
    from tests.helpers import single_node_model

    attrs = {"kernel_shape": [3, 3], "strides": [1, 1], "dilations": [1, 1], "pads": [1, 1, 1, 1]}
    model = attach_functions(single_node_model("Unfold", [("x", (1, 4, 12, 12))], 3, attrs=attrs, domain=DOMAIN))
    (node,) = convlower.optimize(model, provider="cpu", cache=None, guard=False).report.nodes
    assert node.variants["conv_unfold"]["status"] == "skipped"
    assert "0·inf" in node.variants["conv_unfold"]["reason"] and "--variants" in node.variants["conv_unfold"]["reason"]
    assert node.variants["slice_concat"]["status"] == "ok"
    (named,) = convlower.optimize(model, provider="cpu", cache=None, guard=False, variants=["unfold=conv_unfold"]).report.nodes
    assert named.variants["conv_unfold"]["status"] == "ok"


def test_a_canonical_node_beside_control_flow_is_lowered() -> None:
    """A model holding both model-local functions and an If body (onnx-graphsurgeon 0.6.1 recursed
    forever sorting such a graph's functions)."""
    from convlower.passes.local_functions import DOMAIN, attach_functions

    attrs = {"kernel_shape": [3, 3], "strides": [1, 1], "dilations": [1, 1], "pads": [1, 1, 1, 1]}
    branch = lambda op, name: helper.make_graph(  # noqa: E731
        [helper.make_node(op, ["y0"], [name])], name, [], [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)])
    nodes = [
        helper.make_node("DynamicFilter", ["x", "f"], ["y0"], domain=DOMAIN, name="filter", **attrs),
        helper.make_node("If", ["c"], ["y"], then_branch=branch("Identity", "t"), else_branch=branch("Neg", "e"), name="if"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8]),
              helper.make_tensor_value_info("f", TensorProto.FLOAT, [1, 1, 9, 8, 8]),
              helper.make_tensor_value_info("c", TensorProto.BOOL, [])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = attach_functions(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)]))
    result = convlower.lower(model, ["DynamicFilter=shift_sum"])
    assert [n.variant for n in result.nodes] == ["shift_sum"]
    feeds = {"x": RNG.standard_normal((1, 2, 8, 8)).astype(np.float32), "f": RNG.standard_normal((1, 1, 9, 8, 8)).astype(np.float32)}
    for c in (True, False):
        assert_equivalent(model, result.model, inputs={**feeds, "c": np.array(c)})


def test_a_rerun_with_a_warm_cache_times_nothing_and_writes_the_same_model(block: onnx.ModelProto, tmp_path: Path) -> None:
    """Node tunings, settings, confirmations and the guard's timing all come back from the cache:
    the second run times nothing, says so, and writes what the first wrote."""
    cache = str(tmp_path / "tuning.json")
    first = convlower.optimize(block, provider="cpu", cache=cache)
    second = convlower.optimize(block, provider="cpu", cache=cache)
    assert first.report.tuning["timed"] == 3 and second.report.tuning["timed"] == 0
    assert second.report.measurements["timed"] == 0
    assert second.report.measurements["cached"] == first.report.measurements["timed"]
    assert [n.chosen for n in second.report.nodes] == [n.chosen for n in first.report.nodes]
    assert second.model.SerializeToString() == first.model.SerializeToString()
    assert "nothing timed: every measurement came from the cache" in second.report.summary()
    assert second.report.verification.get("passed") is not False, "outputs are compared on every run"
    assert set(second.report.timing) >= {"recognition", "tuning", "total"}


def test_a_changed_model_is_measured_anew(block: onnx.ModelProto, tmp_path: Path) -> None:
    """Whole-model measurements are keyed by the model's digest: another weight, another key."""
    cache = str(tmp_path / "tuning.json")
    convlower.optimize(block, provider="cpu", cache=cache, confirm=False)
    changed = onnx.ModelProto()
    changed.CopyFrom(block)
    changed.graph.initializer[0].CopyFrom(weight(changed.graph.initializer[0].name, tuple(changed.graph.initializer[0].dims)))
    report = convlower.optimize(changed, provider="cpu", cache=cache, confirm=False).report
    assert report.tuning["timed"] == 0, "node tunings depend on shapes, not weights"
    if any(n.chosen != ORIGINAL for n in report.nodes):
        assert report.measurements["timed"] >= 1 and report.guard_timings and not report.guard_timings[-1].get("cached")


def test_a_spent_budget_leaves_nodes_untuned_and_returns_a_verified_model(block: onnx.ModelProto) -> None:
    result = convlower.optimize(block, provider="cpu", cache=None, budget=1e-6)
    report = result.report
    assert report.budget == {"seconds": 1e-6, "not_tuned": ["conv1", "dwconv2", "pwconv3"]}
    assert all(n.chosen == ORIGINAL and n.reason.startswith("not tuned: the --budget of 1e-06 s left no time") for n in report.nodes)
    assert report.verification == {"unchanged": True} and result.model.graph == block.graph
    assert "the --budget left 3 node(s) untuned" in report.summary()


def test_cli_budget_must_be_positive(block: onnx.ModelProto, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "block.onnx"
    onnx.save(block, path)
    assert main(["optimize", str(path), "--budget", "0", "--no-cache"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["convlower: error: --budget 0 is not a positive number of seconds; give the seconds optimize may take, like --budget 30"]
    assert not (tmp_path / "block.convlower.onnx").exists()
