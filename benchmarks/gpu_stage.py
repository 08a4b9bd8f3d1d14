"""Stage the wheels a GPU check needs in parts small enough to carry, and install them on the GPU machine.

    python benchmarks/gpu_stage.py stage [--python-version 3.12] [--platform TAG]... [--onnxruntime-gpu 1.31.1]
                                         [--out .gpu-stage] [--part-mb 60]
    python benchmarks/gpu_stage.py install PARTS_DIR TARGET

The GPU machines this project borrows reach no package index, have onnxruntime without CUDA and no
convlower, and take files only as ignored paths of the working tree, at most 64 MiB a call with the
repository itself. So `stage` fetches the wheels here (onnxruntime-gpu, onnx-graphsurgeon, and
convlower's own wheel built from this working tree), splits each into parts of at most 60 MB, writes
a manifest of every wheel's and every part's size and sha256, and prints which paths to carry in
which call. On the GPU machine `install_staged` (or `install`) checks every part, joins the wheels,
installs them into a folder of their own and puts that folder first on sys.path, so that the staged
onnxruntime-gpu shadows the machine's CPU onnxruntime:

    from gpu_stage import install_staged          # before anything imports onnxruntime
    install_staged(Path(".gpu-stage"), Path(".gpu-site"))

Only those three wheels are staged, each without its dependencies: the GPU machine already has
what they need (numpy, protobuf, onnx and its ml_dtypes, rich, filelock), and onnxruntime-gpu's other
requirements, flatbuffers and packaging, are not imported by `import onnxruntime` or by an inference
session (and come with the machine's CPU onnxruntime anyway); staging them would only shadow the
machine's own copies. Its CUDA 13 and cuDNN 9 libraries come from torch's `nvidia-*` packages there;
note that a staged `onnxruntime.preload_dlls()` without `directory=` looks for `nvidia/` beside its own
package, in TARGET, not in the machine's site-packages: import torch first (it loads those libraries),
or give preload_dlls the folders.

This module imports nothing outside the standard library at import time: the GPU check imports it
before onnxruntime, on a machine that has no convlower.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / ".gpu-stage"
"""Where `stage` writes the parts and the manifest (ignored by git, so it travels only when carried)."""
SUGGESTED_TARGET = REPO_ROOT / ".gpu-site"
"""Where the GPU machine installs them: ignored by git, so a warm machine keeps it between calls."""

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "convlower-gpu-stage/1"
MARKER_NAME = ".gpu-stage-installed.json"
"""Written last into an install; holds the sha256 of the manifest it installed."""

PYTHON_VERSION = "3.12"
"""The GPU machine's Python."""
PLATFORM = "manylinux_2_28_x86_64"
"""onnxruntime-gpu 1.31.1 publishes this one x86_64 Linux tag (and manylinux_2_34 for aarch64). pip
matches `--platform` tags exactly, without the older manylinux tags a glibc 2.28 system also runs."""
ONNXRUNTIME_GPU_VERSION = "1.31.1"
MEGABYTE = 1000 * 1000
PART_MB = 60
"""60 MB parts: one part, the manifest and the repository (about 1 MB) fit one 64 MiB call."""
CARRY_BYTES_PER_CALL = 64 * 1024 * 1024
CARRY_PATHS_PER_CALL = 8

STAGED_MODULES = ("onnxruntime", "onnx_graphsurgeon", "convlower")
"""Modules the staged folder provides; one already imported from elsewhere cannot be replaced."""


class StagingError(Exception):
    """A staging or install step cannot go on; the message is one line saying what to do."""


class StagedPartError(StagingError):
    """The manifest, a part, or a joined wheel is missing or does not match what the manifest says."""


