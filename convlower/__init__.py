"""convlower: lower Conv-like ONNX nodes into faster, verified subgraphs of standard ops.

Public API: `optimize`, `verify`, `lower`, `bench`, `inspect_model`, `session` (an onnxruntime session with the
settings a model was tuned with), and `convlower.testing.assert_equivalent`.
"""

__version__ = "0.1.0"
"""Defined before the submodules are imported: optimize records it in the models it writes."""

from .bench import bench
from .errors import ConvlowerError, UsageError, VerificationError
from .export import export
from .inspect import inspect_model
from .lower import lower
from .optimize import OptimizeResult, optimize
from .settings import session
from .verify import verify

__all__ = ["ConvlowerError", "UsageError", "VerificationError", "bench", "export", "inspect_model", "lower", "optimize", "OptimizeResult", "session", "verify"]
