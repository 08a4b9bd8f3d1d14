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

`--profiles` instead optimizes models once with two shape profiles and times the written model
against the input at each profile (paired, 95% interval): it must not be slower at either. The
models: the OCR models where downloaded, and the zoo's dynamic-filter families (the models
convlower really lowers on CPU), exported with symbolic batch, height and width
(`--exporter dynamo|legacy`) at bench_zoo's realistic sizes for the first profile and twice the
height and width for the second (`--small`: the zoo's small sizes and no OCR model, to check the script end to end).

    python benchmarks/bench_context.py --profiles [--models seed_filter,involution] [--small] [--exporter legacy]

Models: `residual_chain` (a CRNN-style stage: 1x1 Convs followed by residual Adds, see
convlower.models.builders), `conv_block`, and, where benchmarks/real_models.py has downloaded
them, the PP-OCRv4 recognizer and detector (`ocr_rec`, `ocr_det`).
"""

from __future__ import annotations

import argparse
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort

import convlower
from convlower.models.builders import conv_block, residual_chain
from convlower.runner import PairedPolicy, PairedRatio, Runner, time_paired
from convlower.verify import input_sets, verify

AB = PairedPolicy(min_rounds=20, max_rounds=600, budget_s=15.0, precision=0.01)
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
    predicted_interval: tuple[float, float] | None
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
    paired = ab(runner, model, result.model, feeds)
    chosen = sum(1 for n in report.nodes if n.chosen != "original")
    return Run(chosen, len(report.reverted), report.predicted_speedup if chosen else None,
               tuple(report.predicted_interval) if chosen and report.predicted_interval else None,
               report.speedup if chosen else None,
               interval if chosen else None, 1 / paired.ratio, (1 / paired.high, 1 / paired.low), report.tuning.get("seconds", 0.0),
               report.tuning.get("confirm_seconds"))


MODES = (("isolated", False), ("in context (model)", "model"), ("in context (neighbours)", "neighbours"))

PROFILES = {"ocr_rec": [(1, 3, 48, 320), (1, 3, 48, 960)], "ocr_det": [(1, 3, 320, 320), (1, 3, 640, 640)]}
SYMBOLIC_AXES = {0: "batch", 2: "height", 3: "width"}


def zoo_profiles(
    size: str, exporter: str, wanted: list[str] | None = None
) -> dict[str, tuple[onnx.ModelProto, list[dict[str, tuple[int, ...]]]]]:
    """The zoo's dynamic-filter families (those `wanted`, default all) exported with every input's batch, height and width
    symbolic, each with two profiles: the zoo's inputs at `size`, and the same with twice the
    height and width. Exported at batch 2 and an oblong size, as torch.export needs
    (a dynamic dim's example must not be 1 nor equal another dim)."""
    import torch

    from convlower.models import DYNAMIC_FILTER, ZOO

    torch.set_num_threads(1)  # no idle OpenMP workers spinning while onnxruntime is timed (see bench_zoo)
    found = {}
    for name in (n for n in DYNAMIC_FILTER if wanted is None or n in wanted):
        module, inputs = ZOO[name](size)
        names = [p for p in inspect.signature(module.forward).parameters][: len(inputs)]
        example = tuple(torch.randn(2, t.shape[1], 16, 24) for t in inputs)
        model = convlower.export(module, example, dynamo=exporter == "dynamo", opset=18 if exporter == "dynamo" else 17,
                                 input_names=names, dynamic_axes={n: SYMBOLIC_AXES for n in names})
        first = {n: tuple(t.shape) for n, t in zip(names, inputs)}
        second = {n: (s[0], s[1], 2 * s[2], 2 * s[3]) for n, s in first.items()}
        found[name] = (model, [first, second])
    return found


def profile_rows(candidates: dict[str, tuple[onnx.ModelProto, list[dict]]], runner: Runner) -> list[str]:
    """Each model optimized for its two profiles, then timed against its input at each."""
    lines = ["| model | profile | nodes lowered | original ms | optimized ms | speedup [95%] | guard measured [95%] "
             "| guard reverts | in report | verified |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for name, (model, profiles) in candidates.items():
        print(f"{name} two profiles ...", file=sys.stderr, flush=True)
        shapes = {key: [p[key] for p in profiles] for key in profiles[0]}
        result = convlower.optimize(model, input_shapes=shapes, cache=None, provider="cpu")
        lowered = sum(1 for n in result.report.nodes if n.chosen != "original")
        for index, profile in enumerate(profiles):
            feeds = input_sets(model, input_shapes=profile, runs=1, seed=7)[0]
            paired = ab(runner, model, result.model, feeds)
            listed = result.report.profiles[index] if index < len(result.report.profiles) else {}
            in_report = "yes" if listed.get("shapes") == {k: list(v) for k, v in profile.items()} else "NO"
            guard = fmt(listed.get("speedup"), tuple(listed["interval"]) if "interval" in listed else None)
            verified = "yes" if verify(model, result.model, inputs=feeds, runner=runner) else "NO"
            lines.append(f"| {name} | {' '.join(f'{k} ' + 'x'.join(map(str, s)) for k, s in profile.items())} | {lowered} "
                         f"| {paired.a.median_ms:.3f} | {paired.b.median_ms:.3f} "
                         f"| {fmt(1 / paired.ratio, (1 / paired.high, 1 / paired.low))} | {guard} "
                         f"| {len(result.report.reverted)} | {in_report} | {verified} |")
    lines += ["", "speedup: original / optimized, a paired timing (`time_paired`) of the written model against the input at "
              "that profile after optimize returned, with its 95% interval; guard measured: the guard's own timing at that "
              "profile (- where the model was written unchanged); in report: the report lists this profile's shapes."]
    return lines


def ab(runner: Runner, original: onnx.ModelProto, optimized: onnx.ModelProto, feeds: dict) -> PairedRatio:
    """The optimized model (B) against the original (A), the original's session made last: any
    edge a later-made session has goes to the original, as in the guard."""
    second = runner.session(optimized)
    first = runner.session(original)
    return time_paired(first.runner_for(feeds), second.runner_for(feeds), AB)


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
    parser.add_argument("--modes", default="isolated,model,neighbours", help="comma-separated: isolated, model, neighbours")
    parser.add_argument("--profiles", action="store_true", help="the two-profile runs instead")
    parser.add_argument("--small", action="store_true", help="--profiles: the zoo at its small sizes (a quick end-to-end check)")
    parser.add_argument("--exporter", choices=("dynamo", "legacy"), default="dynamo", help="--profiles: the zoo's exporter")
    args = parser.parse_args()

    runner = Runner("cpu")
    available = models(args.corpus)
    if args.profiles:
        size = "small" if args.small else "realistic"
        wanted = args.models.split(",") if args.models else None
        candidates = {name: (available[name][0], [{"x": shape} for shape in shapes]) for name, shapes in PROFILES.items()
                      if name in available and not args.small and (wanted is None or name in wanted)}
        candidates.update(zoo_profiles(size, args.exporter, wanted))
        table = "\n".join([f"onnxruntime {ort.__version__} on {runner.provider} ({runner.device}); two profiles; "
                           f"zoo at {size} sizes, {args.exporter} exporter, symbolic batch/height/width", ""]
                          + profile_rows(candidates, runner))
        print(table)
        if args.markdown:
            args.markdown.write_text(table + "\n", encoding="utf-8")
        return 0
    names = args.models.split(",") if args.models else list(available)
    lines = [f"onnxruntime {ort.__version__} on {runner.provider} ({runner.device}); {args.repeat} runs per mode", "",
             "| model | self-check (A vs A) | mode | run | nodes chosen | guard reverts | predicted [95%] | guard measured [95%] "
             "| independent A/B [95%] | tuning s | confirm s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        model, shapes = available[name]
        feeds = input_sets(model, input_shapes=shapes, runs=1, seed=7)[0]
        self_check = ab(runner, model, model, feeds)
        noise = fmt(1 / self_check.ratio, (1 / self_check.high, 1 / self_check.low))
        for mode, confirm in (m for m in MODES if (m[1] or "isolated") in args.modes.split(",")):
            for index in range(args.repeat):
                print(f"{name} {mode} run {index + 1} ...", file=sys.stderr, flush=True)
                run = one_run(model, shapes, confirm, runner)
                lines.append(f"| {name} | {noise} | {mode} | {index + 1} | {run.chosen} | {run.reverts} | {fmt(run.predicted, run.predicted_interval)} "
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
