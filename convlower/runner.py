"""The runner: the one place that creates onnxruntime sessions, and the timing statistics.

Providers:
- `cpu`: CPUExecutionProvider.
- `cuda`: CUDAExecutionProvider with an explicit cuDNN algorithm search (exhaustive unless the
  session settings tuned say otherwise; never DEFAULT, see `convlower.settings`); inputs live on
  the device and outputs are preallocated there (IOBinding with OrtValues made once), so a timed
  run copies nothing to or from the host, and a CUDA graph can be captured and replayed. If CUDA
  cannot load, that is an error, never a silent fallback.
- `auto`: CUDA where it loads, else CPU with a notice saying why.

Before CUDA is tried, `onnxruntime.preload_dlls()` loads the CUDA and cuDNN libraries that pip
installed (the `nvidia-*` packages of `convlower[cuda]`, or those a CUDA build of torch brought),
so a machine with only the NVIDIA driver needs no LD_LIBRARY_PATH. When CUDA still cannot load,
the error or notice carries onnxruntime's own reason and the install line that mends it
(`cuda_failure`, `INSTALL_CUDA`).

Whatever was asked for, `Runner.provider` is what a session really got (`get_providers()`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from . import console
from .errors import UsageError
from .cache import default_cache_path
from .modelio import runtime_compatible, write_text_atomic
from .weights import runtime_model

from .settings import CPU, CUDA, CUDA_BASELINE, SessionSettings

PROVIDER_CHOICES = ("auto", "cuda", "cpu")


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
    """Makes sessions on one provider with one set of session settings, and says which provider ran."""

    def __init__(self, provider: str = "auto", threads: int | None = None, *, quiet: bool = False):
        if provider not in PROVIDER_CHOICES:
            raise UsageError(f"unknown provider {provider!r}", f"choose one of {', '.join(PROVIDER_CHOICES)}")
        self.requested = provider
        self.threads = threads
        self.notice: str | None = None
        """One short line when `auto` fell back to CPU; `reason` is onnxruntime's whole reason and the fix."""
        self.reason: str | None = None
        self.provider = self._resolve(provider)
        self.settings = SessionSettings.baseline(self.provider, threads)
        if self.notice and not quiet:
            console.notice(self.notice)
            if console.verbose and self.reason:
                console.notice(self.reason)

    def with_settings(self, settings: SessionSettings) -> "Runner":
        """A runner like this one whose sessions use `settings` (for the same provider)."""
        if settings.provider != self.provider:
            raise ValueError(f"settings for {settings.provider} on a runner of {self.provider}")
        other = copy.copy(self)
        other.settings = settings
        return other

    def _resolve(self, requested: str) -> str:
        if requested == "cpu":
            return CPU
        failure = cuda_failure()
        if failure is None:
            return CUDA
        if requested == "cuda":
            raise UsageError(f"--provider cuda: {failure.what}", failure.fix)
        self.notice = f"{failure.summary}: running on CPUExecutionProvider (README: Running on a GPU; --verbose says why)"
        self.reason = f"{failure.what}; {failure.fix}"
        return CPU

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
        options = self.settings.session_options()
        options.log_severity_level = 4  # failures reach the user as exceptions, in one line
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        handed: list[ort.OrtValue] = []
        if isinstance(model, onnx.ModelProto):
            model, data_folder, arrays = runtime_model(runtime_compatible(model))
            if data_folder:
                options.add_session_config_entry("session.model_external_initializers_file_folder_path", data_folder)
            if arrays:
                handed = [ort.OrtValue.ortvalue_from_numpy(array) for array in arrays.values()]
                options.add_external_initializers(list(arrays), handed)
        try:
            session = ort.InferenceSession(model, options, providers=self.settings.providers())
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own error classes
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(
                f"onnxruntime cannot load {what}: {reason}", "check that the model is valid for this onnxruntime"
            ) from exc
        session.external_initializers = handed  # their buffers must outlive the session
        return Session(session, self.provider, what, cuda_graph=self.settings.cuda_graph)


class RunError(UsageError):
    """onnxruntime failed while running a model it had loaded: on these inputs the model cannot run.

    `node` and `op` name where (onnxruntime says so in its message), `reason` its own words.
    """

    def __init__(self, what: str, node: str | None, op: str | None, reason: str):
        where = f" at node {node!r} ({op})" if node else ""
        super().__init__(f"onnxruntime fails running {what}{where}: {reason}",
                         "give inputs the model accepts: --input-shape NAME:DIMS or --inputs DATA.npz")
        self.node, self.op, self.reason = node, op, reason


