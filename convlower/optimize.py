"""`convlower optimize`: the pipeline that picks the fastest verified variant for every node.

    load ─► normalize ─► recognize ─► plan ─► tune ─► rewrite ─► guard ─► report

- normalize: model-local functions other than convlower's canonical ops are inlined, so their
  nodes are planned too; symbolic input dims are bound to the profiling shapes.
- plan: every node a pass family knows, in the main graph and in If/Loop/Scan bodies; nodes with
  the same spec and input shapes are tuned once.
- tune: see `convlower.tune`; outcomes go to the tuning cache.
- guard: the original and optimized whole models run on the same inputs; outputs must agree and
  the optimized model must be measurably faster (interleaved medians, `MODEL_MIN_GAIN`). Outputs
  that disagree revert every choice; a model that is not faster loses the choices with the least
  predicted gain one at a time, and after `GUARD_ROUNDS` tries all of them: convlower never
  writes a model that is wrong or slower. `report.verification` says both whether the outputs
  agreed ("passed") and whether the model written is the input ("unchanged").
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from typing import Iterable, Mapping

import numpy as np
import onnx
import onnx.inliner
import onnx_graphsurgeon as gs
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from convlower.passes import FAMILIES, family_for, spec_dict
from convlower.passes.base import constant_value, onnx_dtype, onnx_nodes

from . import __version__
from .cache import TuningCache, default_cache_path
from .context import InNeighbourhood, NoNeighbourhood
from .errors import UsageError
from .inputs import Feeds, feeds_shapes
from .measure import Deadline, Measurements, Runs, Stopwatch, model_digest
from .modelio import ModelLike, default_opset, load_model
from .report import NodeReport, Report
from .rewrite import PlannedNode, all_graphs, apply_choices, finish, import_graph, plan_nodes, unlowered_conv_ops
from .runner import PairedPolicy, PairedRatio, RunError, Runner, TimingPolicy, time_paired
from .settings import SessionSettings
from .settings import candidates as settings_candidates
from .settings import record as record_settings
from .shapes import InputInfo, ShapeProfiles, graph_inputs, resolve_shapes, shape_profiles, with_static_inputs
from .tune import ORIGINAL, NodeTuning, VariantOutcome, choose_across, tune_node, tuning_key
from .verify import VerifyResult, compare, given_arrays, input_sets, verify

MODEL_MIN_GAIN = 0.01
"""The optimized whole model is kept only when it is this much faster with `MODEL_POLICY.confidence`:
the whole interval of its time ratio to the original lies below 1 - MODEL_MIN_GAIN."""
CONFIRM_MIN_GAIN = 0.02
"""A group's choice is kept in context only when the model with it is this much faster with
confidence: twice the guard's `MODEL_MIN_GAIN`. The guard measures the kept choices again, and a
gain just clear of its own threshold in one measurement is inside it in the next about half the
time; with the margin, what the confirmation keeps the guard keeps."""
NEAR_TIE = 0.25
"""Variants whose node time came within this of the chosen one's meet it in the model: node times
that close do not say which is faster there (the oracle's whole-model search found a seed_filter
model 1.23x faster than the node times' choice), and choosing between them by node time alone
made repeated runs choose differently."""
MAX_CONTENDERS = 3
GUARD_ROUNDS = 3
NODE_POLICY = TimingPolicy(warmup=2, min_runs=10, max_runs=200, budget_s=1.0)
MODEL_POLICY = PairedPolicy(min_rounds=10, max_rounds=400, budget_s=6.0, confidence=0.95)
CONTEXT_POLICY = PairedPolicy(min_rounds=10, max_rounds=200, budget_s=3.0, confidence=0.95)
"""Confirming one group's choice in the whole model: shorter than the guard's check, as there is one per group."""
DUEL_POLICY = PairedPolicy(min_rounds=10, max_rounds=200, budget_s=2.0, confidence=0.95, precision=0.02)
"""Two near-tie variants of a kept group in the model: only which is faster matters, and a true tie
spends the whole budget before the registry's order decides."""

RESOLVABLE_GAIN = CONFIRM_MIN_GAIN / 2
"""A group whose predicted gain (its nodes' time saved alone) is below this share of the whole
model's time is not confirmed on its own: a confirmation resolves gains of `CONFIRM_MIN_GAIN`, and
such a group could only pass by chance. The small groups are confirmed together, after the others."""
TUNING_SHARE = 0.5
CONFIRMATION_SHARE = 0.75
"""With a `budget`, tuning starts no new group past this share of it, nor confirmation past that
share: the rest is the guard's, so that what is written is verified."""

USE_DEFAULT_CACHE = object()


@dataclass
class OptimizeResult:
    model: onnx.ModelProto
    report: Report


def parse_variant_filter(items: Iterable[str] | Mapping[str, Iterable[str]] | None) -> dict[str, set[str]]:
    """`["conv=im2col,einsum"]` -> {"conv": {"im2col", "einsum"}}: the variants the tuner may try."""
    if not items:
        return {}
    pairs = items.items() if isinstance(items, Mapping) else (_split_filter(item) for item in items)
    allowed: dict[str, set[str]] = {}
    for op, names in pairs:
        family = FAMILIES.get(op.lower())
        if family is None:
            raise UsageError(f"--variants: no variants are registered for op {op!r}",
                             f"ops with variants: {', '.join(f.op_type for f in FAMILIES.values())}")
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if family.variant(n) is None]
        if unknown:
            raise UsageError(f"--variants: {family.op_type} has no variant {unknown[0]!r}",
                             f"its variants: {', '.join(family.variant_names)}")
        allowed[op.lower()] = set(names)
    return allowed


def _split_filter(item: str) -> tuple[str, list[str]]:
    op, sep, names = item.partition("=")
    if not sep or not op or not names:
        raise UsageError(f"--variants {item!r} is not OP=V1,V2", "write it like conv=im2col,einsum")
    return op.strip(), [n.strip() for n in names.split(",") if n.strip()]


