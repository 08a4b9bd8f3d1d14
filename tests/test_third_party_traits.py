"""Traits of ONNX files from other hands, each reproduced in a small synthetic model.

Found in public files (benchmarks/real_models.py runs the files themselves), with the promise for
each: `convlower optimize MODEL` with no options exits 0, or exits 2 with one line that names the
option to give; with that option it exits 0 and writes an equal model; never exit 3, never a
traceback.

- Paddle2ONNX declares a dynamic batch as `dim_value: -1` and other dims as `dim_param: "?"`;
- spox and hand-written graphs leave dims unnamed ("" or no field at all);
- voice-activity models reflect-pad more than the default profiling length;
- inputs that need valid values (a sample rate), which random data is not;
- quantized models: ConvInteger (dynamic), QLinearConv (QOperator), DequantizeLinear → Conv (QDQ);
- the naming of Paddle2ONNX (`conv2d_0.w_0`), tf2onnx (`input_1:0`, NHWC with a Transpose) and
  the older torch exporter (`onnx::Conv_12`, unnamed nodes);
- an attribute of the wrong type.

Tested elsewhere: float16 models, opsets 11 to 21, Conv inside If/Loop (test_optimize.py), weights
in external data (test_large_models.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from convlower.cli import main
from convlower.testing import assert_equivalent

RNG = np.random.default_rng(0)
FAST = ("--no-cache", "--variants", "conv=im2col")
"""One variant and no cache: the traits are about getting through, not about what wins."""


def initializer(name: str, shape: tuple[int, ...], dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * 0.2).astype(dtype), name)


def save(graph: onnx.GraphProto, path: Path, opset: int = 17) -> Path:
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8), path)
    return path


def optimize(model: Path, *options: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, Path]:
    """Exit code, stderr and the output path of `convlower optimize MODEL OPTIONS`."""
    out = model.with_name(model.stem + ".out.onnx")
    code = main(["optimize", str(model), "-o", str(out), *FAST, *options])
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err
    return code, err, out


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("convlower: error:")]
    assert len(lines) == 1, err
    return lines[0]


def declared(model: onnx.ModelProto) -> list[list[onnx.TensorShapeProto.Dimension]]:
    return [list(v.type.tensor_type.shape.dim) for v in list(model.graph.input) + list(model.graph.output)]


def conv_on(x: onnx.ValueInfoProto, channels: int = 3, name: str = "conv") -> onnx.GraphProto:
    return helper.make_graph(
        [helper.make_node("Conv", [x.name, "w"], ["y"], name=name, pads=[1, 1, 1, 1])], "g", [x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [initializer("w", (4, channels, 3, 3))],
    )


def paddle_input(name: str = "x") -> onnx.ValueInfoProto:
    """`[-1, 3, ?, ?]`, as Paddle2ONNX declares an image classifier's input."""
    value = helper.make_tensor_value_info(name, TensorProto.FLOAT, [-1, 3, "?", "?"])
    return value


def test_a_negative_batch_and_question_mark_dims_are_symbolic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = save(conv_on(paddle_input()), tmp_path / "paddle.onnx")
    code, err, out = optimize(source, capsys=capsys)
    assert code == 0, err
    assert "axis 0 (unnamed) is symbolic; profiling with 1" in err

    code, err, out = optimize(source, "--input-shape", "x:2x3x16x24", capsys=capsys)
    assert code == 0, err
    assert "symbolic" not in err, "every dim was bound, the two '?' dims to different sizes"
    written = onnx.load(out)
    assert declared(written) == declared(onnx.load(source)), "the interface is kept exactly as declared"
    assert written.graph.input[0].type.tensor_type.shape.dim[0].dim_value == -1
    assert_equivalent(onnx.load(source), written, input_shapes={"x": (3, 3, 10, 7)})


def test_unnamed_dims_are_each_their_own(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "", None])
    source = save(conv_on(x), tmp_path / "unnamed.onnx")
    code, err, out = optimize(source, "--input-shape", "x:1x3x12x20", capsys=capsys)
    assert code == 0, err
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["nodes"][0]["shape"] == "1x3x12x20"
    assert declared(onnx.load(out)) == declared(onnx.load(source))


def reflect_pad_model(path: Path) -> Path:
    """A 1-D front end that reflect-pads 100 samples each side, as an STFT does, then convolves."""
    audio = helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["batch", 1, "samples"])
    graph = helper.make_graph(
        [helper.make_node("Pad", ["audio", "pads"], ["padded"], name="stft/padding/Pad", mode="reflect"),
         helper.make_node("Conv", ["padded", "w"], ["y"], name="stft/conv", strides=[4])],
        "frontend", [audio], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([0, 0, 100, 0, 0, 100], np.int64), "pads"), initializer("w", (8, 1, 16))],
    )
    return save(graph, path)


