"""What every pass module shares: the Spec and Variant shapes, the op-family record, and `Builder`.

A family module (conv.py, dynamic_filter/, ...) defines one `OpFamily`: how to read a node into a
frozen spec, and the variants that can replace it. Each variant is a pure function of the spec:
`why_not(spec)` says why it does not apply (or None), `build(b, spec, inputs, outputs)` emits the
replacement nodes through a `Builder`, writing the node's original output tensors.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

Dim = int | None
"""A tensor dimension in a spec: an int when static, None when it is symbolic or unknown."""


class Spec(Protocol):
    """A frozen, hashable description of one node, every default resolved."""

    op: str

    def key(self) -> str: ...


def spec_key(spec: Any) -> str:
    """A stable text key for a frozen dataclass spec: the tuning-cache key."""
    return json.dumps(dataclasses.asdict(spec), sort_keys=True, separators=(",", ":"))


def spec_dict(spec: Any) -> dict[str, Any]:
    """The spec as plain JSON-ready data, for reports and `inspect`."""
    return dataclasses.asdict(spec)


class GroupedKernelSizes:
    """Sizes derived from a grouped-convolution spec's `in_channels`, `out_channels`, `group` and
    `kernel_shape` fields: a mixin for the frozen spec dataclasses of Conv-like ops."""

    in_channels: int
    out_channels: int
    group: int
    kernel_shape: tuple[int, ...]

    @property
    def taps(self) -> int:
        """Kernel positions: prod(kernel_shape)."""
        return math.prod(self.kernel_shape)

    @property
    def in_per_group(self) -> int:
        return self.in_channels // self.group

    @property
    def out_per_group(self) -> int:
        return self.out_channels // self.group


class Variant(Protocol):
    """One way to compute an op. `native` keeps the op itself.

    `caveat` names inputs the variant does not compute exactly as the op (empty when it does): the
    tuner leaves such a variant out unless the user names it (`--variants OP=NAME`)."""

    name: str
    caveat: str

    def why_not(self, spec: Any) -> str | None: ...

    def build(self, b: "Builder", spec: Any, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]) -> None: ...


def applies_to_any_shape(spec: Any) -> None:
    """The `why_not` of a variant that reads the spec's unknown dims off `Shape` at run time, and so
    applies to every node of its family."""
    return None


@dataclass(frozen=True)
class SimpleVariant:
    """A variant made of two plain functions, so pass modules can stay flat."""

    name: str
    why_not_fn: Callable[[Any], str | None]
    build_fn: Callable[["Builder", Any, Sequence[gs.Tensor], Sequence[gs.Variable]], None]
    summary: str = ""
    caveat: str = ""

    def why_not(self, spec: Any) -> str | None:
        return self.why_not_fn(spec)

    def build(self, b: "Builder", spec: Any, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]) -> None:
        self.build_fn(b, spec, inputs, outputs)


@dataclass(frozen=True)
class OpFamily:
    """One op type and the registered implementations the tuner chooses between.

    `make_spec(node, opset)` returns the spec, or raises `NotLowerable` with the reason the node
    cannot be described (unknown rank, missing shapes, ...).
    """

    op_type: str
    domain: str
    make_spec: Callable[[gs.Node, int], Any]
    variants: tuple[Variant, ...]
    carried_by_function: bool = False
    """A standard op that exports carry, below the opset that brought it, as a node of the same type
    in convlower's domain with a model-local function body (DeformConv under opset 19)."""

    def variant(self, name: str) -> Variant | None:
        return next((v for v in self.variants if v.name == name), None)

    @property
    def variant_names(self) -> list[str]:
        return [v.name for v in self.variants]


