"""The command line as a user runs it: `python -m convlower` in a subprocess, read through its JSON.

Every run here is `sys.executable -m convlower` (the convlower installed beside this Python, not
whichever `convlower` is first on PATH), started in a folder of its own, and checked through
structured output (the optimize report file, `verify --json`) and exit codes, never through
rendered tables, so the tests hold under any terminal width, colour setting or warnings filter.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import convlower
from convlower.models.builders import conv_block

BATCH = 2
"""The batch of the arrays in DATA.npz; the model's batch dim is symbolic, with a default of 1."""


def convlower_cli(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "convlower", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A conv block with a symbolic batch (m.onnx) and real inputs for it at batch 2 (data.npz)."""
    folder = tmp_path_factory.mktemp("cli")
    onnx.save(conv_block(channels=4, size=8), folder / "m.onnx")
    x = np.random.default_rng(0).standard_normal((BATCH, 3, 8, 8)).astype(np.float32)
    np.savez(folder / "data.npz", x=x)
    return folder


# --- the entry points ---------------------------------------------------------------------------


def test_python_dash_m_and_version(tmp_path: Path) -> None:
    version = convlower_cli("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == f"convlower {convlower.__version__}"
    bare = convlower_cli(cwd=tmp_path)
    err = bare.stderr.strip().splitlines()
    assert bare.returncode == 2 and len(err) == 1 and err[0].startswith("convlower: error:")


INTERNAL_ERROR = """
import sys

import convlower.inspect
from convlower.cli import main


def inspect_with_a_bug(model):
    raise RuntimeError("a convlower bug")


convlower.inspect.inspect_model = inspect_with_a_bug
sys.exit(main(sys.argv[1:]))
"""


def test_an_internal_error_exits_3_with_one_line(workdir: Path, tmp_path: Path) -> None:
    """An exception convlower did not raise on purpose is exit 3, one line, traceback only under --verbose.

    No path of convlower's own raises such an exception on a valid model (that would be the bug
    this exit code reports), so the subprocess replaces `inspect_model` with one that raises,
    inside that subprocess only, and runs the real `main()`: the code under test is the CLI's
    last line of defence, not the replaced function.
    """
    quiet = subprocess.run([sys.executable, "-c", INTERNAL_ERROR, "inspect", str(workdir / "m.onnx")],
                           capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert quiet.returncode == 3
    assert quiet.stderr.splitlines() == [
        "convlower: internal error: RuntimeError: a convlower bug (rerun with --verbose and report it)"
    ]
    verbose = subprocess.run([sys.executable, "-c", INTERNAL_ERROR, "--verbose", "inspect", str(workdir / "m.onnx")],
                             capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert verbose.returncode == 3 and "Traceback" in verbose.stderr and "inspect_with_a_bug" in verbose.stderr


# --- optimize -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tuned(workdir: Path) -> tuple[subprocess.CompletedProcess[str], dict, Path]:
    """One optimize run with most flags set: (the process, its report, the folder it wrote into)."""
    out = workdir / "out"
    out.mkdir()
    proc = convlower_cli(
        "optimize", workdir / "m.onnx", "-o", out / "lowered.onnx", "--report", out / "report.json",
        "--provider", "cpu", "--threads", "1", "--no-guard", "--cache", out / "cache.json",
        "--inputs", workdir / "data.npz", "--variants", "conv=im2col", cwd=workdir,
    )
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads((out / "report.json").read_text()), out


def test_optimize_writes_the_model_and_report_where_told(workdir: Path, tuned: tuple) -> None:
    _, report, out = tuned
    assert set(report) >= {"provider", "device", "onnxruntime", "threads", "nodes", "model", "verification", "tuning"}
    assert report["provider"] == "CPUExecutionProvider" and report["onnxruntime"] == ort.__version__
    assert [n["name"] for n in report["nodes"]] == ["conv1", "dwconv2", "pwconv3"]
    assert not (workdir / "m.convlower.onnx").exists() and not (workdir / "m.convlower.json").exists()
    check = convlower_cli("verify", workdir / "m.onnx", out / "lowered.onnx", "--inputs", workdir / "data.npz",
                          "--json", cwd=workdir)
    assert check.returncode == 0 and json.loads(check.stdout)["passed"] is True


def test_optimize_threads_reach_the_report(tuned: tuple) -> None:
    assert tuned[1]["threads"] == 1


def test_optimize_no_guard_skips_the_whole_model_check(tuned: tuple) -> None:
    report = tuned[1]
    assert report["verification"] == {"skipped": True}
    assert report["model"]["original_ms"] is None and report["model"]["optimized_ms"] is None


def test_optimize_profiles_at_the_shapes_of_the_given_inputs(tuned: tuple) -> None:
    proc, report, _ = tuned
    shapes = {n["name"]: n["shape"] for n in report["nodes"]}
    assert shapes == {"conv1": f"{BATCH}x3x8x8", "dwconv2": f"{BATCH}x4x8x8", "pwconv3": f"{BATCH}x4x4x4"}
    assert "is symbolic" not in proc.stderr, "with --inputs no dim needs a default"


def test_optimize_times_only_the_named_variants(tuned: tuple) -> None:
    for node in tuned[1]["nodes"]:
        variants = node["variants"]
        assert variants["im2col"]["status"] == "ok" and variants["im2col"]["ms"] > 0, node["name"]
        others = {name: v for name, v in variants.items() if name != "im2col"}
        assert "native" in others and others["native"] == {"status": "skipped", "reason": "not in --variants"}
        for name, v in others.items():
            assert v["status"] in ("skipped", "not_applicable") and "ms" not in v, (node["name"], name)
            if v["status"] == "skipped":
                assert v["reason"] == "not in --variants"


def test_optimize_cache_is_written_and_a_second_run_times_nothing(workdir: Path, tuned: tuple) -> None:
    _, first, out = tuned
    cache = json.loads((out / "cache.json").read_text())
    assert cache["format"] == "convlower-tuning-cache"
    assert len(cache["entries"]) == 2 * first["tuning"]["distinct_specs"], "the original and im2col, per spec"
    assert first["tuning"]["timed"] == 3 and first["tuning"]["cache"] == str(out / "cache.json")
    proc = convlower_cli(
        "optimize", workdir / "m.onnx", "-o", out / "again.onnx", "--provider", "cpu", "--threads", "1",
        "--no-guard", "--cache", out / "cache.json", "--inputs", workdir / "data.npz", "--variants", "conv=im2col",
        cwd=workdir,
    )
    assert proc.returncode == 0, proc.stderr
    second = json.loads((out / "again.json").read_text())
    assert second["tuning"]["timed"] == 0 and second["tuning"]["cached"] == 3
    assert all(n["cached"] for n in second["nodes"])
    assert [n["chosen"] for n in second["nodes"]] == [n["chosen"] for n in first["nodes"]]


def test_optimize_overwrites_its_input_only_with_force(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    onnx.save(conv_block(channels=4, size=8), model)
    before = model.read_bytes(), model.stat().st_mtime_ns
    args = ("optimize", model, "-o", model, "--provider", "cpu", "--no-guard", "--no-cache", "--variants", "conv=im2col")
    refused = convlower_cli(*args, cwd=tmp_path)
    assert refused.returncode == 2 and "overwrite the input" in refused.stderr
    assert (model.read_bytes(), model.stat().st_mtime_ns) == before and not (tmp_path / "m.json").exists()
    forced = convlower_cli(*args, "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert model.stat().st_mtime_ns != before[1], "the input was not written over"
    assert json.loads((tmp_path / "m.json").read_text())["verification"] == {"skipped": True}
    ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])


def test_optimize_tolerances_decide_which_variants_are_rejected(workdir: Path, tmp_path: Path) -> None:
    """With --atol 0 --rtol 0 a variant survives only if it matches the original node exactly;
    with the float32 defaults the same variants, at the same errors, all survive."""
    def tune(name: str, *tolerances: str) -> dict[tuple[str, str], dict]:
        proc = convlower_cli("optimize", workdir / "m.onnx", "-o", tmp_path / f"{name}.onnx", "--provider", "cpu",
                             "--threads", "1", "--no-guard", "--no-cache", "--inputs", workdir / "data.npz",
                             "--variants", "conv=im2col,shift_matmul,einsum", *tolerances, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        report = json.loads((tmp_path / f"{name}.json").read_text())
        return {(n["name"], v): o for n in report["nodes"] for v, o in n["variants"].items() if "max_abs_err" in o}

    exact = tune("exact", "--atol", "0", "--rtol", "0")
    loose = tune("defaults")
    inexact = {key for key, o in exact.items() if o["max_abs_err"] > 0}
    assert inexact, "every variant matched exactly: this model cannot tell the tolerances apart"
    assert {key for key, o in exact.items() if o["status"] == "rejected"} == inexact
    assert {k: o["max_abs_err"] for k, o in loose.items()} == {k: o["max_abs_err"] for k, o in exact.items()}
    assert all(o["status"] == "ok" for o in loose.values())


# --- verify -------------------------------------------------------------------------------------


def test_verify_runs_on_random_inputs_at_default_shapes(workdir: Path) -> None:
    for runs in (1, 4):
        proc = convlower_cli("verify", workdir / "m.onnx", workdir / "m.onnx", "--runs", runs, "--json", cwd=workdir)
        assert proc.returncode == 0
        result = json.loads(proc.stdout)
        assert result["passed"] is True and result["input_sets"] == runs
        assert result["outputs"][0]["shape"] == [1, 8, 4, 4], "the symbolic batch takes its default, 1"
        assert "convlower: warning: input 'x' axis 0 (N) is symbolic; profiling with 1" in proc.stderr


def test_verify_on_given_inputs(workdir: Path) -> None:
    proc = convlower_cli("verify", workdir / "m.onnx", workdir / "m.onnx", "--inputs", workdir / "data.npz", "--json",
                         cwd=workdir)
    assert proc.returncode == 0 and "warning" not in proc.stderr
    result = json.loads(proc.stdout)
    assert result["input_sets"] == 1 and result["outputs"][0]["shape"] == [BATCH, 8, 4, 4]


def pair(dtypes: list[str], offsets: dict[str, list[float]]) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """A reference whose output y_T is its input x_T, for each dtype T, and a candidate adding `offsets[T]`."""
    def model(candidate: bool) -> onnx.ModelProto:
        nodes, inputs, outputs, initializers = [], [], [], []
        for name in dtypes:
            elem = helper.np_dtype_to_tensor_dtype(np.dtype(name))
            inputs.append(helper.make_tensor_value_info(f"x_{name}", elem, [2]))
            outputs.append(helper.make_tensor_value_info(f"y_{name}", elem, [2]))
            if candidate:
                initializers.append(numpy_helper.from_array(np.asarray(offsets[name], dtype=name), f"d_{name}"))
                nodes.append(helper.make_node("Add", [f"x_{name}", f"d_{name}"], [f"y_{name}"]))
            else:
                nodes.append(helper.make_node("Identity", [f"x_{name}"], [f"y_{name}"]))
        graph = helper.make_graph(nodes, "offsets", inputs, outputs, initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)

    return model(False), model(True)


DEFAULT_TOLERANCES = {"float16": (1e-2, 1e-2), "float32": (1e-3, 1e-3), "float64": (1e-7, 1e-6), "int32": (0.0, 0.0)}
"""(atol, rtol) by dtype, as verify.py's docstring and DESIGN.md promise them."""
AT = [0.0, 100.0]
"""The reference values: at 0 only atol counts; at 100 rtol * 100 dominates."""


