"""Weights in external data stay out of memory: protos carry references, arrays are memory-mapped.

A model whose weights are external data is loaded without them (`modelio.load_model`): each
external tensor keeps its `location`/`offset`/`length` and gains one more entry, `FOLDER_KEY`,
the absolute folder its location is relative to. So every ModelProto convlower copies, infers,
checks, splices and serializes holds only the graph (kilobytes, however large the weights), and a
proto knows where its weights are wherever it travels: through graphsurgeon (which exports a lazily
loaded tensor's original TensorProto), into micro-models and probes. Then:

- `import_onnx`: a graphsurgeon graph whose external constants read their values through a
  read-only `np.memmap` of their bytes in the data file (`ExternalValues`), unmapped when freed.
- `runtime_model`: the bytes onnxruntime gets (convlower's entries dropped, since onnxruntime
  refuses unknown keys) and the folder it resolves the data files in
  (`session.model_external_initializers_file_folder_path`): onnxruntime reads the data itself.
  Tensors from another folder are handed over as memory-mapped arrays.
- `spill_new_weights`: the large constants a variant makes (rearranged weights) go to scratch
  files for the run, so a rewritten model's proto stays small too.
- `checkable`: a stand-in for onnx.checker, which looks for data files relative to the working
  directory: external initializers become graph inputs of the same type and shape.
- `write_with_external_data`: the model and one data file beside it; external tensors are copied
  from their data files in chunks, large inline tensors (new weights a variant made) appended.

A model file of over `DETACH_BYTES` with inline weights has them moved to scratch files at load
(`detach_inline`, marked `INLINE_KEY`), so it takes the same path, and is written inline again
unless it must not be (`needs_external_data`, `write_inline`). Smaller models keep their weights inline: the same
code paths see no external tensor, and they are spared writing their weights to disk.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import external_data_helper, helper
from onnx_graphsurgeon.ir.tensor import LazyValues

FOLDER_KEY = "convlower.folder"
"""External-data entry naming the absolute folder a tensor's `location` is relative to."""
INLINE_KEY = "convlower.inline"
"""External-data entry of a tensor that was inline in the input model (moved out by `detach_inline`)."""
DETACH_BYTES = 2**28
"""Input models whose proto is larger than this have their inline weights moved out at load."""
ALIGN = 4096
"""Offsets of tensors in written data files are multiples of this (a page), so they can be mapped."""
INLINE_LIMIT = 1024
"""Inline tensors of at least this many bytes move to the data file when a model is written with one."""
CHUNK = 64 * 2**20
SPILL_BYTES = 2**20
"""New constants of at least this many bytes leave the proto of a model whose weights are external."""


def all_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Every TensorProto of the model: initializers and tensor attributes, in all subgraphs."""
    return list(external_data_helper._get_all_tensors(model))


def external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in all_tensors(model) if external_data_helper.uses_external_data(t)]


def _entries(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def data_path(tensor: onnx.TensorProto) -> Path:
    """The data file an external tensor of a loaded model reads from."""
    entries = _entries(tensor)
    return Path(entries[FOLDER_KEY]) / entries["location"]


def attach_folder(model: onnx.ModelProto, folder: Path) -> None:
    """Record in each external tensor the folder its location is relative to (in place)."""
    for tensor in external_tensors(model):
        if FOLDER_KEY not in _entries(tensor):
            entry = tensor.external_data.add()
            entry.key, entry.value = FOLDER_KEY, str(folder)


def _without_ours(tensor: onnx.TensorProto) -> None:
    """Drop convlower's entries (onnxruntime refuses unknown external-data keys)."""
    kept = [(e.key, e.value) for e in tensor.external_data if e.key not in (FOLDER_KEY, INLINE_KEY)]
    del tensor.external_data[:]
    for key, value in kept:
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def external_array(tensor: onnx.TensorProto) -> np.ndarray:
    """An external tensor's value as a read-only memory-mapped view of its data file (no copy).

    Each call maps just the tensor's bytes, unmapped when the array is freed: pages read through a
    mapping count in the process's resident memory for as long as it lives, so a mapping kept for
    the whole file would hold every weight ever read (measured: 2.5 GB after rewriting a 2.5 GB
    model's 17 Conv, which read each weight once).
    """
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    shape = tuple(tensor.dims)
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0:
        return np.empty(shape, dtype)
    offset = int(_entries(tensor).get("offset", 0))
    return np.memmap(data_path(tensor), dtype=dtype, mode="r", offset=offset, shape=(count,)).reshape(shape)


class ExternalValues(LazyValues):
    """graphsurgeon's lazy values of an external tensor, loaded as a memory-mapped view.

    graphsurgeon's own `LazyValues.load` would read the data relative to the working directory
    and write it into the TensorProto; this reads nothing until the pages are touched.
    """

    def load(self) -> np.ndarray:
        return external_array(self.tensor)


