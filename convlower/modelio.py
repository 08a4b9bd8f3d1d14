"""Loading and saving models: the checks at the door and the atomic write at the exit.

Every model convlower writes or times must load in the installed onnxruntime, so saving clamps
the IR version to what that onnxruntime reads (onnx 1.23 writes IR 14 by default, onnxruntime 1.31
reads at most 13).

Weights in external data are not read in: the loaded proto refers to them (`convlower.weights`),
and a model written from it gets its own data file beside it.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from . import weights
from .errors import UsageError

MIN_OPSET = 11
ModelLike = str | os.PathLike | onnx.ModelProto

_TWO_GIB = 2**31 - 2**20


def load_model(model: ModelLike, *, detach_over: int = weights.DETACH_BYTES) -> onnx.ModelProto:
    """A ModelProto from a path or a ModelProto; external data is checked and referred to, not read.

    A model file whose proto is over `detach_over` bytes has its inline weights moved to scratch
    files (`weights.detach_inline`), so it is worked on as one with external data is.

    Raises `UsageError` with a one-line reason and fix for anything that is not a loadable model.
    """
    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        _check_opset(proto, "the model")
        if any(weights.FOLDER_KEY not in {e.key for e in t.external_data} for t in weights.external_tensors(proto)):
            raise UsageError("the model refers to external data, but a ModelProto does not say where its files are",
                             "pass the model's path instead")
        return proto
    path = Path(model)
    if not path.exists():
        raise UsageError(f"{path}: no such file", "check the path")
    if path.is_dir():
        raise UsageError(f"{path}: is a directory, not an ONNX file", "name the .onnx file inside it")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: cannot be read ({exc.strerror})", "check its permissions") from exc
    proto = _parse(data, path)
    size = len(data)  # not proto.ByteSize(): protobuf serializes the message to count it
    del data
    _check_external_data(proto, path)
    if size > detach_over:
        proto = weights.detach_inline(proto)
    _check_opset(proto, str(path))
    return proto


def _parse(data: bytes, path: Path) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    not_onnx = UsageError(
        f"{path}: not an ONNX model (the file is truncated or is another format)",
        "export or download the model again",
    )
    if not data:
        raise UsageError(f"{path}: the file is empty", "export or download the model again")
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise not_onnx from exc
    if proto.ir_version <= 0 or not proto.HasField("graph") or not proto.opset_import:
        raise not_onnx
    return proto


def _check_external_data(proto: onnx.ModelProto, path: Path) -> None:
    """Check the external tensors' data files, refusing any location that leaves the model's folder,
    and record the folder in them (`weights.attach_folder`); the data stays on disk."""
    base = path.resolve().parent
    tensors = [t for t in external_data_helper._get_all_tensors(proto) if external_data_helper.uses_external_data(t)]
    for tensor in tensors:
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (base / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(base):
            raise UsageError(
                f"{path}: tensor {tensor.name!r} points outside the model's folder ({location!r})",
                "keep external data files beside the model",
            )
        if not target.is_file():
            raise UsageError(
                f"{path}: external data file {location!r} of tensor {tensor.name!r} is missing",
                "copy it beside the model",
            )
        end = int(next((e.value for e in tensor.external_data if e.key == "offset"), 0)) + weights._length(tensor)
        if target.stat().st_size < end:
            raise UsageError(
                f"{path}: external data file {location!r} ends before tensor {tensor.name!r} does",
                "export the model again",
            )
    weights.attach_folder(proto, base)


def default_opset(model: onnx.ModelProto) -> int:
    """The model's opset for the default ONNX domain."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 0


def _check_opset(proto: onnx.ModelProto, where: str) -> None:
    opset = default_opset(proto)
    if opset < MIN_OPSET:
        raise UsageError(
            f"{where}: uses ONNX opset {opset}; convlower needs opset {MIN_OPSET} or newer",
            "convert it with onnx.version_converter.convert_version(model, 17)",
        )


@functools.cache
def max_runtime_ir_version() -> int:
    """The highest IR version the installed onnxruntime loads, found by asking it once."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    for ir in range(onnx.IR_VERSION, 6, -1):
        probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=ir)
        try:
            ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 - onnxruntime raises its own error classes
            continue
        return ir
    return 7


def runtime_compatible(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its IR version lowered, where needed, to what onnxruntime reads (in place)."""
    model.ir_version = min(model.ir_version, max_runtime_ir_version())
    return model


def save_model(
    model: onnx.ModelProto, path: ModelLike, *, protect: ModelLike | None = None, force: bool = False, limit: int = _TWO_GIB
) -> Path:
    """Write `model` to `path` atomically; one with external data gets one data file beside it.

    A model whose input had external data (its tensors refer to it, or `protect`, the input's
    path, has some), or whose proto with every weight inline would pass `limit` bytes
    (`weights.needs_external_data`), is written as `path` plus `<name>.data`, which holds all its
    large tensors and which onnxruntime loads from that folder; other models are written inline
    (`weights.write_inline`). The files are staged in a temporary folder beside the target and
    moved into place, so a failed write leaves no half-written pair. `protect` names the input
    model: writing over it, or over a data file the model reads, is refused unless `force` is set.
    """
    target = check_output_path(path, protect=protect, force=force)
    runtime_compatible(model)
    external = weights.needs_external_data(model, limit) or _has_external_data(protect)
    data_target = target.parent / (target.name + ".data")
    if external and not force and data_target.exists() and data_target.resolve() in weights.source_data_files(model):
        raise UsageError(f"{data_target}: the output would overwrite the input's external data", "name another output with -o, or pass --force")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convlower-") as tmp:
        staged = Path(tmp) / target.name
        if external:
            weights.write_with_external_data(model, staged, data_target.name)
            os.replace(Path(tmp) / data_target.name, data_target)
        else:
            weights.write_inline(model, staged)
        os.replace(staged, target)
    return target


def _has_external_data(model: ModelLike | None) -> bool:
    """Whether the model file at `model` keeps tensors in external data (read without the data)."""
    if model is None or isinstance(model, onnx.ModelProto) or not Path(model).is_file():
        return False
    try:
        return bool(weights.external_tensors(onnx.load(str(model), load_external_data=False)))
    except (DecodeError, OSError, ValueError):
        return False


def check_output_path(path: ModelLike, *, protect: ModelLike | None = None, force: bool = False) -> Path:
    """The output path, refused where it would overwrite `protect` (unless forced) or has no folder.

    Called before any work is done, so a bad output path costs nothing.
    """
    target = Path(path)
    if protect is not None and not isinstance(protect, onnx.ModelProto) and not force:
        source = Path(protect)
        if target.exists() and source.exists() and target.resolve() == source.resolve():
            raise UsageError(f"{target}: the output would overwrite the input model", "name another output with -o, or pass --force")
    if not target.parent.is_dir():
        raise UsageError(f"{target.parent}: output folder does not exist", "create it or choose another output path")
    return target


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a text file so readers see the old content or the new, never half of it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=target.parent, delete=False, suffix=".tmp", encoding="utf-8") as tmp:
        tmp.write(text)
    os.replace(tmp.name, target)
    return target


def default_output_path(model_path: ModelLike) -> Path:
    """`<stem>.convlower.onnx` beside the input."""
    path = Path(model_path)
    return path.with_name(path.stem + ".convlower.onnx")
