"""Models whose weights are external data: kept on disk while convlower works, written with a data
file of their own beside the output.

The models here are a few MB, saved with `onnx.save_model(..., save_as_external_data=True)`; a model
over 2 GB cannot be made in a test, so the rule that sends one to external data is tested through
its limit parameter, and the real thing is `benchmarks/bench_large_model.py`.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import convlower
from convlower.errors import UsageError
from convlower.models.builders import conv_block
from convlower.modelio import load_model, save_model
from convlower.rewrite import import_graph, plan_nodes
from convlower.runner import Runner
from convlower.tune import micro_model
from convlower.weights import FOLDER_KEY, external_tensors, needs_external_data

CHANNELS = 512
"""conv_block's pointwise weight is 2C x C floats: 2 MB at 512 channels."""
SHAPES = {"x": (1, 3, 8, 8)}


def save_external(model: onnx.ModelProto, path: Path, location: str | None = None) -> Path:
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location or path.name + ".data", size_threshold=1024)
    return path


@pytest.fixture
def source(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    return save_external(conv_block(channels=CHANNELS, size=8), folder / "m.onnx")


def weight_bytes(path: Path) -> int:
    return sum((path.parent / loc).stat().st_size for loc in data_locations(path))


def data_locations(path: Path) -> set[str]:
    """The data files the model file at `path` refers to, as written in it."""
    model = onnx.load(str(path), load_external_data=False)
    return {e.value for t in external_tensors(model) for e in t.external_data if e.key == "location"}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def outputs(path: Path, x: np.ndarray) -> np.ndarray:
    """The output of the model file at `path`, loaded by onnxruntime from its own folder."""
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_loading_keeps_external_weights_on_disk(source: Path) -> None:
    proto = load_model(source)
    assert weight_bytes(source) > 2_000_000
    assert proto.ByteSize() < 10_000
    folders = {e.value for t in external_tensors(proto) for e in t.external_data if e.key == FOLDER_KEY}
    assert folders == {str(source.parent.resolve())}
    assert Runner("cpu").session(proto).run({"x": np.ones(SHAPES["x"], np.float32)})[0].shape == (1, 2 * CHANNELS, 4, 4)


def test_micro_models_refer_to_the_weights_rather_than_copy_them(source: Path) -> None:
    proto = load_model(source)
    graph = import_graph(proto)
    entry = next(e for e in plan_nodes(graph, 17) if e.name == "pwconv3")
    micro = micro_model(entry.node, proto.opset_import, graph.functions)
    assert micro.ByteSize() < 10_000
    assert {t.name for t in external_tensors(micro)} == {"w3", "b3"}
    x = np.random.default_rng(0).standard_normal((1, CHANNELS, 4, 4)).astype(np.float32)
    got = Runner("cpu").session(micro).run({entry.node.inputs[0].name: x})[0]
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(source)).graph.initializer}
    expected = np.einsum("oc,chw->ohw", weights["w3"][:, :, 0, 0], x[0]) + weights["b3"][:, None, None]
    assert np.allclose(got[0], expected, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("elsewhere", [False, True], ids=["beside_input", "other_folder"])
def test_optimize_writes_external_data_beside_the_output(source: Path, tmp_path: Path, elsewhere: bool) -> None:
    before = digest(source.parent / "m.onnx.data")
    folder = tmp_path / "out" if elsewhere else source.parent
    folder.mkdir(exist_ok=True)
    result = convlower.optimize(source, input_shapes=SHAPES, provider="cpu", cache=None)
    out = save_model(result.model, folder / "m.convlower.onnx", protect=source)
    assert data_locations(out) == {"m.convlower.onnx.data"}
    assert (folder / "m.convlower.onnx.data").stat().st_size >= weight_bytes(source)
    assert out.stat().st_size < 100_000
    assert not list(folder.glob(".convlower-*"))
    assert digest(source.parent / "m.onnx.data") == before
    x = np.random.default_rng(1).standard_normal(SHAPES["x"]).astype(np.float32)
    assert np.allclose(outputs(out, x), outputs(source, x), atol=1e-3, rtol=1e-3)
    assert convlower.verify(source, out, input_shapes=SHAPES)


def test_a_lowered_model_with_new_weights_is_written_with_them_in_its_data_file(source: Path) -> None:
    """im2col reshapes weights into new constants: in memory they are spilled out of the proto (the
    pointwise weight is over `SPILL_BYTES`), written they join the output's data file, and nothing
    refers to the input's data file any more."""
    result = convlower.lower(source, ["conv=im2col"])
    assert [n.variant for n in result.nodes] == ["im2col"] * 3
    assert result.model.ByteSize() < 100_000
    out = save_model(result.model, source.parent / "lowered.onnx", protect=source)
    assert data_locations(out) == {"lowered.onnx.data"}
    assert all(n.op_type != "Conv" for n in onnx.load(str(out), load_external_data=False).graph.node)
    assert convlower.verify(source, out, input_shapes=SHAPES)


def test_cli_optimize_and_verify_a_model_with_external_data(source: Path) -> None:
    before = digest(source.parent / "m.onnx.data")
    run = subprocess.run([sys.executable, "-m", "convlower", "optimize", "m.onnx", "--provider", "cpu", "--no-cache",
                          "--input-shape", "x:1x3x8x8"], capture_output=True, text=True, cwd=source.parent, timeout=300)
    assert run.returncode == 0, run.stderr
    out = source.parent / "m.convlower.onnx"
    assert data_locations(out) == {"m.convlower.onnx.data"}
    check = subprocess.run([sys.executable, "-m", "convlower", "verify", "m.onnx", "m.convlower.onnx", "--json",
                            "--input-shape", "x:1x3x8x8"], capture_output=True, text=True, cwd=source.parent, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    assert json.loads(check.stdout)["passed"]
    assert digest(source.parent / "m.onnx.data") == before


def test_the_inputs_data_file_is_overwritten_only_with_force(tmp_path: Path) -> None:
    """An output whose data file would be the one the input reads is refused, unless forced; forced,
    the data is read before the file is replaced, so the result is still right."""
    source = save_external(conv_block(channels=CHANNELS, size=8), tmp_path / "a.onnx", location="b.onnx.data")
    x = np.random.default_rng(2).standard_normal(SHAPES["x"]).astype(np.float32)
    expected = outputs(source, x)
    before = digest(tmp_path / "b.onnx.data")
    model = load_model(source)
    with pytest.raises(UsageError, match="external data"):
        save_model(model, tmp_path / "b.onnx", protect=source)
    assert digest(tmp_path / "b.onnx.data") == before
    save_model(model, tmp_path / "b.onnx", protect=source, force=True)
    assert np.allclose(outputs(tmp_path / "b.onnx", x), expected)


def test_a_model_past_the_limit_is_written_with_external_data(tmp_path: Path) -> None:
    """The rule for models over 2 GB, at a limit a small inline model passes."""
    model = conv_block(channels=64, size=8)
    assert not external_tensors(model)
    assert not needs_external_data(model, limit=2**31)
    assert needs_external_data(model, limit=model.ByteSize() - 1)
    inline = save_model(model, tmp_path / "inline.onnx")
    assert not (tmp_path / "inline.onnx.data").exists()
    split = save_model(model, tmp_path / "split.onnx", limit=model.ByteSize() - 1)
    assert data_locations(split) == {"split.onnx.data"}
    assert split.stat().st_size < inline.stat().st_size / 4
    x = np.random.default_rng(3).standard_normal(SHAPES["x"]).astype(np.float32)
    assert np.array_equal(outputs(split, x), outputs(inline, x))


def test_a_data_file_shorter_than_its_tensors_is_refused(source: Path) -> None:
    data = source.parent / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(UsageError, match="ends before"):
        load_model(source)


def test_a_large_inline_model_is_worked_on_detached_and_written_inline(tmp_path: Path) -> None:
    """An inline model over the detach size (here 0 bytes) keeps its weights in scratch files
    while convlower works on it, and is written inline, as it came."""
    onnx.save(conv_block(channels=CHANNELS, size=8), tmp_path / "m.onnx")
    proto = load_model(tmp_path / "m.onnx", detach_over=0)
    assert {t.name for t in external_tensors(proto)} == {"w3"}
    assert proto.ByteSize() < 100_000
    assert not needs_external_data(proto, limit=2**31)
    lowered = convlower.lower(proto, ["conv=im2col"]).model
    out = save_model(lowered, tmp_path / "lowered.onnx", protect=tmp_path / "m.onnx")
    assert not data_locations(out) and not (tmp_path / "lowered.onnx.data").exists()
    onnx.checker.check_model(str(out), full_check=True)
    assert out.stat().st_size > weight_bytes_inline(tmp_path / "m.onnx") * 0.9
    assert convlower.verify(tmp_path / "m.onnx", out, input_shapes=SHAPES)
    split = save_model(lowered, tmp_path / "split.onnx", limit=100_000)
    assert data_locations(split) == {"split.onnx.data"}
    assert convlower.verify(tmp_path / "m.onnx", split, input_shapes=SHAPES)


def weight_bytes_inline(path: Path) -> int:
    return sum(len(t.raw_data) for t in onnx.load(str(path)).graph.initializer)
