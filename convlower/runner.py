"""The runner: the one place that creates onnxruntime sessions, and the timing statistics.

Providers:
- `cpu`: CPUExecutionProvider.
- `cuda`: CUDAExecutionProvider with cuDNN's exhaustive algorithm search; inputs live on the
  device (IOBinding with OrtValues made once), outputs stay there while timing. If CUDA cannot
  load, that is an error, never a silent fallback.
- `auto`: CUDA where it loads, else CPU with a notice saying why.

Whatever was asked for, `Runner.provider` is what a session really got (`get_providers()`).
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from . import console
from .errors import UsageError
from .modelio import runtime_compatible
from .weights import runtime_model

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
PROVIDER_CHOICES = ("auto", "cuda", "cpu")

CUDA_OPTIONS = {
    "device_id": "0",
    "cudnn_conv_algo_search": "EXHAUSTIVE",
    "cudnn_conv_use_max_workspace": "1",
    "do_copy_in_default_stream": "1",
}


@dataclass(frozen=True)
class Timing:
    """Latency statistics of one model, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: how noisy the measurement was."""
        return (self.p90_ms - self.p10_ms) / self.median_ms if self.median_ms else 0.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def of(cls, samples_ms: Sequence[float]) -> "Timing":
        q = np.percentile(samples_ms, [10, 50, 90])
        return cls(float(q[1]), float(q[0]), float(q[2]), len(samples_ms))


@dataclass(frozen=True)
class TimingPolicy:
    """When to stop timing: the medians are stable (checked every 5 runs from `min_runs`), the
    time budget is spent (after at least 3 runs, so slow models still stop), or `max_runs`."""

    warmup: int = 3
    min_runs: int = 10
    max_runs: int = 500
    budget_s: float = 1.0
    stable_within: float = 0.02
    block: int = 3


class Runner:
    """Makes sessions on one provider with one thread setting, and says which provider ran."""

    def __init__(self, provider: str = "auto", threads: int | None = None, *, quiet: bool = False):
        if provider not in PROVIDER_CHOICES:
            raise UsageError(f"unknown provider {provider!r}", f"choose one of {', '.join(PROVIDER_CHOICES)}")
        self.requested = provider
        self.threads = threads
        self.notice: str | None = None
        self.provider = self._resolve(provider)
        if self.notice and not quiet:
            console.notice(self.notice)

    def _resolve(self, requested: str) -> str:
        if requested == "cpu":
            return CPU
        available = ort.get_available_providers()
        if CUDA in available:
            got = self._probe_cuda()
            if got == CUDA:
                return CUDA
            why = "CUDAExecutionProvider is installed but could not load (no GPU, or CUDA/cuDNN libraries missing)"
        else:
            why = "this onnxruntime build has no CUDAExecutionProvider"
        if requested == "cuda":
            raise UsageError(f"--provider cuda: {why}", "install CUDA and cuDNN for onnxruntime-gpu, or use --provider cpu")
        self.notice = f"{why}; running on CPUExecutionProvider"
        return CPU

    def _probe_cuda(self) -> str:
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            "probe",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )
        probe = runtime_compatible(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
        options = ort.SessionOptions()
        options.log_severity_level = 4
        previous = _logger_severity(4)
        try:
            session = ort.InferenceSession(
                probe.SerializeToString(), options, providers=[(CUDA, CUDA_OPTIONS), CPU]
            )
            return session.get_providers()[0]
        except Exception:  # noqa: BLE001 - any failure to start CUDA means CPU
            return CPU
        finally:
            _logger_severity(previous)

    @property
    def device(self) -> str:
        """A readable name of the device the provider runs on."""
        return gpu_name() if self.provider == CUDA else cpu_name()

    def session(self, model: onnx.ModelProto | bytes, *, what: str = "the model") -> "Session":
        """A session for `model`; a model onnxruntime refuses raises `UsageError` naming the reason.

        Worker threads do not spin while idle: convlower keeps several sessions alive and times
        them in turn, and measured here the spinning threads of idle sessions took the cores from
        the running one (a ResNet's interleaved median doubled, 4.7 -> 9.0 ms). Every session
        pays the same small wake-up cost instead, so comparisons stay fair.
        """
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.threads:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        handed: list[ort.OrtValue] = []
        if isinstance(model, onnx.ModelProto):
            model, data_folder, arrays = runtime_model(runtime_compatible(model))
            if data_folder:
                options.add_session_config_entry("session.model_external_initializers_file_folder_path", data_folder)
            if arrays:
                handed = [ort.OrtValue.ortvalue_from_numpy(array) for array in arrays.values()]
                options.add_external_initializers(list(arrays), handed)
        providers: list = [(CUDA, CUDA_OPTIONS), CPU] if self.provider == CUDA else [CPU]
        try:
            session = ort.InferenceSession(model, options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own error classes
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(
                f"onnxruntime cannot load {what}: {reason}", "check that the model is valid for this onnxruntime"
            ) from exc
        session.external_initializers = handed  # their buffers must outlive the session
        return Session(session, self.provider)


class Session:
    """One onnxruntime session: run on feeds, or time repeated runs on them."""

    def __init__(self, session: ort.InferenceSession, provider: str):
        self.ort = session
        self.provider = session.get_providers()[0]
        self.output_names = [o.name for o in session.get_outputs()]
        self.input_names = [i.name for i in session.get_inputs()]
        self._on_device = provider == CUDA and self.provider == CUDA

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs as host arrays, in the session's output order."""
        return self.ort.run(None, self._select(feeds))

    def _select(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: feeds[name] for name in self.input_names}

    def runner_for(self, feeds: dict[str, np.ndarray]):
        """A zero-argument callable that runs once on these feeds, device-resident on CUDA."""
        selected = self._select(feeds)
        if not self._on_device:
            return lambda: self.ort.run(None, selected)
        binding = self.ort.io_binding()
        keep = []
        for name, array in selected.items():
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array).reshape(array.shape), "cuda", 0)
            keep.append(value)
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, "cuda", 0)

        def once():
            self.ort.run_with_iobinding(binding)
            return keep

        return once

    def time(self, feeds: dict[str, np.ndarray], policy: TimingPolicy = TimingPolicy()) -> Timing:
        return time_interleaved([self], feeds, policy)[0]