def inline_foreign_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Inline model-local functions, except the canonical ops a pass family lowers as a whole."""
    keep = [(f.domain, f.name) for f in model.functions if family_for(f.name, f.domain) is not None]
    if len(keep) == len(model.functions):
        return model
    return onnx.inliner.inline_selected_functions(model, keep, exclude=True)


def optimize(
    model: ModelLike,
    *,
    input_shapes: ShapeProfiles | None = None,
    inputs: str | Feeds | None = None,
    provider: str = "auto",
    threads: int | None = None,
    cache: str | None | object = USE_DEFAULT_CACHE,
    variants: Iterable[str] | Mapping[str, Iterable[str]] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    guard: bool = True,
    confirm: bool | str = "model",
    progress: bool = False,
    budget: float | None = None,
) -> OptimizeResult:
    """Tune every Conv-like node on onnxruntime and return the fastest verified model with a report.

    `input_shapes` binds symbolic dims: `{"x": (1, 3, 224, 224)}`, or several shapes of an input
    for several profiles, `{"x": [(1, 3, 320, 320), (1, 3, 960, 960)]}`: every node is then tuned
    at each, a variant replaces a node only where it is not slower at any, and the guard checks
    every profile. `cache` is a path, a `redis://` URL, a list of those (front first), a
    `TuningCache`, None for no cache, or by default the user's cache folder.
    `variants` limits the tuner (`{"conv": ["im2col"]}` or `["conv=im2col"]`). `confirm` is where
    the per-node choices are confirmed one group at a time before the guard (`_confirm_in_context`):
    "model" (or True) in the whole model, "neighbours" in a micro-model of the group's fusable
    neighbourhood (`convlower.context`), False nowhere (the guard only). With `guard=False` the
    whole model is neither verified nor timed (each node still is), nor are the choices confirmed.
    `budget` (seconds) bounds the whole run: tuning starts no group past `TUNING_SHARE` of it,
    confirmation none past `CONFIRMATION_SHARE`, and the guard checks what was found in what is
    left, so the model returned is verified; the groups left out are listed in `report.budget`.
    Whole-model measurements go to the cache with the node tunings (`convlower.measure`): a re-run
    of an unchanged model with a warm cache times nothing.
    """
    clock, deadline = Stopwatch(), Deadline(_check_budget(budget))
    method = confirm_method(confirm)
    allowed = parse_variant_filter(variants)
    runner = Runner(provider, threads, quiet=True)
    report = Report(runner.provider, runner.device, threads)
    if budget is not None:
        report.budget["seconds"] = budget
    if runner.notice:
        report.notices.append(runner.notice)
        report.provider_reason = runner.reason
    working = _prepare(model, input_shapes, inputs, runner, report)
    groups = _group(working.planned, working.static, report)
    cache_store = TuningCache.open(default_cache_path() if cache is USE_DEFAULT_CACHE else cache)  # type: ignore[arg-type]
    measure = Measurements(cache_store, model_digest(working.original), [report.profiles, _feeds_digest(working.feeds)],
                           _environment(runner, report, threads))
    clock.lap("recognition")
    if guard:
        runner = tune_settings(working.original, runner, working.timing_feeds, report, measurements=measure)
        measure.environment = _environment(runner, report, threads)
        clock.lap("settings")

    _tune(working, groups, report, runner, cache_store, measure.environment, allowed, deadline, progress, atol, rtol)
    report.tuning["seconds"] = clock.lap("tuning")
    choices = {n.name: n.chosen for n in report.nodes if n.chosen != ORIGINAL}
    if method and guard:
        members = {key: [entry.name for entry, _ in group] for key, group in groups.items()}
        choices = _confirm_in_context(working, choices, members, report, runner, working.timing_feeds, method,
                                      measurements=measure, deadline=deadline.share(CONFIRMATION_SHARE))
        report.tuning["confirm_seconds"] = clock.lap("confirmation")
    optimized = working.with_choices(choices)
    if guard:
        optimized = _guard(working, optimized, choices, report, runner, working.profiles, working.feeds, working.timing_feeds,
                           atol, rtol, measurements=measure, deadline=deadline)
        runner = _try_cuda_graph(optimized, runner, working.timing_feeds, report, atol, rtol)
        clock.lap("guard")
    else:
        report.verification = {"skipped": True}
    cache_store.save()
    if cache_store.errors:
        report.tuning["cache_errors"] = cache_store.errors
    report.measurements = {"timed": measure.timed, "cached": measure.cached}
    report.timing = clock.stages
    report.session_settings["chosen"] = runner.settings.to_dict()
    written = _record_profiles(optimized, working.profiles)
    record_settings(written, runner.settings)
    return OptimizeResult(written, report)


def _prepare(model: ModelLike, input_shapes: ShapeProfiles | None, inputs: str | Feeds | None, runner: Runner,
             report: Report) -> "WorkingModel":
    """Load and normalize the model, bind its profiles (each checked by one run), recognize its
    idioms, plan its nodes and find every tensor's shape at each profile: the working model every
    later stage takes."""
    proto = inline_foreign_functions(load_model(model))
    infos = graph_inputs(proto)
    feeds = given_arrays(infos, inputs)
    profiles = []
    for index, profile in enumerate(shape_profiles(input_shapes)):
        named = {**profile, **feeds_shapes(feeds)}
        shapes = resolve_shapes(infos, named, warn=index == 0)
        _check_profiling_run(runner, proto, infos, input_sets(proto, input_shapes=shapes, inputs=feeds, runs=1)[0], named, set(feeds))
        profiles.append(shapes)
    report.profiles = [{"shapes": {name: list(dims) for name, dims in shapes.items()}} for shapes in profiles]
    report.unlowered_ops = unlowered_conv_ops(proto)

    working = WorkingModel(proto)
    working.graph = import_graph(proto)
    working.planned = plan_nodes(working.graph, default_opset(proto))
    exported = {node.name for node in onnx_nodes(proto.graph)}
    # made by a recognizer: a name the export does not have, not one planning gave an unnamed node
    working.recognized_names = {e.name for e in working.planned if e.name not in exported and not e.named_by_plan}
    working.recognized = finish(proto, working.graph)
    working.profiles, working.feeds = profiles, feeds
    working.static = [_profile_shapes(working.recognized, working.planned, working.graph, shapes, feeds, runner) for shapes in profiles]
    working.timing_feeds = [input_sets(proto, input_shapes=shapes, inputs=feeds, runs=1, seed=1234)[0] for shapes in profiles]
    return working


def _tune(working: "WorkingModel", groups: dict[str, list[tuple[PlannedNode, list[dict[str, tuple[int, ...]]]]]],
          report: Report, runner: Runner, cache_store: TuningCache, environment: list, allowed: dict[str, set[str]],
          deadline: Deadline, progress: bool, atol: float | None, rtol: float | None) -> None:
    """Tune each group's distinct problems (from the cache when measured before) and report every
    member; past `TUNING_SHARE` of the budget, the groups left are reported untuned."""
    tuned: dict[str, NodeTuning] = {}
    timed = 0
    with _progress(progress) as bar:
        task = bar.add_task("tuning", total=len(groups))
        for members in groups.values():
            entry, node_shapes = members[0]
            if deadline.share(TUNING_SHARE).spent():
                report.nodes.extend(NodeReport(member.name, member.op, _shape_text(shapes[0]), spec_dict(member.spec), ORIGINAL,
                                               None, reason=f"not tuned: {deadline.describe()}") for member, shapes in members)
                report.budget.setdefault("not_tuned", []).extend(member.name for member, _ in members)
                continue
            bar.update(task, description=f"tuning {entry.op} {entry.name}"[:48])
            for shapes in node_shapes:
                key = tuning_key(entry.spec, shapes)
                if key in tuned:
                    continue
                tuning = _cached(cache_store, key, environment, entry, allowed)
                if tuning is None:
                    tuning = tune_node(
                        entry.node, entry.spec, _candidates(entry, allowed), shapes,
                        opset_imports=working.original.opset_import, functions=working.graph.functions,
                        runner=runner, policy=NODE_POLICY, atol=atol, rtol=rtol,
                    )
                    timed += 1
                    _store(cache_store, key, environment, tuning)
                tuned[key] = tuning
            report.nodes.extend(
                _node_report(member, member_shapes, [tuned[tuning_key(entry.spec, s)] for s in member_shapes], allowed,
                             recognized=member.name in working.recognized_names)
                for member, member_shapes in members
            )
            bar.advance(task)
    cache_store.save()
    order = {entry.name: index for index, entry in enumerate(working.planned)}
    report.nodes.sort(key=lambda n: order[n.name])
    report.tuning = {"distinct_specs": len(tuned), "timed": timed, "cached": len(tuned) - timed, "cache": cache_store.describe()}


def _environment(runner: Runner, report: Report, threads: int | None) -> list[object]:
    """What a measurement's cache key ends with: the session settings, device, onnxruntime, threads."""
    return [runner.settings.label(), runner.device, report.onnxruntime, threads]


