"""Session settings: explicit cuDNN search, settings tried at the model level, recorded and reproduced.

The CUDA settings are checked as data here (no GPU on the machines this suite runs on); the
tuning, recording and `convlower.session` are run for real on the CPU provider.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import convlower
from convlower.errors import UsageError
from convlower.models.builders import conv_block
from convlower.optimize import tune_settings
from convlower.report import Report
from convlower.runner import Runner
from convlower.settings import (
    CPU,
    CUDA,
    METADATA_KEY,
    SEARCH_MODES,
    SessionSettings,
    candidates,
    record,
    recorded,
)
from tests.helpers import single_node_model


def cuda_settings(**options: str) -> SessionSettings:
    return SessionSettings.baseline(CUDA).changed(**options)


# ---- the CUDA provider's options, as data ----------------------------------------------------------


def test_cuda_is_never_timed_with_the_default_search() -> None:
    assert SessionSettings.baseline(CUDA).provider_options["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    for bad in ("DEFAULT", None):
        options = {k: v for k, v in SessionSettings.baseline(CUDA).provider_options.items() if k != "cudnn_conv_algo_search"}
        if bad:
            options["cudnn_conv_algo_search"] = bad
        with pytest.raises(ValueError, match="explicit search"):
            SessionSettings(CUDA, options)
    model = conv_block(channels=4, size=8)
    for name, settings, why_not in candidates(SessionSettings.baseline(CUDA), model, profiles=1):
        if settings is not None:
            assert settings.provider_options["cudnn_conv_algo_search"] in SEARCH_MODES, name
            provider, options = settings.providers()[0]
            assert provider == CUDA and options["cudnn_conv_algo_search"] != "DEFAULT"


def test_cuda_candidates_change_one_setting_each_and_say_why_not() -> None:
    base = SessionSettings.baseline(CUDA)
    found = {name: (s, why) for name, s, why in candidates(base, conv_block(channels=4, size=8), profiles=1)}
    assert set(found) == {"prefer_nhwc", "cudnn_conv_algo_search=HEURISTIC", "cudnn_conv1d_pad_to_nc1d", "enable_cuda_graph"}
    assert found["prefer_nhwc"][0].changes_from_baseline() == {"prefer_nhwc": "1"}
    assert found["cudnn_conv_algo_search=HEURISTIC"][0].changes_from_baseline() == {"cudnn_conv_algo_search": "HEURISTIC"}
    assert found["cudnn_conv1d_pad_to_nc1d"] == (None, "the model has no 1-D Conv")
    assert found["enable_cuda_graph"][0].cuda_graph

    one_d = single_node_model("Conv", [("x", (1, 2, 16)), ("w", np.ones((2, 2, 3), np.float32))])
    found = {name: (s, why) for name, s, why in candidates(base, one_d, profiles=2)}
    assert found["cudnn_conv1d_pad_to_nc1d"][0].changes_from_baseline() == {"cudnn_conv1d_pad_to_nc1d": "1"}
    assert found["enable_cuda_graph"] == (None, "2 shape profiles: a CUDA graph replays one set of shapes")

    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["z"])], "b", [], [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    with_if = helper.make_model(helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)], "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []), helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]))
    found = {name: (s, why) for name, s, why in candidates(base, with_if, profiles=1)}
    assert found["enable_cuda_graph"] == (None, "the model has If: control flow cannot be captured")


def test_the_cpu_provider_has_no_setting_to_try() -> None:
    assert candidates(SessionSettings.baseline(CPU, 2), conv_block(channels=4, size=8), profiles=1) == []


def test_settings_round_trip_through_a_models_metadata() -> None:
    model = conv_block(channels=4, size=8)
    model.metadata_props.add(key="author", value="someone")
    settings = cuda_settings(prefer_nhwc="1", cudnn_conv_algo_search="HEURISTIC")
    record(model, settings)
    record(model, settings)  # replaces, never duplicates
    assert [e.key for e in model.metadata_props] == ["author", METADATA_KEY]
    assert recorded(model) == settings
    assert settings.label() == "CUDAExecutionProvider[cudnn_conv_algo_search=HEURISTIC,prefer_nhwc=1]"
    assert SessionSettings.baseline(CPU, 2).label() == CPU  # the tuning cache's keys are as before on CPU


# ---- tuning at the model level, on the CPU provider -----------------------------------------------


def folded_weight_model(size: int = 384) -> onnx.ModelProto:
    """y = x @ (A @ B) with A, B constants: onnxruntime's graph optimizations fold A @ B once; with
    them disabled every run multiplies two size x size matrices for a 1 x size product, ~size/1
    times the work, so which settings are faster holds by orders of magnitude."""
    rng = np.random.default_rng(0)
    a, b = (numpy_helper.from_array(rng.standard_normal((size, size)).astype(np.float32) / size, n) for n in "ab")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["w"]), helper.make_node("MatMul", ["x", "w"], ["y"])], "folded",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, size])], [a, b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_a_setting_faster_with_confidence_is_kept_and_a_slower_one_is_not() -> None:
    model = folded_weight_model()
    feeds = [{"x": np.ones((1, 384), np.float32)}]
    optimized = SessionSettings.baseline(CPU, 1)
    unoptimized = SessionSettings(CPU, {}, 1, "ORT_DISABLE_ALL")
    runner = Runner("cpu", 1)

    report = Report(CPU, "cpu", 1)
    chosen = tune_settings(model, runner.with_settings(unoptimized), feeds, report, [("graph optimizations", optimized, None)])
    assert chosen.settings == optimized
    (tried,) = report.session_settings["tried"]
    assert tried["kept"] and tried["interval"][1] < 0.98 and tried["settings"] == optimized.to_dict()

    report = Report(CPU, "cpu", 1)
    chosen = tune_settings(model, runner, feeds, report, [("no graph optimizations", unoptimized, None), ("nothing", None, "why not")])
    assert chosen.settings == optimized
    assert [t["status"] for t in report.session_settings["tried"]] == ["ok", "not_applicable"]
    assert not report.session_settings["tried"][0]["kept"] and report.session_settings["tried"][1]["reason"] == "why not"


# ---- recorded by optimize, reproduced by convlower.session ----------------------------------------


@pytest.fixture(scope="module")
def optimized_path(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, convlower.OptimizeResult]:
    result = convlower.optimize(conv_block(channels=4, size=8), input_shapes={"x": (1, 3, 8, 8)}, provider="cpu",
                                threads=1, cache=None)
    path = tmp_path_factory.mktemp("settings") / "block.convlower.onnx"
    onnx.save(result.model, path)
    return path, result


def test_optimize_records_the_settings_in_the_report_and_the_model(optimized_path: tuple[Path, convlower.OptimizeResult]) -> None:
    path, result = optimized_path
    chosen = result.report.to_dict()["session_settings"]["chosen"]
    assert chosen == {"provider": CPU, "provider_options": {}, "graph_optimization_level": "ORT_ENABLE_ALL", "intra_op_num_threads": 1}
    assert json.loads({e.key: e.value for e in onnx.load(path).metadata_props}[METADATA_KEY]) == chosen


def test_convlower_session_reproduces_the_recorded_settings(optimized_path: tuple[Path, convlower.OptimizeResult]) -> None:
    path, result = optimized_path
    for source in (path, str(path), result.model):
        session = convlower.session(source)
        assert isinstance(session, ort.InferenceSession) and session.get_providers() == [CPU]
        options = session.get_session_options()
        assert options.intra_op_num_threads == 1
        assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    expected = ort.InferenceSession(path.as_posix(), providers=[CPU]).run(None, {"x": x})
    np.testing.assert_array_equal(convlower.session(path).run(None, {"x": x})[0], expected[0])


def test_a_model_tuned_for_cuda_gets_a_cpu_session_when_asked(tmp_path: Path) -> None:
    model = conv_block(channels=4, size=8)
    record(model, cuda_settings(prefer_nhwc="1"))
    path = tmp_path / "tuned_on_gpu.onnx"
    onnx.save(model, path)
    assert convlower.session(path, provider="cpu").get_providers() == [CPU]
    if Runner("auto", quiet=True).provider == CPU:
        with pytest.raises(UsageError, match="tuned for CUDA") as caught:
            convlower.session(path)
        assert "provider='cpu'" in caught.value.fix


def test_a_model_without_settings_or_with_bad_ones_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "plain.onnx"
    model = conv_block(channels=4, size=8)
    onnx.save(model, path)
    with pytest.raises(UsageError, match="records no session settings"):
        convlower.session(path)
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps({"provider": CUDA, "provider_options": {"cudnn_conv_algo_search": "DEFAULT"}}))
    with pytest.raises(UsageError, match="unusable session settings.*explicit search"):
        convlower.session(model)
