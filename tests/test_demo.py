"""The README's first command: `convlower demo` runs end to end, checked through its JSON report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")


@pytest.mark.slow
def test_demo_exports_optimizes_and_verifies(tmp_path: Path) -> None:
    """The demo lowers its recognized dynamic filters, the guard keeps them (passed, and the
    written model is not the input), and the optimized model agrees with torch eager."""
    proc = subprocess.run(
        [sys.executable, "-m", "convlower", "demo", "--model", "kpn_denoiser", "--provider", "cpu", "--report", "demo.json"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "demo.json").read_text())
    assert report["provider"] == "CPUExecutionProvider"
    assert report["demo"]["model"] == "kpn_denoiser" and report["demo"]["max_abs_err_vs_torch"] < 1e-3
    filters = [n for n in report["nodes"] if n["op"] == "DynamicFilter" and n["recognized"]]
    assert filters, "no DynamicFilter was recognized in the exported model"
    assert all(n["chosen"] != "original" and n["variants"][n["chosen"]]["status"] == "ok" for n in filters)
    verification = report["verification"]
    assert verification["passed"] is True and verification["unchanged"] is False
    assert verification["max_abs_err"] < 1e-3


def test_demo_refuses_a_model_without_dynamic_filters(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "convlower", "demo", "--model", "resnet"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "not a dynamic-filter, cost-volume or deformable zoo model" in proc.stderr and not list(tmp_path.iterdir())
