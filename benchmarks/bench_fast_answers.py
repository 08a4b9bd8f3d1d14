"""How long `convlower optimize` takes to answer, first and again, on public files it leaves unchanged.

    python benchmarks/bench_fast_answers.py [--cache-dir DIR] [--only NAME[,NAME]] [--budget 20] [--markdown PATH]

The files are those of `real_models.MODELS` named in `FILES` (fetched once into the corpus cache,
never at test time). For each, in subprocesses exactly as a user runs them, with a fresh tuning
cache file in a temporary folder:

1. `optimize` with that cache (the first run: everything measured),
2. `optimize` again with the same cache (a re-run: nothing should be timed),
3. for the files listed in `BUDGETED`, `optimize --budget S` with no cache.

Each row gives the wall time of the whole command (interpreter start, imports and writing
included), what the summary said (nodes lowered, unchanged or not), the report's seconds per stage,
and `convlower verify` of the written model against the input. The provider is the one the report
names. The machine is shared: the seconds are indicative, read the ratios first-run / re-run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from real_models import DEFAULT_CACHE, MODELS, ensure_model, markdown

FILES = {"ppocr_v4_det": "1x3x480x640", "ppocr_v4_rec": "1x3x48x320", "ddddocr_det": None}
"""The issue's three files, with the profiling shape of their input (None: static)."""
BUDGETED = ("ppocr_v4_det",)


def optimize(path: Path, shape: str | None, out: Path, extra: list[str]) -> tuple[float, dict, str]:
    """Wall seconds, the JSON report and the summary line of one `convlower optimize` run."""
    args = [sys.executable, "-m", "convlower", "optimize", str(path), "-o", str(out), "--force", *extra]
    if shape:
        args += ["--input-shape", f"{_input_name(path)}:{shape}"]
    started = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"optimize failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    summary = next((line for line in proc.stdout.splitlines() if "node(s)" in line or "nothing to lower" in line), "")
    return seconds, json.loads(out.with_suffix(".json").read_text()), summary


def verify(path: Path, out: Path, shape: str | None) -> str:
    args = [sys.executable, "-m", "convlower", "verify", str(path), str(out), "--json"]
    if shape:
        args += ["--input-shape", f"{_input_name(path)}:{shape}"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    if proc.returncode not in (0, 1):
        return f"verify failed: {proc.stderr.strip()[-120:]}"
    found = json.loads(proc.stdout)
    return f"{'equal' if found['passed'] else 'DIFFER'} (max abs err {found['max_abs_err']:.1e})"


def _input_name(path: Path) -> str:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in initializers)


def _stages(report: dict) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in report.get("timing", {}).items() if k != "total" and v >= 0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--only", default="", help="comma-separated names from FILES")
    parser.add_argument("--budget", type=float, default=20.0)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    names = [n for n in (args.only.split(",") if args.only else FILES) if n]
    rows, provider = [], "?"
    for name in names:
        model = next(m for m in MODELS if m.name == name)
        path, shape = ensure_model(model, args.cache_dir), FILES[name]
        with tempfile.TemporaryDirectory() as work:
            folder = Path(work)
            cache = ["--cache", str(folder / "tuning.json")]
            runs = [("first", cache), ("re-run, same cache", cache)]
            if name in BUDGETED:
                runs.append((f"--budget {args.budget:g}", ["--no-cache", "--budget", str(args.budget)]))
            for label, extra in runs:
                out = folder / f"{label.split()[0].strip('-')}.onnx"
                seconds, report, summary = optimize(path, shape, out, extra)
                provider = report["provider"]
                measured = report.get("measurements", {})
                rows.append([name, label, f"{seconds:.1f}", f"{report['timing'].get('total', 0):.1f}", _stages(report),
                             f"{report['tuning'].get('timed', 0)} / {measured.get('timed', 0)}",
                             "unchanged" if report["verification"].get("unchanged") else "optimized",
                             verify(path, out, shape), summary.split(";")[0]])
                print(" | ".join(rows[-1]), flush=True)
    header = ["model", "run", "wall s", "optimize s", "stages (s)", "timed: nodes / whole-model",
              "written", "verify", "summary"]
    table = markdown(rows, header)
    print(f"\nprovider: {provider} (2 threads unless the report says otherwise)\n\n{table}")
    if args.markdown:
        args.markdown.write_text(f"provider: {provider}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
