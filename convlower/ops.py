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
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.onnx import symbolic_helper

from convlower.passes.dynamic_filter import OP_TYPE, SlidingWindow
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


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 - torch.library's callback signature
    x, filters, *window = inputs
    ctx.save_for_backward(x, filters)
    ctx.window = _window(*window)


def _backward(ctx, grad: Tensor):  # noqa: ANN001 - torch.library's callback signature
    """Gradients by differentiating the reference on the saved inputs."""
    x, filters = ctx.saved_tensors
    with torch.enable_grad():
        x, filters = x.detach().requires_grad_(), filters.detach().requires_grad_()
        grad_x, grad_filters = torch.autograd.grad(reference(x, filters, ctx.window), (x, filters), grad)
    return grad_x, grad_filters, None, None, None, None


torch.library.register_autograd(TORCH_OP, _backward, setup_context=_setup_context)


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