def _feeds_digest(feeds: Feeds) -> str | None:
    """A digest of the arrays given with `inputs` (None without): measurements on other values are other keys."""
    if not feeds:
        return None
    digest = hashlib.sha256()
    for name in sorted(feeds):
        array = np.ascontiguousarray(feeds[name])
        digest.update(f"{name}|{array.dtype}|{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _check_budget(budget: float | None) -> float | None:
    if budget is not None and not budget > 0:
        raise UsageError(f"--budget {budget:g} is not a positive number of seconds", "give the seconds optimize may take, like --budget 30")
    return budget


class WorkingModel:
    """The model as the stages hand it on, each part computed once (by `_prepare`):

    - `original`: as given, functions other than canonical ops inlined: what is written when no
      choice holds, and the baseline every measurement compares with;
    - `graph`, `planned`, `recognized_names`: the graph with its idioms recognized and its nodes
      named and planned, and which planned nodes a recognizer made;
    - `recognized`: that graph as a model, from which every candidate is built without
      recognizing again (on a 2,000-node TorchScript stereo export, 0.03 s a candidate instead of
      0.7);
    - `profiles`, `feeds`, `static`, `timing_feeds`: each profile's input shapes, the arrays the
      user gave, every tensor's shape at each profile, and the seeded inputs all timing uses.

    The last `KEEP` candidates built are kept: a confirmation, its replicate and the guard ask for
    the same choices one after another. Made from a proto alone (`of`), candidates are built from
    `original`, recognizing its idioms each time."""

    KEEP = 2

    def __init__(self, original: onnx.ModelProto, recognized: onnx.ModelProto | None = None):
        self.original, self.recognized = original, recognized
        self.graph: gs.Graph | None = None
        self.planned: list[PlannedNode] = []
        self.recognized_names: set[str] = set()
        self.profiles: list[dict[str, tuple[int, ...]]] = []
        self.feeds: Feeds = {}
        self.static: list[dict[str, tuple[int, ...] | None]] = []
        self.timing_feeds: list[Feeds] = []
        self._built: dict[tuple[tuple[str, str], ...], onnx.ModelProto] = {}

    @classmethod
    def of(cls, model: "onnx.ModelProto | WorkingModel") -> "WorkingModel":
        return model if isinstance(model, WorkingModel) else cls(model)

    def with_choices(self, choices: Mapping[str, str]) -> onnx.ModelProto:
        """The model with `choices` applied (node name -> variant); the original for none."""
        if not choices:
            return self.original
        key = tuple(sorted(choices.items()))
        if key not in self._built:
            built = (apply_choices(self.recognized, choices, recognize=False) if self.recognized is not None
                     else apply_choices(self.original, choices))
            self._built = {**dict(list(self._built.items())[1 - self.KEEP:]), key: built}
        return self._built[key]


def _record_profiles(model: onnx.ModelProto, profiles: list[dict[str, tuple[int, ...]]]) -> onnx.ModelProto:
    """The model with the profiles it was tuned for and the convlower version in its metadata_props
    (`convlower.profiles`, JSON; `convlower.version`), replacing those of an earlier run."""
    stamp = {"convlower.version": __version__,
             "convlower.profiles": json.dumps([{name: list(dims) for name, dims in p.items()} for p in profiles])}
    kept = [entry for entry in model.metadata_props if entry.key not in stamp]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in stamp.items():
        model.metadata_props.add(key=key, value=value)
    return model


def tune_settings(
    model: onnx.ModelProto, runner: Runner, timing_feeds: list[Feeds], report: Report,
    candidates: list[tuple[str, SessionSettings | None, str | None]] | None = None,
    measurements: Measurements | None = None,
) -> Runner:
    """The runner with the session settings that make `model` fastest (`convlower.settings`).

    Each candidate changes one setting of the best so far and is kept only when the whole model
    is faster with it by `CONFIRM_MIN_GAIN`, with confidence, at every profile's inputs, so that
    node tuning, confirmation and the guard all measure against the best-configured original.
    CUDA graphs are left to `_try_cuda_graph`, on the model written. Every try, and why a
    setting did not apply or failed, goes to `report.session_settings["tried"]`. A setting measured
    before on the same model, inputs and environment is read from `measurements`' cache."""
    measure = measurements or Measurements.in_memory()
    tried = report.session_settings.setdefault("tried", [])
    found = settings_candidates(runner.settings, model, len(timing_feeds)) if candidates is None else candidates
    for name, candidate, why_not in found:
        if name == "enable_cuda_graph":
            continue
        if candidate is None:
            tried.append({"setting": name, "status": "not_applicable", "reason": why_not})
            continue
        trial = runner.with_settings(candidate)

        def runs(trial: Runner = trial, name: str = name) -> tuple[Runs, Runs]:
            after = trial.session(model, what=f"the model with {name}")
            before = runner.session(model)  # made last: any edge a later session has goes to the baseline
            return [before.runner_for(f) for f in timing_feeds], [after.runner_for(f) for f in timing_feeds]

        try:
            pairs = measure.paired(f"setting {name}", runner.settings.to_dict(), candidate.to_dict(), runs,
                                   CONTEXT_POLICY, 1 - CONFIRM_MIN_GAIN)
        except UsageError as exc:
            tried.append({"setting": name, "status": "rejected", "reason": exc.what})
            continue
        kept = _clear_gain(pairs, CONFIRM_MIN_GAIN)
        tried.append({"setting": name, "status": "ok", "kept": kept, "settings": candidate.to_dict(), **pairs[0].to_dict()})
        if kept:
            runner = trial
    return runner


def _try_cuda_graph(
    model: onnx.ModelProto, runner: Runner, timing_feeds: list[Feeds], report: Report, atol: float | None, rtol: float | None
) -> Runner:
    """The runner with `enable_cuda_graph` when the written model, replayed as one CUDA graph,
    gives the same outputs and is faster with confidence; else the runner as it was.

    Tried last and on the model written: a graph replays fixed buffers, so the pipeline's own
    sessions, which run on many inputs, never use it; a user's session made with
    `convlower.session` does, through IOBinding."""
    entry = next((c for c in settings_candidates(runner.settings, model, len(timing_feeds)) if c[0] == "enable_cuda_graph"), None)
    if entry is None:
        return runner
    name, candidate, why_not = entry
    tried = report.session_settings.setdefault("tried", [])
    if candidate is None:
        tried.append({"setting": name, "status": "not_applicable", "reason": why_not})
        return runner
    feeds = timing_feeds[0]
    try:
        expected = runner.session(model).run(feeds)
        graph_session = runner.with_settings(candidate).session(model, what="the model as a CUDA graph")
        after = graph_session.runner_for(feeds, outputs_like=expected)
        after()  # a replay of the captured graph, not the capturing run
        diffs = [compare(str(i), want, got, atol, rtol) for i, (want, got) in enumerate(zip(expected, after.outputs()))]
        before_session = runner.session(model)
        before = before_session.runner_for(feeds)
    except (UsageError, ValueError) as exc:
        tried.append({"setting": name, "status": "rejected", "reason": getattr(exc, "what", str(exc))})
        return runner
    failed = [d for d in diffs if not d.passed]
    if failed:
        tried.append({"setting": name, "status": "rejected",
                      "reason": f"the replayed graph's outputs disagree (max abs err {max(d.max_abs_err for d in failed):.3g})"})
        return runner
    paired = time_paired(before, after, CONTEXT_POLICY, threshold=1 - CONFIRM_MIN_GAIN)
    kept = _clear_gain([paired], CONFIRM_MIN_GAIN)
    tried.append({"setting": name, "status": "ok", "kept": kept, "settings": candidate.to_dict(), **paired.to_dict()})
    return runner.with_settings(candidate) if kept else runner


def _group(
    planned: list[PlannedNode], static: list[dict[str, tuple[int, ...] | None]], report: Report
) -> dict[str, list[tuple[PlannedNode, list[dict[str, tuple[int, ...]]]]]]:
    """Nodes by tuning problem (spec + input shapes at every profile), so each is tuned once;
    nodes that cannot be tuned go straight to the report with the reason."""
    groups: dict[str, list[tuple[PlannedNode, list[dict[str, tuple[int, ...]]]]]] = {}
    for entry in planned:
        per_profile = [_node_shapes(entry, shapes) for shapes in static]
        reason = entry.reason or next((why for _, why in per_profile if why), None)
        if reason:
            report.nodes.append(NodeReport(entry.name, entry.op, "?", None, ORIGINAL, None, reason=reason))
            continue
        shapes = [found for found, _ in per_profile]
        groups.setdefault(" & ".join(tuning_key(entry.spec, s) for s in shapes), []).append((entry, shapes))
    return groups


def _profile_shapes(
    recognized: onnx.ModelProto, planned: list[PlannedNode], graph: gs.Graph, shapes: dict[str, tuple[int, ...]], feeds: Feeds, runner: Runner
) -> dict[str, tuple[int, ...] | None]:
    """Every tensor's shape at one profile: inferred, and observed where inference cannot follow."""
    static = _static_shapes(recognized, shapes)
    static.update(_observed_shapes(recognized, _unknown_inputs(planned, graph, static), shapes, feeds, runner))
    return static


def _check_profiling_run(runner: Runner, model: onnx.ModelProto, infos: list[InputInfo], feeds: Feeds,
                         named: dict[str, tuple[int, ...]], given: set[str]) -> None:
    """Run the model once on its profiling inputs before any tuning, so that a model these inputs
    do not suit (a reflect Pad longer than a default length, a sample rate random data is not)
    fails at once as the user's input problem, naming the node, onnxruntime's reason and the
    option that mends it: `--input-shape` for the inputs whose shape was a default, else `--inputs`."""
    session = runner.session(model)  # a model onnxruntime cannot load fails here, with its reason
    try:
        session.run(feeds)
    except RunError as exc:
        defaulted = [i for i in infos if i.name not in named and (i.dims is None or not all(isinstance(d, int) for d in i.dims))]
        random = [i.name for i in infos if i.name not in given]
        fixes = []
        if defaulted:
            shown = ", ".join(f"{i.name} {'x'.join(map(str, feeds[i.name].shape)) or 'scalar'}" for i in defaulted)
            fixes.append(f"the profiling shapes were defaults ({shown}): give real ones with "
                         + " ".join(f"--input-shape {i.name}:DIMS" for i in defaulted))
        if random:
            fixes.append(f"the inputs {', '.join(random)} were random: give values the model accepts with --inputs DATA.npz"
                         " (numpy.savez; it may hold only the inputs that need real values)")
        else:
            fixes.append("check the arrays in --inputs")
        fix = "; or ".join(fixes)
        where = f" at node {exc.node!r} ({exc.op})" if exc.node else ""
        raise UsageError(f"the model fails on its profiling inputs{where}: {exc.reason}", fix) from exc


def _static_shapes(recognized: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...] | None]:
    """Every tensor's shape (in every subgraph) once the inputs are bound to the profiling shapes.

    `recognized` is the model as planned, recognized idioms included: recognizing again at static
    shapes could name the tensors it makes otherwise."""
    static = gs.import_onnx(with_static_inputs(recognized, shapes))
    found: dict[str, tuple[int, ...] | None] = {}
    for graph in all_graphs(static):
        for name, tensor in graph.tensors().items():
            shape = tensor.shape
            found[name] = tuple(shape) if shape is not None and all(isinstance(d, int) and d >= 0 for d in shape) else None
    return found