def import_onnx(model: onnx.ModelProto) -> gs.Graph:
    """`gs.import_onnx`, with external constants (in all subgraphs) reading through `ExternalValues`."""
    graph = gs.import_onnx(model)
    for owner in [graph, *graph.subgraphs(recursive=True)]:
        for tensor in owner.tensors().values():
            values = getattr(tensor, "_values", None)
            if isinstance(tensor, gs.Constant) and type(values) is LazyValues and external_data_helper.uses_external_data(values.tensor):
                tensor._values = ExternalValues(values.tensor)
    return graph


def spill_new_weights(original: onnx.ModelProto, graph: gs.Graph) -> None:
    """Move the large constants a variant made (rearranged weights) out of the graph rewritten from
    `original` into scratch data files, when `original`'s weights are external data, so the
    rewritten ModelProto stays small as well.

    A model with inline weights keeps its new constants inline, as its weights are. The scratch
    folder lasts as long as the process (`_scratch`).
    """
    external = external_tensors(original)
    if not external:
        return
    inline = all(INLINE_KEY in _entries(t) for t in external)
    constants = [t for owner in [graph, *graph.subgraphs(recursive=True)] for t in owner.tensors().values()
                 if isinstance(t, gs.Constant)]
    for constant in constants:
        values = constant._values
        if isinstance(values, np.ndarray) and values.nbytes >= SPILL_BYTES:
            constant._values = ExternalValues(_spilled(constant.name, values, inline=inline))