def test_a_reflect_pad_longer_than_the_default_input_names_the_node_and_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = reflect_pad_model(tmp_path / "vad.onnx")
    code, err, out = optimize(source, capsys=capsys)
    assert code == 2
    line = error_line(err)
    assert "'stft/padding/Pad' (Pad)" in line and "reflect" in line, line
    assert "--input-shape audio:DIMS" in line and "--inputs DATA.npz" in line, line
    assert not out.exists()
    for command in (["bench", str(source)], ["verify", str(source), str(source)]):
        assert main(command) == 2, command
        line = error_line(capsys.readouterr().err)
        assert "'stft/padding/Pad' (Pad)" in line and "--input-shape" in line, line

    code, err, out = optimize(source, "--input-shape", "audio:1x1x512", capsys=capsys)
    assert code == 0, err
    assert_equivalent(onnx.load(source), onnx.load(out), input_shapes={"audio": (2, 1, 400)})


def sample_rate_model(path: Path) -> Path:
    """Frames of `sr // 250` samples: a sample rate of 16000 or 8000 works, random small ints do not
    (a zero-length frame is not a shape Reshape accepts)."""
    audio = helper.make_tensor_value_info("audio", TensorProto.FLOAT, [1, "samples"])
    sr = helper.make_tensor_value_info("sr", TensorProto.INT64, [])
    graph = helper.make_graph(
        [helper.make_node("Div", ["sr", "per_frame"], ["frame"]),
         helper.make_node("Unsqueeze", ["frame", "axis0"], ["frame1"]),
         helper.make_node("Concat", ["lead", "frame1"], ["shape"], axis=0),
         helper.make_node("Reshape", ["audio", "shape"], ["frames"], name="frames/Reshape"),
         helper.make_node("Conv", ["frames", "w"], ["y"], name="frames/conv", pads=[0, 1, 0, 1])],
        "vad", [audio, sr], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(250, np.int64), "per_frame"),
         numpy_helper.from_array(np.array([0], np.int64), "axis0"),
         numpy_helper.from_array(np.array([1, 1, -1], np.int64), "lead"),
         initializer("w", (4, 1, 1, 3))],
    )
    return save(graph, path)


