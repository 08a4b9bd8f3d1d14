"""Does the speedup of one model over another hold still? The same two sessions, timed in windows.

    python benchmarks/bench_drift.py [--model involution] [--variant shift_sum] [--windows 12] [--window-s 12]

Exports a zoo model, lowers its DynamicFilter nodes to one variant, and times the lowered model
against the original in consecutive windows, each a paired timing (`time_paired`) with its 95%
interval, both sessions made once. Within a window the interval is the noise of rounds; between
windows the ratio itself may move, when the two models load the machine differently (a lowering
that streams big tensors through memory against a compute-bound original) and the load from
other tenants of the machine changes. That movement bounds how closely a prediction made at one
time (optimize's in-context ratios) can match a measurement made at another.
"""

from __future__ import annotations

import argparse
import time

import onnxruntime as ort
import torch

import convlower
from convlower.modelio import default_opset
from convlower.models import DYNAMIC_FILTER, ZOO
from convlower.rewrite import apply_choices, import_graph, plan_nodes
from convlower.runner import PairedPolicy, Runner, time_paired


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(DYNAMIC_FILTER), default="involution")
    parser.add_argument("--variant", default="shift_sum")
    parser.add_argument("--windows", type=int, default=12)
    parser.add_argument("--window-s", type=float, default=12.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    module, inputs = ZOO[args.model]("realistic")
    model = convlower.export(module, inputs, dynamo=True)
    names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    feeds = {n: t.numpy() for n, t in zip(names, inputs)}
    planned = plan_nodes(import_graph(model), default_opset(model))
    lowered = apply_choices(model, {e.name: args.variant for e in planned if e.op == "DynamicFilter"})
    runner = Runner("cpu", args.threads)
    policy = PairedPolicy(min_rounds=20, max_rounds=2000, budget_s=args.window_s, precision=0.005)
    optimized = runner.session(lowered)
    original = runner.session(model)
    print(f"{args.model}, DynamicFilter={args.variant}; onnxruntime {ort.__version__} on {runner.provider} ({runner.device}), "
          f"{args.threads} threads; windows of {args.window_s:g} s\n")
    print("| t s | speedup [95%] | original ms | optimized ms | rounds |\n|---:|---:|---:|---:|---:|")
    start = time.perf_counter()
    speedups = []
    for _ in range(args.windows):
        paired = time_paired(original.runner_for(feeds), optimized.runner_for(feeds), policy)
        speedups.append(1 / paired.ratio)
        print(f"| {time.perf_counter() - start:.0f} | {1 / paired.ratio:.3f}x [{1 / paired.high:.3f}, {1 / paired.low:.3f}] "
              f"| {paired.a.median_ms:.1f} | {paired.b.median_ms:.1f} | {paired.rounds} |", flush=True)
    print(f"\nspeedup across windows: {min(speedups):.3f}x to {max(speedups):.3f}x ({max(speedups) / min(speedups) - 1:.0%} apart)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
