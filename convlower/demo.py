"""`convlower demo`: convlower's job on a bundled model, with nothing but the install.

Builds the bundled conv block (models/builders.py), lists its Conv nodes and their variants,
lowers it with each Conv variant, verifies every result against the original and times it
interleaved with the original on onnxruntime.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from convlower.models.builders import conv_block
from convlower.passes import FAMILIES

from .inspect import inspect_model, to_table
from .lower import lower
from .runner import Runner, TimingPolicy, time_interleaved
from .verify import input_sets, verify


def run_demo() -> int:
    model = conv_block(channels=32, size=64)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "conv_block.onnx"
        path.write_bytes(model.SerializeToString())
        print(f"bundled model: conv_block (3x64x64 -> 64x32x32), {len(model.graph.node)} nodes\n")
        print(to_table(inspect_model(path)))
        runner = Runner("auto")
        feeds = input_sets(model, input_shapes={"x": (1, 3, 64, 64)}, runs=1)[0]
        print(f"\n{'Conv variant':<18} {'lowered':>8} {'verified':>9} {'median ms':>10} {'vs original':>12}")
        failed = 0
        for name in FAMILIES["conv"].variant_names:
            result = lower(model, {"conv": name})
            check = verify(model, result.model, inputs=feeds, runner=runner)
            original, lowered = time_interleaved(
                [runner.session(model), runner.session(result.model)], feeds, TimingPolicy(budget_s=0.5)
            )
            failed += not check
            print(
                f"{name:<18} {len(result.lowered):>5}/{len(result.nodes):<2} {'yes' if check else 'NO':>9} "
                f"{lowered.median_ms:>10.3f} {original.median_ms / lowered.median_ms:>11.2f}x"
            )
        print(f"\nprovider: {runner.provider} ({runner.device})")
    return 1 if failed else 0
