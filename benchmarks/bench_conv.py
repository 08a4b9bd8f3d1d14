"""Median latency of every Conv variant beside native's, on representative layer shapes.

    python benchmarks/bench_conv.py [--quick] [--provider auto|cpu|cuda] [--threads N] [--only TEXT]...

Each shape is a single-Conv model, weights as initializers as in deployment. Each applicable
variant lowers it; its output is checked against the original's on the same input, and they are
timed interleaved with native (convlower.runner), so drift hits all alike. Ratios are variant
median / native median: above 1 is slower than native.
"""

from __future__ import annotations

import argparse
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


@dataclass(frozen=True)
class ConvShape:
    """One Conv layer: input `[1, C, *spatial]`, weight `[M, C/group, *kernel]`, with bias."""

    name: str
    in_channels: int
    out_channels: int
    spatial: tuple[int, ...]
    kernel: tuple[int, ...]
    strides: tuple[int, ...] | None = None
    pads: tuple[int, ...] | None = None
    dilations: tuple[int, ...] | None = None
    group: int = 1

    def model(self, seed: int = 0) -> onnx.ModelProto:
        rng = np.random.default_rng(seed)
        rank = len(self.spatial)
        weight = rng.standard_normal((self.out_channels, self.in_channels // self.group, *self.kernel))
        weight /= np.sqrt(weight[0].size)
        bias = rng.standard_normal(self.out_channels) * 0.1
        attrs = {
            "kernel_shape": list(self.kernel),
            "strides": list(self.strides or (1,) * rank),
            "pads": list(self.pads or (0,) * (2 * rank)),
            "dilations": list(self.dilations or (1,) * rank),
            "group": self.group,
        }
        graph = helper.make_graph(
            [helper.make_node("Conv", ["x", "w", "b"], ["y"], name=self.name, **attrs)],
            self.name,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, self.in_channels, *self.spatial])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(weight.astype(np.float32), "w"), numpy_helper.from_array(bias.astype(np.float32), "b")],
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)

    def input(self, seed: int = 1) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {"x": rng.standard_normal((1, self.in_channels, *self.spatial)).astype(np.float32)}


SHAPES = [
    ConvShape("resnet50_conv1_7x7s2", 3, 64, (224, 224), (7, 7), (2, 2), (3, 3, 3, 3)),
    ConvShape("resnet_3x3_56", 64, 64, (56, 56), (3, 3), pads=(1, 1, 1, 1)),
    ConvShape("resnet_3x3_28", 128, 128, (28, 28), (3, 3), pads=(1, 1, 1, 1)),
    ConvShape("resnet_3x3_14", 256, 256, (14, 14), (3, 3), pads=(1, 1, 1, 1)),
    ConvShape("resnet_3x3s2_56", 128, 128, (56, 56), (3, 3), (2, 2), (1, 1, 1, 1)),
    ConvShape("resnet_1x1_bottleneck", 256, 64, (56, 56), (1, 1)),
    ConvShape("resnext_3x3_g32", 128, 128, (28, 28), (3, 3), pads=(1, 1, 1, 1), group=32),
    ConvShape("mobilenet_dw_3x3", 32, 32, (112, 112), (3, 3), pads=(1, 1, 1, 1), group=32),
    ConvShape("mobilenet_dw_3x3s2", 64, 64, (112, 112), (3, 3), (2, 2), (1, 1, 1, 1), group=64),
    ConvShape("mobilenet_pointwise", 32, 64, (112, 112), (1, 1)),
    ConvShape("tcn_1d_k3_d4", 128, 128, (1024,), (3,), pads=(4, 4), dilations=(4,)),
    ConvShape("c3d_3x3x3", 32, 32, (8, 28, 28), (3, 3, 3), pads=(1, 1, 1, 1, 1, 1)),
    ConvShape("vit_b16_patch_embed", 3, 768, (224, 224), (16, 16), (16, 16)),
    ConvShape("video_swin_patch_embed_2x4x4", 3, 96, (8, 56, 56), (2, 4, 4), (2, 4, 4)),
    ConvShape("tcn_1d_k3_t4000", 64, 64, (4000,), (3,), pads=(1, 1)),
]

LOWERINGS = [name for name in family_for("Conv").variant_names if name != "native"]


@dataclass
class Row:
    shape: str
    native_ms: float
    variant_ms: dict[str, float | str]


def bench_shape(shape: ConvShape, runner: Runner, policy: TimingPolicy) -> Row:
    """Lower `shape` with each applicable variant, check each against the original, time all interleaved."""
    model = shape.model()
    feeds = shape.input()
    models = {"native": convlower.lower(model, {"conv": "native"}).model}
    results: dict[str, float | str] = {}
    for name in LOWERINGS:
        result = convlower.lower(model, {"conv": name})
        if result.lowered:
            models[name] = result.model
        else:
            results[name] = "n/a"
    expected = runner.session(model, what=shape.name).run(feeds)[0]
    sessions = {name: runner.session(m, what=f"{shape.name} {name}") for name, m in models.items()}
    for name, session in list(sessions.items()):
        if not compare("y", expected, session.run(feeds)[0], None, None).passed:
            results[name] = "WRONG"
            del sessions[name]
    timings = time_interleaved(list(sessions.values()), feeds, policy)
    medians = {name: t.median_ms for name, t in zip(sessions, timings)}
    results.update({name: ms for name, ms in medians.items() if name != "native"})
    return Row(shape.name, medians["native"], results)


def table(rows: list[Row]) -> str:
    width = max(len(r.shape) for r in rows)
    header = f"{'shape':<{width}} {'native ms':>10}" + "".join(f" {name:>22}" for name in LOWERINGS)
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = []
        for name in LOWERINGS:
            value = row.variant_ms[name]
            cells.append(f" {value:>22}" if isinstance(value, str) else f" {value:>10.3f} ({value / row.native_ms:>6.2f}x)")
        lines.append(f"{row.shape:<{width}} {row.native_ms:>10.3f}" + "".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short timing budget per shape (a smoke run)")
    parser.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    parser.add_argument("--only", action="append", default=[], metavar="TEXT",
                        help="bench only the shapes whose name contains TEXT (repeatable)")
    args = parser.parse_args(argv)
    shapes = [s for s in SHAPES if not args.only or any(text in s.name for text in args.only)]
    if not shapes:
        parser.error(f"no shape name contains {' or '.join(args.only)}; shapes: {', '.join(s.name for s in SHAPES)}")
    policy = (
        TimingPolicy(warmup=1, min_runs=5, max_runs=20, budget_s=0.2)
        if args.quick
        else TimingPolicy(warmup=3, min_runs=15, max_runs=300, budget_s=3.0)
    )
    runner = Runner(args.provider, args.threads)
    rows = []
    for shape in shapes:
        rows.append(bench_shape(shape, runner, policy))
        print(f"  {shape.name} done", file=sys.stderr)
    print(table(rows))
    print("median ms per run (ratio = variant / native; > 1 is slower); n/a: the variant does not apply")
    print(f"provider: {runner.provider}; device: {runner.device}; onnxruntime {onnxruntime.__version__}; "
          f"threads: {args.threads or 'all cores'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
