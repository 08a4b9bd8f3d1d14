"""`convlower.PixelAdaptiveConv`: pixel-adaptive convolution (PAC), and its lowerings to standard ONNX ops.

A PAC layer (Su et al., "Pixel-Adaptive Convolutional Neural Networks"; pacnet's `pacconv2d`, joint
upsampling, PAC-CRF) is a static convolution whose taps are modulated at every output position by
a kernel computed from guidance features. With `K = prod(kernel_shape)` taps in row-major order:

    Y[n, o, p] = B[o] + sum_c sum_k W[o, c, k] * Kn[n, c // (C / G), k, p] * Xpad[n, c, p * strides + k * dilations]

for X `[N, C, *S]`, the per-pixel kernel Kn `[N, G, K, *S_out]` (usually G = 1), the static weight
W `[O, C, *kernel_shape]`, the optional bias B `[O]`, and Y `[N, O, *S_out]`.

pacnet writes it as unfold, multiply by the kernel, Einsum with W (`unfold_einsum` here, what the
exporters emit). The other variants never build the Gather-indexed copy:

- `shift_modulate_matmul`: per tap, a strided Slice of padded X times that tap's kernel plane,
  contracted with `W[:, :, k]` by one MatMul over channels; the K products summed.
- `shift_modulate_conv`: the same, each contraction a 1x1 Conv (onnxruntime's pointwise Conv).
- `modulated_im2col`: modulated columns `[N, C*K, L]` by Slice + Concat, one MatMul with W as `[O, C*K]`.
- `conv_unfold`: columns by an identity-kernel grouped Conv (onnxruntime's im2col), modulated,
  then one 1x1 Conv with W as `[O, C*K, 1, ..]`.

A constant W (or B) is rearranged once in NumPy; W given as a graph input gets Reshape/Slice nodes.
The op's model-local function body is modulated im2col in channels-last form ending in one Gemm,
whose optional C input takes B: a node without a bias leaves the function's B input missing, which
Gemm accepts, so one body serves both (float16, float32 and float64 on onnxruntime's CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from ..base import (
    Builder,
    Dim,
    NotLowerable,
    OpFamily,
    Reshape,
    SimpleVariant,
    applies_to_any_shape,
    constant_value,
    rearranged,
    static_shape,
)
from ..dynamic_filter import (
    SPATIAL_LETTERS,
    SlidingWindow,
    WindowSpec,
    conv_windows,
    dims_or_shape,
    gathered_windows,
    overload_name,
    pad_spatial,
    resolved_attrs,
    shape_vector,
    shifted_windows,
    stacked_windows,
    unknown_dims,
    window_spec_fields,
)
from ..local_functions import DOMAIN, CanonicalOp, register_canonical_op

OP_TYPE = "PixelAdaptiveConv"


@dataclass(frozen=True)
class PixelAdaptiveConvSpec(WindowSpec):
    """One PixelAdaptiveConv node: G kernel groups over X's C channels, O output channels."""

    groups: Dim
    out_channels: Dim
    bias: bool

    @property
    def group_channels(self) -> Dim:
        """C / G: channels sharing one kernel plane."""
        return None if self.channels is None or self.groups is None else self.channels // self.groups


