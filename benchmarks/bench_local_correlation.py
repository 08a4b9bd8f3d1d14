"""LocalCorrelation on onnxruntime: every lowering against the op's function body, at the shapes of
stereo cost volumes, optical-flow correlation and local attention.

    python benchmarks/bench_local_correlation.py [--only NAME,..] [--quick] [--threads 2] [--provider cpu|auto|cuda]

Each case is one `convlower.LocalCorrelation` node with its model-local function (the body is
`shift_mul_reduce` built with no shape known, as an exported model carries it), and that node
lowered by each variant with `convlower.lower` at the case's static shape. Every candidate's
output is checked against the body's before anything is timed; the candidates are then timed
interleaved (`convlower.runner.time_interleaved`: rotating order, medians) in sessions from
convlower's Runner, so drift hits all alike. Ratios are the body's median over the variant's:
above 1 is faster. A variant that does not apply prints its reason.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime
from onnx import helper

import convlower
from convlower.modelio import runtime_compatible
from convlower.passes import FAMILIES
from convlower.passes.local_correlation import OP_TYPE, Correlation
from convlower.passes.local_functions import DOMAIN, DOMAIN_VERSION, attach_functions
from convlower.runner import Runner, Timing, TimingPolicy, time_interleaved
from convlower.verify import compare

BODY = "function body"


@dataclass(frozen=True)
class Case:
    """One correlation at one shape: A and B `[N, C, *S]`, and what it stands for."""

    name: str
    about: str
    shape: tuple[int, ...]
    correlation: Correlation
    quick_shape: tuple[int, ...]


def window(*axes: tuple[int, int, int], groups: int = 1, reduction: str = "mean", scale: float = 1.0) -> Correlation:
    """A Correlation from per-axis (first, last, step)."""
    first, last, step = (tuple(axis[i] for axis in axes) for i in range(3))
    return Correlation(first, last, step, groups, reduction, scale)


NONE = (0, 0, 1)
CASES = [
    Case("gwcnet_g40_d48", "GwcNet at 1/4 of 256x512: 320 channels, 40 groups, 48 disparities along W",
         (1, 320, 64, 128), window(NONE, (0, -47, -1), groups=40), (1, 40, 8, 32)),
    Case("gwcnet_g8_d48", "the same volume with 8 groups of 40 channels",
         (1, 320, 64, 128), window(NONE, (0, -47, -1), groups=8), (1, 16, 8, 32)),
    Case("gwcnet_small_g8_d24", "a stride-4 encoder's 40 channels at 32x64, 8 groups, 24 disparities",
         (1, 40, 32, 64), window(NONE, (0, -23, -1), groups=8), (1, 8, 8, 32)),
    Case("gwcnet_small_g40_d24", "the same with 40 groups of 1 channel",
         (1, 40, 32, 64), window(NONE, (0, -23, -1), groups=40), (1, 40, 4, 32)),
    Case("pwcnet_81", "PWC-Net: 64 channels at 32x64, -4..4 on both axes (81 taps), mean",
         (1, 64, 32, 64), window((-4, 4, 1), (-4, 4, 1)), (1, 8, 8, 16)),
    Case("flownetc_441", "FlowNetC: 256 channels at 48x64, -20..20 step 2 on both axes (441 taps), mean",
         (1, 256, 48, 64), window((-20, 20, 2), (-20, 20, 2)), (1, 8, 8, 16)),
    Case("local_attention_5x5", "local attention: 64 channels at 32x32, a 5x5 window, 4 heads, q.k / sqrt(16)",
         (1, 64, 32, 32), window((-2, 2, 1), (-2, 2, 1), groups=4, reduction="sum", scale=0.25), (1, 8, 8, 8)),
    Case("sliding_window_1d", "1-D sliding-window attention: 256 channels, 1024 steps, -16..16, 8 heads",
         (1, 256, 1024), window((-16, 16, 1), groups=8, reduction="sum", scale=0.25 ** 1.5), (1, 16, 64)),
    Case("video_3x3x3", "3-D correlation: 32 channels at 8x32x32, -1..1 on every axis (27 taps)",
         (1, 32, 8, 32, 32), window((-1, 1, 1), (-1, 1, 1), (-1, 1, 1)), (1, 4, 4, 8, 8)),
]


def canonical_model(shape: tuple[int, ...], correlation: Correlation) -> onnx.ModelProto:
    """One LocalCorrelation node of A and B at `shape`, with its model-local function."""
    inputs = [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(shape)) for name in ("a", "b")]
    output = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [shape[0], correlation.groups, correlation.taps, *shape[2:]])
    node = helper.make_node(OP_TYPE, ["a", "b"], ["y"], name="correlation", domain=DOMAIN, **correlation.attrs())
    graph = helper.make_graph([node], "local_correlation", inputs, [output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)])
    return runtime_compatible(attach_functions(model))


@dataclass
class Row:
    candidate: str
    timing: Timing | None
    note: str = ""


def bench_case(case: Case, shape: tuple[int, ...], runner: Runner, policy: TimingPolicy) -> tuple[list[Row], str]:
    """The body and every variant that applies at this shape, checked against the body, timed interleaved."""
    model = canonical_model(shape, case.correlation)
    rng = np.random.default_rng(0)
    feeds = {name: rng.standard_normal(shape, dtype=np.float32) for name in ("a", "b")}
    sessions = {BODY: runner.session(model, what=BODY)}
    rows = []
    for variant in FAMILIES[OP_TYPE.lower()].variant_names:
        result = convlower.lower(model, [f"{OP_TYPE}={variant}"])
        if result.lowered:
            sessions[variant] = runner.session(result.model, what=variant)
        else:
            rows.append(Row(variant, None, f"n/a: {result.nodes[0].reason}"))
    expected = sessions[BODY].run(feeds)[0]
    for name in list(sessions)[1:]:
        diff = compare("y", expected, sessions[name].run(feeds)[0], None, None)
        if not diff.passed:
            rows.append(Row(name, None, f"WRONG (max abs err {diff.max_abs_err:.3g})"))
            del sessions[name]
    timings = time_interleaved(list(sessions.values()), feeds, policy)
    provider = sessions[BODY].provider
    return [Row(name, timing) for name, timing in zip(sessions, timings)] + rows, provider


def table(results: dict[str, tuple[tuple[int, ...], list[Row]]]) -> str:
    header = f"{'case':<22} {'A, B shape':<18} {'K':>4} {'candidate':<20} {'median ms':>10} {'p10-p90 ms':>17} {'vs body':>8}"
    lines = [header, "-" * len(header)]
    for name, (shape, rows) in results.items():
        case = next(c for c in CASES if c.name == name)
        body = next(r.timing for r in rows if r.candidate == BODY)
        assert body is not None
        label, shape_text, taps = name, "x".join(map(str, shape)), str(case.correlation.taps)
        for row in rows:
            if row.timing is None:
                lines.append(f"{label:<22} {shape_text:<18} {taps:>4} {row.candidate:<20} {row.note}")
            else:
                t = row.timing
                spread = f"{t.p10_ms:.2f}-{t.p90_ms:.2f}"
                lines.append(f"{label:<22} {shape_text:<18} {taps:>4} {row.candidate:<20} {t.median_ms:>10.2f} "
                             f"{spread:>17} {body.median_ms / t.median_ms:>7.2f}x")
            label = shape_text = taps = ""
        timed = [r for r in rows if r.timing is not None and r.candidate != BODY]
        best = min(timed, key=lambda r: r.timing.median_ms)  # type: ignore[union-attr]
        lines.append(f"{'':<22} best: {best.candidate}, {body.median_ms / best.timing.median_ms:.2f}x the body")  # type: ignore[union-attr]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"cases to run, comma-separated (default all: {','.join(c.name for c in CASES)})")
    parser.add_argument("--quick", action="store_true", help="small shapes and tiny timing budgets: a smoke run")
    parser.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else [c.name for c in CASES]
    unknown = set(names) - {c.name for c in CASES}
    if unknown:
        raise SystemExit(f"unknown case {sorted(unknown)[0]!r}; choose from {', '.join(c.name for c in CASES)}")
    policy = (
        TimingPolicy(warmup=1, min_runs=3, max_runs=6, budget_s=0.2)
        if args.quick
        else TimingPolicy(warmup=2, min_runs=15, max_runs=200, budget_s=8.0, stable_within=0.01)
    )
    runner = Runner(args.provider, args.threads)
    results, providers = {}, set()
    for case in (c for c in CASES if c.name in names):
        shape = case.quick_shape if args.quick else case.shape
        rows, provider = bench_case(case, shape, runner, policy)
        results[case.name] = (shape, rows)
        providers.add(provider)
        print(f"  {case.name} done: {case.about}", file=sys.stderr, flush=True)
    print(table(results))
    print(f"onnxruntime {onnxruntime.__version__}, provider that ran: {', '.join(sorted(providers))}; "
          f"device: {runner.device}; threads: {args.threads}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