def _unknown_inputs(planned: list[PlannedNode], graph: gs.Graph, static: dict[str, tuple[int, ...] | None]) -> list[gs.Tensor]:
    """Runtime inputs of planned main-graph nodes whose shape inference left the shape unknown."""
    main = set(map(id, graph.nodes))
    return [
        tensor
        for entry in planned
        if id(entry.node) in main
        for tensor in entry.node.inputs
        if not tensor.is_empty() and constant_value(tensor) is None and static.get(tensor.name) is None
    ]


def _observed_shapes(
    model: onnx.ModelProto, tensors: list[gs.Tensor], shapes: dict[str, tuple[int, ...]], feeds: Feeds, runner: Runner
) -> dict[str, tuple[int, ...]]:
    """Shapes of `tensors` seen by running the model once with them as extra outputs.

    For graphs whose shapes ONNX inference cannot follow (the legacy torch exporter computes some
    Pad amounts with Shape/Slice/Concat chains it does not fold).
    """
    if not tensors:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {o.name for o in probe.graph.output}
    for tensor in {t.name: t for t in tensors}.values():
        if tensor.name not in outputs and tensor.dtype is not None:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(tensor.name, onnx_dtype(tensor), None))
    session = runner.session(probe)
    values = session.run(input_sets(model, input_shapes=shapes, inputs=feeds, runs=1)[0])
    return {name: tuple(value.shape) for name, value in zip(session.output_names, values)}


