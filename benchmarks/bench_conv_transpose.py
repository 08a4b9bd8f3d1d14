"""Median latency of every ConvTranspose and Col2Im variant beside native's, on decoder and fold shapes.

    python benchmarks/bench_conv_transpose.py [--quick] [--provider auto|cpu|cuda] [--threads N]

The transposed convolutions of a UNet decoder (2×2, stride 2, halving the channels at each level)
and of a DBNet detection head (64 channels at 1/4 of a 640×640 image, kernel 2 and kernel 4 with
pad 1, stride 2), plus folds (Col2Im): the inverse of a 3×3 unfold, and the col2im of the k4 s2 p1
transposed conv. Each case is a one-node model, weights as initializers as in deployment. Each
applicable variant lowers it; its output is checked against the original's on the same input,
and all are timed interleaved with native (convlower.runner), so drift hits all alike. Ratios
are variant median / native median: above 1 is slower than native.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper

import convlower
from convlower.passes import family_for
from convlower.runner import Runner, TimingPolicy, time_interleaved
from convlower.verify import compare

OPSET = 18
"""Col2Im's first opset: the col2im variant needs it."""

FULL = TimingPolicy(warmup=3, min_runs=20, max_runs=500, budget_s=10.0)
"""About 10 s of interleaved runs per case: the default run takes about 2 minutes on 2 cores."""
QUICK = TimingPolicy(warmup=1, min_runs=5, max_runs=20, budget_s=0.2)


@dataclass(frozen=True)
class Case:
    """One single-node model and its input."""

    name: str
    op: str
    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]


def _model(name: str, node: onnx.NodeProto, x_shape: list[int], initializers: list[onnx.TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node], name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=9)


def conv_transpose(
    name: str, in_channels: int, out_channels: int, size: int, kernel: int, stride: int, pad: int = 0
) -> Case:
    """ConvTranspose2d(in, out, kernel, stride, pad) with bias on a [1, in, size, size] input."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((in_channels, out_channels, kernel, kernel)) / math.sqrt(in_channels * kernel * kernel)
    bias = rng.standard_normal(out_channels) * 0.1
    attrs = {"kernel_shape": [kernel, kernel], "strides": [stride, stride], "pads": [pad] * 4}
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], name=name, **attrs)
    initializers = [numpy_helper.from_array(weight.astype(np.float32), "w"), numpy_helper.from_array(bias.astype(np.float32), "b")]
    x = rng.standard_normal((1, in_channels, size, size)).astype(np.float32)
    return Case(name, "ConvTranspose", _model(name, node, list(x.shape), initializers), {"x": x})


def fold(name: str, channels: int, image: int, kernel: int, stride: int, pad: int) -> Case:
    """Col2Im of [1, channels·kernel², L] columns into a [1, channels, image, image] image (F.fold)."""
    blocks = (image + 2 * pad - kernel) // stride + 1
    shapes = [numpy_helper.from_array(np.array([n, n], np.int64), s) for n, s in ((image, "image"), (kernel, "block"))]
    node = helper.make_node("Col2Im", ["x", "image", "block"], ["y"], name=name, strides=[stride] * 2, pads=[pad] * 4)
    x = np.random.default_rng(0).standard_normal((1, channels * kernel * kernel, blocks * blocks)).astype(np.float32)
    return Case(name, "Col2Im", _model(name, node, list(x.shape), shapes), {"x": x})


CASES = [
    conv_transpose("unet_up_512_256_28", 512, 256, 28, 2, 2),
    conv_transpose("unet_up_256_128_56", 256, 128, 56, 2, 2),
    conv_transpose("unet_up_128_64_112", 128, 64, 112, 2, 2),
    conv_transpose("dbnet_k2s2_64_64_160", 64, 64, 160, 2, 2),
    conv_transpose("dbnet_k2s2_64_1_160", 64, 1, 160, 2, 2),
    conv_transpose("dbnet_k4s2p1_64_64_160", 64, 64, 160, 4, 2, 1),
    conv_transpose("dbnet_k4s2p1_64_1_160", 64, 1, 160, 4, 2, 1),
    fold("fold_3x3_p1_64_56", 64, 56, 3, 1, 1),
    fold("fold_k4s2p1_64_160", 64, 160, 4, 2, 1),
]


@dataclass
class Result:
    """One case: native's median, and each variant's median or why it has none."""

    case: Case
    providers: str
    native_ms: float
    variants: dict[str, float | str]


def bench_case(case: Case, runner: Runner, policy: TimingPolicy) -> Result:
    """Lower the case with each applicable variant, check each against the original, time all interleaved."""
    models, notes = {}, {}
    for name in family_for(case.op).variant_names:
        result = convlower.lower(case.model, {case.op: name})
        if result.lowered:
            models[name] = result.model
        else:
            notes[name] = f"n/a: {result.nodes[0].reason}"
    expected = runner.session(case.model, what=case.name).run(case.feeds)[0]
    sessions = {name: runner.session(model, what=f"{case.name} {name}") for name, model in models.items()}
    for name, session in list(sessions.items()):
        diff = compare("y", expected, session.run(case.feeds)[0], None, None)
        if not diff.passed:
            notes[name] = f"WRONG (max abs err {diff.max_abs_err:.3g})"
            del sessions[name]
    timings = time_interleaved(list(sessions.values()), case.feeds, policy)
    medians = {name: timing.median_ms for name, timing in zip(sessions, timings)}
    providers = ",".join(sorted({session.provider for session in sessions.values()}))
    return Result(case, providers, medians.pop("native"), {**medians, **notes})


def report(results: list[Result]) -> str:
    """A line per (case, variant): its median next to native's and the ratio, cases grouped by op."""
    lines = [f"{'case':<24} {'variant':<17} {'median ms':>10} {'native ms':>10} {'ratio':>7}  provider"]
    lines.append("-" * len(lines[0]))
    for result in sorted(results, key=lambda r: r.case.op, reverse=True):
        for name, value in result.variants.items():
            prefix = f"{result.case.name:<24} {name:<17}"
            if isinstance(value, str):
                lines.append(f"{prefix} {value}")
            else:
                ratio = value / result.native_ms
                lines.append(f"{prefix} {value:>10.3f} {result.native_ms:>10.3f} {ratio:>6.2f}x  {result.providers}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short timing budget per case (a smoke run)")
    parser.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    args = parser.parse_args(argv)
    runner = Runner(args.provider, args.threads)
    results = []
    for case in CASES:
        results.append(bench_case(case, runner, QUICK if args.quick else FULL))
        print(f"  {case.name} done", file=sys.stderr)
    print(report(results))
    print("ratio = variant median / native median, timed interleaved: > 1 is slower than native")
    print(f"device: {runner.device}; onnxruntime {onnxruntime.__version__}; threads: {args.threads or 'all cores'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