def make_spec(node: gs.Node, opset: int) -> PixelAdaptiveConvSpec:
    """Read a PixelAdaptiveConv node; raises NotLowerable with the reason it cannot be described."""
    inputs = node.inputs
    if len(inputs) not in (3, 4):
        raise NotLowerable(f"PixelAdaptiveConv takes 3 or 4 inputs (X, K, W[, B]), this node has {len(inputs)}")
    fields = window_spec_fields(node)
    window, out_spatial = fields["window"], fields["out_spatial"]
    k_shape, w_shape = static_shape(inputs[1]), static_shape(inputs[2])
    if k_shape is None or len(k_shape) != window.rank + 3:
        raise NotLowerable(f"K must have rank {window.rank + 3} ([N, G, taps, *S_out]); its shape is {k_shape}")
    if w_shape is None or len(w_shape) != window.rank + 2 or any(d is None for d in w_shape):
        raise NotLowerable(f"W must have the static shape [O, C, *kernel_shape]; its shape is {w_shape}")
    out_channels, channels = w_shape[0], w_shape[1]
    if tuple(w_shape[2:]) != window.kernel_shape:
        raise NotLowerable(f"W's kernel {list(w_shape[2:])} is not kernel_shape {list(window.kernel_shape)}")
    if fields["channels"] not in (None, channels):
        raise NotLowerable(f"X has {fields['channels']} channels, W expects {channels}")
    groups, taps = k_shape[1], k_shape[2]
    if groups is None:
        raise NotLowerable("K's group axis (axis 1) must be static")
    if channels % groups:
        raise NotLowerable(f"C={channels} is not a multiple of the kernel groups G={groups}")
    if taps is not None and taps != window.taps:
        raise NotLowerable(f"K has {taps} taps on axis 2, kernel_shape {list(window.kernel_shape)} has {window.taps}")
    if any(o is not None and k is not None and o != k for o, k in zip(out_spatial, k_shape[3:])):
        raise NotLowerable(f"K's spatial extent {list(k_shape[3:])} is not the output extent {list(out_spatial)}")
    bias = len(inputs) == 4 and not inputs[3].is_empty()
    if bias and static_shape(inputs[3]) != (out_channels,):
        raise NotLowerable(f"B must have shape [{out_channels}]; its shape is {static_shape(inputs[3])}")
    fields["channels"] = channels
    fields["out_spatial"] = tuple(o if o is not None else k for o, k in zip(out_spatial, k_shape[3:]))
    return PixelAdaptiveConvSpec(**fields, groups=groups, out_channels=out_channels, bias=bias)


# --- building blocks ----------------------------------------------------------------------------------


def _grouped_input(b: Builder, spec: PixelAdaptiveConvSpec, x: gs.Tensor, kernel: gs.Tensor) -> gs.Tensor:
    """X as `[N, G, C/G, *S]`, so that the kernel's `[N, G, 1, ..]` planes broadcast over each group."""
    if spec.groups == 1:
        return b.unsqueeze(x, [1])
    groups: int | gs.Tensor = spec.groups if spec.groups is not None else b.shape(kernel, 1, 2)
    group_channels = spec.group_channels if spec.group_channels is not None else -1
    return b.reshape(x, shape_vector(b, [0, groups, group_channels, *dims_or_shape(b, spec.in_spatial, x, 2)]))


def _modulated_columns(b: Builder, spec: PixelAdaptiveConvSpec, x: gs.Tensor, kernel: gs.Tensor) -> gs.Tensor:
    """`[N, G, C/G, K, *S_out]`: every tap's window of padded X times its kernel plane (Slice + Concat)."""
    padded = pad_spatial(b, _grouped_input(b, spec, x, kernel), spec.window, leading_axes=3)
    return b.mul(stacked_windows(b, padded, spec.window, first_axis=3), b.unsqueeze(kernel, [2]))


def _out_shape(b: Builder, spec: PixelAdaptiveConvSpec, kernel: gs.Tensor) -> gs.Tensor:
    """`[0, O, *S_out]` as a Reshape target; S_out read off the kernel's shape where symbolic."""
    return shape_vector(b, [0, int(spec.out_channels), *dims_or_shape(b, spec.out_spatial, kernel, 3)])  # type: ignore[arg-type]


def _bias_column(b: Builder, spec: PixelAdaptiveConvSpec, bias: gs.Tensor, trailing: int) -> gs.Tensor:
    """B as `[O, 1, ..]` with `trailing` unit axes, to broadcast over the output's positions."""
    return rearranged(b, bias, Reshape((int(spec.out_channels), *(1,) * trailing)))  # type: ignore[arg-type]


def _flat_weight(b: Builder, spec: PixelAdaptiveConvSpec, w: gs.Tensor, *trailing: int) -> gs.Tensor:
    """W as `[O, C*K, *trailing]` (rows channel-major, as the columns are)."""
    rows = int(spec.channels) * spec.window.taps  # type: ignore[arg-type]
    return rearranged(b, w, Reshape((int(spec.out_channels), rows, *trailing)))  # type: ignore[arg-type]


def _tap_weights(b: Builder, spec: PixelAdaptiveConvSpec, w: gs.Tensor, *trailing: int) -> list[gs.Tensor]:
    """`W[:, :, k]` as `[O, C, *trailing]` for every tap k: constants sliced in NumPy, else Slice nodes."""
    o, c, taps = int(spec.out_channels), int(spec.channels), spec.window.taps  # type: ignore[arg-type]
    value = constant_value(w)
    if value is not None:
        per_tap = value.reshape(o, c, taps)
        return [b.const(np.ascontiguousarray(per_tap[:, :, k]).reshape(o, c, *trailing), "weight") for k in range(taps)]
    flat = b.reshape(w, [o, c, taps])
    return [b.reshape(b.slice(flat, [k], [k + 1], [2]), [o, c, *trailing]) for k in range(taps)]