def _node_shapes(entry: PlannedNode, static: dict[str, tuple[int, ...] | None]) -> tuple[dict[str, tuple[int, ...]], str | None]:
    """Concrete shapes of the node's runtime inputs (weights excluded), or why they are unknown."""
    shapes = {}
    for tensor in entry.node.inputs:
        if tensor.is_empty() or constant_value(tensor) is not None:
            continue
        shape = static.get(tensor.name)
        if shape is None:
            where = " (it is inside an If/Loop/Scan body, where ONNX shape inference did not reach)" if entry.nested else ""
            return {}, f"shape of input {tensor.name!r} is unknown at the profiling shapes{where}"
        shapes[tensor.name] = shape
    return shapes, None


def _candidates(entry: PlannedNode, allowed: dict[str, set[str]]):
    """The variants to tune: those that apply, are allowed, and are exact, unless named despite a caveat."""
    names = allowed.get(entry.op.lower())
    return [v for v in entry.family.variants if entry.why_not.get(v.name) is None
            and (v.name in names if names is not None else not v.caveat)]


def _cached(cache: TuningCache, key: str, environment: list, entry: PlannedNode, allowed: dict[str, set[str]]) -> NodeTuning | None:
    """The tuning from the cache, when the original and every candidate were measured before."""
    original = cache.get(TuningCache.key(key, ORIGINAL, *environment))
    if original is None:
        return None
    tuning = NodeTuning(original["ms"], cached=True)
    for variant in _candidates(entry, allowed):
        hit = cache.get(TuningCache.key(key, variant.name, *environment))
        if hit is None:
            return None
        tuning.outcomes[variant.name] = VariantOutcome(**hit)
    return tuning


def _store(cache: TuningCache, key: str, environment: list, tuning: NodeTuning) -> None:
    cache.put(TuningCache.key(key, ORIGINAL, *environment), {"ms": tuning.original_ms})
    for name, outcome in tuning.outcomes.items():
        cache.put(TuningCache.key(key, name, *environment), outcome.to_dict())


def _node_report(
    entry: PlannedNode, shapes: list[dict[str, tuple[int, ...]]], tunings: list[NodeTuning], allowed: dict[str, set[str]], *, recognized: bool
) -> NodeReport:
    """The node's report at the first profile, its choice across all, and each profile's timings."""
    variants = {}
    names = allowed.get(entry.op.lower())
    for variant in entry.family.variants:
        why = entry.why_not.get(variant.name)
        if why is not None:
            variants[variant.name] = {"status": "not_applicable", "reason": why}
        elif names is not None and variant.name not in names:
            variants[variant.name] = {"status": "skipped", "reason": "not in --variants"}
        elif names is None and variant.caveat:
            variants[variant.name] = {"status": "skipped", "reason": f"{variant.caveat}; name it in --variants to allow it"}
        elif variant.name in tunings[0].outcomes:
            variants[variant.name] = tunings[0].outcomes[variant.name].to_dict()
    profiles = None
    if len(tunings) > 1:
        profiles = [{"shape": _shape_text(s), "original_ms": t.original_ms,
                     "variants": {name: o.to_dict() for name, o in t.outcomes.items()}} for s, t in zip(shapes, tunings)]
    chosen = choose_across(tunings, recognized=recognized, standard_op=not entry.family.domain)
    return NodeReport(entry.name, entry.op, _shape_text(shapes[0]), spec_dict(entry.spec), chosen, tunings[0].original_ms,
                      variants, cached=all(t.cached for t in tunings), recognized=recognized, profiles=profiles)


def _shape_text(shapes: dict[str, tuple[int, ...]]) -> str:
    return ", ".join("x".join(map(str, s)) for s in shapes.values())


CONFIRM_METHODS = ("model", "neighbours")


