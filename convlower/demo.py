"""`convlower demo`: convlower's main job on a bundled model, with nothing but the install.

Exports a zoo model whose dynamic filters (or cost volume) are written the plain-torch way (unfold,
multiply, sum; a volume filled by slice assignment), optimizes it (tuning from scratch, so the progress bar shows real work), prints the
per-node table and the end-to-end speedup, and checks the optimized model against torch eager.
With `report`, the optimize report goes there as JSON, with a `demo` entry: the model, its input
shapes, and the optimized model's max abs error against torch eager, for scripts and tests to read
instead of the rendered table.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from rich.console import Console

from convlower.models import CORRELATION, DYNAMIC_FILTER, FAMILIES, MIN_OPSET, ZOO

from . import console
from .errors import UsageError
from .modelio import write_text_atomic
from .optimize import optimize
from .runner import Runner

DEFAULT_MODEL = "involution"
DEMO_MODELS = (*DYNAMIC_FILTER, *CORRELATION, "dcn_head")
TORCH_ATOL = 1e-3
"""The optimized model's outputs must be within this of torch eager's for the demo to succeed."""


def run_demo(model: str = DEFAULT_MODEL, provider: str = "auto", report: Path | None = None) -> int:
    """Export, optimize and check one dynamic-filter or cost-volume zoo model at its realistic size;
    0 when it verified and agrees with torch eager, else 1."""
    if model not in DEMO_MODELS:
        raise UsageError(f"demo model {model!r} is not a dynamic-filter, cost-volume or deformable zoo model",
                         f"choose one of {', '.join(DEMO_MODELS)}")
    try:
        import torch
    except ImportError as exc:
        raise UsageError("convlower demo exports a torch model, and torch is not installed",
                         "pip install 'convlower[torch]'") from exc
    from .export import export

    terminal = Console(width=160)
    module, inputs = ZOO[model]("realistic")
    shapes = ", ".join("x".join(map(str, t.shape)) for t in inputs)
    terminal.print(f"[bold]{model}[/bold]: {FAMILIES[model]}\ninputs {shapes}; exporting with torch.onnx (TorchScript exporter)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = export(module, inputs, dynamo=False, opset=MIN_OPSET.get(model, 18))
    feeds = {i.name: t.numpy() for i, t in zip(exported.graph.input, inputs)}

    started = time.perf_counter()
    result = optimize(exported, inputs=feeds, provider=provider, cache=None, progress=sys.stderr.isatty())
    terminal.print(result.report.table())
    for notice in result.report.notices:
        console.notice(notice)

    with torch.inference_mode():
        expected = module(*inputs).numpy()
    (got,) = Runner(provider, quiet=True).session(result.model).run(feeds)
    error = float(np.max(np.abs(got - expected)))
    terminal.print(f"optimized model vs torch eager: max abs error {error:.2e}")
    terminal.print(f"[bold]{result.report.summary()}[/bold]; took {time.perf_counter() - started:.0f} s")
    if report is not None:
        demo = {"model": model, "inputs": [list(t.shape) for t in inputs], "max_abs_err_vs_torch": error}
        write_text_atomic(report, json.dumps(result.report.to_dict() | {"demo": demo}, indent=2))
    return 0 if result.report.verification.get("passed") is not False and error < TORCH_ATOL else 1