def test_an_input_that_needs_a_valid_value_is_given_alone_in_an_npz(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = sample_rate_model(tmp_path / "sr.onnx")
    code, err, out = optimize(source, "--input-shape", "audio:1x512", capsys=capsys)
    assert code == 2
    line = error_line(err)
    assert "'frames/Reshape' (Reshape)" in line and "the inputs audio, sr were random" in line and "--inputs DATA.npz" in line, line

    np.savez(tmp_path / "sr.npz", sr=np.array(16000, np.int64))
    code, err, out = optimize(source, "--input-shape", "audio:1x512", "--inputs", str(tmp_path / "sr.npz"), capsys=capsys)
    assert code == 0, err
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["nodes"][0]["shape"] == "1x1x8x64", "profiled at the frames a 16 kHz rate makes"
    assert_equivalent(onnx.load(source), onnx.load(out), inputs={"audio": RNG.standard_normal((1, 512)).astype(np.float32),
                                                               "sr": np.array(16000, np.int64)})


def test_an_npz_naming_no_input_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = sample_rate_model(tmp_path / "sr.onnx")
    np.savez(tmp_path / "typo.npz", rate=np.array(16000, np.int64))
    code, err, _ = optimize(source, "--inputs", str(tmp_path / "typo.npz"), capsys=capsys)
    assert code == 2 and "'rate', which is not a model input" in error_line(err)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small conv net quantized by onnxruntime's own tool three ways."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

    folder = tmp_path_factory.mktemp("quantized")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])],
        "net", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [initializer("w1", (4, 3, 3, 3)), initializer("w2", (4, 4, 3, 3))],
    )
    source = save(graph, folder / "float.onnx", opset=13)

    class Calibration(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    paths = {kind: folder / f"{kind}.onnx" for kind in ("dynamic", "qoperator", "qdq")}
    quantize_dynamic(source, paths["dynamic"], weight_type=QuantType.QUInt8)
    quantize_static(source, paths["qoperator"], Calibration(), quant_format=QuantFormat.QOperator)
    quantize_static(source, paths["qdq"], Calibration(), quant_format=QuantFormat.QDQ)
    return paths


@pytest.mark.parametrize("kind, op", [("dynamic", "ConvInteger"), ("qoperator", "QLinearConv")])
def test_a_model_with_only_integer_convs_has_nothing_to_lower(
    quantized: dict[str, Path], kind: str, op: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["optimize", str(quantized[kind]), "--no-cache"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"nothing to lower: no Conv, ConvTranspose or known idiom; found 2 {op}, which convlower does not lower" in out
    assert "no variant beat" not in out and "x end to end" not in out
    report = json.loads(quantized[kind].with_name(f"{kind}.convlower.json").read_text())
    assert report["unlowered_ops"] == {op: 2} and report["nodes"] == []
    assert report["verification"] == {"unchanged": True}


def test_a_qdq_conv_is_left_to_onnxruntime_with_the_reason(quantized: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["optimize", str(quantized["qdq"]), "--no-cache"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(quantized["qdq"].with_name("qdq.convlower.json").read_text())
    assert [n["chosen"] for n in report["nodes"]] == ["original", "original"]
    assert all("DequantizeLinear" in n["reason"] and "QLinearConv" in n["reason"] for n in report["nodes"])
    assert "nothing to lower: 2 node(s) cannot be lowered" in out


def test_paddle2onnx_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Paddle2ONNX names tensors `conv2d_0.w_0`, outputs `save_infer_model/scale_0.tmp_1`, and
    leaves nodes unnamed."""
    x = paddle_input("x")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "conv2d_0.w_0", "conv2d_0.b_0"], ["conv2d_1.tmp_0"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["conv2d_1.tmp_0"], ["save_infer_model/scale_0.tmp_1"])],
        "paddle", [x], [helper.make_tensor_value_info("save_infer_model/scale_0.tmp_1", TensorProto.FLOAT, [-1, 4, "?", "?"])],
        [initializer("conv2d_0.w_0", (4, 3, 3, 3)), initializer("conv2d_0.b_0", (4,))],
    )
    source = save(graph, tmp_path / "inference.onnx", opset=11)
    code, err, out = optimize(source, "--input-shape", "x:1x3x16x16", capsys=capsys)
    assert code == 0, err
    written = onnx.load(out)
    assert [o.name for o in written.graph.output] == ["save_infer_model/scale_0.tmp_1"]
    assert declared(written) == declared(onnx.load(source))
    assert_equivalent(onnx.load(source), written, input_shapes={"x": (2, 3, 9, 13)})


def test_tf2onnx_names_and_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """tf2onnx keeps TensorFlow's NHWC input (`input_1:0`, with a colon) and transposes it to NCHW
    before each Conv; node and tensor names are TensorFlow's scopes."""
    x = helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, ["unk__12", 16, 16, 3])
    scope = "StatefulPartitionedCall/model/conv2d/"
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["input_1:0"], [scope + "Conv2D__6:0"], perm=[0, 3, 1, 2], name=scope + "Conv2D__6"),
         helper.make_node("Conv", [scope + "Conv2D__6:0", "const_fold_opt__20"], [scope + "Conv2D:0"], name=scope + "Conv2D",
                          auto_pad="SAME_UPPER", strides=[2, 2]),
         helper.make_node("Transpose", [scope + "Conv2D:0"], ["Identity:0"], perm=[0, 2, 3, 1], name=scope + "Conv2D__8")],
        "tf2onnx", [x], [helper.make_tensor_value_info("Identity:0", TensorProto.FLOAT, ["unk__13", 8, 8, 4])],
        [initializer("const_fold_opt__20", (4, 3, 3, 3))],
    )
    source = save(graph, tmp_path / "saved_model.onnx", opset=13)
    code, err, out = optimize(source, "--input-shape", "input_1:0:2x16x16x3", capsys=capsys)
    assert code == 0, err
    assert "symbolic" not in err, "the colon in the input's name is part of the name"
    assert_equivalent(onnx.load(source), onnx.load(out), input_shapes={"input_1:0": (3, 16, 16, 3)})


def test_older_torch_exporter_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """torch 1.x named inputs `input.1`, weights `onnx::Conv_12`, tensors by number, and nodes `Conv_0`."""
    x = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["batch_size", 3, 12, 12])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input.1", "onnx::Conv_12", "onnx::Conv_13"], ["11"], name="Conv_0", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["11"], ["14"], name="Relu_1")],
        "torch-jit-export", [x], [helper.make_tensor_value_info("14", TensorProto.FLOAT, ["batch_size", 4, 12, 12])],
        [initializer("onnx::Conv_12", (4, 3, 3, 3)), initializer("onnx::Conv_13", (4,))],
    )
    source = save(graph, tmp_path / "torch1.onnx", opset=11)
    code, err, out = optimize(source, capsys=capsys)
    assert code == 0, err
    report = json.loads(out.with_suffix(".json").read_text())
    assert [n["name"] for n in report["nodes"]] == ["Conv_0"]
    assert_equivalent(onnx.load(source), onnx.load(out), input_shapes={"input.1": (2, 3, 12, 12)})


def test_an_attribute_of_the_wrong_type_is_a_reason_not_a_crash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    graph = conv_on(x)
    graph.node[0].attribute.append(helper.make_attribute("group", "1"))
    source = save(graph, tmp_path / "stringly.onnx")
    assert main(["inspect", str(source), "--json"]) == 0
    out, err = capsys.readouterr()
    assert "group='1' is not an integer" in out, out
    assert main(["lower", str(source), "--variant", "conv=im2col", "-o", str(tmp_path / "lowered.onnx")]) == 0
    out, err = capsys.readouterr()
    assert "group='1' is not an integer" in out and "lowered 0 of 1" in out
    code, err, _ = optimize(source, capsys=capsys)
    assert code == 2 and "onnxruntime cannot load the model" in error_line(err)
