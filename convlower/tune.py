"""Tuning one node: micro-models of the original and of each variant, checked, then timed together.

A micro-model holds just one node (or one variant's replacement of it) with the node's real
input shapes and dtype, its weights as initializers as in deployment (so onnxruntime's weight
pre-packing counts), and the model's opsets and canonical-op functions. Every variant's output
is checked against the original node's before it is timed; one that fails to load, to run or to
agree is rejected with the reason. The original and the surviving variants are then timed
interleaved, and a variant is chosen only when it beats the original by `MIN_GAIN`: ties and
noise keep the original.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from convlower.passes import Builder, Variant, spec_key
from convlower.passes.base import constant_value
from convlower.passes.local_functions import attach_functions

from .errors import UsageError
from .inputs import random_inputs
from .runner import Runner, TimingPolicy, time_interleaved
from .shapes import graph_inputs
from .verify import OutputDiff, compare
from .rewrite import sort_nodes

ORIGINAL = "original"
NATIVE = "native"
"""The variant that keeps the op itself: the original node is what it means, so it is not timed twice."""
MIN_GAIN = 0.03
"""A variant must be at least this much faster than the original node to replace it."""


@dataclass
class VariantOutcome:
    """One variant on one node: ok with a median, not applicable, or rejected, with the reason."""

    status: str
    ms: float | None = None
    max_abs_err: float | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class NodeTuning:
    """The tuning of one distinct (spec, input shapes): the original's median and each variant's outcome."""

    original_ms: float
    outcomes: dict[str, VariantOutcome] = field(default_factory=dict)
    cached: bool = False


def micro_model(
    node: gs.Node,
    opset_imports: Sequence[onnx.OperatorSetIdProto],
    functions: Sequence[gs.Function],
    variant: Variant | None = None,
    spec: Any = None,
) -> onnx.ModelProto:
    """A model of just `node`, or of `variant`'s replacement of it when a variant is given."""
    opset = next(o.version for o in opset_imports if o.domain in ("", "ai.onnx"))
    graph = gs.Graph(opset=opset)
    inputs: list[gs.Tensor] = []
    for tensor in node.inputs:
        value = None if tensor.is_empty() else constant_value(tensor)
        if tensor.is_empty():
            inputs.append(gs.Variable.empty())
        elif value is not None:
            # an initializer shares its lazy values: an external weight stays a reference to its file
            inputs.append(gs.Constant(tensor.name, tensor._values if isinstance(tensor, gs.Constant) else value))
        else:
            inputs.append(gs.Variable(tensor.name, dtype=tensor.dtype, shape=tensor.shape))
            graph.inputs.append(inputs[-1])
    dtype = node.outputs[0].dtype or next((t.dtype for t in inputs if t.dtype is not None), np.float32)
    outputs = [gs.Variable(t.name, dtype=t.dtype or dtype, shape=t.shape) for t in node.outputs]
    graph.outputs = list(outputs)
    if variant is None:
        graph.layer(op=node.op, domain=node.domain, attrs=dict(node.attrs), inputs=inputs, outputs=outputs, name=node.name)
    else:
        variant.build(Builder(graph, opset, node.name, dtype=dtype), spec, inputs, outputs)
    used = {(n.domain, n.op) for n in graph.nodes}
    graph.functions = [f for f in functions if (f.domain, f.name) in used]
    sort_nodes(graph.cleanup())
    return attach_functions(gs.export_onnx(graph, do_type_check=False, opset_imports=list(opset_imports)))


