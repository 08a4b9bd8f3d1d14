"""Numeric equivalence of two models: the same inputs in, outputs compared within tolerance.

Per output it reports what Polygraphy reports: max absolute error, max relative error, mean
absolute error, and the count of elements outside `atol + rtol * |reference|`, plus where the
worst one is. Tolerances default by dtype (`DEFAULT_TOLERANCES`): lowering reorders float sums, so
float32 gets 1e-3 absolute and relative; integers and bools must match exactly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from .inputs import Feeds, complete_feeds, feeds_shapes, load_npz
from .modelio import ModelLike, load_model
from .runner import RunError, Runner
from .shapes import InputInfo, graph_inputs, resolve_shapes

DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-7, 1e-6),
    "float32": (1e-3, 1e-3),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}


def tolerances(dtype: np.dtype, atol: float | None = None, rtol: float | None = None) -> tuple[float, float]:
    """(atol, rtol) for a dtype, where the caller has not set them; exact for ints and bools."""
    default = DEFAULT_TOLERANCES.get(np.dtype(dtype).name, (0.0, 0.0))
    return (default[0] if atol is None else atol, default[1] if rtol is None else rtol)


@dataclass
class OutputDiff:
    """How one output of the candidate differs from the reference, over all input sets."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    max_abs_err: float
    max_rel_err: float
    mean_abs_err: float
    mismatches: int
    size: int
    worst_index: tuple[int, ...]
    worst_reference: float
    worst_candidate: float
    atol: float
    rtol: float
    note: str | None = None

    @property
    def passed(self) -> bool:
        return self.mismatches == 0 and self.note is None


@dataclass
class VerifyResult:
    """Truthy when every output agrees; prints as a table."""

    outputs: list[OutputDiff]
    input_sets: int
    provider: str
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems and all(o.passed for o in self.outputs)

    def __bool__(self) -> bool:
        return self.passed

    @property
    def max_abs_err(self) -> float:
        return max((o.max_abs_err for o in self.outputs), default=0.0)

    @property
    def max_rel_err(self) -> float:
        return max((o.max_rel_err for o in self.outputs), default=0.0)

    @property
    def worst(self) -> OutputDiff | None:
        """The output with the most mismatches, then the largest absolute error."""
        return max(self.outputs, key=lambda o: (not o.passed, o.mismatches, o.max_abs_err), default=None)

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "max_abs_err": self.max_abs_err,
            "max_rel_err": self.max_rel_err,
            "input_sets": self.input_sets,
            "provider": self.provider,
            "problems": self.problems,
            "outputs": [asdict(o) | {"passed": o.passed} for o in self.outputs],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        lines = [f"{'output':<24} {'shape':<18} {'max abs':>10} {'max rel':>10} {'mean abs':>10} {'mismatch':>10}  ok"]
        for o in self.outputs:
            mismatch = f"{o.mismatches}/{o.size}"
            lines.append(
                f"{o.name[:24]:<24} {'x'.join(map(str, o.shape)) or 'scalar':<18} {o.max_abs_err:>10.3g} "
                f"{o.max_rel_err:>10.3g} {o.mean_abs_err:>10.3g} {mismatch:>10}  {'yes' if o.passed else 'NO'}"
            )
            if o.note:
                lines.append(f"  {o.note}")
        lines.extend(f"problem: {p}" for p in self.problems)
        verdict = "equivalent" if self.passed else "NOT equivalent"
        lines.append(f"{verdict} over {self.input_sets} input set(s) on {self.provider}")
        return "\n".join(lines)


def compare(name: str, reference: np.ndarray, candidate: np.ndarray, atol: float | None, rtol: float | None) -> OutputDiff:
    """Error statistics of one output pair. Equal values (the same infinity, NaN in the same place)
    count as equal; anything else where the reference is not finite is a mismatch, since no
    tolerance around an infinity means anything."""
    ref = np.asarray(reference)
    cand = np.asarray(candidate)
    a, r = tolerances(ref.dtype, atol, rtol)
    base = dict(name=name, shape=tuple(ref.shape), dtype=ref.dtype.name, atol=a, rtol=r)
    if ref.shape != cand.shape or ref.dtype != cand.dtype:
        return OutputDiff(
            **base, max_abs_err=float("inf"), max_rel_err=float("inf"), mean_abs_err=float("inf"),
            mismatches=ref.size, size=ref.size, worst_index=(), worst_reference=float("nan"),
            worst_candidate=float("nan"),
            note=f"candidate is {cand.dtype.name} {tuple(cand.shape)}, reference is {ref.dtype.name} {tuple(ref.shape)}",
        )
    ref64 = ref.astype(np.float64)
    cand64 = cand.astype(np.float64)
    same = (ref64 == cand64) | (np.isnan(ref64) & np.isnan(cand64))
    with np.errstate(invalid="ignore"):
        diff = np.where(same, 0.0, np.abs(ref64 - cand64))
    diff = np.where(np.isnan(diff), np.inf, diff)
    rel = diff / np.maximum(np.abs(ref64), np.finfo(np.float64).tiny)
    rel = np.where(diff == 0, 0.0, rel)
    bad = ~same & (~np.isfinite(ref64) | (diff > a + r * np.abs(ref64)))
    worst = np.unravel_index(int(np.argmax(diff)), ref.shape) if ref.size else ()
    return OutputDiff(
        **base,
        max_abs_err=float(diff.max()) if ref.size else 0.0,
        max_rel_err=float(rel.max()) if ref.size else 0.0,
        mean_abs_err=float(diff.mean()) if ref.size else 0.0,
        mismatches=int(bad.sum()),
        size=int(ref.size),
        worst_index=tuple(int(i) for i in worst),
        worst_reference=float(ref64[worst]) if ref.size else 0.0,
        worst_candidate=float(cand64[worst]) if ref.size else 0.0,
    )


