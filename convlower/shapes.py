"""Shapes: shape inference, and binding symbolic input dims to the profiling shapes.

Tuning and verification need concrete shapes. The user gives them with
`--input-shape NAME:1x3x224x224`; a symbolic dim left unbound takes a documented default:

- `DEFAULT_BATCH` (1) for the first axis of an input (the batch axis, by convention);
- `DEFAULT_DIM` (64) for any other axis;

and convlower warns on stderr (`convlower.console.warn`), naming the input, the axis and the dim.
Dims with the same symbolic name take the same value across inputs. A dim is symbolic when it
has a name (`dim_param`), when it has neither a name nor a value, and when its value is negative:
Paddle2ONNX declares a dynamic batch as `dim_value: -1` and other dims as `dim_param: "?"`. Such
unnamed dims ("", "?", negative) are each a dim of their own, never tied to another.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from . import console
from .errors import UsageError

DEFAULT_BATCH = 1
DEFAULT_DIM = 64

Dims = tuple[int | str | None, ...]


class DefaultShapeWarning(console.ConvlowerWarning):
    """A symbolic dim was bound to a default because no profiling shape named it."""


@dataclass(frozen=True)
class InputInfo:
    """A graph input as the model declares it: dims are ints, names of symbolic dims, or None."""

    name: str
    elem_type: int
    dims: Dims | None

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.elem_type))


def graph_inputs(model: onnx.ModelProto) -> list[InputInfo]:
    """The model's real inputs (initializers that double as inputs are left out)."""
    initializers = {t.name for t in model.graph.initializer}
    infos = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dims: Dims | None = None
        if tensor_type.HasField("shape"):
            dims = tuple(_dim(d) for d in tensor_type.shape.dim)
        infos.append(InputInfo(value.name, tensor_type.elem_type, dims))
    return infos


UNNAMED_DIM_PARAMS = frozenset({"", "?"})
"""dim_params that name nothing: exporters write them for "unknown", not for a shared symbol."""


def _dim(d: onnx.TensorShapeProto.Dimension) -> int | str | None:
    """A declared dim: its value, its symbol's name, or None for an unnamed symbolic dim."""
    if d.HasField("dim_value"):
        return d.dim_value if d.dim_value >= 0 else None
    if d.HasField("dim_param") and d.dim_param not in UNNAMED_DIM_PARAMS:
        return d.dim_param
    return None


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """`x:1x3x224x224` -> ("x", (1, 3, 224, 224)); the name may itself contain colons."""
    name, sep, dims = text.rpartition(":")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x")) if dims else ()
    except ValueError:
        shape = ()
    if not sep or not name or not shape or any(d <= 0 for d in shape):
        raise UsageError(f"--input-shape {text!r} is not NAME:DIMS", "write it like x:1x3x224x224")
    return name, shape


ShapeProfiles = dict[str, "tuple[int, ...] | list[tuple[int, ...]]"]


def shape_profiles(input_shapes: ShapeProfiles | None) -> list[dict[str, tuple[int, ...]]]:
    """Profiles from shapes by input name, where an input may have several shapes, as with
    TensorRT's optimization profiles: `{"x": [(1, 3, 320, 320), (1, 3, 960, 960)]}` is two
    profiles. Profile i takes each input's i-th shape; an input with one shape has it in every
    profile. No shapes at all is one empty profile (every symbolic dim then takes its default)."""
    lists = {name: [tuple(s)] if _is_one_shape(s) else [tuple(x) for x in s] for name, s in (input_shapes or {}).items()}
    counts = {len(shapes) for shapes in lists.values()} - {1}
    if len(counts) > 1 or any(not shapes for shapes in lists.values()):
        raise UsageError(
            "--input-shape: inputs named several times are named different numbers of times "
            + ", ".join(f"({name} {len(shapes)}x)" for name, shapes in lists.items()),
            "name each input once (the same shape in every profile) or once per profile",
        )
    total = max(counts, default=1)
    return [{name: shapes[i] if len(shapes) > 1 else shapes[0] for name, shapes in lists.items()} for i in range(total)]


def _is_one_shape(value: object) -> bool:
    return isinstance(value, (tuple, list)) and all(isinstance(d, (int, np.integer)) for d in value)


def resolve_shapes(
    inputs: list[InputInfo], given: dict[str, tuple[int, ...]] | None = None, *, warn: bool = True
) -> dict[str, tuple[int, ...]]:
    """A concrete shape for every input: given shapes first, then symbol bindings, then defaults."""
    given = dict(given or {})
    known = {i.name for i in inputs}
    for name in given:
        if name not in known:
            raise UsageError(
                f"--input-shape names {name!r}, which is not a model input",
                f"the inputs are: {', '.join(sorted(known)) or '(none)'}",
            )
    symbols: dict[str, int] = {}
    for info in inputs:
        shape = given.get(info.name)
        if shape is None or info.dims is None:
            continue
        if len(shape) != len(info.dims):
            raise UsageError(
                f"--input-shape {info.name}: gives {len(shape)} dims, the input has {len(info.dims)}",
                f"give {len(info.dims)} dims",
            )
        for axis, (want, have) in enumerate(zip(shape, info.dims)):
            if isinstance(have, int) and have != want:
                raise UsageError(
                    f"--input-shape {info.name}: axis {axis} is fixed at {have} in the model, not {want}",
                    f"use {have} there",
                )
            if isinstance(have, str):
                symbols.setdefault(have, want)

    resolved: dict[str, tuple[int, ...]] = {}
    for info in inputs:
        if info.name in given:
            resolved[info.name] = tuple(given[info.name])
            continue
        if info.dims is None:
            raise UsageError(
                f"input {info.name!r} has no declared shape",
                f"give one with --input-shape {info.name}:DIMS",
            )
        dims = []
        for axis, d in enumerate(info.dims):
            if isinstance(d, int):
                dims.append(d)
            elif isinstance(d, str) and d in symbols:
                dims.append(symbols[d])
            else:
                value = DEFAULT_BATCH if axis == 0 else DEFAULT_DIM
                if isinstance(d, str):
                    symbols[d] = value
                if warn:
                    console.warn(
                        f"input {info.name!r} axis {axis} ({d or 'unnamed'}) is symbolic; profiling with {value}. "
                        f"Set it with --input-shape {info.name}:DIMS",
                        DefaultShapeWarning,
                    )
                dims.append(value)
        resolved[info.name] = tuple(dims)
    return resolved


def with_static_inputs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """A copy of the model whose inputs carry the given static shapes, shapes inferred through it."""
    static = onnx.ModelProto()
    static.CopyFrom(model)
    for value in static.graph.input:
        if value.name not in shapes:
            continue
        shape = value.type.tensor_type.shape
        del shape.dim[:]
        for d in shapes[value.name]:
            shape.dim.add().dim_value = d
    del static.graph.value_info[:]
    return infer_shapes(static)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference with data propagation; a model it cannot process comes back as it was."""
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError):
        return model
