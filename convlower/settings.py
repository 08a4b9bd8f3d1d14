"""Session settings: the provider options that decide conv speed, tried at the model level and recorded.

A model's speed on onnxruntime depends on more than its graph. On the CUDA provider it depends on
how cuDNN picks a convolution algorithm (`cudnn_conv_algo_search`: onnxruntime >= 1.20 with cuDNN 9
maps DEFAULT to cuDNN's fallback heuristics, which users report 10-50x slower on some convs), on
the layout convs run in (`prefer_nhwc`), on how 1-D convs become 2-D for cuDNN
(`cudnn_conv1d_pad_to_nc1d`), and on whether a whole run replays as one CUDA graph
(`enable_cuda_graph`). convlower never measures against a badly configured baseline: the CUDA
search mode is always explicit (EXHAUSTIVE, or HEURISTIC when that is faster; DEFAULT is refused),
and `optimize` tries each setting that applies to the model against the best so far, keeping it
only when the whole model is faster with confidence (`convlower.optimize._tune_settings`).

The chosen settings go to the report (`session_settings`) and to the written model's
`metadata_props` (`convlower.session`), and `convlower.session(path)` builds an
`onnxruntime.InferenceSession` with them. Timing-harness choices (no spinning worker threads,
quiet logging) are the runner's and are not recorded: they make comparisons fair, not runs fast.

On the CPU provider there is no setting to try: the thread count is the user's, and MLAS has no
per-model conv options. The settings still carry the provider, threads and graph optimization
level, and are recorded and reproduced the same way.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import onnx
import onnxruntime as ort

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
METADATA_KEY = "convlower.session"
"""The written model's metadata_props entry that holds its session settings (JSON)."""

CUDA_BASELINE = {
    "device_id": "0",
    "cudnn_conv_algo_search": "EXHAUSTIVE",
    "cudnn_conv_use_max_workspace": "1",
    "do_copy_in_default_stream": "1",
}
"""The CUDA provider's options before any is tuned: cuDNN's exhaustive search, its largest workspace."""
SEARCH_MODES = ("EXHAUSTIVE", "HEURISTIC")
"""The cuDNN algorithm searches convlower times with; DEFAULT (cuDNN's fallback heuristics) never."""
GRAPH_LEVELS = {
    "ORT_DISABLE_ALL": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "ORT_ENABLE_BASIC": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "ORT_ENABLE_EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "ORT_ENABLE_ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class SessionSettings:
    """How to make a session that runs a model fast: provider, its options, threads, graph level.

    `provider_options` are the provider's own (strings, as onnxruntime takes them); for CUDA they
    always name a search mode from `SEARCH_MODES`.
    """

    provider: str
    provider_options: Mapping[str, str] = field(default_factory=dict)
    threads: int | None = None
    graph_optimization_level: str = "ORT_ENABLE_ALL"

    def __post_init__(self) -> None:
        if self.provider not in (CPU, CUDA):
            raise ValueError(f"unknown provider {self.provider!r}: convlower runs on {CPU} or {CUDA}")
        options = {str(k): str(v) for k, v in self.provider_options.items()}
        object.__setattr__(self, "provider_options", dict(sorted(options.items())))
        if self.provider == CUDA and options.get("cudnn_conv_algo_search") not in SEARCH_MODES:
            raise ValueError(f"cudnn_conv_algo_search={options.get('cudnn_conv_algo_search')!r}: convlower times CUDA "
                             f"only with an explicit search, one of {', '.join(SEARCH_MODES)} (DEFAULT maps to cuDNN's "
                             "fallback heuristics on onnxruntime >= 1.20)")
        if self.graph_optimization_level not in GRAPH_LEVELS:
            raise ValueError(f"graph_optimization_level {self.graph_optimization_level!r} is not one of {', '.join(GRAPH_LEVELS)}")

    @classmethod
    def baseline(cls, provider: str, threads: int | None = None) -> "SessionSettings":
        """The settings a provider starts from before any is tuned."""
        return cls(provider, CUDA_BASELINE if provider == CUDA else {}, threads)

    def changed(self, **options: str) -> "SessionSettings":
        """These settings with some provider options changed."""
        return replace(self, provider_options={**self.provider_options, **options})

    def changes_from_baseline(self) -> dict[str, str]:
        """The provider options that differ from the provider's baseline: what tuning chose."""
        base = SessionSettings.baseline(self.provider).provider_options
        return {k: v for k, v in self.provider_options.items() if base.get(k) != v}

    def label(self) -> str:
        """A short name: the provider and the options that differ from its baseline."""
        changes = self.changes_from_baseline()
        return self.provider + (f"[{','.join(f'{k}={v}' for k, v in changes.items())}]" if changes else "")

    @property
    def cuda_graph(self) -> bool:
        return self.provider_options.get("enable_cuda_graph") == "1"

    def session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.graph_optimization_level = GRAPH_LEVELS[self.graph_optimization_level]
        if self.threads:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        return options

    def providers(self) -> list[Any]:
        """The `providers` argument of `onnxruntime.InferenceSession`: CPU last as the fallback."""
        return [(CUDA, dict(self.provider_options)), CPU] if self.provider == CUDA else [CPU]

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"provider": self.provider, "provider_options": dict(self.provider_options),
                                "graph_optimization_level": self.graph_optimization_level}
        if self.threads:
            data["intra_op_num_threads"] = self.threads
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SessionSettings":
        return cls(str(data["provider"]), dict(data.get("provider_options") or {}), data.get("intra_op_num_threads"),
                   str(data.get("graph_optimization_level", "ORT_ENABLE_ALL")))


