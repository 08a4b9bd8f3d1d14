"""Do per-node choices hold in the whole model? Isolated micro-models against in-context confirmation.

    python benchmarks/bench_context.py [--repeat 3] [--models residual_chain,conv_block,ocr_rec]
                                       [--corpus ~/.cache/convlower-corpus] [--markdown PATH]

For each model, `convlower.optimize` runs `--repeat` times fresh (no cache) in three modes:
- isolated: choices from per-node micro-models alone (`confirm=False`); the guard is the only check;
- in context (model): each group's choice is confirmed in the whole model first (the default);
- in context (neighbours): each group's choice is confirmed in a micro-model of its fusable
  neighbourhood instead (`confirm="neighbours"`, `convlower.context`).
Per run: the nodes chosen, the guard's reverts, the speedup the choices predict (isolated: from the
node timings; model: the product of the confirmed groups' ratios; neighbours: the ms the groups
saved in their neighbourhoods taken off the guard's original median), the guard's measured
speedup with its 95% interval, an independent paired A/B of the written model against the
input, and the seconds spent tuning and confirming. A harness check first times each input model
against itself: it must read 1.00x within the interval printed beside it.

`--profiles` instead optimizes each OCR model once with two shape profiles and times the written
model against the input at each profile (paired, 95% interval): it must not be slower at either.

Models: `residual_chain` (a CRNN-style stage: 1x1 Convs followed by residual Adds, see
convlower.models.builders), `conv_block`, and, where benchmarks/real_models.py has downloaded
them, the PP-OCRv4 recognizer and detector (`ocr_rec`, `ocr_det`).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort

import convlower
from convlower.models.builders import conv_block, residual_chain
from convlower.runner import PairedPolicy, Runner, time_paired
from convlower.verify import input_sets

AB = PairedPolicy(min_rounds=20, max_rounds=400, budget_s=8.0)
CORPUS = Path.home() / ".cache" / "convlower-corpus"


def models(corpus: Path) -> dict[str, tuple[onnx.ModelProto, dict]]:
    found = {
        "residual_chain": (residual_chain(), {"x": (1, 64, 8, 80)}),
        "conv_block": (conv_block(channels=32, size=64), {"x": (1, 3, 64, 64)}),
    }
    for name, file, shape in (("ocr_rec", "ch_PP-OCRv4_rec_infer.onnx", (1, 3, 48, 320)),
                              ("ocr_det", "ch_PP-OCRv4_det_infer.onnx", (1, 3, 320, 320))):
        path = next(corpus.rglob(file), None)
        if path is not None:
            found[name] = (onnx.load(path), {"x": shape})
    return found


@dataclass
class Run:
    chosen: int
    reverts: int
    predicted: float | None
    measured: float | None
    interval: tuple[float, float] | None
    ab: float
    ab_interval: tuple[float, float]
    tuning_s: float
    confirm_s: float | None


def one_run(model: onnx.ModelProto, shapes: dict, confirm: bool | str, runner: Runner) -> Run:
    result = convlower.optimize(model, input_shapes=shapes, cache=None, provider="cpu", confirm=confirm)
    report = result.report
    check = report._primary_check()
    interval = (1 / check["interval"][1], 1 / check["interval"][0]) if check else None
    feeds = input_sets(model, input_shapes=shapes, runs=1, seed=7)[0]
    paired = time_paired(runner.session(model).runner_for(feeds), runner.session(result.model).runner_for(feeds), AB)
    chosen = sum(1 for n in report.nodes if n.chosen != "original")
    return Run(chosen, len(report.reverted), report.predicted_speedup if chosen else None, report.speedup if chosen else None,
               interval if chosen else None, 1 / paired.ratio, (1 / paired.high, 1 / paired.low), report.tuning.get("seconds", 0.0),
               report.tuning.get("confirm_seconds"))


MODES = (("isolated", False), ("in context (model)", "model"), ("in context (neighbours)", "neighbours"))

PROFILES = {"ocr_rec": [(1, 3, 48, 320), (1, 3, 48, 960)], "ocr_det": [(1, 3, 320, 320), (1, 3, 640, 640)]}


def profile_rows(available: dict, runner: Runner) -> list[str]:
    """Each OCR model optimized for two profiles, then timed against its input at each."""
    lines = ["| model | profile | nodes chosen | guard reverts | guard measured [95%] | independent A/B [95%] |",
             "|---|---|---:|---:|---:|---:|"]
    for name, shapes in PROFILES.items():
        if name not in available:
            continue
        model = available[name][0]
        print(f"{name} two profiles ...", file=sys.stderr, flush=True)
        result = convlower.optimize(model, input_shapes={"x": shapes}, cache=None, provider="cpu")
        chosen = sum(1 for n in result.report.nodes if n.chosen != "original")
        for index, shape in enumerate(shapes):
            feeds = input_sets(model, input_shapes={"x": shape}, runs=1, seed=7)[0]
            paired = time_paired(runner.session(model).runner_for(feeds), runner.session(result.model).runner_for(feeds), AB)
            profile = result.report.profiles[index]
            guard = fmt(profile.get("speedup"), tuple(profile["interval"]) if "interval" in profile else None)
            lines.append(f"| {name} | x {'x'.join(map(str, shape))} | {chosen} | {len(result.report.reverted)} | {guard} "
                         f"| {fmt(1 / paired.ratio, (1 / paired.high, 1 / paired.low))} |")
    return lines


def fmt(value: float | None, interval: tuple[float, float] | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}x" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--models", default=None, help="comma-separated (default: all found)")
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--profiles", action="store_true", help="the two-profile runs instead")
    args = parser.parse_args()

    runner = Runner("cpu")
    available = models(args.corpus)
    if args.profiles:
        table = "\n".join([f"onnxruntime {ort.__version__} on {runner.provider} ({runner.device}); two profiles", ""]
                          + profile_rows(available, runner))
        print(table)
        if args.markdown:
            args.markdown.write_text(table + "\n", encoding="utf-8")
        return 0
    names = args.models.split(",") if args.models else list(available)
    lines = [f"onnxruntime {ort.__version__} on {runner.provider} ({runner.device}); {args.repeat} runs per mode", "",
             "| model | self-check (A vs A) | mode | run | nodes chosen | guard reverts | predicted | guard measured [95%] "
             "| independent A/B [95%] | tuning s | confirm s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        model, shapes = available[name]
        feeds = input_sets(model, input_shapes=shapes, runs=1, seed=7)[0]
        session = runner.session(model)
        self_check = time_paired(session.runner_for(feeds), runner.session(model).runner_for(feeds), AB)
        noise = fmt(1 / self_check.ratio, (1 / self_check.high, 1 / self_check.low))
        for mode, confirm in MODES:
            for index in range(args.repeat):
                print(f"{name} {mode} run {index + 1} ...", file=sys.stderr, flush=True)
                run = one_run(model, shapes, confirm, runner)
                lines.append(f"| {name} | {noise} | {mode} | {index + 1} | {run.chosen} | {run.reverts} | {fmt(run.predicted)} "
                             f"| {fmt(run.measured, run.interval)} | {fmt(run.ab, run.ab_interval)} | {run.tuning_s:.1f} "
                             f"| {'-' if run.confirm_s is None else f'{run.confirm_s:.1f}'} |")
    lines += ["", "predicted: isolated = original time over (time - node gains measured alone); in context (model) = product "
              "of the confirmed groups' whole-model ratios; in context (neighbours) = the guard's original time over (time - ms "
              "the confirmed groups saved in their neighbourhoods). confirm s: time spent confirming. "
              "measured: the guard's paired median ratio of the written model. "
              "independent A/B: a separate paired timing of the written model against the input, after optimize returned."]
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