@pytest.mark.parametrize("inside", [True, False], ids=["inside", "outside"])
def test_verify_default_tolerances_per_dtype(tmp_path: Path, inside: bool) -> None:
    """Each output differs from the reference by half (inside) or twice (outside) its dtype's
    default `atol + rtol * |reference|`; for ints, whose default is exact, by 0 or by 1."""
    factor = 0.5 if inside else 2.0
    offsets = {name: [factor * (atol + rtol * abs(v)) for v in AT] for name, (atol, rtol) in DEFAULT_TOLERANCES.items()}
    offsets["int32"] = [0, 0] if inside else [1, 1]
    reference, candidate = pair(list(DEFAULT_TOLERANCES), offsets)
    onnx.save(reference, tmp_path / "ref.onnx")
    onnx.save(candidate, tmp_path / "cand.onnx")
    np.savez(tmp_path / "at.npz", **{f"x_{name}": np.asarray(AT, dtype=name) for name in DEFAULT_TOLERANCES})
    proc = convlower_cli("verify", "ref.onnx", "cand.onnx", "--inputs", "at.npz", "--json", cwd=tmp_path)
    assert proc.returncode == (0 if inside else 1), proc.stderr
    outputs = {o["name"]: o for o in json.loads(proc.stdout)["outputs"]}
    for name, (atol, rtol) in DEFAULT_TOLERANCES.items():
        out = outputs[f"y_{name}"]
        assert (out["atol"], out["rtol"]) == (atol, rtol), name
        assert out["max_abs_err"] > 0 or (name == "int32" and inside), name
        assert out["mismatches"] == (0 if inside else 2), (name, out)