def tune_node(
    node: gs.Node,
    spec: Any,
    candidates: Sequence[Variant],
    shapes: dict[str, tuple[int, ...]],
    *,
    opset_imports: Sequence[onnx.OperatorSetIdProto],
    functions: Sequence[gs.Function],
    runner: Runner,
    policy: TimingPolicy,
    atol: float | None = None,
    rtol: float | None = None,
) -> NodeTuning:
    """Check every candidate against the original node, then time the survivors with it."""
    original = micro_model(node, opset_imports, functions)
    feeds = random_inputs(graph_inputs(original), shapes)
    try:
        reference_session = runner.session(original, what=f"node {node.name!r}")
        reference = reference_session.run(feeds)
    except UsageError as exc:
        raise UsageError(f"node {node.name!r} ({node.op}) does not run on its own: {exc.what}", exc.fix) from exc
    outcomes: dict[str, VariantOutcome] = {}
    sessions = []
    for variant in candidates:
        if variant.name == NATIVE:
            outcomes[NATIVE] = VariantOutcome("ok", max_abs_err=0.0)
            continue
        try:
            session = runner.session(micro_model(node, opset_imports, functions, variant, spec), what=variant.name)
            got = session.run(feeds)
        except Exception as exc:  # noqa: BLE001 - any failure rejects the variant, with the reason
            outcomes[variant.name] = VariantOutcome("rejected", reason=f"fails to build, load or run: {_first_line(exc)}")
            continue
        diffs = [compare(str(i), r, g, atol, rtol) for i, (r, g) in enumerate(zip(reference, got))]
        error = max(d.max_abs_err for d in diffs)
        failed = [d for d in diffs if not d.passed]
        if failed:
            outcomes[variant.name] = VariantOutcome("rejected", max_abs_err=error, reason=_disagreement(failed[0]))
            continue
        outcomes[variant.name] = VariantOutcome("ok", max_abs_err=error)
        sessions.append((variant.name, session))
    timings = time_interleaved([reference_session] + [s for _, s in sessions], feeds, policy)
    for (name, _), timing in zip(sessions, timings[1:]):
        outcomes[name].ms = timing.median_ms
    if NATIVE in outcomes:
        outcomes[NATIVE].ms = timings[0].median_ms
    return NodeTuning(timings[0].median_ms, outcomes)


def choose(tuning: NodeTuning, *, recognized: bool = False, standard_op: bool = False) -> str:
    """The fastest verified variant if it beats the original by MIN_GAIN, else the original.

    A `recognized` node (a canonical node a recognizer made from an exported idiom) has no
    original of its own to keep: keeping it means keeping the idiom, which its function body
    only stands in for. It gets its fastest verified variant; the guard still compares the
    whole model with the idiom as exported. Where the canonical node is a `standard_op` of ONNX
    (DeformConv), its `native` variant is the runtime's own kernel and a candidate like the rest.
    """
    timed = [(o.ms, name) for name, o in tuning.outcomes.items()
             if o.status == "ok" and o.ms is not None and _candidate(name, recognized, standard_op)]
    if not timed:
        return ORIGINAL
    ms, name = min(timed)
    return name if recognized or ms < tuning.original_ms * (1 - MIN_GAIN) else ORIGINAL


def _candidate(name: str, recognized: bool, standard_op: bool) -> bool:
    return name != NATIVE or (recognized and standard_op)


def choose_across(tunings: Sequence[NodeTuning], *, recognized: bool = False, standard_op: bool = False) -> str:
    """`choose` over several shape profiles: a variant verified at every profile and not slower
    than the original at any, whose geometric-mean ratio to the original beats it by MIN_GAIN.
    A `recognized` node takes the variant of least geometric-mean ratio (see `choose`)."""
    if len(tunings) == 1:
        return choose(tunings[0], recognized=recognized, standard_op=standard_op)
    verified = [{name for name, o in t.outcomes.items()
                 if o.status == "ok" and o.ms is not None and _candidate(name, recognized, standard_op)} for t in tunings]
    scored = []
    for name in set.intersection(*verified):
        ratios = [t.outcomes[name].ms / t.original_ms for t in tunings]  # type: ignore[operator]
        if recognized or max(ratios) <= 1.0:
            scored.append((float(np.exp(np.mean(np.log(ratios)))), name))
    if not scored:
        return ORIGINAL
    ratio, name = min(scored)
    return name if recognized or ratio < 1 - MIN_GAIN else ORIGINAL


def tuning_key(spec: Any, shapes: dict[str, tuple[int, ...]]) -> str:
    """What makes two nodes the same tuning problem: the spec and the concrete input shapes, in
    the node's input order (tensor names do not matter)."""
    return spec_key(spec) + "|" + ",".join("x".join(map(str, shape)) for shape in shapes.values())


def _disagreement(diff: OutputDiff) -> str:
    """Why a variant's output is rejected: its error against the tolerance it had to meet."""
    found = diff.note or f"{diff.mismatches} of {diff.size} elements differ, max abs err {diff.max_abs_err:.3g}"
    return f"output disagrees with the original node: {found} (atol {diff.atol:g}, rtol {diff.rtol:g})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