def time_interleaved(
    sessions: Sequence[Session], feeds: dict[str, np.ndarray], policy: TimingPolicy = TimingPolicy()
) -> list[Timing]:
    """Time several sessions on the same feeds, interleaved (see `time_calls`)."""
    return time_calls([s.runner_for(feeds) for s in sessions], policy)


def time_calls(calls: Sequence[Callable[[], object]], policy: TimingPolicy = TimingPolicy()) -> list[Timing]:
    """Time several zero-argument calls, interleaved so drift hits all alike.

    Each round runs every call for a block of `policy.block` timed runs after one untimed run
    (the first run after a switch pays for caches the other call evicted), and the order rotates
    every round so no call always goes first.
    """
    for call in calls:
        for _ in range(policy.warmup):
            call()
    samples: list[list[float]] = [[] for _ in calls]
    start = time.perf_counter()
    last_median: list[float] | None = None
    order = list(range(len(calls)))
    while True:
        for index in order:
            calls[index]()
            for _ in range(policy.block):
                t0 = time.perf_counter()
                calls[index]()
                samples[index].append((time.perf_counter() - t0) * 1e3)
        order = order[1:] + order[:1]
        runs = len(samples[0])
        if runs >= policy.max_runs or (runs >= 3 and time.perf_counter() - start > policy.budget_s):
            break
        if runs >= policy.min_runs and runs % (policy.block * 3) == 0:
            medians = [statistics.median(b) for b in samples]
            if last_median and all(
                abs(m - p) <= policy.stable_within * p for m, p in zip(medians, last_median)
            ):
                break
            last_median = medians
    return [Timing.of(b) for b in samples]


def _logger_severity(level: int) -> int:
    """Set onnxruntime's default logger severity; returns the previous one (3 unless changed)."""
    previous = getattr(_logger_severity, "current", 2)
    ort.set_default_logger_severity(level)
    _logger_severity.current = level  # type: ignore[attr-defined]
    return previous


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def gpu_name() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
            capture_output=True, text=True, timeout=10, check=True,
        )
        return out.stdout.strip() or "CUDA device 0"
    except (OSError, subprocess.SubprocessError):
        return "CUDA device 0"
