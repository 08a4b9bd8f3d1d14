"""CUDA that cannot load, said plainly; convlower's messages whatever Python's warnings filter says.

The CUDA tests use the onnxruntime installed here, unmocked: where CUDA really loads they skip,
and elsewhere (this project's CI has no GPU) they check that the notice and the `--provider cuda`
error carry onnxruntime's own reason and the install line that mends it. The reason is checked
against an independent oracle: a `dlopen` of onnxruntime's CUDA provider library, whose error
names the library that is missing. The CUDA path itself is not run here.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

from convlower.errors import UsageError
from convlower.models.builders import conv_block
from convlower.runner import CPU, CUDA, INSTALL_CUDA, Runner, cuda_failure

CUDA_BUILD = CUDA in ort.get_available_providers()
needs_cuda_build_that_fails = pytest.mark.skipif(
    not CUDA_BUILD or cuda_failure() is None, reason="needs onnxruntime-gpu on a machine where CUDA does not load"
)


def provider_library_error() -> str | None:
    """The dynamic loader's error for onnxruntime's CUDA provider library, None if it loads."""
    capi = Path(ort.__file__).parent / "capi"
    library = capi / ("onnxruntime_providers_cuda.dll" if sys.platform == "win32" else "libonnxruntime_providers_cuda.so")
    try:
        ctypes.CDLL(str(library))
    except OSError as exc:
        return str(exc)
    return None


def convlower_cli(*args: object, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "convlower", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300, env={**os.environ, **env})


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A conv block whose batch dim is symbolic (N), so running it binds N to its default."""
    path = tmp_path_factory.mktemp("cuda") / "m.onnx"
    onnx.save(conv_block(channels=4, size=8), path)
    return path


@needs_cuda_build_that_fails
def test_the_notice_names_onnxruntimes_reason_and_the_install_line() -> None:
    runner = Runner("auto", quiet=True)
    assert runner.provider == CPU
    assert runner.notice and "running on CPUExecutionProvider" in runner.notice and "Running on a GPU" in runner.notice
    assert len(runner.notice) < 160, "the first thing a new user reads is one short line"
    notice = runner.reason
    assert notice and notice.startswith("CUDAExecutionProvider could not load: ") and INSTALL_CUDA in notice
    assert "without logging why" not in notice, "onnxruntime's log line was not read"
    loader_error = provider_library_error()
    if loader_error:  # the provider library itself cannot load: the notice names what it misses
        missing = loader_error.split(":")[0].strip()
        assert missing in notice, (missing, notice)
    with pytest.raises(UsageError) as refused:
        Runner("cuda")
    assert refused.value.what == f"--provider cuda: {cuda_failure().what}" and INSTALL_CUDA in refused.value.fix


@needs_cuda_build_that_fails
def test_provider_cuda_exits_2_with_one_line_and_auto_keeps_stdout_clean(model: Path, tmp_path: Path) -> None:
    refused = convlower_cli("bench", model, "--provider", "cuda", "--input-shape", "x:1x3x8x8", cwd=tmp_path)
    assert refused.returncode == 2 and refused.stdout == ""
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith("convlower: error: --provider cuda: CUDAExecutionProvider could not load: ")
    assert INSTALL_CUDA in line

    auto = convlower_cli("bench", model, "--provider", "auto", "--input-shape", "x:1x3x8x8", "--runs", "5", "--json",
                         cwd=tmp_path)
    assert auto.returncode == 0, auto.stderr
    assert json.loads(auto.stdout)["provider"] == CPU, "preload_dlls' prints must not reach stdout"
    (notice,) = auto.stderr.strip().splitlines()
    assert notice.startswith("convlower: CUDA") and "running on CPUExecutionProvider" in notice and len(notice) < 170
    assert "onnxruntime:" not in auto.stderr, "onnxruntime's raw log lines must not reach the terminal"
    verbose = convlower_cli("--verbose", "bench", model, "--provider", "auto", "--input-shape", "x:1x3x8x8", "--runs", "5",
                            cwd=tmp_path)
    short, reason = verbose.stderr.strip().splitlines()
    assert short == notice and reason.startswith("convlower: CUDAExecutionProvider could not load: ") and INSTALL_CUDA in reason


@pytest.mark.skipif(CUDA_BUILD, reason="this onnxruntime has CUDAExecutionProvider")
def test_a_cpu_only_onnxruntime_is_told_to_install_onnxruntime_gpu() -> None:
    runner = Runner("auto", quiet=True)
    assert runner.provider == CPU and "without CUDAExecutionProvider" in runner.notice
    with pytest.raises(UsageError, match="install onnxruntime-gpu"):
        Runner("cuda")


def test_pythonwarnings_ignore_does_not_silence_the_default_shape_warning(model: Path, tmp_path: Path) -> None:
    proc = convlower_cli("verify", model, model, cwd=tmp_path, PYTHONWARNINGS="ignore")
    assert proc.returncode == 0, proc.stderr
    assert "convlower: warning: input 'x' axis 0 (N) is symbolic; profiling with 1" in proc.stderr


def test_pythonwarnings_error_stops_with_exit_2_not_an_internal_error(model: Path, tmp_path: Path) -> None:
    proc = convlower_cli("verify", model, model, cwd=tmp_path, PYTHONWARNINGS="error")
    assert proc.returncode == 2, proc.stderr
    warning, error = proc.stderr.strip().splitlines()
    assert warning.startswith("convlower: warning: input 'x' axis 0 (N) is symbolic")
    assert error.startswith("convlower: error: Python's warnings filter made the warning above an error")


@pytest.mark.skipif(not CUDA_BUILD, reason="a CPU-only onnxruntime needs no probe")
def test_the_probe_runs_once_per_environment_and_its_answer_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first call probes and stores the answer under the environment's key; the next process
    (here: the function's memo cleared) reads it back instead of probing."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    stored_path = tmp_path / "convlower" / "cuda_probe.json"
    cuda_failure.cache_clear()
    try:
        probed = cuda_failure()
        (environment, answer), = json.loads(stored_path.read_text()).items()
        assert answer == ({} if probed is None else {"what": probed.what, "fix": probed.fix, "summary": probed.summary})
        stored_path.write_text(json.dumps({environment: {"what": "stored answer", "fix": "f", "summary": "s"}}))
        cuda_failure.cache_clear()
        assert cuda_failure().what == "stored answer", "read back, not probed again"
        monkeypatch.setenv("LD_LIBRARY_PATH", "/another/path")
        cuda_failure.cache_clear()
        assert cuda_failure() == probed, "another environment is probed anew"
    finally:
        cuda_failure.cache_clear()