class ImportedElsewhereError(StagingError):
    """A module the staged folder provides was imported from another place before install_staged ran."""


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB pieces (a wheel is 256 MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def shown(path: Path) -> str:
    """A path as a person would type it from here: relative to the current folder when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def run_pip(args: list[str], what: str) -> None:
    """Run this interpreter's pip; on failure raise StagingError with pip's last error line."""
    command = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check"]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode == 0:
        return
    lines = [line.strip(" │╰─>") for line in completed.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.lower().startswith("error")]
    said = (errors or lines or [f"no output from {' '.join(command[:4])}"])[-1]
    raise StagingError(f"{what} failed (pip exit {completed.returncode}): {said}")


def git(repo_root: Path, *args: str) -> str:
    """The output of a git command in the checkout; StagingError if git cannot answer."""
    try:
        completed = subprocess.run(["git", "-C", str(repo_root), *args], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as error:
        said = getattr(error, "stderr", "") or str(error)
        raise StagingError(f"git {' '.join(args)} failed in {repo_root}: {said.strip()}") from error
    return completed.stdout


def working_tree_files(repo_root: Path) -> list[Path]:
    """The files that travel with the working tree: tracked and untracked-but-not-ignored, as they are now.

    A tracked file deleted in the working tree is listed by git but does not travel, so it is left out.
    """
    listed = git(repo_root, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    paths = {repo_root / name for name in listed.split("\0") if name}
    return sorted(path for path in paths if path.is_file())


def describe_source(repo_root: Path) -> dict[str, Any]:
    """The commit convlower's wheel is built on and whether the working tree differs from it."""
    return {
        "commit": git(repo_root, "rev-parse", "HEAD").strip(),
        "modified": bool(git(repo_root, "status", "--porcelain", "--untracked-files=normal").strip()),
    }


def download_wheels(requirements: list[str], python_version: str, platforms: list[str], dest: Path) -> list[Path]:
    """Download the wheels of `requirements` for another interpreter and platform, without dependencies."""
    args = ["download", "--no-deps", "--only-binary=:all:", "--implementation", "cp",
            "--python-version", python_version, "--dest", str(dest)]
    for platform in platforms:
        args += ["--platform", platform]
    run_pip([*args, *requirements], f"downloading {', '.join(requirements)} for Python {python_version} {' '.join(platforms)}")
    return sorted(dest.glob("*.whl"))


def build_requirements_installed(pyproject: Path) -> bool:
    """Whether this interpreter already has the project's build requirements (`[build-system] requires`).

    Then pip can build without an isolated build environment, so without a package index. A fresh
    Python 3.11 venv cannot (its setuptools 65.5 is below the >=68 asked and has no bdist_wheel);
    convlower's own environment can, since torch requires setuptools>=77.
    """
    import tomllib  # noqa: PLC0415  (staging side only; the install side needs the standard library alone)

    from packaging.requirements import Requirement  # noqa: PLC0415

    for text in tomllib.loads(pyproject.read_text())["build-system"]["requires"]:
        requirement = Requirement(text)
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            return False
        if not requirement.specifier.contains(installed, prereleases=True):
            return False
    return True


def build_convlower_wheel(repo_root: Path, dest: Path) -> Path:
    """Build convlower's wheel from a copy of the working tree (uncommitted edits included) into `dest`.

    The copy keeps the build out of a checkout others work in and keeps a stale build/ folder, with
    modules since deleted, out of the wheel. The build needs no index where the build requirements are
    installed here (see build_requirements_installed); elsewhere pip fetches them into an isolated one.
    """
    with tempfile.TemporaryDirectory(prefix="convlower-wheel-") as scratch:
        source, built_dir = Path(scratch) / "source", Path(scratch) / "wheel"
        for path in working_tree_files(repo_root):
            copy = source / path.relative_to(repo_root)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, copy)
        offline = ["--no-build-isolation", "--no-index"] if build_requirements_installed(source / "pyproject.toml") else []
        run_pip(["wheel", "--no-deps", *offline, "--wheel-dir", str(built_dir), str(source)], "building convlower's wheel")
        (built,) = built_dir.glob("*.whl")
        dest.mkdir(parents=True, exist_ok=True)
        return Path(shutil.move(built, dest / built.name))