_NODE_FAILURE = re.compile(r"running (?P<op>[\w.]+) node\. Name:'(?P<node>[^']*)' Status Message: (?P<reason>.*)", re.S)


_SOURCE_LOCATION = re.compile(r"^\S+\.(?:h|cc|cpp|cu):\d+ .*?\) (?=\S)")


def run_error(exc: Exception, what: str) -> RunError:
    """onnxruntime's run-time failure as a `RunError`: the failing node, when its message names
    one, and onnxruntime's reason without the source file and function it was raised in."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    found = _NODE_FAILURE.search(text)
    node, op, reason = (found["node"], found["op"], found["reason"]) if found else (None, None, text.split(" : ")[-1])
    return RunError(what, node, op, _SOURCE_LOCATION.sub("", reason.strip()))


class Session:
    """One onnxruntime session: run on feeds, or time repeated runs on them."""

    def __init__(self, session: ort.InferenceSession, provider: str, what: str = "the model", *, cuda_graph: bool = False):
        self.ort = session
        self.provider = session.get_providers()[0]
        self.output_names = [o.name for o in session.get_outputs()]
        self.input_names = [i.name for i in session.get_inputs()]
        self._on_device = provider == CUDA and self.provider == CUDA
        self.cuda_graph = cuda_graph and self._on_device
        self.what = what

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs as host arrays, in the session's output order; a failure raises `RunError`.

        A session that replays a CUDA graph runs only through `runner_for`, whose buffers stay put."""
        if self.cuda_graph:
            raise ValueError(f"{self.what}: a CUDA-graph session runs through runner_for(feeds, outputs_like=...)")
        try:
            return self.ort.run(None, self._select(feeds))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own error classes
            raise run_error(exc, self.what) from exc

    def _select(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: feeds[name] for name in self.input_names}

    def runner_for(self, feeds: dict[str, np.ndarray], outputs_like: Sequence[np.ndarray] | None = None) -> "BoundRun":
        """A zero-argument callable that runs once on these feeds, device-resident on CUDA.

        One checked run comes first, so inputs the model cannot run on raise `RunError` here. On
        CUDA, inputs are copied to the device once and outputs preallocated there, from the
        checked run's outputs or, for a CUDA-graph session (whose buffers must not move between
        capture and replay), from `outputs_like`, arrays of the outputs' shapes and dtypes."""
        selected = self._select(feeds)
        if not self._on_device:
            self.run(feeds)
            return BoundRun(lambda: self.ort.run(None, selected))
        if outputs_like is None:
            outputs_like = self.run(feeds)
        binding = self.ort.io_binding()
        inputs = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(selected[name]), "cuda", 0) for name in self.input_names]
        outputs = [ort.OrtValue.ortvalue_from_shape_and_type(list(like.shape), like.dtype, "cuda", 0) for like in outputs_like]
        for name, value in zip(self.input_names, inputs):
            binding.bind_ortvalue_input(name, value)
        for name, value in zip(self.output_names, outputs):
            binding.bind_ortvalue_output(name, value)

        def once() -> None:
            self.ort.run_with_iobinding(binding)

        try:
            once()  # a CUDA graph is captured here
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own error classes
            raise run_error(exc, self.what) from exc
        return BoundRun(once, outputs, keep=inputs)

    def time(self, feeds: dict[str, np.ndarray], policy: TimingPolicy = TimingPolicy()) -> Timing:
        return time_interleaved([self], feeds, policy)[0]


class BoundRun:
    """One run of a session on fixed feeds, as a zero-argument callable; on CUDA its inputs and
    outputs live on the device, and `outputs()` copies the last run's outputs to the host."""

    def __init__(self, call: Callable[[], object], device_outputs: Sequence[ort.OrtValue] = (), keep: Sequence[ort.OrtValue] = ()):
        self._call = call
        self._device_outputs = list(device_outputs)
        self._keep = list(keep)  # the device inputs must outlive the binding

    def __call__(self) -> object:
        return self._call()

    def outputs(self) -> list[np.ndarray]:
        if self._device_outputs:
            return [value.numpy() for value in self._device_outputs]
        return list(self._call())  # type: ignore[arg-type]


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