def _tap_products(b: Builder, spec: PixelAdaptiveConvSpec, x: gs.Tensor, kernel: gs.Tensor) -> list[gs.Tensor]:
    """Per tap, its window of padded X times its kernel plane, as `[N, G, C/G, *S_out]`."""
    padded = pad_spatial(b, _grouped_input(b, spec, x, kernel), spec.window, leading_axes=3)
    return [
        b.mul(window, b.slice(kernel, [k], [k + 1], [2]))
        for k, window in enumerate(shifted_windows(b, padded, spec.window, first_axis=3))
    ]


# --- variants ---------------------------------------------------------------------------------------


def build_unfold_einsum(
    b: Builder, spec: PixelAdaptiveConvSpec, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]
) -> None:
    """As the exporters write pacnet: unfold by Pad + Gather per axis, multiply by the kernel, Einsum with W."""
    x, kernel, w = inputs[:3]
    groups, group_channels, taps = int(spec.groups), int(spec.group_channels), spec.window.taps  # type: ignore[arg-type]
    out_spatial = [int(s) for s in spec.out_spatial]  # type: ignore[arg-type]
    columns = gathered_windows(b, pad_spatial(b, x, spec.window, leading_axes=2), spec.window, out_spatial, first_axis=2)
    grouped = b.reshape(columns, [0, groups, group_channels, taps, *out_spatial])
    modulated = b.mul(grouped, b.unsqueeze(kernel, [2]))
    weight = rearranged(b, w, Reshape((int(spec.out_channels), groups, group_channels, taps)))  # type: ignore[arg-type]
    s = SPATIAL_LETTERS[: spec.window.rank]
    if not spec.bias:
        b.einsum(f"ngck{s},ogck->no{s}", [modulated, weight], out=outputs[0])
        return
    y = b.einsum(f"ngck{s},ogck->no{s}", [modulated, weight])
    b.add(y, _bias_column(b, spec, inputs[3], spec.window.rank), out=outputs[0])


def build_shift_modulate_matmul(
    b: Builder, spec: PixelAdaptiveConvSpec, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]
) -> None:
    """Per tap: shifted window times kernel plane, `[N, C, L]`, then `W[:, :, k] @ .` to `[N, O, L]`; summed."""
    x, kernel, w = inputs[:3]
    channels = int(spec.channels)  # type: ignore[arg-type]
    products = [
        b.matmul(weight, b.reshape(product, [0, channels, -1]))
        for weight, product in zip(_tap_weights(b, spec, w), _tap_products(b, spec, x, kernel))
    ]
    if spec.bias:
        products.append(_bias_column(b, spec, inputs[3], 1))
    b.reshape(b.sum(products), _out_shape(b, spec, kernel), out=outputs[0])


def build_shift_modulate_conv(
    b: Builder, spec: PixelAdaptiveConvSpec, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]
) -> None:
    """Per tap: shifted window times kernel plane, `[N, C, *S_out]`, then a 1x1 Conv by `W[:, :, k]`
    (the first one adding B); summed."""
    x, kernel, w = inputs[:3]
    rank = spec.window.rank
    channels = int(spec.channels)  # type: ignore[arg-type]
    spatial = shape_vector(b, [0, channels, *dims_or_shape(b, spec.out_spatial, kernel, 3)])
    bias = [inputs[3]] if spec.bias else []
    products = [
        b.op("Conv", [b.reshape(product, spatial), weight, *(bias if k == 0 else [])], {"kernel_shape": [1] * rank})
        for k, (weight, product) in enumerate(zip(_tap_weights(b, spec, w, *(1,) * rank), _tap_products(b, spec, x, kernel)))
    ]
    b.sum(products, out=outputs[0])


def build_modulated_im2col(
    b: Builder, spec: PixelAdaptiveConvSpec, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]
) -> None:
    """Modulated columns `[N, C*K, L]` (Slice + Concat, times the kernel), one MatMul with W as `[O, C*K]`."""
    x, kernel, w = inputs[:3]
    rows = int(spec.channels) * spec.window.taps  # type: ignore[arg-type]
    columns = b.reshape(_modulated_columns(b, spec, x, kernel), [0, rows, -1])
    y = b.matmul(_flat_weight(b, spec, w), columns)
    if spec.bias:
        y = b.add(y, _bias_column(b, spec, inputs[3], 1))
    b.reshape(y, _out_shape(b, spec, kernel), out=outputs[0])


