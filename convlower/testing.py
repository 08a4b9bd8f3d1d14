"""Equivalence assertions for pytest: `assert_equivalent(a, b)` fails with the worst output and where."""

from __future__ import annotations

from .inputs import Feeds
from .modelio import ModelLike
from .verify import VerifyResult, verify


def assert_equivalent(
    reference: ModelLike,
    candidate: ModelLike,
    *,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    inputs: str | Feeds | None = None,
    runs: int = 3,
    atol: float | None = None,
    rtol: float | None = None,
    provider: str = "cpu",
) -> VerifyResult:
    """Assert two models compute the same outputs within tolerance; returns the comparison.

    The failure message names the worst output, the element where it differs most, both values,
    and the full table.
    """
    result = verify(
        reference, candidate, input_shapes=input_shapes, inputs=inputs, runs=runs, atol=atol, rtol=rtol, provider=provider
    )
    if not result:
        worst = result.worst
        where = (
            f"output {worst.name!r} at {worst.worst_index}: reference {worst.worst_reference:.6g}, "
            f"candidate {worst.worst_candidate:.6g} ({worst.mismatches} of {worst.size} elements beyond "
            f"atol={worst.atol:g} rtol={worst.rtol:g})"
            if worst is not None
            else "; ".join(result.problems)
        )
        raise AssertionError(f"models are not equivalent: {where}\n{result}")
    return result