def test_verify_atol_and_rtol_override_the_defaults(tmp_path: Path) -> None:
    """float32 outputs off by 0.01 at 0 (beyond the default atol 1e-3) and by 0.5 at 100 (beyond
    the default 1e-3 + 1e-3 * 100): each fails until its own tolerance is widened."""
    reference, candidate = pair(["float32"], {"float32": [0.01, 0.5]})
    onnx.save(reference, tmp_path / "ref.onnx")
    onnx.save(candidate, tmp_path / "cand.onnx")
    np.savez(tmp_path / "at.npz", x_float32=np.asarray(AT, dtype=np.float32))

    def mismatches(*tolerances: object) -> tuple[int, int]:
        proc = convlower_cli("verify", "ref.onnx", "cand.onnx", "--inputs", "at.npz", "--json", *tolerances, cwd=tmp_path)
        (out,) = json.loads(proc.stdout)["outputs"]
        return proc.returncode, out["mismatches"]

    assert mismatches() == (1, 2)
    assert mismatches("--atol", 0.02) == (1, 1), "--atol covers the 0.01 at 0, not the 0.5 at 100"
    assert mismatches("--rtol", 0.01) == (1, 1), "--rtol covers the 0.5 at 100, not the 0.01 at 0"
    assert mismatches("--atol", 0.02, "--rtol", 0.01) == (0, 0)


def conv_chain(length: int) -> onnx.ModelProto:
    """`length` 1x1 Convs one after another: a model whose `inspect --json` is longer than a pipe's buffer."""
    weight = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x" if i == 0 else f"h{i}", "w"], [f"h{i + 1}" if i < length - 1 else "y"], name=f"conv{i}")
             for i in range(length)]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2, 4, 4])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_reader_that_closes_the_pipe_ends_inspect_quietly(tmp_path: Path) -> None:
    """`convlower inspect MODEL --json | head`: the reader goes away after a few bytes; convlower
    ends with exit 0 and nothing on stderr, not an internal error."""
    onnx.save(conv_chain(400), tmp_path / "chain.onnx")
    proc = subprocess.Popen([sys.executable, "-m", "convlower", "inspect", "chain.onnx", "--json"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(16).startswith(b"{")
    proc.stdout.close()
    assert proc.wait(timeout=120) == 0
    assert proc.stderr.read() == b""