def merge(diffs: list[OutputDiff]) -> OutputDiff:
    """One output's statistics over several input sets: worst case, summed mismatches."""
    worst = max(diffs, key=lambda d: d.max_abs_err)
    merged = OutputDiff(**asdict(worst))
    merged.max_rel_err = max(d.max_rel_err for d in diffs)
    merged.mean_abs_err = float(np.mean([d.mean_abs_err for d in diffs]))
    merged.mismatches = sum(d.mismatches for d in diffs)
    merged.size = sum(d.size for d in diffs)
    merged.note = next((d.note for d in diffs if d.note), None)
    return merged


def input_sets(
    model: onnx.ModelProto,
    *,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    inputs: str | Feeds | None = None,
    runs: int = 3,
    seed: int = 0,
) -> list[Feeds]:
    """The feeds to compare on: the given arrays once when they cover every input, else `runs`
    seeded sets in which the inputs not given are random (the given ones fixed)."""
    infos = graph_inputs(model)
    given = given_arrays(infos, inputs)
    if all(info.name in given for info in infos):
        return [given]
    shapes = resolve_shapes(infos, {**(input_shapes or {}), **feeds_shapes(given)})
    return [complete_feeds(infos, given, shapes, seed=seed + i) for i in range(runs)]


def given_arrays(infos: list[InputInfo], inputs: str | Feeds | None) -> Feeds:
    """The arrays the user gave, by input name: from an .npz path or a dict; none when None."""
    if inputs is None:
        return {}
    return load_npz(inputs, infos) if not isinstance(inputs, dict) else dict(inputs)


def verify(
    reference: ModelLike,
    candidate: ModelLike,
    *,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    inputs: str | Feeds | None = None,
    runs: int = 3,
    atol: float | None = None,
    rtol: float | None = None,
    provider: str = "cpu",
    runner: Runner | None = None,
) -> VerifyResult:
    """Run both models on the same inputs and compare every output.

    `inputs` is an .npz path or a dict of arrays; otherwise `runs` random input sets are made at
    `input_shapes` (symbolic dims default as `convlower.shapes` documents).
    """
    ref_model = load_model(reference)
    cand_model = load_model(candidate)
    runner = runner or Runner(provider, quiet=True)
    problems = _interface_problems(ref_model, cand_model)
    if problems:
        return VerifyResult([], 0, runner.provider, problems)
    sets = input_sets(ref_model, input_shapes=input_shapes, inputs=inputs, runs=runs)
    ref_session = runner.session(ref_model, what="the reference model")
    cand_session = runner.session(cand_model, what="the candidate model")
    per_output: dict[str, list[OutputDiff]] = {}
    for feeds in sets:
        ref_out = ref_session.run(feeds)
        try:
            cand_out = dict(zip(cand_session.output_names, cand_session.run(feeds)))
        except RunError as exc:
            return VerifyResult([], len(sets), runner.provider, [f"the candidate fails where the reference runs: {exc.what}"])
        for name, value in zip(ref_session.output_names, ref_out):
            per_output.setdefault(name, []).append(compare(name, value, cand_out[name], atol, rtol))
    return VerifyResult([merge(d) for d in per_output.values()], len(sets), runner.provider)


def _interface_problems(ref: onnx.ModelProto, cand: onnx.ModelProto) -> list[str]:
    problems = []
    ref_in = {i.name for i in graph_inputs(ref)}
    cand_in = {i.name for i in graph_inputs(cand)}
    if ref_in != cand_in:
        problems.append(f"inputs differ: reference {sorted(ref_in)}, candidate {sorted(cand_in)}")
    ref_out = [o.name for o in ref.graph.output]
    cand_out = {o.name for o in cand.graph.output}
    missing = [n for n in ref_out if n not in cand_out]
    if missing:
        problems.append(f"candidate lacks output(s) {missing}")
    return problems

