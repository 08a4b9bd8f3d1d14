"""The model zoo end to end: export, optimize, and time original vs optimized vs oracle vs torch eager.

    python benchmarks/bench_zoo.py [--size realistic|small] [--models kpn_denoiser,resnet]
                                   [--exporter dynamo|legacy] [--threads 2] [--no-oracle]

For each zoo family: export with `convlower.export`, optimize (no cache, so the tuning time is
real), then time the original model, the optimized one, the oracle, and torch eager, all
interleaved in one loop on the same inputs. The oracle applies, node group by node group, the
variant that makes the *whole model* fastest (exhaustive over each group's variants, coordinate
descent over groups) — what per-node micro-model tuning is trying to predict.

Writes `benchmarks/results/zoo.md` (the table) and `zoo.png` (a bar chart), and prints the
table with the machine, the onnxruntime version and the provider that actually ran.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

import convlower
from convlower.models import DYNAMIC_FILTER, FAMILIES, ZOO
from convlower.optimize import OptimizeResult
from convlower.rewrite import apply_choices, import_graph, plan_nodes
from convlower.modelio import default_opset
from convlower.runner import Runner, TimingPolicy, time_calls
from convlower.tune import ORIGINAL
from convlower.verify import verify

RESULTS = Path(__file__).resolve().parent / "results"
COMPARE = TimingPolicy(warmup=3, min_runs=20, max_runs=300, budget_s=8.0)
ORACLE_ROUND = TimingPolicy(warmup=2, min_runs=10, max_runs=100, budget_s=2.0)


@dataclass
class Row:
    name: str
    nodes: int
    lowered: int
    chosen: str
    original_ms: float
    optimized_ms: float
    oracle_ms: float | None
    eager_ms: float
    tuning_s: float
    verified: bool

    @property
    def speedup(self) -> float:
        return self.original_ms / self.optimized_ms


def oracle(model: onnx.ModelProto, result: OptimizeResult, runner: Runner, feeds: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Coordinate descent over node groups (same spec and shapes), timing whole models."""
    planned = plan_nodes(import_graph(model), default_opset(model))
    shapes_of = {n.name: n.shape for n in result.report.nodes}
    groups: dict[tuple[str, str], list] = {}
    for entry in planned:
        if entry.spec is not None and entry.name in shapes_of:
            groups.setdefault((entry.spec.key(), shapes_of[entry.name]), []).append(entry)
    best: dict[str, str] = {}
    for members in groups.values():
        options = [ORIGINAL] + [v for v in members[0].applicable if v != "native"]
        trials = []
        for option in options:
            trial = {k: v for k, v in best.items() if k not in {m.name for m in members}}
            if option != ORIGINAL:
                trial.update({m.name: option for m in members})
            trials.append(trial)
        sessions = [runner.session(apply_choices(model, t) if t else model) for t in trials]
        timings = time_calls([s.runner_for(feeds) for s in sessions], ORACLE_ROUND)
        best = trials[int(np.argmin([t.median_ms for t in timings]))]
    return apply_choices(model, best) if best else model


def run_family(name: str, size: str, exporter: str, runner: Runner, with_oracle: bool) -> Row:
    module, inputs = ZOO[name](size)
    model = convlower.export(module, inputs, dynamo=exporter == "dynamo")
    names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    feeds = {n: t.numpy() for n, t in zip(names, inputs)}
    started = time.perf_counter()
    result = convlower.optimize(model, inputs=feeds, provider=runner.requested, threads=runner.threads, cache=None)
    tuning_s = time.perf_counter() - started
    check = verify(model, result.model, inputs=feeds, runner=runner)
    candidates = [model, result.model] + ([oracle(model, result, runner, feeds)] if with_oracle else [])
    calls = [runner.session(m).runner_for(feeds) for m in candidates]
    with torch.inference_mode():
        calls.append(lambda: module(*inputs))
        timings = time_calls(calls, COMPARE)
    lowered = [n for n in result.report.nodes if n.chosen != ORIGINAL]
    chosen = ", ".join(sorted({f"{n.op}={n.chosen}" for n in lowered})) or "-"
    return Row(
        name, len(result.report.nodes), len(lowered), chosen, timings[0].median_ms, timings[1].median_ms,
        timings[2].median_ms if with_oracle else None, timings[-1].median_ms, tuning_s, bool(check),
    )


def markdown(rows: list[Row], header: str) -> str:
    lines = [
        header, "",
        "| model | dynamic filters | nodes lowered | variants chosen | original ms | optimized ms | oracle ms | torch eager ms "
        "| speedup | vs eager | tuning s | verified |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        oracle_ms = f"{r.oracle_ms:.2f}" if r.oracle_ms is not None else "-"
        lines.append(
            f"| {r.name} | {'yes' if r.name in DYNAMIC_FILTER else 'no'} | {r.lowered}/{r.nodes} | {r.chosen} "
            f"| {r.original_ms:.2f} | {r.optimized_ms:.2f} | {oracle_ms} | {r.eager_ms:.2f} "
            f"| {r.speedup:.2f}x{'' if r.lowered else ' (unchanged)'} "
            f"| {r.eager_ms / r.optimized_ms:.2f}x | {r.tuning_s:.1f} | {'yes' if r.verified else 'NO'} |"
        )
    lines += ["", "Medians of interleaved runs on the same inputs. speedup = original / optimized; "
              "vs eager = torch eager / optimized (> 1: the optimized ONNX model is faster). "
              "Where nothing was lowered the two models are the same, and their ratio is the noise of the measurement."]
    return "\n".join(lines)


def bar_chart(rows: list[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [("original", [r.original_ms for r in rows]), ("convlower", [r.optimized_ms for r in rows]),
              ("torch eager", [r.eager_ms for r in rows])]
    if all(r.oracle_ms is not None for r in rows):
        series.insert(2, ("oracle", [r.oracle_ms for r in rows]))
    x = np.arange(len(rows))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(rows)), 4.5))
    for i, (label, values) in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=label)
    ax.set_xticks(x, [r.name for r in rows], rotation=20)
    ax.set_yscale("log")
    ax.set_ylabel("median latency, ms (log)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("realistic", "small"), default="realistic")
    parser.add_argument("--models", default=",".join(FAMILIES), help="comma-separated zoo families")
    parser.add_argument("--exporter", choices=("dynamo", "legacy"), default="dynamo")
    parser.add_argument("--provider", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime and torch threads (default 2)")
    parser.add_argument("--no-oracle", action="store_true", help="skip the (slow) oracle search")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    runner = Runner(args.provider, args.threads)
    header = (
        f"convlower zoo benchmark — {args.size} sizes, {args.exporter} exporter; onnxruntime {ort.__version__} "
        f"on {runner.provider} ({runner.device}); torch {torch.__version__}; {args.threads} threads; "
        f"{platform.system()} {platform.machine()}"
    )
    rows = []
    for name in args.models.split(","):
        print(f"{name} ...", file=sys.stderr, flush=True)
        rows.append(run_family(name.strip(), args.size, args.exporter, runner, not args.no_oracle))
    table = markdown(rows, header)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "zoo.md").write_text(table + "\n", encoding="utf-8")
    bar_chart(rows, args.out / "zoo.png", header)
    print(table)
    print(f"\nwrote {args.out / 'zoo.md'} and {args.out / 'zoo.png'}")
    return 0 if all(r.verified for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