def confirm_method(confirm: bool | str | None) -> str | None:
    """Where `optimize(confirm=...)` confirms: "model", "neighbours", or None for nowhere (True
    is "model", the default)."""
    if confirm is True:
        return "model"
    if confirm is False or confirm is None:
        return None
    if confirm in CONFIRM_METHODS:
        return str(confirm)
    raise UsageError(f"confirm={confirm!r} is not a confirmation method",
                     f"use one of {', '.join(CONFIRM_METHODS)}, or False for none")


def _confirm_in_context(
    original: "onnx.ModelProto | WorkingModel",
    choices: dict[str, str],
    members: dict[str, list[str]],
    report: Report,
    runner: Runner,
    timing_feeds: list[Feeds],
    method: str = "model",
    *,
    measurements: Measurements | None = None,
    deadline: Deadline | None = None,
) -> dict[str, str]:
    """The choices that also win in context: all together first, then one tuning group at a time.

    A node timed alone is not the node onnxruntime runs: on CPU it fuses a Conv with the
    activation or residual Add after it and keeps chains of Conv in its blocked NCHWc layout, and
    a node lowered to MatMul in the middle of a chain loses both and pays layout conversions.

    Group testing: the groups that won alone are first timed all together in the whole model
    against the model without them. A set that is not faster by `CONFIRM_MIN_GAIN`, with
    confidence, ends the confirmation there: every group goes back to the original with that
    measurement as its reason (on models where nothing wins, one measurement instead of one per
    group). A set that wins is split: each group of identical nodes (largest predicted gain first)
    is added to the choices kept so far only when the model with it is faster than the model
    without it by `CONFIRM_MIN_GAIN`, with confidence (`_clear_gain`), twice: a group that passes
    is timed again in sessions made anew, and kept only if it passes again. Across dozens of
    groups with no real gain, one passing by chance in a run was common (the guard then reverted
    it); twice by chance is rare. The second measurement, made after the group was picked, is also
    the one the prediction uses: the first is biased toward gain by the picking itself. Groups
    whose predicted gain is below `RESOLVABLE_GAIN` of the model's time, which no confirmation
    could tell from noise alone, are confirmed last, all of them as one.

    Which variant: node times within `NEAR_TIE` of each other do not say which is faster in the
    model, so once a group's choice is confirmed, the variants near it meet it in the model, two
    at a time (`_duel`); a challenger replaces it only when faster there with confidence (and is
    then timed against the baseline itself), so a tie keeps the first in the registry's order:
    a tie decided by noise would make repeated runs choose differently. Duels time two fast
    models against each other, which is cheaper and more precise than timing each against a
    slow original; a group that loses in context has none.

    The context of one group is the whole model (`method` "model", `_InModel`) or one micro-model
    of the group's fusable neighbourhoods (`method` "neighbours", `convlower.context.InNeighbourhood`,
    the choices kept so far applied inside it; a group with a node in an If/Loop/Scan body, and
    the set of all groups, are confirmed in the whole model).

    Every measurement goes through `measurements` (`convlower.measure`): one made before on the
    same model, choices, inputs and environment is read from the cache, not timed. With a
    `deadline` spent, the groups not yet confirmed go back to the original, saying so.

    Each group's in-context ratio (at the first profile; every profile's under "profiles") and
    the method that measured it go to its nodes' reports (`context`); a group that loses in
    context goes back to the original with the measured ratio as its reason, so the guard does
    not have to revert it. The set's measurement goes to `report.confirmation["together"]`.
    """
    candidates = {key: [name for name in names if name in choices] for key, names in members.items()}
    candidates = {key: names for key, names in candidates.items() if names}
    if not candidates:
        return {}
    working = WorkingModel.of(original)
    measure = measurements or Measurements.in_memory()
    by_name = {n.name: n for n in report.nodes}
    gain = {key: sum((by_name[n].original_ms or 0) - (by_name[n].chosen_ms or 0) for n in names) for key, names in candidates.items()}
    whole = _InModel(working, runner, timing_feeds)
    static = [with_static_inputs(working.original, feeds_shapes(f)) for f in timing_feeds] if method == "neighbours" else []
    order = sorted(candidates, key=gain.__getitem__, reverse=True)
    units = [[key] for key in order]
    report.confirmation["groups"] = len(order)
    if len(order) > 1:
        everything = {name: choices[name] for key in order for name in candidates[key]}
        together = _compare(measure, "together", whole, {}, everything, deadline)
        won = _clear_gain(together, CONFIRM_MIN_GAIN)
        report.confirmation["together"] = {**together[0].to_dict(), "kept": won}
        if not won:
            _record_context(by_name, everything, together, {}, whole.method, [], groups=len(order))
            return {}
        units = _units(order, gain, together[0].a.median_ms)
    kept: dict[str, str] = {}
    for unit in units:
        names = [name for key in unit for name in candidates[key]]
        if deadline is not None and deadline.spent():
            _not_confirmed(by_name, names, deadline)
            continue
        alone = len(unit) == 1
        where = (_in_neighbourhood(static, names, runner) if static and alone else None) or whole
        contenders = _contenders(by_name[names[0]]) if alone else []
        proposal = dict.fromkeys(names, contenders[0]) if alone else {name: choices[name] for name in names}
        pairs = _compare(measure, "confirm", where, kept, {**kept, **proposal}, deadline)
        duels: dict[str, dict[str, object]] = {}
        first: list[PairedRatio] = []
        if _clear_gain(pairs, CONFIRM_MIN_GAIN):
            best = contenders[0] if alone else None
            for challenger in contenders[1:]:
                best, duels[challenger] = _duel(measure, where, kept, names, best, challenger, deadline)
            if best is not None:
                proposal = dict.fromkeys(names, best)
            first = pairs
            pairs = _compare(measure, "replicate", where, kept, {**kept, **proposal}, deadline)
        if _record_context(by_name, proposal, pairs, duels, where.method, first, groups=len(unit)):
            kept.update(proposal)
    return kept


def _units(order: list[str], gain: dict[str, float], model_ms: float) -> list[list[str]]:
    """The groups to confirm one at a time (predicted gain at least `RESOLVABLE_GAIN` of the
    model's `model_ms`, largest first), then the rest as one unit."""
    large = [key for key in order if gain[key] >= RESOLVABLE_GAIN * model_ms]
    small = [key for key in order if key not in large]
    return [[key] for key in large] + ([small] if small else [])