INSTALL_CUDA = "pip install 'onnxruntime-gpu[cuda,cudnn]>=1.31'"
"""The one line that brings CUDA 13 and cuDNN 9 for onnxruntime-gpu (its own `cuda` and `cudnn` extras).

It is what convlower's `cuda` extra installs, written so that it works however convlower itself was
installed (convlower is installed from its checkout, `pip install -e '.[cuda]'`, not from PyPI).
"""


@dataclass(frozen=True)
class CudaFailure:
    """Why CUDAExecutionProvider cannot run here (`what`), how to mend it (`fix`), and the gist in
    a few words (`summary`, for the one line a user reads first)."""

    what: str
    fix: str
    summary: str = "CUDA is not available here"


@functools.cache
def cuda_failure() -> CudaFailure | None:
    """None when a session really gets CUDAExecutionProvider, else why not and how to mend it.

    Probed once per machine and environment: the answer is kept in `cuda_probe.json` beside the
    tuning cache, keyed by `_probe_environment` (onnxruntime, the Python environment, the NVIDIA
    packages and driver, the library path), and probed again when any of those changes. The probe
    loads the CUDA libraries (`preload_cuda_libraries`), then makes a one-node session asking for
    CUDA first. onnxruntime either raises, or falls back to CPU and only logs why; both reasons
    are kept, with the libraries `preload_dlls` could not load.
    """
    if CUDA not in ort.get_available_providers():
        return CudaFailure(
            f"this onnxruntime ({ort.__version__}) is a build without CUDAExecutionProvider",
            f"install onnxruntime-gpu in its place (x86_64 Linux or Windows): "
            f"pip uninstall -y onnxruntime && {INSTALL_CUDA}",
            "this onnxruntime has no CUDA provider",
        )
    environment = _probe_environment()
    known = _read_probe(environment)
    if known is not None:
        return CudaFailure(**known) if known else None
    failure = _cuda_failure_probed()
    _write_probe(environment, asdict(failure) if failure else {})
    return failure


def _cuda_failure_probed() -> CudaFailure | None:
    preload_trouble = preload_cuda_libraries()
    reason = _probe_cuda()
    if reason is None:
        return None
    if preload_trouble:
        reason += f" ({preload_trouble})"
    return CudaFailure(
        f"CUDAExecutionProvider could not load: {reason}",
        f"for an NVIDIA GPU with its driver, install CUDA 13 and cuDNN 9 with {INSTALL_CUDA} (convlower's cuda extra)",
        "CUDA libraries are missing" if "cannot open shared object" in reason or preload_trouble else "CUDA did not start",
    )


def _probe_path() -> Path:
    return default_cache_path().with_name("cuda_probe.json")


def _probe_environment() -> str:
    """What the probe's answer depends on: onnxruntime's version and files, the interpreter's
    environment, the NVIDIA packages pip installed, the driver, the library path, the visible GPUs."""
    parts = [ort.__version__, ort.__file__, sys.prefix, os.environ.get("LD_LIBRARY_PATH", ""),
             os.environ.get("CUDA_VISIBLE_DEVICES", ""), str(os.path.exists("/dev/nvidiactl"))]
    for path in [os.path.dirname(ort.__file__), os.path.join(os.path.dirname(os.path.dirname(ort.__file__)), "nvidia")]:
        with contextlib.suppress(OSError):
            parts.append(f"{path}:{os.stat(path).st_mtime_ns}")
    with contextlib.suppress(OSError), open("/proc/driver/nvidia/version") as driver:
        parts.append(driver.readline().strip())
    return "|".join(parts)


def _read_probe(environment: str) -> dict[str, str] | None:
    """The probe's stored answer for this environment ({} for "CUDA loads"), or None."""
    with contextlib.suppress(OSError, ValueError, TypeError):
        with open(_probe_path()) as file:
            stored = json.load(file)
        answer = stored.get(environment) if isinstance(stored, dict) else None
        if answer == {} or (isinstance(answer, dict) and set(answer) == {"what", "fix", "summary"}):
            return answer
    return None


def _write_probe(environment: str, answer: dict[str, str]) -> None:
    """Keep the answer for this environment (the last few environments' answers stay); never fails."""
    with contextlib.suppress(OSError, ValueError, TypeError):
        stored: dict = {}
        with contextlib.suppress(OSError, ValueError):
            with open(_probe_path()) as file:
                stored = json.load(file)
        stored = {key: value for key, value in (stored.items() if isinstance(stored, dict) else []) if key != environment}
        stored = dict(list(stored.items())[-7:])
        stored[environment] = answer
        _probe_path().parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(_probe_path(), json.dumps(stored, indent=1))


