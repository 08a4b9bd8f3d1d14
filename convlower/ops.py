"""`convlower.ops.dynamic_filter`: the DynamicFilter op in PyTorch, and how it exports.

    y = dynamic_filter(x, filters, kernel_size=5)       # audio: x [N, C, T], filters [N, G, 5, T]
    y = dynamic_filter(x, filters, kernel_size=3)       # images: x [N, C, H, W], filters [N, G, 9, H, W]
    y = dynamic_filter(x, filters, kernel_size=3)       # video: x [N, C, D, H, W], filters [N, G, 27, D, H, W]

computes `y[n, c, p] = sum_k xpad[n, c, p * stride + k * dilation] * filters[n, c // (C / G), k, p]`
(the canonical `convlower.DynamicFilter`, see DESIGN.md) for 1-D, 2-D and 3-D inputs, with a
reference implementation (shift-sum) for eager runs and training (autograd through a recomputed
reference), and a fake kernel for tracing.

Exporting it:
- the dynamo exporter (`torch.onnx.export(..., dynamo=True)`): the op emits the node through
  `torch.onnx.ops.symbolic`;
- the TorchScript exporter (`dynamo=False`): importing this module registers an ONNX symbolic for
  `convlower::dynamic_filter`.
Either way the node has domain `convlower` and the attributes `kernel_shape`, `strides`,
`dilations`, `pads`. `convlower.export` wraps both exporters and attaches the model-local function
that lets onnxruntime run the node (and names symbolic batch, time or spatial dims for either
exporter: `dynamic_axes`); after a plain `torch.onnx.export`, call
`convlower.passes.local_functions.attach_functions(model)` for the same.

`convlower.ops.local_correlation`: the LocalCorrelation op (cost volumes, local attention scores),
exported the same way as one `convlower.LocalCorrelation` node:

    cost = local_correlation(left, right, [0, (0, -47, -1)], groups=40)      # GwcNet: disparities 0..47 along W
    flow = local_correlation(f1, f2, 4)                                       # PWC-Net: -4..4 on both axes, 81 taps
    flow = local_correlation(f1, f2, [(-20, 20, 2)] * 2)                      # FlowNetC: -20..20 step 2 on both axes
    attn = local_correlation(q, k, 2, groups=heads, reduction="sum", scale=d ** -0.5)   # 5x5 local attention

computes `y[n, g, k, p] = scale * reduce_{c in group g} a[n, c, p] * b[n, c, p + δ_k]`, `[N, G, K, *S]`,
with b read as zero outside its extent.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.onnx import symbolic_helper

from convlower.passes.dynamic_filter import OP_TYPE, SlidingWindow
from convlower.passes.local_correlation import OP_TYPE as CORRELATION_OP_TYPE
from convlower.passes.local_correlation import Correlation
from convlower.passes.local_functions import DOMAIN, DOMAIN_VERSION

Padding = str | int | Sequence[int]
TORCH_OP = "convlower::dynamic_filter"


def sliding_window(
    spatial_rank: int,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    padding: Padding = "same",
) -> SlidingWindow:
    """The window of torch-style arguments: ints or one value per spatial axis; padding "same"
    (stride 1; any odd remainder goes to the end, as torch's conv does), "valid", or per-axis amounts."""

    def per_axis(value: int | Sequence[int], name: str) -> tuple[int, ...]:
        values = (value,) * spatial_rank if isinstance(value, int) else tuple(value)
        if len(values) != spatial_rank:
            raise ValueError(f"{name} has {len(values)} values; the input has {spatial_rank} spatial axes")
        return tuple(int(v) for v in values)

    kernel, strides, dilations = per_axis(kernel_size, "kernel_size"), per_axis(stride, "stride"), per_axis(dilation, "dilation")
    if padding == "same":
        if any(s != 1 for s in strides):
            raise ValueError("padding='same' needs stride 1; give the padding amounts instead")
        total = [(k - 1) * d for k, d in zip(kernel, dilations)]
        pads = tuple(t // 2 for t in total) + tuple(t - t // 2 for t in total)
    elif padding == "valid":
        pads = (0,) * 2 * spatial_rank
    elif isinstance(padding, str):
        raise ValueError(f"padding {padding!r} is not 'same', 'valid' or amounts")
    else:
        pads = per_axis(padding, "padding") * 2
    window = SlidingWindow(kernel, strides, dilations, pads)
    window.validate()
    return window


def reference(x: Tensor, filters: Tensor, window: SlidingWindow) -> Tensor:
    """DynamicFilter in plain torch ops: pad once, then for each tap add its strided view times its
    filter plane (seed 000, method_2). `filters` is canonical `[N, G, K, *S_out]`."""
    rank = window.rank
    torch_pads = [p for axis in reversed(range(rank)) for p in (window.pads[axis], window.pads[axis + rank])]
    padded = F.pad(x, torch_pads).unflatten(1, (filters.shape[1], -1))
    out_spatial = filters.shape[3:]
    result = None
    for k, offset in enumerate(window.offsets()):
        view = padded[
            (slice(None),) * 3
            + tuple(
                slice(o * d, o * d + (size - 1) * s + 1, s)
                for o, d, s, size in zip(offset, window.dilations, window.strides, out_spatial)
            )
        ]
        plane = filters[:, :, k].unsqueeze(2)
        result = view * plane if result is None else torch.addcmul(result, view, plane)
    return result.flatten(1, 2)  # type: ignore[union-attr]


def _window(kernel_shape: Sequence[int], strides: Sequence[int], dilations: Sequence[int], pads: Sequence[int]) -> SlidingWindow:
    return SlidingWindow(tuple(kernel_shape), tuple(strides), tuple(dilations), tuple(pads))


@torch.library.custom_op(TORCH_OP, mutates_args=())
def _dynamic_filter(
    x: Tensor, filters: Tensor, kernel_shape: list[int], strides: list[int], dilations: list[int], pads: list[int]
) -> Tensor:
    return reference(x, filters, _window(kernel_shape, strides, dilations, pads))


@_dynamic_filter.register_fake
def _dynamic_filter_fake(
    x: Tensor, filters: Tensor, kernel_shape: list[int], strides: list[int], dilations: list[int], pads: list[int]
) -> Tensor:
    return x.new_empty((*x.shape[:2], *filters.shape[3:]))


def _differentiate_reference(op_name: str, spec_of: Callable[..., Any], reference: Callable[[Tensor, Tensor, Any], Tensor]) -> None:
    """Give a custom op of two tensors and some attributes its gradients, by differentiating its torch
    reference (`spec_of(*attributes)` read as the reference's third argument) on the saved inputs."""

    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 - torch.library's callback signature
        first, second, *attributes = inputs
        ctx.save_for_backward(first, second)
        ctx.spec, ctx.attribute_count = spec_of(*attributes), len(attributes)

    def backward(ctx, grad: Tensor):  # noqa: ANN001 - torch.library's callback signature
        first, second = ctx.saved_tensors
        with torch.enable_grad():
            first, second = first.detach().requires_grad_(), second.detach().requires_grad_()
            grads = torch.autograd.grad(reference(first, second, ctx.spec), (first, second), grad)
        return (*grads, *[None] * ctx.attribute_count)

    torch.library.register_autograd(op_name, backward, setup_context=setup_context)


_differentiate_reference(TORCH_OP, _window, reference)


def dynamic_filter(
    x: Tensor,
    filters: Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    padding: Padding = "same",
) -> Tensor:
    """Spatially variant filtering: every output position has its own kernel.

    x: `[N, C, *S]`. filters: `[N, G, K, *S_out]` with `K = prod(kernel_size)` taps in row-major
    order and `C % G == 0` (G = 1 shares one filter across channels, G = C is per channel), or
    `[N, K, *S_out]` for G = 1. Returns `[N, C, *S_out]`.
    """
    window = sliding_window(x.dim() - 2, kernel_size, stride, dilation, padding)
    if filters.dim() == x.dim():
        filters = filters.unsqueeze(1)
    if not torch.jit.is_tracing():  # the TorchScript tracer would record the checks' shape reads
        _check_shapes(x, filters, window)
    if torch.onnx.is_in_onnx_export() and not torch.jit.is_tracing():
        return torch.onnx.ops.symbolic(
            f"{DOMAIN}::{OP_TYPE}",
            (x, filters),
            window.attrs(),
            dtype=x.dtype,
            shape=[*x.shape[:2], *filters.shape[3:]],
            version=DOMAIN_VERSION,
        )
    attrs = window.attrs()
    return _dynamic_filter(x, filters, attrs["kernel_shape"], attrs["strides"], attrs["dilations"], attrs["pads"])


def _check_shapes(x: Tensor, filters: Tensor, window: SlidingWindow) -> None:
    if filters.dim() != x.dim() + 1:
        raise ValueError(f"filters must be [N, G, K, *S_out] (rank {x.dim() + 1}); got shape {tuple(filters.shape)}")
    expected_out = window.output_size(list(x.shape[2:]))
    if filters.shape[0] != x.shape[0] or filters.shape[2] != window.taps or tuple(filters.shape[3:]) != expected_out:
        raise ValueError(
            f"filters must be [N={x.shape[0]}, G, K={window.taps}, *S_out={list(expected_out)}] for x of shape "
            f"{tuple(x.shape)}; got {tuple(filters.shape)}"
        )
    if x.shape[1] % filters.shape[1]:
        raise ValueError(f"the channels C={x.shape[1]} are not a multiple of the filter groups G={filters.shape[1]}")


@symbolic_helper.parse_args("v", "v", "is", "is", "is", "is")
def _onnx_symbolic(g, x, filters, kernel_shape, strides, dilations, pads):  # noqa: ANN001 - TorchScript graph values
    """The TorchScript exporter's translation: one `convlower::DynamicFilter` node, typed `[N, C, *S_out]`."""
    y = g.op(
        f"{DOMAIN}::{OP_TYPE}", x, filters, kernel_shape_i=kernel_shape, strides_i=strides, dilations_i=dilations, pads_i=pads
    )
    x_sizes, filter_sizes = x.type().varyingSizes(), filters.type().varyingSizes()
    if x_sizes is not None and filter_sizes is not None:
        y.setType(x.type().with_sizes(x_sizes[:2] + filter_sizes[3:]))
    return y


torch.onnx.register_custom_op_symbolic(TORCH_OP, _onnx_symbolic, 1)


# --- LocalCorrelation -----------------------------------------------------------------------------------

CORRELATION_TORCH_OP = "convlower::local_correlation"
Displacements = int | Sequence[int | Sequence[int]]
"""d: -d..d step 1 on every spatial axis; or one entry per spatial axis: d (-d..d), (first, last)
(step 1) or (first, last, step), the last displacement included; a negative step runs them in
descending order (GwcNet's disparity axis: `(0, -47, -1)`)."""


def correlation_window(
    spatial_rank: int, displacements: Displacements, groups: int = 1, reduction: str = "mean", scale: float = 1.0
) -> Correlation:
    """The `Correlation` (the node's attributes) of torch-style arguments; raises ValueError for bad
    ones. A 1-D input's window is a list of one entry: `[(first, last, step)]`."""
    per_axis = [displacements] * spatial_rank if isinstance(displacements, int) else list(displacements)
    if len(per_axis) != spatial_rank:
        raise ValueError(f"displacements has {len(per_axis)} entries; the input has {spatial_rank} spatial axes")
    windows = []
    for axis, entry in enumerate(per_axis):
        if isinstance(entry, int):
            if entry < 0:
                raise ValueError(f"axis {axis}: a displacement radius must be >= 0, got {entry}")
            windows.append((-entry, entry, 1))
        elif len(entry) in (2, 3):
            windows.append((int(entry[0]), int(entry[1]), int(entry[2]) if len(entry) == 3 else 1))
        else:
            raise ValueError(f"axis {axis}: {entry!r} is not d, (first, last) or (first, last, step)")
    first, last, step = (tuple(w[i] for w in windows) for i in range(3))
    correlation = Correlation(first, last, step, int(groups), reduction, float(scale))
    correlation.validate()
    return correlation


def correlation_reference(a: Tensor, b: Tensor, correlation: Correlation) -> Tensor:
    """LocalCorrelation in plain torch ops: pad b once by the window's reach, then per displacement
    its shifted view times a, reduced over each group's channels; stacked on axis 2, times scale."""
    rank = correlation.rank
    before = [max(0, -low) for low in correlation.lowest]
    after = [max(0, high) for high in correlation.highest]
    padded = F.pad(b, [p for axis in reversed(range(rank)) for p in (before[axis], after[axis])])
    spatial = a.shape[2:]
    axes = zip(correlation.first, correlation.last, correlation.step)
    offsets = itertools.product(*(range(first, last + (1 if step > 0 else -1), step) for first, last, step in axes))
    planes = []
    for delta in offsets:
        view = padded[(slice(None), slice(None), *(slice(p + d, p + d + n) for p, d, n in zip(before, delta, spatial)))]
        grouped = (a * view).unflatten(1, (correlation.groups, -1))
        planes.append(grouped.mean(2) if correlation.reduction == "mean" else grouped.sum(2))
    y = torch.stack(planes, 2)
    return y * correlation.scale if correlation.scale != 1.0 else y


def _correlation(first: Sequence[int], last: Sequence[int], step: Sequence[int], groups: int, reduction: str, scale: float) -> Correlation:
    return Correlation(tuple(first), tuple(last), tuple(step), groups, reduction, scale)


@torch.library.custom_op(CORRELATION_TORCH_OP, mutates_args=())
def _local_correlation(
    a: Tensor, b: Tensor, first: list[int], last: list[int], step: list[int], groups: int, reduction: str, scale: float
) -> Tensor:
    return correlation_reference(a, b, _correlation(first, last, step, groups, reduction, scale))


@_local_correlation.register_fake
def _local_correlation_fake(
    a: Tensor, b: Tensor, first: list[int], last: list[int], step: list[int], groups: int, reduction: str, scale: float
) -> Tensor:
    return a.new_empty((a.shape[0], groups, _correlation(first, last, step, groups, reduction, scale).taps, *a.shape[2:]))


_differentiate_reference(CORRELATION_TORCH_OP, _correlation, correlation_reference)


def local_correlation(
    a: Tensor, b: Tensor, displacements: Displacements, groups: int = 1, reduction: str = "mean", scale: float = 1.0
) -> Tensor:
    """Local correlation: each position of `a` against the positions of `b` around it.

    a, b: `[N, C, *S]` (1 to 3 spatial axes), C a multiple of `groups`. displacements: an int d
    for -d..d step 1 on every axis, or one entry per spatial axis: d, (first, last) or (first,
    last, step), last included, a negative step counting down (no displacement on an axis: 0 or
    (0, 0)). reduction: "mean" or
    "sum" over each group's C/G channels; scale: a constant factor on the result. Returns
    `[N, G, K, *S]`, K the displacements in row-major order (first axis slowest), zero where
    `p + δ` falls outside b.
    """
    correlation = correlation_window(a.dim() - 2, displacements, groups, reduction, scale)
    if not torch.jit.is_tracing():  # the TorchScript tracer would record the checks' shape reads
        _check_correlation_shapes(a, b, correlation)
    if torch.onnx.is_in_onnx_export() and not torch.jit.is_tracing():
        return torch.onnx.ops.symbolic(
            f"{DOMAIN}::{CORRELATION_OP_TYPE}",
            (a, b),
            correlation.attrs(),
            dtype=a.dtype,
            shape=[a.shape[0], correlation.groups, correlation.taps, *a.shape[2:]],
            version=DOMAIN_VERSION,
        )
    return _local_correlation(
        a, b, list(correlation.first), list(correlation.last), list(correlation.step),
        correlation.groups, correlation.reduction, correlation.scale,
    )


def _check_correlation_shapes(a: Tensor, b: Tensor, correlation: Correlation) -> None:
    if a.shape != b.shape:
        raise ValueError(f"a and b must have one shape; got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() < 3:
        raise ValueError(f"a must be [N, C, *S] with 1 to 3 spatial axes; got shape {tuple(a.shape)}")
    if a.shape[1] % correlation.groups:
        raise ValueError(f"the channels C={a.shape[1]} are not a multiple of groups={correlation.groups}")


@symbolic_helper.parse_args("v", "v", "is", "is", "is", "i", "s", "f")
def _correlation_symbolic(g, a, b, first, last, step, groups, reduction, scale):  # noqa: ANN001 - TorchScript graph values
    """The TorchScript exporter's translation: one `convlower::LocalCorrelation` node, typed `[N, G, K, *S]`."""
    y = g.op(
        f"{DOMAIN}::{CORRELATION_OP_TYPE}", a, b, displacement_first_i=first, displacement_last_i=last,
        displacement_step_i=step, groups_i=groups, reduction_s=reduction, scale_f=scale,
    )
    sizes = a.type().varyingSizes()
    if sizes is not None:
        taps = _correlation(first, last, step, groups, reduction, scale).taps
        y.setType(a.type().with_sizes([sizes[0], groups, taps, *sizes[2:]]))
    return y


torch.onnx.register_custom_op_symbolic(CORRELATION_TORCH_OP, _correlation_symbolic, 1)


# --- DeformConv -----------------------------------------------------------------------------------------

DEFORM_TORCH_OP = "convlower::deform_conv2d"
TORCHVISION_DEFORM_OP = "torchvision::deform_conv2d"


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or two ints; got {value!r}")
    return int(pair[0]), int(pair[1])


def deform_conv2d_reference(
    x: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor | None,
    stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
) -> Tensor:
    """DeformConv in plain torch ops, differentiable: every tap of each offset group sampled by one
    `grid_sample` (bilinear, zeros outside), times the mask, then a grouped im2col matmul."""
    n, channels, height, width = x.shape
    out_channels, in_per_group, kh, kw = weight.shape
    oh, ow = offset.shape[2:]
    taps, groups = kh * kw, channels // in_per_group
    offset_groups = offset.shape[1] // (2 * taps)
    rows = (torch.arange(oh, dtype=x.dtype) * stride[0] - padding[0])[None, :] \
        + (torch.arange(kh, dtype=x.dtype) * dilation[0]).repeat_interleave(kw)[:, None]
    cols = (torch.arange(ow, dtype=x.dtype) * stride[1] - padding[1])[None, :] \
        + (torch.arange(kw, dtype=x.dtype) * dilation[1]).repeat(kh)[:, None]
    delta = offset.view(n, offset_groups, taps, 2, oh, ow)
    y = delta[:, :, :, 0] + rows.view(taps, oh, 1)
    x_at = delta[:, :, :, 1] + cols.view(taps, 1, ow)
    grid = torch.stack(((2 * x_at + 1) / width - 1, (2 * y + 1) / height - 1), dim=-1).view(n * offset_groups, taps * oh, ow, 2)
    sampled = F.grid_sample(x.reshape(n * offset_groups, channels // offset_groups, height, width), grid,
                            mode="bilinear", padding_mode="zeros", align_corners=False)
    if mask is not None:
        sampled = sampled * mask.reshape(n * offset_groups, 1, taps * oh, ow)
    columns = sampled.reshape(n, groups, in_per_group * taps, oh * ow)
    out = torch.matmul(weight.reshape(groups, out_channels // groups, in_per_group * taps), columns)
    out = out.reshape(n, out_channels, oh, ow)
    return out + bias.view(1, -1, 1, 1) if bias is not None else out


@torch.library.custom_op(DEFORM_TORCH_OP, mutates_args=())
def _deform_conv2d(
    x: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor | None,
    stride: list[int], padding: list[int], dilation: list[int],
) -> Tensor:
    return deform_conv2d_reference(x, offset, weight, bias, mask, tuple(stride), tuple(padding), tuple(dilation))  # type: ignore[arg-type]


@_deform_conv2d.register_fake
def _deform_conv2d_fake(
    x: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor | None,
    stride: list[int], padding: list[int], dilation: list[int],
) -> Tensor:
    return x.new_empty((x.shape[0], weight.shape[0], *offset.shape[2:]))


def deform_conv2d(
    input: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None = None,
    stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1,
    mask: Tensor | None = None,
) -> Tensor:
    """Deformable convolution (DCNv1, and DCNv2 with `mask`) with `torchvision.ops.deform_conv2d`'s
    signature and semantics, for code that has no torchvision: input `[N, C, H, W]`, offset
    `[N, 2·offset_groups·kh·kw, oH, oW]` ((Δy, Δx) per tap), weight `[out, C/groups, kh, kw]`
    (groups = C / weight's second dim), mask `[N, offset_groups·kh·kw, oH, oW]`. Differentiable
    in eager mode; exported (either exporter) as one ONNX `DeformConv` node, or below opset 19 by
    `convlower.export` as one `convlower.DeformConv` carrier that runs by its function body.
    """
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    kh, kw = weight.shape[2:]
    if torch.onnx.is_in_onnx_export() and not torch.jit.is_tracing():
        inputs = (input, weight, offset, bias, mask)
        attrs = _deform_attrs(input.shape[1], weight.shape, offset.shape[1], stride, padding, dilation)
        return torch.onnx.ops.symbolic(
            "::DeformConv", inputs, attrs, dtype=input.dtype, shape=[input.shape[0], weight.shape[0], *offset.shape[2:]],
        )
    if torch.jit.is_tracing():
        return _deform_conv2d(input, offset, weight, bias, mask, list(stride), list(padding), list(dilation))
    if input.shape[1] % weight.shape[1] or offset.shape[1] % (2 * kh * kw):
        raise ValueError(f"input {tuple(input.shape)}, weight {tuple(weight.shape)} and offset {tuple(offset.shape)} "
                         "do not make whole groups and offset groups")
    return deform_conv2d_reference(input, offset, weight, bias, mask, stride, padding, dilation)


def _deform_attrs(channels: int, weight_shape: Sequence[int], offset_channels: int, stride: Sequence[int],
                  padding: Sequence[int], dilation: Sequence[int]) -> dict[str, Any]:
    """The DeformConv node's attributes, for either exporter: groups and offset groups read off the shapes."""
    kh, kw = int(weight_shape[2]), int(weight_shape[3])
    return {"kernel_shape": [kh, kw], "strides": list(stride), "pads": [*padding, *padding], "dilations": list(dilation),
            "group": int(channels) // int(weight_shape[1]), "offset_group": int(offset_channels) // (2 * kh * kw)}


@symbolic_helper.parse_args("v", "v", "v", "v", "v", "is", "is", "is")
def _deform_symbolic(g, x, offset, weight, bias, mask, stride, padding, dilation):  # noqa: ANN001 - TorchScript graph values
    """The TorchScript exporter's translation of `convlower.ops.deform_conv2d`: one ONNX `DeformConv` (opset 19+)."""
    return _deform_node(g, x, weight, offset, bias, mask, stride, padding, dilation)


@symbolic_helper.parse_args("v", "v", "v", "v", "v", "i", "i", "i", "i", "i", "i", "i", "i", "b")
def _torchvision_deform_symbolic(g, x, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w,  # noqa: ANN001
                                 dilation_h, dilation_w, groups, offset_groups, use_mask):
    """The TorchScript exporter's translation of `torchvision.ops.deform_conv2d`, which torch has
    none of (the dynamo exporter's comes with onnxscript): one ONNX `DeformConv` (opset 19+).
    torchvision passes a zero bias where there is none, and a placeholder mask where `use_mask` is false."""
    return _deform_node(g, x, weight, offset, bias, mask if use_mask else None,
                        (stride_h, stride_w), (pad_h, pad_w), (dilation_h, dilation_w))


def _deform_node(g, x, weight, offset, bias, mask, stride, padding, dilation):  # noqa: ANN001 - TorchScript graph values
    attrs = _deform_attrs(x.type().varyingSizes()[1], weight.type().varyingSizes(), offset.type().varyingSizes()[1],
                          stride, padding, dilation)
    inputs = [x, weight, offset, bias, mask]
    while inputs and (inputs[-1] is None or symbolic_helper._is_none(inputs[-1])):
        inputs.pop()
    inputs = [g.op("Constant", value_t=torch.tensor([], dtype=torch.float32)) if v is None or symbolic_helper._is_none(v) else v
              for v in inputs]
    return g.op("DeformConv", *inputs, **{f"{name}_i": value for name, value in attrs.items()})


torch.onnx.register_custom_op_symbolic(DEFORM_TORCH_OP, _deform_symbolic, 1)
# Opset 1, the lowest: a translation the user registers for an opset of their own (deform_conv2d_onnx_exporter's, at
# 12) takes precedence from that opset on.
torch.onnx.register_custom_op_symbolic(TORCHVISION_DEFORM_OP, _torchvision_deform_symbolic, 1)