def candidates(settings: SessionSettings, model: onnx.ModelProto, profiles: int) -> list[tuple[str, SessionSettings | None, str | None]]:
    """The settings worth trying against `settings` on this model, as (name, settings, why not).

    Each changes one option; where it cannot apply, settings is None and `why not` says why.
    CUDA graphs are tried last and only where a graph can be captured: one shape profile (a graph
    replays one set of shapes) and no If/Loop/Scan (control flow cannot be captured).
    """
    if settings.provider != CUDA:
        return []
    ops = {n.op_type for n in model.graph.node}
    one_d = any(n.op_type in ("Conv", "ConvTranspose") and _conv_rank(model, n) == 1 for n in model.graph.node)
    found: list[tuple[str, SessionSettings | None, str | None]] = [
        ("prefer_nhwc", settings.changed(prefer_nhwc="1"), None),
        ("cudnn_conv_algo_search=HEURISTIC", settings.changed(cudnn_conv_algo_search="HEURISTIC"), None),
        ("cudnn_conv1d_pad_to_nc1d", settings.changed(cudnn_conv1d_pad_to_nc1d="1") if one_d else None,
         None if one_d else "the model has no 1-D Conv"),
    ]
    control_flow = sorted(ops & {"If", "Loop", "Scan"})
    if profiles > 1:
        found.append(("enable_cuda_graph", None, f"{profiles} shape profiles: a CUDA graph replays one set of shapes"))
    elif control_flow:
        found.append(("enable_cuda_graph", None, f"the model has {', '.join(control_flow)}: control flow cannot be captured"))
    else:
        found.append(("enable_cuda_graph", settings.changed(enable_cuda_graph="1"), None))
    return found


def _conv_rank(model: onnx.ModelProto, node: onnx.NodeProto) -> int | None:
    """The spatial rank of a Conv/ConvTranspose node, read off its weight initializer's dims."""
    weight = next((t for t in model.graph.initializer if len(node.input) > 1 and t.name == node.input[1]), None)
    if weight is not None:
        return len(weight.dims) - 2
    kernel = next((a for a in node.attribute if a.name == "kernel_shape"), None)
    return len(kernel.ints) if kernel is not None else None


def record(model: onnx.ModelProto, settings: SessionSettings) -> None:
    """Write `settings` into the model's metadata_props (`METADATA_KEY`), replacing an earlier entry."""
    kept = [entry for entry in model.metadata_props if entry.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(settings.to_dict(), sort_keys=True))


def recorded(model: onnx.ModelProto) -> SessionSettings | None:
    """The settings a model was tuned with, from its metadata_props; None when it has none."""
    entry = next((e for e in model.metadata_props if e.key == METADATA_KEY), None)
    return None if entry is None else SessionSettings.from_dict(json.loads(entry.value))


def session(model: "str | os.PathLike[str] | onnx.ModelProto", *, provider: str | None = None) -> ort.InferenceSession:
    """An `onnxruntime.InferenceSession` of a model `convlower optimize` wrote, made with the session
    settings it was tuned with (provider, provider options, threads, graph optimization level).

    `provider="cpu"` makes a CPU session of a model tuned for CUDA (with the recorded threads).
    A model tuned for CUDA on a machine where CUDA cannot load is a `UsageError` with the reason,
    never a silent CPU session. A model with no recorded settings is a `UsageError` too.
    """
    from .errors import UsageError
    from .modelio import load_model, runtime_compatible
    from .runner import cuda_failure

    if provider not in (None, "cpu", "cuda"):
        raise UsageError(f"provider={provider!r} is not one of cpu, cuda", "leave it out to use the provider the model was tuned on")
    proto = load_model(model)
    what = f"{model}" if not isinstance(model, onnx.ModelProto) else "the model"
    try:
        settings = recorded(proto)
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{what} has unusable session settings in {METADATA_KEY}: {exc}",
                         "optimize the model again, or make the session with onnxruntime directly") from exc
    if settings is None:
        raise UsageError(f"{what} records no session settings ({METADATA_KEY} is not in its metadata_props)",
                         "write it with convlower optimize, or make the session with onnxruntime directly")
    if provider == "cpu":
        settings = SessionSettings.baseline(CPU, settings.threads)
    elif provider == "cuda" and settings.provider != CUDA:
        settings = SessionSettings.baseline(CUDA, settings.threads)
    if settings.provider == CUDA:
        failure = cuda_failure()
        if failure is not None:
            raise UsageError(f"the model was tuned for CUDA, but {failure.what}", f"{failure.fix}; or pass provider='cpu'")
    source = os.fspath(model) if not isinstance(model, onnx.ModelProto) else runtime_compatible(proto).SerializeToString()
    return ort.InferenceSession(source, settings.session_options(), providers=settings.providers())