def detach_inline(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its inline tensors of `SPILL_BYTES` or more moved to scratch files, marked
    `INLINE_KEY` so it is written inline again (`write_inline`) unless it must not be.

    For input models over `DETACH_BYTES`: a large inline model then takes the same path as one with
    external data, and every copy of its proto is small. Smaller models keep their weights inline,
    sparing a write of them to disk. The result is a fresh message: protobuf keeps a cleared
    field's memory until the message it was parsed into is freed (measured: 1.1 GB kept).
    """
    for tensor in all_tensors(model):
        if tensor.HasField("raw_data") and len(tensor.raw_data) >= SPILL_BYTES:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
            spilled = _spilled(tensor.name, np.frombuffer(tensor.raw_data, dtype=dtype), inline=True)
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            tensor.external_data.extend(spilled.external_data)
    fresh = onnx.ModelProto()
    fresh.CopyFrom(model)
    return fresh


def write_inline(model: onnx.ModelProto, path: Path) -> None:
    """Write the model to `path` with every external tensor's data read back inline.

    `SerializeToString` of a model with its weights inline holds them three times at once (the
    message, protobuf's encoding buffer, the bytes; measured 3.1x on 0.6 GB). A message may be
    written in parts instead, since parsers merge concatenated encodings of one message and append
    to its repeated fields: the model without its external initializers first, then one
    `graph { initializer { ... raw_data } }` part per initializer, its data copied from its file
    in chunks. External tensors elsewhere (subgraphs, attributes) are read back into a copy.
    """
    if not external_tensors(model):
        path.write_bytes(model.SerializeToString())
        return
    streamed = [t for t in model.graph.initializer if external_data_helper.uses_external_data(t)]
    names = {t.name for t in streamed}
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    kept = [t for t in copy.graph.initializer if t.name not in names]
    del copy.graph.initializer[:]
    copy.graph.initializer.extend(kept)
    for tensor in external_tensors(copy):
        raw = np.ascontiguousarray(external_array(tensor)).tobytes()
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
        tensor.raw_data = raw
    with open(path, "wb") as out:
        out.write(copy.SerializeToString())
        for tensor in streamed:
            head = onnx.TensorProto()
            head.CopyFrom(tensor)
            del head.external_data[:]
            head.ClearField("data_location")
            length = _length(tensor)
            head_bytes = head.SerializeToString() + _key(_RAW_DATA) + _varint(length)
            entry = _key(_INITIALIZER) + _varint(len(head_bytes) + length)
            out.write(_key(_GRAPH) + _varint(len(entry) + len(head_bytes) + length) + entry + head_bytes)
            _copy_range(data_path(tensor), int(_entries(tensor).get("offset", 0)), length, out)


_GRAPH, _INITIALIZER, _RAW_DATA = 7, 5, 9
"""Field numbers: ModelProto.graph, GraphProto.initializer, TensorProto.raw_data."""


def _key(field: int) -> bytes:
    """The key of a length-delimited protobuf field."""
    return _varint(field << 3 | 2)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _spilled(name: str, array: np.ndarray, *, inline: bool) -> onnx.TensorProto:
    """`array` written to a new scratch file, as an external TensorProto that refers to it
    (marked `INLINE_KEY` when `inline`)."""
    _spilled.count = getattr(_spilled, "count", 0) + 1  # type: ignore[attr-defined]
    location = f"weight{_spilled.count}.bin"  # type: ignore[attr-defined]
    folder = _scratch()
    np.ascontiguousarray(array).tofile(folder / location)
    tensor = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entries = [("location", location), ("offset", "0"), ("length", str(array.nbytes)), (FOLDER_KEY, str(folder))]
    for key, value in entries + ([(INLINE_KEY, "1")] if inline else []):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


@functools.cache
def _scratch() -> Path:
    """This process's folder for spilled weights, removed when it exits."""
    folder = Path(tempfile.mkdtemp(prefix="convlower-weights-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def runtime_model(model: onnx.ModelProto) -> tuple[bytes, str | None, dict[str, np.ndarray]]:
    """What an onnxruntime session is made from: the model's bytes, the folder onnxruntime reads
    external data from (None when there is none), and arrays to hand it as external initializers.

    onnxruntime resolves external data in one folder, so tensors from another folder (spilled
    weights) are handed over as memory-mapped arrays (`SessionOptions.add_external_initializers`).
    """
    tensors = external_tensors(model)
    if not tensors:
        return model.SerializeToString(), None, {}
    folders = [_entries(t).get(FOLDER_KEY) for t in tensors]
    if None in folders:
        raise ValueError("an external tensor does not say its folder: load the model with convlower.modelio.load_model")
    main = max(set(folders), key=folders.count)
    handed = {t.name: external_array(t) for t, folder in zip(tensors, folders) if folder != main}
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in external_tensors(copy):
        _without_ours(tensor)
    return copy.SerializeToString(), main, handed


def checkable(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model for onnx.checker: main-graph external initializers become inputs of their type
    and shape (the checker would look for their data files relative to the working directory)."""
    external = [t for t in model.graph.initializer if external_data_helper.uses_external_data(t)]
    if not external:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    names = {t.name for t in external}
    kept = [t for t in copy.graph.initializer if t.name not in names]
    del copy.graph.initializer[:]
    copy.graph.initializer.extend(kept)
    declared = {v.name for v in copy.graph.input}
    copy.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in external if t.name not in declared)
    return copy


def needs_external_data(model: onnx.ModelProto, limit: int) -> bool:
    """Whether the model is written with external data: its input's weights were external (a
    tensor not marked `INLINE_KEY`), or the proto with every weight inline would pass `limit`
    bytes (protobuf cannot serialize a message over 2 GiB)."""
    external = external_tensors(model)
    if any(INLINE_KEY not in _entries(t) for t in external):
        return True
    return model.ByteSize() + sum(_length(t) for t in external) > limit


def source_data_files(model: onnx.ModelProto) -> set[Path]:
    """The data files the model's external tensors read from (resolved)."""
    return {data_path(t).resolve() for t in external_tensors(model)}


def write_with_external_data(model: onnx.ModelProto, path: Path, data_name: str) -> None:
    """Write the model to `path` and all its large tensors to `path.parent / data_name`.

    The caller's model is not changed. External tensors are copied from their data files in
    chunks; inline tensors of `INLINE_LIMIT` bytes or more are moved out. Offsets are aligned to
    `ALIGN` so onnxruntime can memory-map them.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    with open(path.parent / data_name, "wb") as data:
        for tensor in all_tensors(copy):
            external = external_data_helper.uses_external_data(tensor)
            if not external and not (tensor.HasField("raw_data") and len(tensor.raw_data) >= INLINE_LIMIT):
                continue
            offset = _align(data)
            if external:
                length = _copy_range(data_path(tensor), int(_entries(tensor).get("offset", 0)), _length(tensor), data)
            else:
                data.write(tensor.raw_data)
                length = len(tensor.raw_data)
                tensor.ClearField("raw_data")
            del tensor.external_data[:]
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = onnx.TensorProto.EXTERNAL
    path.write_bytes(copy.SerializeToString())


def _length(tensor: onnx.TensorProto) -> int:
    """Bytes of an external tensor: its `length` entry, or what its type and dims take."""
    entries = _entries(tensor)
    if "length" in entries:
        return int(entries["length"])
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def _align(data) -> int:
    offset = data.tell()
    offset += -offset % ALIGN
    data.seek(offset)
    return offset


def _copy_range(source: Path, offset: int, length: int, data) -> int:
    with open(source, "rb") as src:
        src.seek(offset)
        left = length
        while left:
            chunk = src.read(min(CHUNK, left))
            if not chunk:
                raise OSError(f"{source}: ends before byte {offset + length}")
            data.write(chunk)
            left -= len(chunk)
    return length

