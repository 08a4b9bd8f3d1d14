"""The foundation: loading, saving, shapes, the runner, verify, bench and the CLI's error contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import convlower
from convlower.cli import main
from convlower.errors import UsageError
from convlower.modelio import load_model, max_runtime_ir_version, save_model
from convlower.models.builders import conv_block
from convlower.runner import CPU, Runner
from convlower.shapes import DefaultShapeWarning, graph_inputs, parse_input_shape, resolve_shapes
from convlower.testing import assert_equivalent
from convlower.weights import external_array


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "block.onnx"
    onnx.save(conv_block(channels=4, size=8), path)
    return path


def perturbed(model: onnx.ModelProto, scale: float = 0.5) -> onnx.ModelProto:
    """A copy with the first weight changed enough to matter."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    weight = copy.graph.initializer[0]
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) + scale, weight.name))
    return copy


def cli(*argv: str) -> int:
    return main([str(a) for a in argv])


# --- verify ------------------------------------------------------------------------------------


def test_verify_equal_for_a_copy(model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "copy.onnx"
    copy.write_bytes(model_path.read_bytes())
    assert cli("verify", model_path, copy) == 0
    assert "equivalent over 3 input set(s)" in capsys.readouterr().out


def test_verify_unequal_for_perturbed_weights(model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.onnx"
    onnx.save(perturbed(onnx.load(model_path)), bad)
    assert cli("verify", model_path, bad, "--json") == 1
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is False
    (out,) = report["outputs"]
    assert out["mismatches"] > 0 and out["max_abs_err"] > 1e-2


def test_verify_python_api_is_truthy_and_prints_a_table(model_path: Path) -> None:
    result = convlower.verify(model_path, model_path, input_shapes={"x": (2, 3, 8, 8)})
    assert result and result.max_abs_err == 0.0
    assert result.outputs[0].shape == (2, 8, 4, 4)
    assert "equivalent" in str(result)


def test_verify_with_real_inputs_from_npz(model_path: Path, tmp_path: Path) -> None:
    data = tmp_path / "data.npz"
    np.savez(data, x=np.ones((1, 3, 8, 8), np.float32))
    result = convlower.verify(model_path, model_path, inputs=str(data))
    assert result.input_sets == 1 and result.outputs[0].shape == (1, 8, 4, 4)


def test_assert_equivalent_names_the_worst_output(model_path: Path) -> None:
    model = onnx.load(model_path)
    assert_equivalent(model, model)
    with pytest.raises(AssertionError, match=r"output 'y' at \("):
        assert_equivalent(model, perturbed(model))


def test_verify_reports_a_different_interface(model_path: Path) -> None:
    model = onnx.load(model_path)
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    renamed.graph.output[0].name = "z"
    renamed.graph.node[-1].output[0] = "z"
    result = convlower.verify(model, renamed)
    assert not result and "lacks output" in result.problems[0]


# --- bad input: one line, exit 2, no traceback -------------------------------------------------


def _opset9_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=7)


def _unloadable_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"], domain="example.unknown")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("example.unknown", 1)], ir_version=8
    )


