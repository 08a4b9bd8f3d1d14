"""Every registered variant except `native` made deliberately wrong: its first output plus 0.05.

For `pytest --sabotage-variants` (tests/conftest.py) and, through `sitecustomize.py` beside this
file, the `python -m convlower` subprocesses that tests start: with the variants wrong, tests must
fail in every family's file and in the end-to-end tests, or they do not check what they claim.

Product code reaches variants only through the registry `convlower.passes.FAMILIES` (`family_for`,
`FAMILIES.get`, `entry.family.variants`), so the registry's entries are replaced by copies whose
variants build wrong. The canonical ops' function bodies are built by the pass modules' own build
functions, not through the registry, so they stay right, and so does `native`, which keeps the op.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import onnx_graphsurgeon as gs

OFFSET = 0.05
UNTOUCHED = "native"

BuildFn = Callable[[Any, Any, Sequence[gs.Tensor], Sequence[gs.Variable]], None]


def off_by(offset: float, build_fn: BuildFn) -> BuildFn:
    """A build that runs `build_fn` into a fresh tensor, then writes that tensor plus `offset` to the first output."""

    def build(b: Any, spec: Any, inputs: Sequence[gs.Tensor], outputs: Sequence[gs.Variable]) -> None:
        first = outputs[0]
        name = b.graph._generate_name(f"{b.prefix}/right", set(b.graph.tensors().keys()))
        right = gs.Variable(name, dtype=first.dtype, shape=first.shape)
        build_fn(b, spec, inputs, [right, *outputs[1:]])
        b.add(right, b.scalar(offset), out=first)

    return build


def make_variants_wrong(offset: float = OFFSET) -> list[str]:
    """Replace every registry entry by one whose non-native variants are off by `offset`; returns
    the names of the variants made wrong ("Op.variant"). Idempotent: wrong variants are marked."""
    from convlower.passes import FAMILIES
    from convlower.passes.base import SimpleVariant

    wrong = []
    for key, family in list(FAMILIES.items()):
        variants = []
        for variant in family.variants:
            if variant.name != UNTOUCHED and not getattr(variant.build_fn, "sabotaged", False):
                if not isinstance(variant, SimpleVariant):
                    raise TypeError(f"{family.op_type}.{variant.name} is a {type(variant).__name__}; only SimpleVariant is wrapped")
                build = off_by(offset, variant.build_fn)
                build.sabotaged = True  # type: ignore[attr-defined]
                variant = dataclasses.replace(variant, build_fn=build)
                wrong.append(f"{family.op_type}.{variant.name}")
            variants.append(variant)
        FAMILIES[key] = dataclasses.replace(family, variants=tuple(variants))
    return wrong