def preload_cuda_libraries() -> str | None:
    """Load the CUDA and cuDNN libraries with `onnxruntime.preload_dlls()`; None, or what went wrong.

    `preload_dlls` (onnxruntime 1.21+) finds the libraries in the `nvidia-*` packages pip
    installed, which a plain `dlopen` would not search. It prints what it could not load to
    stdout, which would corrupt `--json` output, so its prints are caught here and only the
    library names kept; its warnings are dropped, as the probe that follows says what failed.
    Older onnxruntime has no `preload_dlls`; then the system's library path is all there is.
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return None
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            preload()
        except Exception as exc:  # noqa: BLE001 - a failed preload leaves the libraries to the system path
            return f"preload_dlls failed: {exc}"
    failed = [m.group(1) for m in map(_PRELOAD_FAILED.match, printed.getvalue().splitlines()) if m]
    names = dict.fromkeys(os.path.basename(name) for name in failed)
    return f"preload_dlls could not load {', '.join(names)}" if names else None


_PRELOAD_FAILED = re.compile(r"Failed to load (\S+?): ")
_ORT_LOG_LINE = re.compile(r"\[([EW]):onnxruntime:[^\]]*\] (.*)")
_ORT_ERROR = re.compile(r"\[ONNXRuntimeError\] : \d+ : \w+ : (.*)")
_LOAD_ERROR = re.compile(r"Failed to load library (\S+) with error: (.*)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _probe_cuda() -> str | None:
    """None when a one-node session gets CUDAExecutionProvider, else onnxruntime's reason why not."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    probe = runtime_compatible(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    previous = _logger_severity(2)
    log: list[str] = []
    try:
        with _stderr_into(log):
            session = ort.InferenceSession(
                probe.SerializeToString(), options, providers=[(CUDA, CUDA_BASELINE), CPU]
            )
    except Exception as exc:  # noqa: BLE001 - any failure to start CUDA means CPU
        return _ort_reason(str(exc)) or type(exc).__name__
    finally:
        _logger_severity(previous)
    if session.get_providers()[0] == CUDA:
        return None
    return _logged_reason("".join(log)) or "onnxruntime fell back to CPUExecutionProvider without logging why"


@contextlib.contextmanager
def _stderr_into(log: list[str]):
    """Send file descriptor 2 to a temporary file while the block runs, then append its text to `log`.

    onnxruntime's C++ logger writes there directly, past `sys.stderr`; this is how its reason for
    falling back to CPU is read (and kept off the user's terminal as a raw log line).
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            log.append(sink.read().decode(errors="replace"))


def _logged_reason(log: str) -> str | None:
    """onnxruntime's reason in its log: the error lines, else the warning lines, each made short."""
    entries = [m.groups() for m in map(_ORT_LOG_LINE.search, _ANSI.sub("", log).splitlines()) if m]
    for severity in ("E", "W"):
        messages = [_ort_reason(text) for level, text in entries if level == severity]
        if messages:
            return "; ".join(dict.fromkeys(messages))
    return None


def _ort_reason(message: str) -> str:
    """onnxruntime's message without its source location: `lib.so: dlerror` for a library that did not load."""
    message = " ".join(message.split())
    error = _ORT_ERROR.search(message)
    if error:
        message = error.group(1)
    load = _LOAD_ERROR.search(message)
    if load:
        message = f"{os.path.basename(load.group(1))}: {load.group(2)}"
    return message.strip()


def _logger_severity(level: int) -> int:
    """Set onnxruntime's default logger severity; returns the previous one (2, onnxruntime's default, unless changed)."""
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


@dataclass(frozen=True)
class PairedPolicy:
    """How `time_paired` measures: rounds of `block` timed runs of each model back to back, from
    `min_rounds` until the answer is clear, or `budget_s` / `max_rounds` is spent.

    The answer is clear when the confidence interval of the ratio lies wholly above the threshold,
    or wholly below it and no wider than ±`precision`: a ratio below the threshold is what gets
    kept and built on (a group's in-context ratio is a factor of the predicted speedup), so that
    answer measures on, within the budget, until the estimate is precise; one above it is dropped
    as soon as it is clear. Without a threshold, until the interval is within ±`precision`.

    Runs of `long_run_ms` or more are timed one per side a round, without the untimed run after
    each switch: that run absorbs the caches the other model evicted, which such a run does not
    notice, and at a second a run the rounds are what the budget must buy."""

    warmup: int = 3
    block: int = 3
    min_rounds: int = 10
    max_rounds: int = 400
    budget_s: float = 8.0
    confidence: float = 0.95
    resamples: int = 2000
    precision: float = 0.01
    long_run_ms: float = 50.0


