"""Dynamic filters (seed 000) and unfold: every variant against the graph torch exports, and torch eager.

    python benchmarks/bench_dynamic_filter.py [--quick] [--provider auto|cpu|cuda] [--threads N]

For each shape (N, C, H, W, K), seed 000's method_1 (`F.unfold` + `view` + `einsum`, plain torch)
is exported with torch.onnx.export (dynamo); that graph is timed as exported, and convlower
recognizes it and lowers it with each DynamicFilter variant. Torch eager runs method_1 and
`convlower.ops.dynamic_filter` under torch.inference_mode with the same thread count. Every
output is checked against eager method_1; everything is timed interleaved (convlower.runner), so
drift hits all alike. Speedups are (exported graph median) / (candidate median) and (eager
method_1 median) / (candidate median): above 1 is faster. A second table does the same for a plain
`F.unfold` and the Unfold variants.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime
import torch
import torch.nn.functional as F

import convlower
from convlower.ops import dynamic_filter
from convlower.passes import FAMILIES
from convlower.runner import Runner, Timing, TimingPolicy, time_interleaved
from convlower.verify import compare

SHAPES = [(2048, 1, 32, 32, 3), (8, 16, 64, 64, 3), (1, 64, 128, 128, 5)]


class Method1(torch.nn.Module):
    """Seed 000's method_1 (K fixed at construction)."""

    def __init__(self, kernel: int):
        super().__init__()
        self.kernel = kernel

    def forward(self, feature_map: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
        n, c, h, w = feature_map.shape
        k = self.kernel
        unfolded = F.unfold(feature_map, k, padding=k // 2).view(n, c, k**2, h, w)
        return torch.einsum("nckhw,nkhw->nchw", unfolded, filters)


class Unfold(torch.nn.Module):
    """A plain `F.unfold(x, K, padding=K // 2)`."""

    def __init__(self, kernel: int):
        super().__init__()
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.unfold(x, self.kernel, padding=self.kernel // 2)


class Eager:
    """A torch callable that `time_interleaved` can time beside onnxruntime sessions."""

    provider = "torch eager (CPU)"

    def __init__(self, fn: Callable[..., torch.Tensor]):
        self.fn = fn

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [self.runner_for(feeds)().numpy()]

    def runner_for(self, feeds: dict[str, np.ndarray]) -> Callable[[], torch.Tensor]:
        tensors = [torch.from_numpy(a) for a in feeds.values()]

        def once() -> torch.Tensor:
            with torch.inference_mode():
                return self.fn(*tensors)

        return once


@dataclass
class Row:
    candidate: str
    timing: Timing | None
    provider: str = ""
    note: str = ""


@dataclass
class Comparison:
    """One op at one shape: the exported graph, its lowerings, torch eager."""

    exported: str
    eager: str
    variants: list[str]
    rows: list[Row]


def export(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], names: list[str]) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, inputs, buffer, dynamo=True, opset_version=18, input_names=names, output_names=["y"])
    return onnx.load_from_string(buffer.getvalue())


def compare_candidates(
    exported: onnx.ModelProto,
    op: str,
    eager: dict[str, Callable[..., torch.Tensor]],
    feeds: dict[str, np.ndarray],
    runner: Runner,
    policy: TimingPolicy,
) -> Comparison:
    """Lower `exported` with each variant of `op`; check every candidate against the first eager
    callable's output, and time them all interleaved."""
    variants = FAMILIES[op.lower()].variant_names
    exported_name = "exported graph"
    candidates: dict[str, Any] = {exported_name: runner.session(exported, what=exported_name)}
    rows = []
    for variant in variants:
        result = convlower.lower(exported, [f"{op}={variant}"])
        if result.lowered:
            candidates[variant] = runner.session(result.model, what=variant)
        else:
            rows.append(Row(variant, None, note="; ".join(o.reason or "" for o in result.nodes) or "not recognized"))
    candidates.update({name: Eager(fn) for name, fn in eager.items()})
    reference = next(iter(eager))
    expected = candidates[reference].run(feeds)[0]
    for name, candidate in list(candidates.items()):
        diff = compare("y", expected, candidate.run(feeds)[0], None, None)
        if not diff.passed:
            rows.append(Row(name, None, note=f"WRONG (max abs err {diff.max_abs_err:.3g})"))
            del candidates[name]
    timings = time_interleaved(list(candidates.values()), feeds, policy)
    timed = [Row(name, timing, c.provider) for (name, c), timing in zip(candidates.items(), timings)]
    return Comparison(exported_name, reference, variants, timed + rows)


def bench_dynamic_filter(shape: tuple[int, ...], runner: Runner, policy: TimingPolicy) -> Comparison:
    n, c, h, w, k = shape
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((n, c, h, w)).astype(np.float32), "f": rng.random((n, k * k, h, w)).astype(np.float32)}
    exported = export(Method1(k), (torch.from_numpy(feeds["x"]), torch.from_numpy(feeds["f"])), ["x", "f"])
    eager = {"torch eager method_1": Method1(k), "torch eager dynamic_filter": lambda x, f: dynamic_filter(x, f, k)}
    return compare_candidates(exported, "DynamicFilter", eager, feeds, runner, policy)


