"""Peak memory and time of `convlower optimize` on a large synthetic Conv model.

    python benchmarks/bench_large_model.py [--gigabytes 2.5] [--inline] [--workdir DIR] [--keep]

The model is a chain of `--convs` 3x3 Conv (+ Relu) layers with as many channels as it takes to
reach `--gigabytes` of weights, on a small spatial size so each run is fast. Its weights are
written as external data (one `.data` file beside the model, offsets page-aligned, streamed one
layer at a time so generating it needs little memory), or with `--inline` inside the protobuf
(at most 2 GB, protobuf's limit; 1.1 GB by default).

It is written under `--workdir` (default ~/.cache/convlower-bench, outside the repository) by a
child process and optimized by `python -m convlower optimize` in another, whose peak resident
memory (`ru_maxrss` from `os.wait4`) is convlower's alone: this process stays small while it
runs (on Linux a child's peak counts its parent's resident memory at the time it started). Then the written model is checked here: whether it has external data beside
it, that onnxruntime loads it from its own folder, and that its output equals the input model's
on one random input. Generated models are deleted unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

PAGE = 4096
SPATIAL = (4, 4)


def channels_for(gigabytes: float, convs: int) -> int:
    """Channels (a multiple of 16) of `convs` CxCx3x3 float32 weights adding up to about `gigabytes`."""
    per_conv = gigabytes * 1e9 / convs
    return max(16, int(round(np.sqrt(per_conv / (9 * 4)) / 16)) * 16)


def _layer(rng: np.random.Generator, channels: int) -> tuple[np.ndarray, np.ndarray]:
    weight = rng.standard_normal((channels, channels, 3, 3), dtype=np.float32)
    weight *= np.float32(np.sqrt(2.0 / (channels * 9)))
    bias = (rng.standard_normal(channels, dtype=np.float32) * np.float32(0.01)).astype(np.float32)
    return weight, bias


def _external(name: str, array: np.ndarray, location: str, offset: int) -> TensorProto:
    tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(array.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def make_model(path: Path, gigabytes: float, convs: int, *, inline: bool, seed: int = 0) -> int:
    """Write the model to `path` (and `path.data` unless `inline`); returns its weight bytes."""
    channels = channels_for(gigabytes, convs)
    rng = np.random.default_rng(seed)
    nodes, initializers = [], []
    data_name = path.name + ".data"
    total = 0
    with open(path.parent / data_name, "wb") if not inline else open(os.devnull, "wb") as data:
        previous = "x"
        for index in range(convs):
            weight, bias = _layer(rng, channels)
            names = (f"conv{index}.weight", f"conv{index}.bias")
            for name, array in zip(names, (weight, bias)):
                total += array.nbytes
                if inline:
                    initializers.append(numpy_helper.from_array(array, name))
                    continue
                offset = -data.tell() % PAGE + data.tell()
                data.seek(offset)
                data.write(array.tobytes())
                initializers.append(_external(name, array, data_name, offset))
            del weight, bias
            conv_out = f"conv{index}"
            nodes.append(helper.make_node("Conv", [previous, *names], [conv_out], name=f"Conv_{index}",
                                          kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
            previous = f"relu{index}" if index < convs - 1 else "y"
            nodes.append(helper.make_node("Relu", [conv_out], [previous], name=f"Relu_{index}"))
    graph = helper.make_graph(
        nodes, "large_conv_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, *SPATIAL])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, *SPATIAL])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path.write_bytes(model.SerializeToString())
    return total


def _generate(path: Path, gigabytes: float, convs: int, *, inline: bool) -> int:
    """`make_model` in a child process, so this one stays small: a child's peak RSS counts the
    memory of the process that started it (Linux records the old image's peak at exec)."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from pathlib import Path; "
            f"from bench_large_model import make_model; "
            f"print(make_model(Path({str(path)!r}), {gigabytes!r}, {convs!r}, inline={inline!r}))")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


@dataclass
class Measured:
    returncode: int
    stdout: str
    stderr: str
    peak_rss: int


def _measured(command: list[str], cwd: Path) -> Measured:
    """Run `command` in `cwd` (not the repository: `python -m` imports from the working directory
    first) and return its exit code, output, and peak resident memory in bytes (`wait4`'s rusage
    of that child alone)."""
    with open(cwd / "stdout.txt", "w+") as out, open(cwd / "stderr.txt", "w+") as err:
        child = subprocess.Popen(command, stdout=out, stderr=err, cwd=cwd, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Measured(child.returncode, out.read(), err.read(), usage.ru_maxrss * 1024)


def _output(path: Path, feed: np.ndarray) -> np.ndarray:
    """The model's output on `feed`, from a session that loads it (and its data) from its own folder."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": feed})[0]


def _data_files(path: Path) -> list[str]:
    """The external data files the model at `path` refers to."""
    model = onnx.load(str(path), load_external_data=False)
    return sorted({e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=None, help="weight size (default 2.5, or 1.1 with --inline)")
    parser.add_argument("--convs", type=int, default=17)
    parser.add_argument("--inline", action="store_true", help="weights inside the protobuf (at most 2 GB)")
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "convlower-bench")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the generated models")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    gigabytes = args.gigabytes or (1.1 if args.inline else 2.5)
    if args.inline and gigabytes >= 2.0:
        parser.error("--inline models must stay under protobuf's 2 GB limit")

    work = args.workdir / f"conv{args.convs}_{gigabytes:g}gb_{'inline' if args.inline else 'external'}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    source, output = work / "model.onnx", work / "model.convlower.onnx"
    try:
        started = time.perf_counter()
        size = _generate(source, gigabytes, args.convs, inline=args.inline)
        print(f"generated {source} ({size / 1e9:.2f} GB of weights, {channels_for(gigabytes, args.convs)} channels) "
              f"in {time.perf_counter() - started:.0f} s", flush=True)

        command = [sys.executable, "-m", "convlower", "optimize", str(source), "-o", str(output),
                   "--provider", "cpu", "--no-cache"]
        if args.threads:
            command += ["--threads", str(args.threads)]
        started = time.perf_counter()
        child = _measured(command, work)
        seconds = time.perf_counter() - started
        peak = child.peak_rss
        figures = {
            "weights_gb": round(size / 1e9, 3), "inline": args.inline, "exit_code": child.returncode,
            "seconds": round(seconds, 1), "peak_rss_gb": round(peak / 1e9, 2), "peak_over_size": round(peak / size, 2),
        }
        if child.returncode != 0:
            print(child.stdout[-3000:], child.stderr[-3000:], sep="\n")
        else:
            figures["data_files"] = _data_files(output)
            figures["summary"] = child.stdout.strip().splitlines()[-2] if child.stdout.strip() else ""
            feed = np.random.default_rng(1).standard_normal((1, channels_for(gigabytes, args.convs), *SPATIAL), dtype=np.float32)
            expected = _output(source, feed)
            got = _output(output, feed)
            figures["max_abs_err"] = float(np.max(np.abs(expected - got)))
            figures["output_equal"] = bool(np.allclose(got, expected, atol=1e-3, rtol=1e-3))
        print(json.dumps(figures, indent=2))
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
        return 0 if child.returncode == 0 and figures.get("output_equal") else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
