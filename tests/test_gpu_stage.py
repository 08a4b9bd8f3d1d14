"""benchmarks/gpu_stage.py, without a network and without mocks: convlower's own wheel, built from this
working tree, split into 64 KB parts, checked, joined and installed into a fresh folder, then imported
from there by a fresh Python; a corrupted or missing part is refused before anything is installed.

The real downloads (onnxruntime-gpu, onnx-graphsurgeon) need the package index and are checked by
hand; the code that splits, checks and installs them is the same as here.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import convlower.passes

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_stage.py"
PART_BYTES = 64 * 1000
RUNNING = f"{sys.version_info.major}.{sys.version_info.minor}"


def load_gpu_stage() -> ModuleType:
    """benchmarks/gpu_stage.py as a module, as the GPU check imports it, without putting benchmarks/ on sys.path."""
    spec = importlib.util.spec_from_file_location("gpu_stage", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_stage = load_gpu_stage()


def python_env() -> dict[str, str]:
    """This environment without PYTHONPATH, so a child Python finds only what the test puts on its sys.path."""
    return {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}


def run_install_cli(parts: Path, target: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), "install", str(parts), str(target)],
                          capture_output=True, text=True, env=python_env(), cwd=parts.parent, timeout=120)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """convlower's wheel, built once for this module from the working tree."""
    return gpu_stage.build_convlower_wheel(REPO, tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def staged(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel split into 64 KB parts, with its manifest, staged for this Python."""
    parts = tmp_path_factory.mktemp("stage") / "parts"
    gpu_stage.write_parts([wheel], parts, PART_BYTES, RUNNING, [], gpu_stage.describe_source(REPO))
    return parts


@pytest.fixture
def parts_copy(staged: Path, tmp_path: Path) -> Path:
    """A copy of the staged parts that a test may damage."""
    return Path(shutil.copytree(staged, tmp_path / "parts"))


def manifest_parts(parts: Path) -> list[dict]:
    return json.loads((parts / gpu_stage.MANIFEST_NAME).read_text())["wheels"][0]["parts"]


def test_parts_join_back_into_the_wheel(wheel: Path, staged: Path) -> None:
    manifest = json.loads((staged / gpu_stage.MANIFEST_NAME).read_text())
    (entry,) = manifest["wheels"]
    names = [part["file"] for part in entry["parts"]]
    assert len(names) >= 3 and names == sorted(names)
    assert all(name.startswith(f"{wheel.name}.part-") for name in names)
    assert names[-1].endswith(f"-of-{len(names):03d}")
    assert all(part["size"] <= PART_BYTES for part in entry["parts"])
    joined = b"".join((staged / name).read_bytes() for name in names)
    assert joined == wheel.read_bytes()
    assert (entry["size"], entry["sha256"]) == (len(joined), hashlib.sha256(joined).hexdigest())
    assert (entry["distribution"], entry["version"]) == ("convlower", convlower.__version__)
    assert sorted(path.name for path in staged.iterdir()) == sorted([*names, gpu_stage.MANIFEST_NAME])


def test_installed_convlower_runs_from_the_target_and_a_second_install_is_skipped(staged: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    distributions, installed_now = gpu_stage.ensure_installed(staged, target)
    assert installed_now and distributions == [f"convlower=={convlower.__version__}"]
    marker = target / gpu_stage.MARKER_NAME
    stamp = marker.stat().st_mtime_ns

    # A fresh Python does what the GPU check does: install_staged (skipped: the marker matches), then import.
    script = (
        "import json, sys; from pathlib import Path\n"
        f"sys.path.insert(0, {str(SCRIPT.parent)!r})\n"
        "from gpu_stage import install_staged\n"
        f"distributions = install_staged(Path({str(staged)!r}), Path({str(target)!r}))\n"
        "import convlower, convlower.passes\n"
        "print(json.dumps({'distributions': distributions, 'file': convlower.__file__, 'first': sys.path[0],"
        " 'families': sorted(convlower.passes.FAMILIES)}))\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=python_env(),
                               cwd=tmp_path, timeout=120)
    assert completed.returncode == 0, completed.stderr
    seen = json.loads(completed.stdout.splitlines()[-1])
    assert seen["distributions"] == distributions
    assert Path(seen["first"]) == target.resolve()
    assert Path(seen["file"]).resolve().is_relative_to(target.resolve())
    assert seen["families"] == sorted(convlower.passes.FAMILIES) and seen["families"]
    assert marker.stat().st_mtime_ns == stamp

    again = run_install_cli(staged, target)
    assert again.returncode == 0 and "already holds this stage" in again.stdout
    assert marker.stat().st_mtime_ns == stamp


def test_a_corrupted_part_is_refused_and_nothing_is_installed(parts_copy: Path, tmp_path: Path) -> None:
    damaged = parts_copy / manifest_parts(parts_copy)[1]["file"]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    target = tmp_path / "site"

    completed = run_install_cli(parts_copy, target)
    assert completed.returncode == 2 and completed.stdout == ""
    (line,) = completed.stderr.splitlines()
    assert f"part parts/{damaged.name} is corrupted" in line and "expected" in line
    assert line.endswith(f"carry parts/{damaged.name} again")
    assert not target.exists()

    with pytest.raises(gpu_stage.StagedPartError, match="is corrupted"):
        gpu_stage.ensure_installed(parts_copy, target)
    assert not target.exists()


def test_a_missing_part_is_refused_and_nothing_is_installed(parts_copy: Path, tmp_path: Path) -> None:
    missing = parts_copy / manifest_parts(parts_copy)[2]["file"]
    missing.unlink()
    target = tmp_path / "site"

    completed = run_install_cli(parts_copy, target)
    assert completed.returncode == 2
    (line,) = completed.stderr.splitlines()
    assert f"part parts/{missing.name} is missing (expected" in line
    assert line.endswith(f"carry parts/{missing.name} again") and "Traceback" not in completed.stderr
    assert not target.exists()

    with pytest.raises(gpu_stage.StagedPartError, match="is missing"):
        gpu_stage.ensure_installed(parts_copy, target)
    assert not target.exists()


def test_install_staged_refuses_once_onnxruntime_is_imported_from_elsewhere(staged: Path, tmp_path: Path) -> None:
    assert "onnxruntime" in sys.modules  # convlower, imported above from the checkout, imports it
    path_before = list(sys.path)
    with pytest.raises(gpu_stage.ImportedElsewhereError, match="onnxruntime is already imported from"):
        gpu_stage.install_staged(staged, tmp_path / "site")
    assert sys.path == path_before and not (tmp_path / "site").exists()


def test_wheels_staged_for_another_python_are_refused(wheel: Path, tmp_path: Path) -> None:
    parts = tmp_path / "parts"
    gpu_stage.write_parts([wheel], parts, PART_BYTES, "3.99", [], gpu_stage.describe_source(REPO))
    with pytest.raises(gpu_stage.StagingError, match=f"staged for Python 3.99, this is Python {RUNNING}: "
                                                     f"stage again with --python-version {RUNNING}"):
        gpu_stage.ensure_installed(parts, tmp_path / "site")


def test_a_folder_that_is_not_a_staged_install_is_left_alone(staged: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    target.mkdir()
    (target / "keep.txt").write_text("someone's file")
    with pytest.raises(gpu_stage.StagingError, match="holds files that are not a staged install"):
        gpu_stage.ensure_installed(staged, target)
    assert [path.name for path in target.iterdir()] == ["keep.txt"]


def test_carry_calls_fit_one_call_each_with_the_repository() -> None:
    sizes = [60_000_000] * 4 + [15_600_000, 204_000, 59_000]
    manifest = {"wheels": [{"parts": [{"file": f"w.part-{index:03d}", "size": size} for index, size in enumerate(sizes, 1)]}]}
    repo_bytes, manifest_bytes = 1_200_000, 3_000
    calls = gpu_stage.carry_calls(".gpu-stage", manifest, manifest_bytes, repo_bytes)
    assert len(calls) == 5
    size_of = {f".gpu-stage/w.part-{index:03d}": size for index, size in enumerate(sizes, 1)}
    for paths in calls:
        assert paths[0] == ".gpu-stage/manifest.json" and len(paths) <= gpu_stage.CARRY_PATHS_PER_CALL
        assert repo_bytes + manifest_bytes + sum(size_of[path] for path in paths[1:]) <= gpu_stage.CARRY_BYTES_PER_CALL
    assert sorted(path for paths in calls for path in paths[1:]) == sorted(size_of)

    with pytest.raises(gpu_stage.StagingError, match="stage with a smaller --part-mb"):
        gpu_stage.carry_calls(".gpu-stage", manifest, manifest_bytes, repo_bytes=8_000_000)


def test_an_output_folder_inside_the_repository_must_be_ignored_by_git() -> None:
    gpu_stage.refuse_untravelled_out(gpu_stage.DEFAULT_OUT)
    with pytest.raises(gpu_stage.StagingError, match="not ignored by git, so it would travel whole with every call"):
        gpu_stage.refuse_untravelled_out(REPO / "benchmarks" / "staged-here")