def bench_unfold(shape: tuple[int, ...], runner: Runner, policy: TimingPolicy) -> Comparison:
    n, c, h, w, k = shape
    feeds = {"x": np.random.default_rng(0).standard_normal((n, c, h, w)).astype(np.float32)}
    exported = export(Unfold(k), (torch.from_numpy(feeds["x"]),), ["x"])
    return compare_candidates(exported, "Unfold", {"torch eager F.unfold": Unfold(k)}, feeds, runner, policy)


def table(title: str, results: dict[tuple[int, ...], Comparison]) -> str:
    header = f"{'shape (N, C, H, W, K)':<22} {title:<28} {'median ms':>10} {'p10-p90 ms':>17} {'vs exported':>12} {'vs eager':>9}"
    lines = [header, "-" * len(header)]
    for shape, comparison in results.items():
        timed = {r.candidate: r.timing.median_ms for r in comparison.rows if r.timing is not None}
        exported, eager = timed[comparison.exported], timed[comparison.eager]
        label = str(shape)
        for row in comparison.rows:
            if row.timing is None:
                lines.append(f"{label:<22} {row.candidate:<28} {row.note}")
            else:
                t = row.timing
                spread = f"{t.p10_ms:.2f}-{t.p90_ms:.2f}"
                lines.append(
                    f"{label:<22} {row.candidate:<28} {t.median_ms:>10.2f} {spread:>17} "
                    f"{exported / t.median_ms:>11.1f}x {eager / t.median_ms:>8.2f}x"
                )
            label = ""
        best = min((name for name in timed if name in comparison.variants), key=timed.__getitem__)
        lines.append(
            f"{'':<22} best: {best}, {exported / timed[best]:.1f}x faster than the exported graph, "
            f"{eager / timed[best]:.2f}x {comparison.eager}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short timing budget per shape (a smoke run)")
    parser.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="threads for onnxruntime and torch (default: all cores)")
    args = parser.parse_args(argv)
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    policy = (
        TimingPolicy(warmup=1, min_runs=5, max_runs=10, budget_s=0.5)
        if args.quick
        else TimingPolicy(warmup=3, min_runs=20, max_runs=200, budget_s=20.0, stable_within=0.01)
    )
    runner = Runner(args.provider, threads)
    filters, unfolds = {}, {}
    for shape in SHAPES:
        filters[shape] = bench_dynamic_filter(shape, runner, policy)
        unfolds[shape] = bench_unfold(shape, runner, policy)
        print(f"  {shape} done", file=sys.stderr)
    print(table("DynamicFilter (method_1)", filters))
    print()
    print(table("Unfold (plain F.unfold)", unfolds))
    comparisons = [*filters.values(), *unfolds.values()]
    ran = sorted({r.provider for c in comparisons for r in c.rows if r.timing is not None and r.provider != Eager.provider})
    print(f"onnxruntime {onnxruntime.__version__}, providers that ran: {', '.join(ran)}; torch {torch.__version__} eager on CPU; "
          f"device: {runner.device}; threads: {threads} (onnxruntime intra-op and torch)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