BAD_INPUTS = {
    "missing": (lambda d, good: d / "nope.onnx", "no such file"),
    "directory": (lambda d, good: d, "is a directory"),
    "not_onnx": (lambda d, good: _write(d / "notes.onnx", b"hello, I am a text file\n"), "not an ONNX model"),
    "empty": (lambda d, good: _write(d / "empty.onnx", b""), "empty"),
    "truncated": (lambda d, good: _write(d / "cut.onnx", good.read_bytes()[: len(good.read_bytes()) // 2]), "not an ONNX model"),
    "old_opset": (lambda d, good: _save(d / "old.onnx", _opset9_model()), "opset 9"),
    "unloadable": (lambda d, good: _save(d / "odd.onnx", _unloadable_model()), "onnxruntime cannot load"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _save(path: Path, model: onnx.ModelProto) -> Path:
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_model_is_one_line_and_exit_2(case: str, model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make, words = BAD_INPUTS[case]
    bad = make(tmp_path, model_path)
    assert cli("verify", bad, model_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("convlower: error:") and words in err[0]
    assert "Traceback" not in "\n".join(err)


def test_console_script_prints_no_traceback(tmp_path: Path) -> None:
    bad = _write(tmp_path / "bad.onnx", b"\x08\x07\x12")
    proc = subprocess.run([sys.executable, "-m", "convlower", "inspect", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    verbose = subprocess.run(
        [sys.executable, "-m", "convlower", "--verbose", "inspect", str(bad)], capture_output=True, text=True
    )
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr


def test_usage_errors_exit_2(model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("verify", model_path) == 2
    assert cli("verify", model_path, model_path, "--input-shape", "x=1x3") == 2
    assert cli("verify", model_path, model_path, "--input-shape", "nope:1x3x8x8") == 2
    assert cli("verify", model_path, model_path, "--input-shape", "x:1x3x8") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("convlower: error:") for line in err)


def test_external_data_outside_the_model_folder_is_refused(tmp_path: Path) -> None:
    inner = tmp_path / "inner"
    inner.mkdir()
    model = conv_block(channels=4, size=8)
    onnx.save(model, inner / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    loaded = load_model(inner / "m.onnx").graph.initializer[0]
    assert np.array_equal(external_array(loaded), numpy_helper.to_array(conv_block(channels=4, size=8).graph.initializer[0]))
    escaped = onnx.load(inner / "m.onnx", load_external_data=False)
    for tensor in escaped.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../secret.data"
    onnx.save(escaped, inner / "escape.onnx")
    with pytest.raises(UsageError, match="outside the model's folder"):
        load_model(inner / "escape.onnx")


def test_missing_external_data_file(tmp_path: Path) -> None:
    onnx.save(conv_block(channels=4, size=8), tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    (tmp_path / "m.data").unlink()
    with pytest.raises(UsageError, match="is missing"):
        load_model(tmp_path / "m.onnx")


# --- saving ------------------------------------------------------------------------------------


def test_output_equal_to_input_is_refused_unless_forced(model_path: Path) -> None:
    before = model_path.read_bytes()
    with pytest.raises(UsageError, match="overwrite the input"):
        save_model(onnx.load(model_path), model_path, protect=model_path)
    assert model_path.read_bytes() == before
    save_model(onnx.load(model_path), model_path, protect=model_path, force=True)
    assert load_model(model_path).graph.node


def test_cli_refuses_to_overwrite_its_input(model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = model_path.read_bytes()
    assert cli("lower", model_path, "--variant", "conv=native", "-o", model_path) == 2
    assert "overwrite the input" in capsys.readouterr().err
    assert model_path.read_bytes() == before


def test_saved_model_loads_in_onnxruntime(tmp_path: Path) -> None:
    model = conv_block(channels=4, size=8)
    model.ir_version = onnx.IR_VERSION
    out = save_model(model, tmp_path / "new.onnx")
    assert onnx.load(out).ir_version <= max_runtime_ir_version()
    session = ort.InferenceSession(str(out), providers=[CPU])
    (y,) = session.run(None, {"x": np.zeros((1, 3, 8, 8), np.float32)})
    assert y.shape == (1, 8, 4, 4)
    assert not list(tmp_path.glob(".convlower-*")), "the staging folder is left behind"


def test_save_into_a_missing_folder_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        save_model(conv_block(channels=4, size=8), tmp_path / "no" / "m.onnx")


# --- shapes ------------------------------------------------------------------------------------


def test_parse_input_shape() -> None:
    assert parse_input_shape("x:1x3x224x224") == ("x", (1, 3, 224, 224))
    assert parse_input_shape("ns:input:0:2x5") == ("ns:input:0", (2, 5))
    for bad in ("x", "x:", ":1x2", "x:1xx2", "x:0x3", "x:ax3"):
        with pytest.raises(UsageError):
            parse_input_shape(bad)


def test_symbolic_dims_bind_by_name_and_default_with_a_warning(capsys: pytest.CaptureFixture[str]) -> None:
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", "L"]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", "L"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "L"])],
    )
    infos = graph_inputs(helper.make_model(graph))
    assert resolve_shapes(infos, {"a": (2, 7)}) == {"a": (2, 7), "b": (2, 7)}
    assert capsys.readouterr().err == ""
    assert resolve_shapes(infos) == {"a": (1, 64), "b": (1, 64)}
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "convlower: warning: input 'a' axis 0 (N) is symbolic; profiling with 1. Set it with --input-shape a:DIMS"
    assert len(err) == 2 and err[1].startswith("convlower: warning: input 'a' axis 1 (L) is symbolic; profiling with 64.")


def test_the_default_shape_warning_is_also_catchable() -> None:
    """Library users can catch it (or make it an error) by its category; `pytest.warns` sets the
    filter to "always" itself, so this holds under any warnings filter."""
    infos = graph_inputs(helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["a"], ["y"])], "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )))
    with pytest.warns(DefaultShapeWarning, match=r"input 'a' axis 0 \(N\)"):
        resolve_shapes(infos)


def test_symbolic_model_runs_with_input_shape_and_with_default(model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("bench", model_path, "--provider", "cpu", "--runs", "10", "--input-shape", "x:2x3x8x8") == 0
    captured = capsys.readouterr()
    assert "CPUExecutionProvider" in captured.out and "warning" not in captured.err
    assert cli("verify", model_path, model_path) == 0
    captured = capsys.readouterr()
    assert "input 'x' axis 0 (N) is symbolic; profiling with 1" in captured.err


def test_fixed_dim_conflict_is_a_usage_error(model_path: Path) -> None:
    with pytest.raises(UsageError, match="fixed at 3"):
        convlower.verify(model_path, model_path, input_shapes={"x": (1, 4, 8, 8)})


# --- runner ------------------------------------------------------------------------------------


def test_runner_reports_the_provider_it_really_got(capsys: pytest.CaptureFixture[str]) -> None:
    runner = Runner("auto")
    session = runner.session(conv_block(channels=4, size=8))
    assert session.provider == runner.provider
    if "CUDAExecutionProvider" not in ort.get_available_providers() or runner.provider == CPU:
        assert runner.provider == CPU


@pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(), reason="this onnxruntime build has no CUDA provider"
)
def test_cuda_that_cannot_load_is_an_error_not_a_fallback() -> None:
    runner = Runner("auto", quiet=True)
    if runner.provider != CPU:
        pytest.skip("CUDA loads here")
    assert runner.notice and "running on CPUExecutionProvider" in runner.notice
    with pytest.raises(UsageError, match="--provider cuda"):
        Runner("cuda")


def test_bench_two_models_interleaved(model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("bench", model_path, model_path, "--provider", "cpu", "--runs", "20", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["provider"] == "CPUExecutionProvider" and len(report["models"]) == 2
    assert report["interval"][0] <= report["ratio"] <= report["interval"][1] and report["confidence"] == 0.95
    assert all(m["runs"] == 3 * report["rounds"] <= 20 for m in report["models"])


def test_inspect_lists_conv_nodes(model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("inspect", model_path, "--json") == 0
    nodes = json.loads(capsys.readouterr().out)["nodes"]
    assert [n["name"] for n in nodes] == ["conv1", "dwconv2", "pwconv3"]
    assert nodes[1]["attributes"]["group"] == 4