class _InModel:
    """The whole model at each profile, to time choices in (as `convlower.context.InNeighbourhood`
    times them in a neighbourhood)."""

    method = "model"

    def __init__(self, model: WorkingModel, runner: Runner, timing_feeds: list[Feeds]):
        self.model, self.runner, self.timing_feeds = model, runner, timing_feeds

    def runs(self, choices: dict[str, str]) -> Runs:
        """Per profile, a zero-argument run of the model with `choices` applied (the model as given
        when there are none)."""
        session = self.runner.session(self.model.with_choices(choices))
        return [session.runner_for(f) for f in self.timing_feeds]


def _in_neighbourhood(static: list[onnx.ModelProto], names: list[str], runner: Runner) -> InNeighbourhood | None:
    """The group's neighbourhood at each profile, or None when a member has none (in an If/Loop/Scan body)."""
    try:
        return InNeighbourhood(static, names, runner)
    except NoNeighbourhood:
        return None


def _compare(measure: Measurements, what: str, where: "_InModel | InNeighbourhood", before: dict[str, str],
             after: dict[str, str], deadline: Deadline | None, policy: PairedPolicy = CONTEXT_POLICY,
             threshold: float = 1 - CONFIRM_MIN_GAIN) -> list[PairedRatio]:
    """The context with the choices `after` timed against it with the choices `before`, at every
    profile (`what` tells a confirmation from its replicate in the cache). The `before` side is
    made last, so any edge a later-made session has goes to it. Until a group is kept, `before` is
    the model as given, so recognition's own effect is in the first factor."""

    def runs() -> tuple[Runs, Runs]:
        made_first = where.runs(after)
        return where.runs(before), made_first

    return measure.paired(f"{what} in {where.method}", before, after, runs, _within(policy, deadline), threshold)


def _duel(measure: Measurements, where: "_InModel | InNeighbourhood", kept: dict[str, str], names: list[str],
          incumbent: str, challenger: str, deadline: Deadline | None) -> tuple[str, dict[str, object]]:
    """The winner of two variants of one group, each in context with the choices kept so far, and
    the record of the duel: the challenger wins only when faster with confidence at every profile."""
    pairs = _compare(measure, "duel", where, {**kept, **dict.fromkeys(names, incumbent)},
                     {**kept, **dict.fromkeys(names, challenger)}, deadline, DUEL_POLICY, 1.0)
    won = all(p.high < 1 for p in pairs)
    return (challenger if won else incumbent), {"against": incumbent, "won": won, **pairs[0].to_dict()}


def _contenders(node: NodeReport) -> list[str]:
    """The variants to meet in the model: the chosen one and up to `MAX_CONTENDERS` - 1 others
    verified at every profile whose node time there came within `NEAR_TIE` of the chosen one's
    (and, for a node that has an original to keep, not above the original's), the closest first,
    all in the registry's order."""
    tables = [(p["variants"], p["original_ms"]) for p in node.profiles] if node.profiles else [(node.variants, node.original_ms)]

    def ratios(variant: str) -> list[float] | None:
        found = []
        for variants, original_ms in tables:
            outcome, chosen = variants.get(variant, {}), variants.get(node.chosen, {})
            if outcome.get("status") != "ok" or outcome.get("ms") is None or not chosen.get("ms"):
                return None
            if not node.recognized and original_ms is not None and outcome["ms"] > original_ms:
                return None
            found.append(outcome["ms"] / chosen["ms"])
        return found

    near = []
    for variant in tables[0][0]:
        found = ratios(variant) if variant not in (node.chosen, "native") else None
        if found is not None and max(found) <= 1 + NEAR_TIE:
            near.append((float(np.mean(found)), variant))
    picked = {node.chosen, *(variant for _, variant in sorted(near)[:MAX_CONTENDERS - 1])}
    return [variant for variant in node.variants if variant in picked]


def _within(policy: PairedPolicy, deadline: Deadline | None) -> PairedPolicy:
    """`policy` with its budget cut to what the deadline leaves (a quarter of a second at least)."""
    if deadline is None or deadline.left() >= policy.budget_s:
        return policy
    return replace(policy, budget_s=max(0.25, deadline.left()))


def _record_context(by_name: dict[str, NodeReport], proposal: dict[str, str], pairs: list[PairedRatio],
                    duels: dict[str, dict[str, object]], method: str, first: list[PairedRatio], *, groups: int = 1) -> bool:
    """Whether the choices in `proposal` (node name -> variant: one group, or several confirmed as
    one) are kept, and each node's `context`: the in-context ratio against the context without
    them, the method (where it was measured), the duels that chose a group's variant, and the
    reason when the nodes went back to the original or changed variant in context. `first` is
    the measurement a kept group passed before its replicate `pairs` (under "first"); `groups`
    counts the groups measured together (under "groups" when more than one). A neighbourhood's
    context also has "saved_ms", the milliseconds the choice saved there, from which
    `Report.predicted_speedup` predicts the whole model."""
    kept = _clear_gain(pairs, CONFIRM_MIN_GAIN)
    context: dict[str, object] = {**pairs[0].to_dict(), "kept": kept, "method": method}
    variants = set(proposal.values())
    if len(variants) == 1:
        context["variant"] = next(iter(variants))
    if groups > 1:
        context["groups"] = groups
    if method == "neighbours":
        context["saved_ms"] = round(pairs[0].a.median_ms * (1 - pairs[0].ratio), 6)
    where = "in its neighbourhood" if method == "neighbours" else "in the whole model"
    if len(pairs) > 1:
        context["profiles"] = [p.to_dict() for p in pairs]
    if duels:
        context["duels"] = duels
    if first:
        context["first"] = first[0].to_dict()
    worst = max(pairs, key=lambda p: p.high)
    measured = f"time ratio {worst.ratio:.3f}, {worst.confidence:.0%} interval {worst.low:.3f}-{worst.high:.3f}"
    together = f" together with {groups - 1} other group(s)" if groups > 1 else ""
    for name, variant in proposal.items():
        node = by_name[name]
        node.context = context
        if not kept:
            node.reason = (f"{variant} won alone and once {where}{together}, but not again ({measured})" if first
                           else f"{variant} won alone but not {where}{together} ({measured})")
            node.chosen = ORIGINAL
        elif variant != node.chosen:
            node.reason = f"{variant} chosen over {node.chosen}, which was faster alone: {variant} was faster {where}"
            node.chosen = variant
    return kept