class NotLowerable(Exception):
    """A node that no variant can describe; the message is the reason shown to the user."""


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a tensor known at rewrite time: an initializer or a Constant node's output.

    A lazily loaded initializer is loaded without keeping the array on the tensor, so it stays
    lazy and graphsurgeon exports its original TensorProto: weights in external data stay
    references (their `load` is a memory-mapped view, `convlower.weights.ExternalValues`) and
    inline weights are not copied into the exported model a second time."""
    if isinstance(tensor, gs.Constant):
        values = tensor._values
        return np.asarray(values.load() if isinstance(values, LazyValues) else values)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        attrs = tensor.inputs[0].attrs
        if "value" in attrs and isinstance(attrs["value"], gs.Constant):
            return np.asarray(attrs["value"].values)
    return None


def int_attr(node: gs.Node, name: str, default: int) -> int:
    """An integer attribute; a malformed one (a string, a float, a list) is NotLowerable, not a crash."""
    value = node.attrs.get(name, default)
    if not _is_int(value):
        raise NotLowerable(f"attribute {name}={value!r} is not an integer")
    return int(value)


def quantized_operands(node: gs.Node) -> str | None:
    """Why a Conv-like node belongs to a quantized (QDQ) model, or None: its data or weight comes
    from DequantizeLinear. onnxruntime fuses DequantizeLinear → Conv → QuantizeLinear into
    QLinearConv; a lowered node would break that fusion and run in float."""
    for role, tensor in zip(("input", "weight"), node.inputs):
        if len(tensor.inputs) == 1 and tensor.inputs[0].op == "DequantizeLinear":
            return (f"its {role} comes from DequantizeLinear (a quantized QDQ model, which onnxruntime "
                    "runs as QLinearConv); lowering it would run it in float")
    return None


def static_shape(tensor: gs.Tensor) -> tuple[Dim, ...] | None:
    """The tensor's shape with symbolic dims as None; None when even the rank is unknown."""
    shape = tensor.shape
    if shape is None:
        return None
    return tuple(d if isinstance(d, int) and d >= 0 else None for d in shape)


def onnx_dtype(tensor: gs.Tensor) -> int | None:
    """The ONNX element type of a tensor, or None when unknown."""
    dtype = tensor.dtype
    if dtype is None:
        return None
    if isinstance(dtype, int):
        return dtype
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


FLOAT_TYPES = {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.DOUBLE: "float64"}
"""Element types the variants handle (bfloat16 has no NumPy type to build constants from)."""

def float_dtype(x: gs.Tensor) -> str:
    """The name of a tensor's float element type; raises NotLowerable for any other."""
    elem_type = onnx_dtype(x)
    if elem_type is None:
        raise NotLowerable("the input's element type is unknown")
    if elem_type not in FLOAT_TYPES:
        name = onnx.TensorProto.DataType.Name(elem_type).lower()
        raise NotLowerable(f"element type {name}: the variants handle {', '.join(FLOAT_TYPES.values())}")
    return FLOAT_TYPES[elem_type]


def positive_ints(values: Sequence[int], rank: int, what: str) -> tuple[int, ...]:
    """An attribute of `rank` positive ints (strides, dilations, ...); raises NotLowerable otherwise."""
    ints = tuple(values) if isinstance(values, (list, tuple, np.ndarray)) else (values,)
    if len(ints) != rank or any(not _is_int(v) or v < 1 for v in ints):
        raise NotLowerable(f"{what} {list(ints)} is not {rank} positive integer(s)")
    return tuple(int(v) for v in ints)


