"""benchmarks/gpu_check.py on the CPU, in a subprocess as it is run: it writes check.json and
summary.md, its correctness section finds every variant right, and a section that runs out of its
budget says where and lets the next one run. Real onnxruntime, no mocks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def run_check(out: Path, *options: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any], str]:
    """The check's CPU path with --quick and `options`; its exit, check.json and summary.md."""
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--provider", "cpu", "--quick", *options],
                          capture_output=True, text=True, timeout=180)
    assert (out / "check.json").exists() and (out / "summary.md").exists(), done.stderr
    return done, json.loads((out / "check.json").read_text()), (out / "summary.md").read_text()


def test_cpu_check_writes_json_and_markdown_and_finds_every_variant_correct(tmp_path: Path) -> None:
    done, check, summary = run_check(tmp_path, "--sections", "environment,correctness", "--families", "col2im,DynamicFilter",
                                     "--cases", "3")
    assert done.returncode == 0, done.stderr
    assert check["session_providers"][0] == "CPUExecutionProvider"
    environment = check["sections"]["environment"]
    assert environment["status"] == "done"
    assert environment["data"]["NVIDIA_TF32_OVERRIDE"]["value"] == "0"
    assert environment["data"]["session_providers"] == check["session_providers"]

    correctness = check["sections"]["correctness"]
    assert correctness["status"] == "done", correctness["message"]
    data = correctness["data"]
    assert data["failures"] == [] and data["not_covered"] == [] and data["refused_by_reference"] == []
    assert set(data["families"]) == {"col2im", "dynamicfilter"}
    expected_rows = {f"{family}/{variant}" for family, info in data["families"].items() for variant in info["variants"]}
    assert set(data["table"]) == expected_rows
    for name, row in data["table"].items():
        assert row["float32"]["run"] == 3 == row["float32"]["passed"], name  # every variant fits every generated node
    half = data["table"]["dynamicfilter/shift_sum"]["float16"]
    assert half["run"] == half["passed"] == 3
    conformance = data["table"]["col2im/shift_add"]["conformance"]
    assert conformance["run"] == conformance["passed"] >= 5

    assert summary.startswith("# convlower GPU check\n\n**Verdict.** Sessions really ran on **CPUExecutionProvider**")
    assert "Correctness: every variant of 2 families is correct" in summary
    assert "| dynamicfilter | shift_sum | - | 3/3 | 3/3 |" in summary


def test_a_section_out_of_its_budget_says_where_and_the_next_section_runs(tmp_path: Path) -> None:
    done, check, summary = run_check(tmp_path, "--sections", "correctness,zoo", "--budget", "correctness=1")
    assert done.returncode == 0, done.stderr
    correctness, zoo = check["sections"]["correctness"], check["sections"]["zoo"]
    assert correctness["status"] == "out of time"
    assert correctness["message"] == f"ran out of time in correctness at {correctness['step']}" and correctness["step"]
    assert 1 <= correctness["elapsed_s"] < 5
    assert zoo["status"] == "done", zoo["message"]
    assert [m["model"] for m in zoo["data"]["models"]] == ["involution", "kpn_denoiser", "resnet"]
    assert all(m["verification"].get("passed", True) for m in zoo["data"]["models"])
    assert f"*out of time: ran out of time in correctness at {correctness['step']};" in summary
    assert "Cut short: correctness (ran out of time in correctness at" in summary