def _not_confirmed(by_name: dict[str, NodeReport], names: list[str], deadline: Deadline) -> None:
    """Nodes whose group the budget left no time to confirm go back to the original, saying so."""
    for name in names:
        node = by_name[name]
        node.reason = f"{node.chosen} won alone, not confirmed in context: {deadline.describe()}"
        node.chosen = ORIGINAL



def _guard(
    original: "onnx.ModelProto | WorkingModel",
    optimized: onnx.ModelProto,
    choices: dict[str, str],
    report: Report,
    runner: Runner,
    profiles: list[dict[str, tuple[int, ...]]],
    feeds: Feeds,
    timing_feeds: list[Feeds],
    atol: float | None,
    rtol: float | None,
    *,
    measurements: Measurements | None = None,
    deadline: Deadline | None = None,
) -> onnx.ModelProto:
    """Keep `optimized` only if it agrees with `original` and is faster; else revert choices.

    `report.verification` records both what the check found and what was written: "passed" says
    whether the last optimized candidate's outputs agreed with the original's (at every profile),
    "unchanged" whether the model returned is `original` itself. Outputs that disagree revert
    every choice at once (passed false, with the errors and the outputs that failed). The timing
    is paired (`time_paired`), at every profile: a candidate is kept only when the confidence
    interval of its time ratio to the original lies below 1 at every profile and below
    1 - MODEL_MIN_GAIN at one at least, measuring more rounds while the answer is unclear; every
    check's ratio and interval go to `report.guard_timings`. A candidate not shown faster loses
    its choice of least predicted gain, and after `GUARD_ROUNDS` such rounds all the rest. Each
    round either returns or reverts at least one choice, so it ends. With no choice at all
    nothing runs: `{"unchanged": true}`. Outputs are compared on every run; the timing comes from
    `measurements`, so an unchanged model with the same choices is not timed again (`cached` in
    its guard timing), and its budget is cut to what `deadline` leaves.
    """
    working = WorkingModel.of(original)
    original = working.original
    if not choices:
        report.verification = {"unchanged": True}
        return original
    measure = measurements or Measurements.in_memory()
    choices = dict(choices)
    gains = {n.name: (n.original_ms or 0) - (n.chosen_ms or 0) for n in report.nodes if n.name in choices}
    while choices:
        checks = [verify(original, optimized, input_shapes=shapes, inputs=feeds, runs=2, atol=atol, rtol=rtol, runner=runner)
                  for shapes in profiles]
        check = next((c for c in checks if not c), checks[0])
        errors = {"max_abs_err": max(c.max_abs_err for c in checks), "max_rel_err": max(c.max_rel_err for c in checks),
                  "input_sets": sum(c.input_sets for c in checks)}
        if not check:
            reason = _disagreement(check)
            report.verification = {"passed": False, "unchanged": True, **errors,
                                   "failed_outputs": [o.name for o in check.outputs if not o.passed], "reason": reason}
            _revert(report, list(choices), f"the optimized model's outputs disagree with the original's: {reason}")
            return original
        report.verification = {"passed": True, "unchanged": False, **errors}

        def runs(candidate: onnx.ModelProto = optimized) -> tuple[Runs, Runs]:
            after = runner.session(candidate)
            before = runner.session(original)  # made last: any edge a later session has goes to the original
            return [before.runner_for(f) for f in timing_feeds], [after.runner_for(f) for f in timing_feeds]

        pairs = measure.paired("guard", {}, choices, runs, _within(MODEL_POLICY, deadline), 1 - MODEL_MIN_GAIN)
        for index, paired in enumerate(pairs):
            report.guard_timings.append({"profile": index, **paired.to_dict()})
            if index < len(report.profiles):
                report.profiles[index].update(original_ms=paired.a.median_ms, optimized_ms=paired.b.median_ms,
                                              speedup=1 / paired.ratio, interval=[1 / paired.high, 1 / paired.low])
        report.original_ms, report.optimized_ms = pairs[0].a.median_ms, pairs[0].b.median_ms
        if _clear_gain(pairs):
            return optimized
        worst = max(pairs, key=lambda p: p.high)
        least = min(choices, key=lambda name: gains.get(name, 0.0))
        _revert(report, [least], f"the optimized model was not shown {MODEL_MIN_GAIN:.0%} faster "
                                 f"(time ratio {worst.ratio:.3f}, {worst.confidence:.0%} interval {worst.low:.3f}-{worst.high:.3f}"
                                 + (f" at profile {pairs.index(worst) + 1})" if len(pairs) > 1 else ")"))
        del choices[least]
        if len(report.reverted) >= GUARD_ROUNDS and choices:
            _revert(report, list(choices), "the guard's revert budget is spent")
            break
        optimized = working.with_choices(choices)
    report.verification.update(unchanged=True, reason="the optimized model's outputs agreed, but it was not faster")
    return original


def _clear_gain(pairs: list[PairedRatio], min_gain: float = MODEL_MIN_GAIN) -> bool:
    """B is faster than A with confidence: the interval of B/A lies below 1 at every profile, and
    below 1 - `min_gain` at one at least. A gain smaller than the noise is not taken, as groups
    whose measured ratio was lucky would otherwise add up to a prediction the written model does
    not meet."""
    return all(p.high < 1 for p in pairs) and any(p.high < 1 - min_gain for p in pairs)


def _disagreement(check: VerifyResult) -> str:
    """What a failed verification found, in a phrase: the largest error among the outputs that
    failed and their names, or the problems that kept the outputs from being compared."""
    if check.problems:
        return "; ".join(check.problems)
    failed = [o for o in check.outputs if not o.passed]
    names = ", ".join(o.name for o in failed[:3]) + (f" and {len(failed) - 3} more" if len(failed) > 3 else "")
    return f"max abs err {max(o.max_abs_err for o in failed):.3g} at {names}"


def _revert(report: Report, names: list[str], why: str) -> None:
    for node in report.nodes:
        if node.name in names and node.chosen != ORIGINAL:
            node.reason = f"reverted from {node.chosen}: {why}"
            node.chosen = ORIGINAL
            report.reverted.append(node.name)


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description:<48}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        transient=True, disable=not enabled,
    )