def write_parts(wheels: list[Path], out: Path, part_bytes: int, python_version: str, platforms: list[str],
                source: dict[str, Any]) -> dict[str, Any]:
    """Split each wheel into parts of at most `part_bytes` in the new folder `out`, and write the manifest.

    Parts are named `<wheel file>.part-003-of-005`, so they sort in order and group by wheel. Every
    wheel has at least one part, so the install side treats all alike.
    """
    out.mkdir(parents=True)
    entries = []
    for wheel in wheels:
        size = wheel.stat().st_size
        count = max(1, math.ceil(size / part_bytes))
        parts = []
        with wheel.open("rb") as stream:
            for index in range(1, count + 1):
                chunk = stream.read(part_bytes)
                name = f"{wheel.name}.part-{index:03d}-of-{count:03d}"
                (out / name).write_bytes(chunk)
                parts.append({"file": name, "size": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
        distribution, version = wheel.name.split("-")[:2]
        entries.append({"file": wheel.name, "distribution": distribution, "version": version, "size": size,
                        "sha256": file_sha256(wheel), "parts": parts})
    manifest = {
        "format": MANIFEST_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python_version": python_version,
        "platforms": platforms,
        "part_bytes": part_bytes,
        "convlower_source": source,
        "wheels": entries,
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def refuse_foreign_folder(folder: Path, marker: str, what: str) -> None:
    """Raise unless `folder` is absent, empty, or holds `marker` (an earlier result of ours, safe to replace)."""
    if folder.exists() and not folder.is_dir():
        raise StagingError(f"{shown(folder)} is a file, not a folder: choose another path")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / marker).is_file():
        raise StagingError(f"{shown(folder)} holds files that are not {what}: choose another folder or empty it")


def replace_folder(fresh: Path, folder: Path) -> None:
    """Put the finished `fresh` folder where `folder` is, so a half-written result is never in its place."""
    if folder.exists():
        old = folder.with_name(f"{folder.name}.old-{os.getpid()}")
        folder.rename(old)
        fresh.rename(folder)
        shutil.rmtree(old)
    else:
        fresh.rename(folder)


def refuse_untravelled_out(out: Path) -> None:
    """An output folder inside the repository must be ignored by git, else it travels whole with every call."""
    resolved = out.resolve()
    if resolved.is_relative_to(REPO_ROOT):
        ignored = subprocess.run(["git", "-C", str(REPO_ROOT), "check-ignore", "-q", str(resolved)]).returncode == 0
        if not ignored:
            raise StagingError(f"{shown(out)} is inside the repository but not ignored by git, so it would travel "
                               f"whole with every call: add it to .gitignore or use {shown(DEFAULT_OUT)}")


def stage(out: Path, python_version: str, platforms: list[str], part_bytes: int, onnxruntime_gpu_version: str) -> dict[str, Any]:
    """Download and build the wheels, split them into `out` (replacing an earlier stage) and return the manifest."""
    refuse_untravelled_out(out)
    refuse_foreign_folder(out, MANIFEST_NAME, "an earlier stage")
    out.parent.mkdir(parents=True, exist_ok=True)
    fresh = out.with_name(f"{out.name}.staging-{os.getpid()}")
    try:
        with tempfile.TemporaryDirectory(prefix="gpu-stage-wheels-") as scratch:
            wheels_dir = Path(scratch)
            started = time.monotonic()
            requirements = [f"onnxruntime-gpu=={onnxruntime_gpu_version}", "onnx-graphsurgeon"]
            downloaded = download_wheels(requirements, python_version, platforms, wheels_dir)
            print(f"downloaded {', '.join(wheel.name for wheel in downloaded)} in {time.monotonic() - started:.1f} s", flush=True)
            started = time.monotonic()
            built = build_convlower_wheel(REPO_ROOT, wheels_dir)
            print(f"built {built.name} from the working tree in {time.monotonic() - started:.1f} s", flush=True)
            started = time.monotonic()
            manifest = write_parts([*downloaded, built], fresh, part_bytes, python_version, platforms, describe_source(REPO_ROOT))
            print(f"split and hashed in {time.monotonic() - started:.1f} s", flush=True)
        replace_folder(fresh, out)
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
    return manifest


def carry_calls(out_as_carried: str, manifest: dict[str, Any], manifest_bytes: int, repo_bytes: int) -> list[list[str]]:
    """Group the parts into `run` calls: each carries the manifest and whole parts, with the repository
    within 64 MiB and within 8 paths. Largest parts first, each into the first call with room."""
    room = CARRY_BYTES_PER_CALL - repo_bytes - manifest_bytes
    parts = sorted((part for wheel in manifest["wheels"] for part in wheel["parts"]), key=lambda part: -part["size"])
    calls: list[list[str]] = []
    loads: list[int] = []
    for part in parts:
        if part["size"] > room:
            raise StagingError(f"a part of {part['size']} bytes, the manifest and the repository ({repo_bytes} bytes) "
                               f"exceed the {CARRY_BYTES_PER_CALL} bytes of one call: stage with a smaller --part-mb")
        fits = [index for index, names in enumerate(calls)
                if loads[index] + part["size"] <= room and len(names) < CARRY_PATHS_PER_CALL - 1]
        if not fits:
            calls.append([])
            loads.append(0)
        index = fits[0] if fits else len(calls) - 1
        calls[index].append(part["file"])
        loads[index] += part["size"]
    return [[f"{out_as_carried}/{MANIFEST_NAME}", *(f"{out_as_carried}/{name}" for name in sorted(names))] for names in calls]


def print_carry_plan(out: Path, manifest: dict[str, Any]) -> None:
    """Say what was staged and which paths to carry in which call."""
    wheels = manifest["wheels"]
    total = sum(wheel["size"] for wheel in wheels)
    count = sum(len(wheel["parts"]) for wheel in wheels)
    digest = file_sha256(out / MANIFEST_NAME)
    print(f"staged {len(wheels)} wheels for Python {manifest['python_version']} {' '.join(manifest['platforms'])} "
          f"in {shown(out)}: {total / MEGABYTE:.1f} MB in {count} parts (manifest sha256 {digest[:16]})")
    for wheel in wheels:
        print(f"  {wheel['file']}  {wheel['size'] / MEGABYTE:.1f} MB  {len(wheel['parts'])} part(s)")
    if not out.resolve().is_relative_to(REPO_ROOT):
        print(f"{shown(out)} is outside the repository: stage into {shown(DEFAULT_OUT)} to carry it to a GPU machine")
        return
    repo_bytes = sum(path.stat().st_size for path in working_tree_files(REPO_ROOT))
    out_as_carried = out.resolve().relative_to(REPO_ROOT).as_posix()
    calls = carry_calls(out_as_carried, manifest, (out / MANIFEST_NAME).stat().st_size, repo_bytes)
    print(f"carry them in {len(calls)} run calls, one list each (the repository travels too: {repo_bytes / MEGABYTE:.1f} MB; "
          "a warm machine keeps what earlier calls carried, a fresh one needs every call again):")
    for number, paths in enumerate(calls, 1):
        print(f"  call {number}: carry {json.dumps(paths)}")
    target = SUGGESTED_TARGET.relative_to(REPO_ROOT)
    print(f"then on the GPU machine, before anything imports onnxruntime: install_staged(Path({out_as_carried!r}), "
          f"Path({str(target)!r})) from benchmarks/gpu_stage.py, or `python benchmarks/gpu_stage.py install "
          f"{out_as_carried} {target}` and PYTHONPATH={target}")


def read_manifest(parts_dir: Path) -> tuple[dict[str, Any], str]:
    """The manifest in `parts_dir` and the sha256 of its bytes (the install marker records it)."""
    path = parts_dir / MANIFEST_NAME
    if not path.is_file():
        raise StagedPartError(f"no {MANIFEST_NAME} in {shown(parts_dir)}: carry {shown(path)} "
                              "(`python benchmarks/gpu_stage.py stage` writes it)")
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw)
    except ValueError as error:
        raise StagedPartError(f"{shown(path)} is not valid JSON ({error}): carry {shown(path)} again") from error
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise StagedPartError(f"{shown(path)} is not a {MANIFEST_FORMAT} manifest: stage again and carry it")
    return manifest, hashlib.sha256(raw).hexdigest()


def part_problem(path: Path, part: dict[str, Any]) -> str | None:
    """What is wrong with one part on disk, or None when its size and sha256 match the manifest."""
    expected = f"expected {part['size']} bytes, sha256 {part['sha256'][:16]}"
    if not path.is_file():
        return f"part {shown(path)} is missing ({expected})"
    size = path.stat().st_size
    if size != part["size"]:
        return f"part {shown(path)} has {size} bytes ({expected})"
    digest = file_sha256(path)
    if digest != part["sha256"]:
        return f"part {shown(path)} is corrupted: sha256 {digest[:16]} ({expected})"
    return None


def verify_parts(parts_dir: Path, manifest: dict[str, Any]) -> None:
    """Check every part against the manifest; one StagedPartError names all that must be carried again."""
    problems = []
    for wheel in manifest["wheels"]:
        for part in wheel["parts"]:
            path = parts_dir / part["file"]
            problem = part_problem(path, part)
            if problem:
                problems.append((path, problem))
    if len(problems) == 1:
        path, problem = problems[0]
        raise StagedPartError(f"{problem}: carry {shown(path)} again")
    if problems:
        paths = " ".join(shown(path) for path, _ in problems)
        raise StagedPartError(f"{len(problems)} parts are missing or corrupted, first: {problems[0][1]}: carry {paths} again")


def join_wheels(parts_dir: Path, manifest: dict[str, Any], dest: Path) -> list[Path]:
    """Join each wheel's verified parts into `dest` under its own name, checking the whole wheel's sha256."""
    wheels = []
    for wheel in manifest["wheels"]:
        path = dest / wheel["file"]
        digest = hashlib.sha256()
        with path.open("wb") as stream:
            for part in wheel["parts"]:
                chunk = (parts_dir / part["file"]).read_bytes()
                digest.update(chunk)
                stream.write(chunk)
        if digest.hexdigest() != wheel["sha256"]:
            raise StagedPartError(f"{wheel['file']} joined from parts that match the manifest has sha256 "
                                  f"{digest.hexdigest()[:16]}, not {wheel['sha256'][:16]}: the manifest is inconsistent, stage again")
        wheels.append(path)
    return wheels


def installed_manifest_digest(target: Path) -> str | None:
    """The manifest sha256 recorded by a finished install in `target`, or None."""
    try:
        return json.loads((target / MARKER_NAME).read_text())["manifest_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def installed_distributions(target: Path) -> list[str]:
    """`name==version` of every distribution installed in `target`."""
    return sorted(f"{dist.metadata['Name']}=={dist.version}" for dist in metadata.distributions(path=[str(target)]))


def ensure_installed(parts_dir: Path, target: Path) -> tuple[list[str], bool]:
    """Install the staged wheels into `target` unless it already holds this manifest's install.

    Returns the installed distributions and whether they were installed now. Every part is checked
    before anything is installed; the install is made in a sibling folder and renamed into place with
    its marker, so `target` holds either the previous install or the complete new one.
    """
    manifest, digest = read_manifest(parts_dir)
    if installed_manifest_digest(target) == digest:
        return installed_distributions(target), False
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest["python_version"] != running:
        raise StagingError(f"{shown(parts_dir)} holds wheels staged for Python {manifest['python_version']}, this is "
                           f"Python {running}: stage again with --python-version {running}")
    refuse_foreign_folder(target, MARKER_NAME, "a staged install")
    verify_parts(parts_dir, manifest)
    target.parent.mkdir(parents=True, exist_ok=True)
    fresh = target.with_name(f"{target.name}.installing-{os.getpid()}")
    try:
        with tempfile.TemporaryDirectory(prefix=f"{target.name}.wheels-", dir=target.parent) as scratch:
            wheels = join_wheels(parts_dir, manifest, Path(scratch))
            run_pip(["install", "--no-index", "--no-deps", "--no-warn-script-location", "--target", str(fresh),
                     *map(str, wheels)], f"installing the staged wheels into {shown(fresh)}")
        marker = {"manifest_sha256": digest, "wheels": [wheel["file"] for wheel in manifest["wheels"]]}
        (fresh / MARKER_NAME).write_text(json.dumps(marker, indent=1) + "\n")
        replace_folder(fresh, target)
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
    return installed_distributions(target), True


def refuse_modules_imported_elsewhere(target: Path) -> None:
    """Raise ImportedElsewhereError if a module the staged folder provides is already loaded from another place."""
    root = target.resolve()
    for name in STAGED_MODULES:
        module = sys.modules.get(name)
        location = getattr(module, "__file__", None)
        if module is not None and (location is None or not Path(location).resolve().is_relative_to(root)):
            raise ImportedElsewhereError(f"{name} is already imported from {location}: call install_staged before "
                                         f"anything imports {name}, so that the staged one in {shown(target)} comes first")


def install_staged(parts_dir: Path, target: Path) -> list[str]:
    """Install the staged wheels of `parts_dir` into `target` and put `target` first on sys.path.

    Call it before anything imports onnxruntime: a later `import onnxruntime` then loads the staged
    onnxruntime-gpu, not the machine's CPU build. A second call with the same manifest installs
    nothing (the marker in `target` says it is done). Returns the installed `name==version`s.
    Raises StagedPartError for a missing or corrupted part (nothing is installed then),
    ImportedElsewhereError if onnxruntime (or convlower, onnx_graphsurgeon) is already imported from
    elsewhere, and StagingError for anything else that stops it; each message is one line.
    """
    refuse_modules_imported_elsewhere(target)
    distributions, _ = ensure_installed(parts_dir, target)
    entry = str(target.resolve())
    sys.path[:] = [entry, *(path for path in sys.path if path != entry)]
    importlib.invalidate_caches()
    return distributions


def main(argv: list[str] | None = None) -> int:
    """The command line: `stage` here, `install` on the GPU machine; a failure is one line on stderr and exit 2."""
    parser = argparse.ArgumentParser(prog="gpu_stage.py", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    stage_parser = commands.add_parser("stage", help="download and build the wheels, split them into parts, write the manifest")
    stage_parser.add_argument("--python-version", default=PYTHON_VERSION, help=f"the GPU machine's Python (default {PYTHON_VERSION})")
    stage_parser.add_argument("--platform", action="append", dest="platforms", metavar="TAG",
                              help=f"a platform tag the wheels may have; repeat for several, as pip (default {PLATFORM})")
    stage_parser.add_argument("--onnxruntime-gpu", default=ONNXRUNTIME_GPU_VERSION, metavar="VERSION",
                              help=f"the onnxruntime-gpu version to stage (default {ONNXRUNTIME_GPU_VERSION})")
    stage_parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the folder for parts and manifest (default {shown(DEFAULT_OUT)})")
    stage_parser.add_argument("--part-mb", type=float, default=PART_MB, help=f"the largest part, in MB of 10^6 bytes (default {PART_MB})")
    install_parser = commands.add_parser("install", help="check and join the parts, install the wheels into TARGET")
    install_parser.add_argument("parts_dir", type=Path, metavar="PARTS_DIR")
    install_parser.add_argument("target", type=Path, metavar="TARGET")
    args = parser.parse_args(argv)
    try:
        if args.command == "stage":
            part_bytes = int(args.part_mb * MEGABYTE)
            if part_bytes < 1:
                raise StagingError(f"--part-mb {args.part_mb} is not a positive size")
            manifest = stage(args.out, args.python_version, args.platforms or [PLATFORM], part_bytes, args.onnxruntime_gpu)
            print_carry_plan(args.out, manifest)
        else:
            started = time.monotonic()
            distributions, installed_now = ensure_installed(args.parts_dir, args.target)
            if installed_now:
                print(f"installed {', '.join(distributions)} into {shown(args.target)} in {time.monotonic() - started:.1f} s")
            else:
                print(f"{shown(args.target)} already holds this stage: {', '.join(distributions)}")
            print(f"put {shown(args.target)} first on sys.path (PYTHONPATH={shown(args.target)}) before importing onnxruntime")
    except StagingError as error:
        print(f"gpu_stage: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