def build_conv_unfold(
    b: Builder, spec: PixelAdaptiveConvSpec, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]
) -> None:
    """Columns `[N, C*K, *S_out]` by an identity-kernel grouped Conv, times the kernel, then one
    1x1 Conv with W as `[O, C*K, 1, ..]` (and B as its bias)."""
    x, kernel, w = inputs[:3]
    groups, group_channels, taps = int(spec.groups), int(spec.group_channels), spec.window.taps  # type: ignore[arg-type]
    rank = spec.window.rank
    columns = conv_windows(b, x, spec.window, groups * group_channels)
    modulated = b.mul(b.reshape(columns, [0, groups, group_channels, taps, -1]), b.reshape(kernel, [0, groups, 1, taps, -1]))
    rows_and_positions = [0, groups * group_channels * taps, *dims_or_shape(b, spec.out_spatial, kernel, 3)]
    spatial = b.reshape(modulated, shape_vector(b, rows_and_positions))
    conv_inputs = [spatial, _flat_weight(b, spec, w, *(1,) * rank), *([inputs[3]] if spec.bias else [])]
    b.op("Conv", conv_inputs, {"kernel_shape": [1] * rank}, out=outputs[0])


def _need_static_spatial(spec: PixelAdaptiveConvSpec) -> str | None:
    if any(d is None for d in spec.out_spatial):
        return "needs static output extents (the Gather indices are constants)"
    return None


def _conv_why_not(spec: PixelAdaptiveConvSpec) -> str | None:
    if spec.dtype != "float32":
        return f"onnxruntime's CPU Conv runs float32 only, not {spec.dtype}"
    return None


VARIANTS = (
    SimpleVariant(
        "unfold_einsum", _need_static_spatial, build_unfold_einsum, "Gather unfold, Mul by the kernel, Einsum with W (as exported)"
    ),
    SimpleVariant(
        "shift_modulate_matmul", lambda spec: None, build_shift_modulate_matmul, "per tap: Slice * kernel plane, MatMul by W[:, :, k]"
    ),
    SimpleVariant(
        "shift_modulate_conv", _conv_why_not, build_shift_modulate_conv, "per tap: Slice * kernel plane, 1x1 Conv by W[:, :, k]"
    ),
    SimpleVariant("modulated_im2col", applies_to_any_shape, build_modulated_im2col, "Slice + Concat columns * kernel, one MatMul"),
    SimpleVariant("conv_unfold", _conv_why_not, build_conv_unfold, "identity-kernel Conv unfold * kernel, one 1x1 Conv"),
)


# --- the function body --------------------------------------------------------------------------------


def build_reference_body(
    b: Builder, attrs: Mapping[str, Any], inputs: Sequence[gs.Variable], outputs: Sequence[gs.Variable]
) -> None:
    """The model-local function body, for any shape: modulated columns in channels-last form
    `[N*L, C*K]`, one Gemm with W as `[O, C*K]` whose optional C input is B, back to `[N, O, *S_out]`."""
    x, kernel, w, bias = inputs
    window = SlidingWindow.from_attrs(attrs)
    rank = window.rank
    spec = PixelAdaptiveConvSpec(op=OP_TYPE, **unknown_dims(window), groups=None, out_channels=None, bias=True)
    columns = _modulated_columns(b, spec, x, kernel)
    channels_last = b.transpose(columns, [0, *range(4, 4 + rank), 1, 2, 3])
    flat_weight = b.reshape(w, [0, -1])
    rows = b.reshape(channels_last, shape_vector(b, [-1, b.shape(flat_weight, 1, 2)]))
    y = b.op("Gemm", [rows, flat_weight, bias], {"transB": 1})
    positions = b.reshape(y, shape_vector(b, [b.shape(kernel, 0, 1), b.shape(kernel, 3), -1]))
    b.transpose(positions, [0, rank + 1, *range(1, rank + 1)], out=outputs[0])


FAMILY = OpFamily(OP_TYPE, DOMAIN, make_spec, VARIANTS)
CANONICAL = register_canonical_op(CanonicalOp(OP_TYPE, ("X", "K", "W", "B"), resolved_attrs, overload_name, build_reference_body))
