"""`convlower.export`: torch.onnx.export with convlower's ops in place, returning a runnable model.

The model it returns carries, for each canonical node (`convlower.DynamicFilter` from
`convlower.ops.dynamic_filter`, `convlower.LocalCorrelation` from `convlower.ops.local_correlation`),
the model-local function that onnxruntime runs, at an IR version the installed onnxruntime reads.
torch is imported only when `export` is called: it is an optional extra of convlower.
"""

from __future__ import annotations

import inspect
import io
import os
import warnings
from typing import Any, Mapping, Sequence

import onnx

from convlower.passes.deform_conv import CARRIER_OPSET, carry_below_opset_19
from convlower.passes.local_functions import DOMAIN, DOMAIN_VERSION, attach_functions

from .errors import UsageError
from .modelio import runtime_compatible, save_model

BATCH_DIM = "batch"


def export(
    module: Any,
    example_inputs: Any,
    path: str | os.PathLike | None = None,
    *,
    dynamo: bool = True,
    opset: int = 18,
    dynamic_batch: bool = False,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    **export_kwargs: Any,
) -> onnx.ModelProto:
    """Export a torch module to ONNX; `convlower.ops.dynamic_filter` becomes `convlower.DynamicFilter`
    and `convlower.ops.local_correlation` becomes `convlower.LocalCorrelation`.

    example_inputs: one tensor or a tuple of positional inputs. dynamo picks the exporter: the
    dynamo one (torch.export; opset 18 and newer) or the TorchScript one (`dynamo=False`).
    dynamic_batch makes axis 0 of every input and output a symbolic `batch` dim (use an example
    batch larger than 1 with the dynamo exporter). dynamic_axes names more symbolic dims, as
    `{"x": {0: "batch", 2: "time"}, "filters": {0: "batch", 3: "time"}}`: one name is one dim
    wherever it appears (the dynamo exporter makes one `torch.export.Dim` of it and derives the
    outputs' dims itself; the TorchScript exporter also takes output names here). Example sizes of
    a dynamic dim should be larger than 1 and differ from the static dims, as torch.export needs.
    Inputs are named after `forward`'s parameters unless `input_names` says otherwise. Other
    keyword arguments go to torch.onnx.export. The model is also written to `path` when one is given.
    """
    import torch

    from . import ops  # noqa: F401 - registers the ops' symbolics for the TorchScript exporter

    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    names = list(input_names) if input_names is not None else _parameter_names(module, len(args))
    axes = {name: dict(dims) for name, dims in (dynamic_axes or {}).items()}
    if dynamo:
        dims = {dim: torch.export.Dim(dim) for per_input in axes.values() for dim in per_input.values()}
        dims.setdefault(BATCH_DIM, torch.export.Dim(BATCH_DIM))
        shapes = [
            ({0: dims[BATCH_DIM]} if dynamic_batch else {}) | {axis: dims[dim] for axis, dim in axes.get(name, {}).items()}
            for name in names
        ]
        with warnings.catch_warnings():  # torch warns when several inputs share one dim
            warnings.filterwarnings("ignore", message="# The axis name: .* will not be used")
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                opset_version=opset,
                input_names=names,
                output_names=output_names,
                dynamic_shapes=tuple(shape or None for shape in shapes) if any(shapes) else None,
                **export_kwargs,
            )
        model = program.model_proto
    else:
        buffer = io.BytesIO()
        if (dynamic_batch or axes) and output_names is None:
            output_names = _output_names(module, args)
        legacy_axes = {
            name: ({0: BATCH_DIM} if dynamic_batch else {}) | axes.get(name, {}) for name in [*names, *(output_names or [])]
        }
        torch.onnx.export(
            module,
            args,
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=names,
            output_names=output_names,
            dynamic_axes={name: dims for name, dims in legacy_axes.items() if dims} or None,
            custom_opsets={DOMAIN: DOMAIN_VERSION},
            **export_kwargs,
        )
        model = onnx.load_from_string(buffer.getvalue())
    if opset < CARRIER_OPSET and any(n.op_type == "DeformConv" for n in model.graph.node):
        raise UsageError(f"the module calls deform_conv2d, which below opset 19 exports as a convlower.DeformConv whose "
                         f"function body needs opset {CARRIER_OPSET}; this export is at opset {opset}",
                         f"export with opset={CARRIER_OPSET} or later (19 and later: ONNX's own DeformConv)")
    runtime_compatible(attach_functions(carry_below_opset_19(model)))
    if path is not None:
        save_model(model, path)
    return model


def _parameter_names(module: Any, count: int) -> list[str]:
    """The names of `forward`'s first positional parameters, so both exporters name inputs alike."""
    parameters = [
        p.name
        for p in inspect.signature(module.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return parameters[:count] if len(parameters) >= count else [f"input_{i}" for i in range(count)]


def _output_names(module: Any, args: tuple) -> list[str]:
    """Names for the module's outputs (the TorchScript exporter needs them to make axes dynamic)."""
    import torch

    with torch.inference_mode():
        outputs = module(*args)
    count = len(outputs) if isinstance(outputs, (tuple, list)) else 1
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]