def non_negative_ints(values: Sequence[int], count: int, what: str) -> tuple[int, ...]:
    """An attribute of `count` integers >= 0 (pads, output_padding); raises NotLowerable otherwise."""
    ints = tuple(values) if isinstance(values, (list, tuple, np.ndarray)) else (values,)
    if len(ints) != count or any(not _is_int(v) or v < 0 for v in ints):
        raise NotLowerable(f"{what} {list(ints)} is not {count} non-negative integer(s)")
    return tuple(int(v) for v in ints)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def attr_text(value: str | bytes) -> str:
    """A string attribute as text (onnx-graphsurgeon may hand bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def onnx_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of a GraphProto and of the subgraphs (If/Loop/Scan bodies) nested in it."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from onnx_nodes(attr.g)
            for sub in attr.graphs:
                yield from onnx_nodes(sub)


SLICE_TO_END = np.iinfo(np.int64).max
"""A Slice end that reads to the end of an axis whatever its size."""


def tap_windows(
    b: "Builder",
    x: gs.Tensor,
    kernel_shape: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    first_axis: int,
) -> list[gs.Tensor]:
    """The (already padded) input seen through each kernel tap, taps in row-major order.

    Tap `o` reads `x[..., o·d : end - (k-1-o)·d : s]` on every spatial axis (spatial axes start at
    `first_axis`): exactly the output's spatial size, counted back from the end of the axis, so
    the slices need no shapes and stay valid for any input size. An axis a tap reads whole
    (k = 1, s = 1) is not sliced; a tap that reads all of x is x itself.
    """
    windows = []
    for offset in itertools.product(*(range(k) for k in kernel_shape)):
        starts, ends, axes, steps = [], [], [], []
        for axis, (o, k, s, d) in enumerate(zip(offset, kernel_shape, strides, dilations)):
            if k == 1 and s == 1:
                continue
            starts.append(o * d)
            ends.append(-(k - 1 - o) * d or SLICE_TO_END)
            axes.append(first_axis + axis)
            steps.append(s)
        windows.append(b.slice(x, starts, ends, axes, steps) if axes else x)
    return windows


class Builder:
    """Emits nodes into a graph at a given opset, naming them after the node they replace.

    The opset matters: ReduceSum, Squeeze and Unsqueeze take axes as inputs from opset 13 and as
    attributes before; the builder hides that so variants read the same at every opset >= 11.
    """

    def __init__(self, graph: gs.Graph, opset: int, prefix: str, dtype: np.dtype = np.dtype(np.float32)):
        self.graph = graph
        self.opset = opset
        self.prefix = prefix or "convlower"
        self.dtype = np.dtype(dtype)

    def op(
        self,
        op_type: str,
        inputs: Sequence[gs.Tensor | np.ndarray | None],
        attrs: dict[str, Any] | None = None,
        out: gs.Variable | None = None,
        domain: str | None = None,
    ) -> gs.Variable:
        """One node with one output; `out` names the output tensor, else a fresh one is made."""
        ins = [self._tensor(x) for x in inputs]
        output = out if out is not None else f"{self.prefix}/{op_type.lower()}"
        kwargs: dict[str, Any] = {"op": op_type, "attrs": dict(attrs or {})}
        if domain:
            kwargs["domain"] = domain
        name = self.graph._generate_name(f"{self.prefix}/{op_type}", {n.name for n in self.graph.nodes})
        return self.graph.layer(inputs=ins, outputs=[output], name=name, **kwargs)[0]

    def _tensor(self, x: gs.Tensor | np.ndarray | None) -> gs.Tensor:
        if x is None:
            return gs.Variable.empty()
        if isinstance(x, gs.Tensor):
            return x
        return self.const(np.asarray(x))

    def const(self, value: np.ndarray, hint: str = "const") -> gs.Constant:
        """A new initializer."""
        name = self.graph._generate_name(f"{self.prefix}/{hint}", set(self.graph.tensors().keys()))
        return gs.Constant(name, np.ascontiguousarray(value).reshape(np.shape(value)))

    def ints(self, values: Sequence[int]) -> gs.Constant:
        return self.const(np.asarray(list(values), dtype=np.int64), "ints")

    def scalar(self, value: float) -> gs.Constant:
        """A 0-d constant of the builder's float dtype."""
        return self.const(np.asarray(value, dtype=self.dtype), "scalar")

    def pad(self, x: gs.Tensor, pads: Sequence[int], out: gs.Variable | None = None) -> gs.Tensor:
        """Zero-pad; `pads` is ONNX order (all begins, then all ends) over every axis. No-op when all zero."""
        if not any(pads):
            return x
        return self.op("Pad", [x, self.ints(pads)], {"mode": "constant"}, out=out)

    def slice(
        self,
        x: gs.Tensor,
        starts: Sequence[int],
        ends: Sequence[int],
        axes: Sequence[int],
        steps: Sequence[int] | None = None,
        out: gs.Variable | None = None,
    ) -> gs.Variable:
        ins: list[Any] = [x, self.ints(starts), self.ints(ends), self.ints(axes)]
        if steps is not None and any(s != 1 for s in steps):
            ins.append(self.ints(steps))
        return self.op("Slice", ins, out=out)

    def reshape(self, x: gs.Tensor, shape: Sequence[int] | gs.Tensor, out: gs.Variable | None = None) -> gs.Variable:
        target = shape if isinstance(shape, gs.Tensor) else self.ints(shape)
        return self.op("Reshape", [x, target], out=out)

    def transpose(self, x: gs.Tensor, perm: Sequence[int], out: gs.Variable | None = None) -> gs.Variable:
        return self.op("Transpose", [x], {"perm": list(perm)}, out=out)

    def concat(self, xs: Sequence[gs.Tensor], axis: int, out: gs.Variable | None = None) -> gs.Tensor:
        if len(xs) == 1 and out is None:
            return xs[0]
        return self.op("Concat", list(xs), {"axis": axis}, out=out)

    def matmul(self, a: gs.Tensor, b: gs.Tensor, out: gs.Variable | None = None) -> gs.Variable:
        return self.op("MatMul", [a, b], out=out)

    def add(self, a: gs.Tensor, b: gs.Tensor, out: gs.Variable | None = None) -> gs.Variable:
        return self.op("Add", [a, b], out=out)

    def mul(self, a: gs.Tensor, b: gs.Tensor, out: gs.Variable | None = None) -> gs.Variable:
        return self.op("Mul", [a, b], out=out)

    def sum(self, xs: Sequence[gs.Tensor], out: gs.Variable | None = None) -> gs.Tensor:
        """Elementwise sum of several tensors (one Sum node); the tensor itself when there is one."""
        if len(xs) == 1:
            return xs[0] if out is None else self.op("Identity", [xs[0]], out=out)
        return self.op("Sum", list(xs), out=out)

    def einsum(self, equation: str, xs: Sequence[gs.Tensor], out: gs.Variable | None = None) -> gs.Variable:
        return self.op("Einsum", list(xs), {"equation": equation}, out=out)

    def reduce_sum(
        self, x: gs.Tensor, axes: Sequence[int], keepdims: bool = False, out: gs.Variable | None = None
    ) -> gs.Variable:
        if self.opset >= 13:
            return self.op("ReduceSum", [x, self.ints(axes)], {"keepdims": int(keepdims)}, out=out)
        return self.op("ReduceSum", [x], {"axes": list(axes), "keepdims": int(keepdims)}, out=out)

    def unsqueeze(self, x: gs.Tensor, axes: Sequence[int], out: gs.Variable | None = None) -> gs.Variable:
        if self.opset >= 13:
            return self.op("Unsqueeze", [x, self.ints(axes)], out=out)
        return self.op("Unsqueeze", [x], {"axes": list(axes)}, out=out)

    def squeeze(self, x: gs.Tensor, axes: Sequence[int], out: gs.Variable | None = None) -> gs.Variable:
        if self.opset >= 13:
            return self.op("Squeeze", [x, self.ints(axes)], out=out)
        return self.op("Squeeze", [x], {"axes": list(axes)}, out=out)

    def shape(self, x: gs.Tensor, start: int | None = None, end: int | None = None) -> gs.Variable:
        """Shape of x (a slice of it where start/end are given; opset 15 has them as attributes)."""
        if start is None and end is None:
            return self.op("Shape", [x])
        if self.opset >= 15:
            attrs = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
            return self.op("Shape", [x], attrs)
        full = self.op("Shape", [x])
        return self.slice(full, [start or 0], [end if end is not None else 2**62], [0])

    def identity(self, x: gs.Tensor, out: gs.Variable) -> gs.Variable:
        return self.op("Identity", [x], out=out)


@dataclass(frozen=True)
class Reshape:
    """A reshape of a weight or bias: in NumPy for a constant, a node for a run-time input."""

    shape: tuple[int, ...]

    def on_array(self, value: np.ndarray) -> np.ndarray:
        return value.reshape(self.shape)

    def on_graph(self, b: Builder, tensor: gs.Tensor) -> gs.Tensor:
        return b.reshape(tensor, self.shape)


@dataclass(frozen=True)
class Transpose:
    """A transpose of a weight: in NumPy for a constant, a node for a run-time input."""

    perm: tuple[int, ...]

    def on_array(self, value: np.ndarray) -> np.ndarray:
        return value.transpose(self.perm)

    def on_graph(self, b: Builder, tensor: gs.Tensor) -> gs.Tensor:
        return b.transpose(tensor, self.perm)


def rearranged(b: Builder, tensor: gs.Tensor, *steps: Reshape | Transpose) -> gs.Tensor:
    """`tensor` put through `steps`: once at rewrite time when it is a constant, else by nodes."""
    value = constant_value(tensor)
    if value is None:
        for step in steps:
            tensor = step.on_graph(b, tensor)
        return tensor
    for step in steps:
        value = step.on_array(value)
    return b.const(value, "weight")