@dataclass(frozen=True)
class PairedRatio:
    """B's latency over A's: the median of per-round ratios, with a bootstrap interval.

    Each round times A and B back to back (the order alternating), so drift on a shared machine
    (another process, a clock change) moves both sides of a round alike and cancels in its ratio;
    the interval is over rounds, the unit that is independent. The median, not the mean, so that
    a burst of load on another process that hits one side of a few rounds does not decide."""

    ratio: float
    low: float
    high: float
    confidence: float
    rounds: int
    a: Timing
    b: Timing
    cached: bool = False
    """Read back from the tuning cache (`convlower.measure`), not timed in this run."""

    def to_dict(self) -> dict[str, object]:
        found: dict[str, object] = {"ratio": round(self.ratio, 4), "interval": [round(self.low, 4), round(self.high, 4)],
                                    "confidence": self.confidence, "rounds": self.rounds,
                                    "a_median_ms": self.a.median_ms, "b_median_ms": self.b.median_ms}
        if self.cached:
            found["cached"] = True
        return found


def time_paired(
    a: Callable[[], object], b: Callable[[], object], policy: PairedPolicy = PairedPolicy(), threshold: float | None = None
) -> PairedRatio:
    """Time B against A in paired rounds until the interval of B/A lies wholly above `threshold`,
    or wholly below it and within ±`policy.precision` (see `PairedPolicy`), or the budget is spent."""
    warm = [_warm_up(call, policy.warmup) for call in (a, b)]
    block, settle = (1, False) if max(warm) >= policy.long_run_ms else (policy.block, True)
    samples: tuple[list[float], list[float]] = ([], [])
    log_ratios: list[float] = []
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    low = high = 1.0
    next_check = policy.min_rounds
    while True:
        order = (0, 1) if len(log_ratios) % 2 == 0 else (1, 0)
        medians = [0.0, 0.0]
        for index in order:
            call = (a, b)[index]
            if settle:
                call()
            runs = []
            for _ in range(block):
                t0 = time.perf_counter()
                call()
                runs.append((time.perf_counter() - t0) * 1e3)
            samples[index].extend(runs)
            medians[index] = statistics.median(runs)
        log_ratios.append(float(np.log(medians[1] / medians[0])) if medians[0] > 0 and medians[1] > 0 else 0.0)
        rounds = len(log_ratios)
        spent = rounds >= policy.max_rounds or time.perf_counter() - start > policy.budget_s
        if rounds < policy.min_rounds or (rounds < next_check and not spent):
            continue
        next_check = rounds + max(1, rounds // 8)  # the bootstrap costs more than a fast round: not after every one
        low, high = _bootstrap_interval(np.array(log_ratios), policy, rng)
        precise = high / low <= (1 + policy.precision) / (1 - policy.precision)
        if threshold is None:
            done = precise
        else:
            done = low > threshold or (high < threshold and precise)
        if done or spent:
            break
    return PairedRatio(float(np.exp(np.median(log_ratios))), low, high, policy.confidence, len(log_ratios),
                       Timing.of(samples[0]), Timing.of(samples[1]))


def _warm_up(call: Callable[[], object], runs: int) -> float:
    """Run `call` `runs` times (at least once) and return its last run's milliseconds."""
    elapsed = 0.0
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        call()
        elapsed = (time.perf_counter() - t0) * 1e3
    return elapsed


def _bootstrap_interval(log_ratios: np.ndarray, policy: PairedPolicy, rng: np.random.Generator) -> tuple[float, float]:
    """Percentile bootstrap interval of the median ratio."""
    picks = rng.integers(0, len(log_ratios), size=(policy.resamples, len(log_ratios)))
    medians = np.median(log_ratios[picks], axis=1)
    tail = (1 - policy.confidence) / 2 * 100
    low, high = np.percentile(medians, [tail, 100 - tail])
    return float(np.exp(low)), float(np.exp(high))
