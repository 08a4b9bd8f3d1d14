"""DeformConv on onnxruntime: the native kernel, convlower's two lowerings, and the per-tap
`grid_sample` decomposition that ports without torchvision export.

    python benchmarks/bench_deform_conv.py [--threads 2] [--quick]

Each case is one deformable 3x3 layer (offsets up to a few pixels, so taps fall between pixels and
off the image) at a detector head's shape. Candidates, every one checked against the native node's
output before anything is timed, then timed interleaved (`time_calls`, rotating order):

- `native`: one ONNX DeformConv (opset 19), onnxruntime's own kernel;
- `gather_im2col`, `grid_sample`: that node lowered by `convlower.lower`;
- `per-tap grid_sample (export)`: the same layer written in plain torch as ports without
  torchvision write it (`models/deform_idioms.py`'s `PerTapGridSample`: one `F.grid_sample` per
  tap, stacked, then an einsum with the weight), exported by torch's TorchScript exporter at
  opset 19 — what a user who cannot export `deform_conv2d` ships today;
- `per-tap export, optimized`: that export after `convlower.optimize` (recognized as one
  DeformConv, then tuned; no cache), the tuning time printed beside it.

Ratios are native's median over each candidate's: above 1 is faster than the native kernel; the
last column is the export's median over each candidate's. The native model in a second session
("self-check") must read 1.00x: its distance from 1 is the noise. The provider is printed; the
machine is shared, so read the ratios.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
import warnings

import numpy as np
import onnx
import torch

import convlower
from convlower.models.deform_idioms import PerTapGridSample
from convlower.runner import Runner, TimingPolicy, time_calls
from convlower.verify import compare

CASES = {
    "dcnv1_32x64x64": dict(channels=32, side=64, modulated=False),
    "dcnv2_32x64x64": dict(channels=32, side=64, modulated=True),
    "dcnv2_64x32x32": dict(channels=64, side=32, modulated=True),
}


def native_model(channels: int, side: int, modulated: bool, weight: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    from onnx import TensorProto, helper, numpy_helper

    inputs = ["x", "w", "offset", "b"] + (["mask"] if modulated else [])
    node = helper.make_node("DeformConv", inputs, ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="dcn")
    values = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, side, side]),
              helper.make_tensor_value_info("offset", TensorProto.FLOAT, [1, 18, side, side])]
    if modulated:
        values.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 9, side, side]))
    graph = helper.make_graph([node], "dcn", values, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, side, side])],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)


def decomposed_model(weight: np.ndarray, bias: np.ndarray, feeds: dict[str, np.ndarray]) -> onnx.ModelProto:
    module = PerTapGridSample(weight.shape[1], weight.shape[0]).eval()
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(weight))
        module.bias.copy_(torch.from_numpy(bias))
    args = tuple(torch.from_numpy(feeds[name]) for name in ("x", "offset", "mask"))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, buffer, dynamo=False, opset_version=19, input_names=["x", "offset", "mask"])
    return onnx.load_from_string(buffer.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a short timing budget (a smoke run)")
    args = parser.parse_args(argv)
    runner = Runner("cpu", args.threads)
    policy = TimingPolicy(warmup=3, min_runs=20, max_runs=300, budget_s=1.0 if args.quick else 6.0)
    print(f"onnxruntime on {runner.provider} ({runner.device}), {args.threads} threads")
    print("| case | candidate | ms | native / candidate | export / candidate | max abs err |\n|---|---|---:|---:|---:|---:|")
    for name, case in CASES.items():
        rng = np.random.default_rng(0)
        channels, side = case["channels"], case["side"]
        weight = (rng.standard_normal((channels, channels, 3, 3)) * 0.1).astype(np.float32)
        bias = rng.standard_normal(channels).astype(np.float32)
        feeds = {"x": rng.standard_normal((1, channels, side, side)).astype(np.float32),
                 "offset": (rng.standard_normal((1, 18, side, side)) * 2).astype(np.float32),
                 "mask": rng.random((1, 9, side, side)).astype(np.float32) if case["modulated"] else np.ones((1, 9, side, side), np.float32)}
        native = native_model(channels, side, case["modulated"], weight, bias)
        models = {"native": native, "native again (self-check)": native}
        for variant in ("gather_im2col", "grid_sample"):
            models[variant] = convlower.lower(native, {"DeformConv": variant}).model
        models["per-tap grid_sample (export)"] = decomposed_model(weight, bias, feeds)
        started = time.perf_counter()
        result = convlower.optimize(models["per-tap grid_sample (export)"], provider="cpu", threads=args.threads, cache=None)
        tuned_s = time.perf_counter() - started
        chosen = sorted({f"{n.op}={n.chosen}" for n in result.report.nodes})
        models["per-tap export, optimized"] = result.model
        sessions, errors = [], {}
        expected = None
        for label, model in models.items():
            session = runner.session(model)
            needed = {i.name for i in model.graph.input}
            got = session.run({k: v for k, v in feeds.items() if k in needed})[0]
            expected = got if expected is None else expected
            errors[label] = compare("y", expected, got, None, None).max_abs_err
            sessions.append((label, session, {k: v for k, v in feeds.items() if k in needed}))
        timings = [t.median_ms for t in time_calls([session.runner_for(f) for _, session, f in sessions], policy)]
        base, export = timings[0], timings[list(models).index("per-tap grid_sample (export)")]
        for (label, _, _), timing in zip(sessions, timings):
            print(f"| {name} | {label} | {timing:.3f} | {base / timing:.2f}x | {export / timing:.2f}x | {errors[label]:.1e} |")
        print(f"| {name} | (optimize: {tuned_s:.1f} s, chose {', '.join(chosen)}) | | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
