"""The README's first command: `convlower demo` runs end to end from the installed console script."""

from __future__ import annotations

import shutil
import subprocess

import pytest

pytest.importorskip("torch")


@pytest.mark.slow
def test_demo_exports_optimizes_and_verifies() -> None:
    exe = shutil.which("convlower")
    assert exe, "the convlower console script is not installed"
    proc = subprocess.run([exe, "demo", "--model", "kpn_denoiser", "--provider", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert "DynamicFilter (recognized)" in proc.stdout
    assert lines[-2].startswith("optimized model vs torch eager: max abs error")
    assert "node(s) lowered" in lines[-1] and "; verified; on CPUExecutionProvider" in lines[-1]


def test_demo_refuses_a_model_without_dynamic_filters(capsys: pytest.CaptureFixture[str]) -> None:
    from convlower.cli import main

    assert main(["demo", "--model", "resnet"]) == 2
    assert "not a dynamic-filter zoo model" in capsys.readouterr().err
