"""convlower: lower Conv-like ONNX nodes into faster, verified subgraphs of standard ops.

Public API: `optimize`, `verify`, `lower`, `bench`, `inspect_model`, and `convlower.testing.assert_equivalent`.
"""

from .bench import bench
from .errors import ConvlowerError, UsageError, VerificationError
from .export import export
from .inspect import inspect_model
from .lower import lower
from .optimize import OptimizeResult, optimize
from .verify import verify

__version__ = "0.1.0"

__all__ = ["ConvlowerError", "UsageError", "VerificationError", "bench", "export", "inspect_model", "lower", "optimize", "OptimizeResult", "verify"]
