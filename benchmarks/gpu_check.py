"""Does convlower work, and win, on this GPU? One command, at most five minutes on an NVIDIA H200.

    python benchmarks/gpu_check.py --out DIR [--provider cuda|cpu] [--quick]
                                   [--wheels PARTS_DIR --target DIR] [--sections environment,correctness,...]
                                   [--families conv,dynamicfilter] [--cases N] [--budget NAME=SECONDS]...

It writes DIR/summary.md (a one-paragraph verdict, then one part per section) and DIR/check.json
(every figure, with each section's status, budget, time taken and where it stopped), and prints
its progress on stderr.

Sections (`--sections` picks some, in this order), each with a time budget in seconds (full / --quick):

    environment   10 / 10   GPU, driver, CUDA and cuDNN (torch, nvidia-smi, onnxruntime's build), the
                            providers a session really got, every version, NVIDIA_TF32_OVERRIDE
    correctness   70 / 50   every family of `convlower.passes.FAMILIES`, every variant, on the provider:
                            the ONNX conformance cases of Conv, ConvTranspose and Col2Im and `--cases`
                            generated nodes per family (24 / 8), in float32 and float16, against the CPU
                            reference and against the original node on the provider
    seed000       80 / 50   seed 000 at its shape (N=2048, C=1, 32x32, K=3; N=256 with --quick on CPU):
                            method_1, method_2, torch.compile(method_1), the ONNX export, convlower's
                            optimized model and a device-to-device copy of the op's bytes, timed in one run
    zoo           70 / 30   `convlower.optimize` (guard on, no cache) on the zoo's models, dynamic filters first
    conv_shapes   40 / 25   the Conv layers of bench_conv.py, the real-model corpus and the zoo: every
                            applicable Conv variant against the provider's own Conv, interleaved
    total        290 / 175  the whole run, from the start, staging included

A section that runs out of its budget keeps what it finished, records "ran out of time in SECTION
at STEP", and the check goes on with the next section. When staging and startup leave less than
the sections' budgets, every budget is scaled down alike; when the total is spent, the sections
left are not run. Budgets are enforced by SIGALRM (`TimeLimit`), so a step that hangs (a compile, an
optimize) is cut off too; a long call into C (a cuDNN search) is cut off when it returns.
`--budget NAME=SECONDS` overrides one (a section's name, or `total`).

`--wheels PARTS_DIR --target DIR` first installs the staged wheels (onnxruntime-gpu, onnx-graphsurgeon,
convlower) with `gpu_stage.install_staged`: before anything imports onnxruntime or convlower, which
this script imports only inside its functions for that reason. `NVIDIA_TF32_OVERRIDE=0` is set at
startup, before CUDA initialises, so that cuBLAS and cuDNN (torch's and onnxruntime's) compute in
true float32 and no comparison is blurred by TF32.

Exit status: 0 when every section selected ran (or ran out of time) and correctness found no
failure; 1 when correctness found a failure or a section stopped on an error; 2 for bad usage, a
staging failure, or a provider that cannot load (`--provider cuda` without CUDA).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import io
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

if TYPE_CHECKING:  # imported for real inside functions, after staging
    import torch
    from bench_conv import ConvShape
    from convlower.optimize import OptimizeResult
    from convlower.passes import OpFamily
    from convlower.runner import BoundRun, Runner, Timing

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
HERE = Path(__file__).resolve().parent
CORPUS_SHAPES = HERE / "corpus_conv_shapes.json"
SEED_BATCH = 2048
QUICK_CPU_SEED_BATCH = 256
ZOO_ORDER = ("involution", "carafe", "kpn_denoiser", "resnet", "mobilenet", "unet", "tcn", "conv3d")
"""The zoo section's models, dynamic filters (where convlower should win) first; seed_filter is
seed 000's layer, timed in the seed000 section."""
QUICK_ZOO = ("involution", "kpn_denoiser", "resnet")
FLOAT_DTYPES = ("float32", "float16")


# ---- time budgets -------------------------------------------------------------------------------


class OutOfTime(BaseException):
    """Raised from SIGALRM when a `TimeLimit` expires. A BaseException, so that no `except Exception`
    in convlower, onnxruntime or torch code swallows it on its way to the limit's `with` block."""

    def __init__(self, limit: "TimeLimit"):
        super().__init__(f"{limit.what}: its {limit.seconds:.0f} s are spent")
        self.limit = limit


class TimeLimit:
    """A `with` block that may take at most `seconds`; when they are spent, OutOfTime is raised in
    it and the block ends, `expired` set. Limits nest: the outermost one that expired is raised (a
    section's limit ends the section, not just its current step), and one that fires inside
    another fires through it. The alarm repeats every second until the block is left, so code that
    catches even BaseException cannot keep running past its limit."""

    active: ClassVar[list["TimeLimit"]] = []

    def __init__(self, seconds: float, what: str):
        self.seconds = max(seconds, 0.0)
        self.what = what
        self.deadline = time.monotonic() + self.seconds
        self.expired = False

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def __enter__(self) -> "TimeLimit":
        self.deadline = time.monotonic() + self.seconds
        TimeLimit.active.append(self)
        _arm()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        signal.setitimer(signal.ITIMER_REAL, 0)
        TimeLimit.active.remove(self)
        _arm()
        if isinstance(exc, OutOfTime) and exc.limit is self:
            self.expired = True
            return True
        return False


def _arm() -> None:
    """Set the alarm for the soonest deadline of the active limits (none: no alarm)."""
    if not TimeLimit.active:
        signal.setitimer(signal.ITIMER_REAL, 0)
        return
    soonest = min(limit.deadline for limit in TimeLimit.active)
    signal.setitimer(signal.ITIMER_REAL, max(soonest - time.monotonic(), 0.001), 1.0)


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    now = time.monotonic()
    expired = [limit for limit in TimeLimit.active if limit.deadline <= now + 0.001]
    if expired:
        raise OutOfTime(expired[0])
    _arm()


# ---- the record of a run ------------------------------------------------------------------------


@dataclass
class SectionRecord:
    """What one section did: its status, budget, time taken, the step it was at, and its figures.

    Sections write their figures into `data` as they go, so a section cut off keeps what it finished."""

    name: str
    budget_s: float
    status: str = "not run"
    step: str = ""
    message: str = ""
    elapsed_s: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)
    deadline: float = math.inf
    """When the section's budget ends (time.monotonic()); set when it starts."""

    def remaining(self) -> float:
        """Seconds left of the section's budget: what a step that takes a share of it divides."""
        return max(0.0, self.deadline - time.monotonic())

    def at(self, step: str, *, show: bool = True) -> None:
        """Record the step the section is at (it names where a cut-off happened); print it unless told not to."""
        self.step = step
        if show:
            progress(f"{self.name}: {step}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "budget_s": self.budget_s, "status": self.status, "step": self.step,
                "message": self.message, "elapsed_s": self.elapsed_s, "data": self.data}


STARTED = time.monotonic()


def progress(text: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f}s] {text}", file=sys.stderr, flush=True)


def short(exc: BaseException, width: int = 300) -> str:
    """An exception as one line: its type and the first line of its message, cut to `width`."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= width else text[: width - 1] + "…"


@dataclass
class Context:
    """What every section shares: the options, the runner on the provider, and the zoo's exports."""

    args: argparse.Namespace
    runner: "Runner"
    session_providers: list[str]
    """The providers the probe session really got (`get_providers()`), CUDA's fallback included."""
    tf32_before: str | None
    staged: list[str]
    exports: dict[tuple[str, str], "Exported"] = field(default_factory=dict)

    @property
    def quick(self) -> bool:
        return self.args.quick

    @property
    def provider(self) -> str:
        """The execution provider sessions really get (CUDAExecutionProvider or CPUExecutionProvider)."""
        return self.runner.provider

    @property
    def on_cuda(self) -> bool:
        return self.provider == CUDA

    @property
    def provider_flag(self) -> str:
        """The provider as convlower's API and command line name it."""
        return "cuda" if self.on_cuda else "cpu"

    def zoo_export(self, name: str, size: str) -> "Exported":
        """A zoo model exported once per run (the zoo and conv_shapes sections share it)."""
        if (name, size) not in self.exports:
            from convlower.models import ZOO

            module, inputs = ZOO[name](size)
            self.exports[(name, size)] = export_module(module, inputs)
        return self.exports[(name, size)]


# ---- exporting and timing -----------------------------------------------------------------------


@dataclass
class Exported:
    """A torch module exported to ONNX, and the feeds of its example inputs."""

    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]


def export_module(module: Any, inputs: Sequence[Any]) -> Exported:
    """`convlower.export` with the TorchScript exporter: it needs no onnxscript (which the GPU
    machine lacks) and exports the zoo about 3x faster than the dynamo exporter; convlower
    recognizes the idioms of both."""
    import convlower

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        model = convlower.export(module, tuple(inputs), dynamo=False)
    return Exported(model, feeds_of(model, [t.detach().cpu().numpy() for t in inputs]))


def feeds_of(model: onnx.ModelProto, arrays: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """The model's graph inputs (those that are not initializers), in order, bound to `arrays`."""
    weights = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in weights]
    return dict(zip(names, arrays))


Timer = Callable[[], float]
"""One timed run of a candidate: runs it once and returns its milliseconds."""


def wall_timer(call: Callable[[], object]) -> Timer:
    """Wall time of a synchronous call: an onnxruntime run (an IOBinding run on CUDA returns when
    the device is done), or torch on the CPU."""

    def timed() -> float:
        start = time.perf_counter()
        call()
        return (time.perf_counter() - start) * 1e3

    return timed


def torch_timer(call: Callable[[], object], device: "torch.device") -> Timer:
    """On CUDA, the device time between two CUDA events around the call; on the CPU, wall time."""
    import torch

    if device.type != "cuda":
        return wall_timer(call)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def timed() -> float:
        start.record()
        call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    return timed


def time_rounds(timers: dict[str, Timer], budget_s: float, *, warmup: int = 3, max_rounds: int = 300) -> dict[str, "Timing"]:
    """Time every candidate in rounds, one run each per round in a rotating order, so that drift
    (clocks, other load) hits all alike; until `budget_s` is spent (at least 3 rounds) or `max_rounds`."""
    from convlower.runner import Timing

    for timer in timers.values():
        for _ in range(warmup):
            timer()
    names = list(timers)
    samples: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < 3 or time.perf_counter() - start < budget_s):
        for name in names:
            samples[name].append(timers[name]())
        names = names[1:] + names[:1]
        rounds += 1
    return {name: Timing.of(values) for name, values in samples.items()}


# ---- section 0: environment ---------------------------------------------------------------------


def run_environment(ctx: Context, record: SectionRecord) -> None:
    """Versions of everything that decides the figures, and the providers a session really got."""
    record.data["session_providers"] = ctx.session_providers
    record.data["device"] = ctx.runner.device
    record_environment(record, ctx.args.provider, ctx.tf32_before, ctx.staged)


def record_environment(record: SectionRecord, requested: str, tf32_before: str | None, staged: list[str]) -> None:
    """The facts that need no session: versions, builds, the GPU. Also recorded when the provider
    cannot load, since they are what says why."""
    import convlower
    import onnxruntime as ort
    from convlower.runner import cpu_name

    data = record.data
    data["python"] = sys.version.split()[0]
    data["platform"] = platform.platform()
    data["cpu"] = cpu_name()
    data["NVIDIA_TF32_OVERRIDE"] = {"value": os.environ.get("NVIDIA_TF32_OVERRIDE"), "before": tf32_before}
    data["provider_requested"] = requested
    data["versions"] = {"convlower": convlower.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                        "numpy": np.__version__}
    data["staged"] = staged
    record.at("onnxruntime build")
    data["onnxruntime"] = onnxruntime_build()
    record.at("torch")
    data["torch"] = torch_build()
    data["versions"]["torch"] = data["torch"]["version"]
    record.at("nvidia-smi")
    data["nvidia_smi"] = nvidia_smi()
    data["nvidia_packages"] = {d.metadata["Name"]: d.version for d in importlib.metadata.distributions()
                               if (d.metadata["Name"] or "").lower().startswith("nvidia-")}
    data["loaded_cuda_libraries"] = loaded_cuda_libraries()


def onnxruntime_build() -> dict[str, Any]:
    """onnxruntime's package, the CUDA (and cuDNN, where recorded) it was built for, its providers."""
    import onnxruntime as ort
    from onnxruntime.capi import build_and_package_info as build

    return {
        "version": ort.__version__,
        "package": getattr(build, "package_name", None),
        "built_for_cuda": getattr(build, "cuda_version", None),
        "built_for_cudnn": getattr(build, "cudnn_version", None),
        "available_providers": ort.get_available_providers(),
        "build_info": ort.get_build_info() if hasattr(ort, "get_build_info") else None,
    }


def torch_build() -> dict[str, Any]:
    """torch's version, the CUDA and cuDNN it carries, its device, and its TF32 switches."""
    import torch

    info: dict[str, Any] = {
        "version": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "allow_tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
    }
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        info["device"] = torch.cuda.get_device_name(0)
        info["capability"] = f"sm_{major}{minor}"
    return info


CUDA_LIBRARY = re.compile(r"lib(cudart|cublas|cublasLt|cudnn|cufft|curand|nvrtc|nvJitLink|onnxruntime_providers_cuda)\.so[.\d]*$")


def loaded_cuda_libraries() -> list[str]:
    """The CUDA, cuDNN and onnxruntime CUDA provider libraries this process has loaded (from
    /proc/self/maps): which files onnxruntime and torch really use, whatever they were built for."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    paths = {line.split()[-1] for line in maps.splitlines() if line.count("/")}
    return sorted(path for path in paths if CUDA_LIBRARY.search(Path(path).name))


def nvidia_smi() -> dict[str, Any]:
    """The GPUs, driver and driver CUDA version nvidia-smi reports, or why it could not say."""
    query = ("name", "driver_version", "memory.total", "compute_cap")
    try:
        listing = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(query)}", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=15, check=True)
        banner = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=15, check=True)
    except FileNotFoundError:
        return {"error": "nvidia-smi is not on PATH"}
    except (OSError, subprocess.SubprocessError) as exc:
        return {"error": short(exc)}
    gpus = [dict(zip(query, (cell.strip() for cell in line.split(",")))) for line in listing.stdout.strip().splitlines()]
    cuda = re.search(r"CUDA Version:\s*(\S+)", banner.stdout)
    return {"gpus": gpus, "driver_cuda": cuda.group(1) if cuda else None}


# ---- section 1: correctness ---------------------------------------------------------------------


@dataclass(frozen=True)
class NodeCase:
    """One generated node: its op, attributes and operands. Float operands are kept in float32 and
    cast when the model is built in another dtype; int64 operands (Col2Im's shapes) stay as they are.
    Operands named in `fed` are graph inputs, the others initializers."""

    family: str
    name: str
    op_type: str
    domain: str
    opset: int
    attrs: dict[str, Any]
    operands: dict[str, np.ndarray]
    fed: tuple[str, ...]
    output_rank: int | None = None
    """The output's rank for canonical ops (shape inference does not see through their functions)."""

    def rounded_to(self, dtype: str) -> "NodeCase":
        """The same node with its float operands rounded to `dtype` and back: its float32 model is
        then the reference of its `dtype` model."""
        rounded = {k: v.astype(dtype).astype(np.float32) if v.dtype == np.float32 else v for k, v in self.operands.items()}
        return dataclasses.replace(self, operands=rounded)

    def arrays(self, dtype: str) -> dict[str, np.ndarray]:
        return {k: v.astype(dtype) if v.dtype == np.float32 else v for k, v in self.operands.items()}

    def model(self, dtype: str) -> onnx.ModelProto:
        from convlower.modelio import runtime_compatible
        from convlower.passes.local_functions import attach_functions

        arrays = self.arrays(dtype)
        elem_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        graph_inputs = [helper.make_tensor_value_info(n, elem_type, list(arrays[n].shape)) for n in self.fed]
        weights = [numpy_helper.from_array(a, n) for n, a in arrays.items() if n not in self.fed]
        node = helper.make_node(self.op_type, list(arrays), ["y"], name=self.name, domain=self.domain, **self.attrs)
        shape = None if self.output_rank is None else [None] * self.output_rank
        graph = helper.make_graph([node], self.name, graph_inputs, [helper.make_tensor_value_info("y", elem_type, shape)], weights)
        opsets = [helper.make_opsetid("", self.opset)] + ([helper.make_opsetid(self.domain, 1)] if self.domain else [])
        model = helper.make_model(graph, opset_imports=opsets)
        return runtime_compatible(attach_functions(model) if self.domain else model)

    def feeds(self, dtype: str) -> dict[str, np.ndarray]:
        arrays = self.arrays(dtype)
        return {n: arrays[n] for n in self.fed}


def ints(rng: np.random.Generator, low: int, high: int, count: int) -> tuple[int, ...]:
    """`count` integers drawn from [low, high]."""
    return tuple(int(v) for v in rng.integers(low, high + 1, count))


def scaled_normal(rng: np.random.Generator, shape: Sequence[int], fan_in: int = 1) -> np.ndarray:
    """Standard normal values divided by sqrt(fan_in): weights as trained models hold them, so that
    outputs stay near 1 and float16's tolerance measures the lowering, not the data's scale."""
    return (rng.standard_normal(tuple(shape)) / math.sqrt(fan_in)).astype(np.float32)


CONV_KINDS = ("dense", "grouped", "depthwise", "pointwise", "patchify", "dilated", "auto_pad", "strided")
"""Kinds of Conv the generator cycles through: each variant of the Conv family has some that fit it.
With ranks cycling 2, 1, 3 alongside, 24 cases meet every kind at every rank."""


def conv_case(index: int, rng: np.random.Generator) -> NodeCase:
    """A small Conv of rank 1-3: dense, grouped, depthwise, 1x1, patch embedding, dilated, auto_pad
    or strided; asymmetric pads; bias on every other case; weights fed at run time on every fourth."""
    kind = CONV_KINDS[index % len(CONV_KINDS)]
    rank = (2, 1, 3)[index % 3]
    kernel = ints(rng, 1, 3 if rank < 3 else 2, rank)
    strides, dilations = (1,) * rank, (1,) * rank
    pads: tuple[int, ...] | None = ints(rng, 0, 2, 2 * rank)
    auto_pad = None
    group, in_channels, out_channels = 1, int(rng.integers(1, 5)), int(rng.integers(1, 6))
    if kind == "grouped":
        group = int(rng.integers(2, 4))
        in_channels, out_channels = group * int(rng.integers(1, 3)), group * int(rng.integers(1, 3))
    elif kind == "depthwise":
        group = in_channels = int(rng.integers(2, 5))
        out_channels = in_channels * int(rng.integers(1, 3))
    elif kind == "pointwise":
        kernel, strides = (1,) * rank, ints(rng, 1, 2, rank)
    elif kind == "patchify":
        kernel = ints(rng, 2, 3 if rank < 3 else 2, rank)
        strides, pads = kernel, (0,) * (2 * rank)
    elif kind == "dilated":
        dilations, strides = ints(rng, 1, 2, rank), ints(rng, 1, 2, rank)
    elif kind == "auto_pad":
        auto_pad, pads = str(rng.choice(["SAME_UPPER", "SAME_LOWER", "VALID"])), None
        strides = ints(rng, 1, 2, rank)
    elif kind == "strided":
        strides = ints(rng, 2, 3, rank)
    reach = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    padding = [0] * rank if pads is None else [pads[i] + pads[i + rank] for i in range(rank)]
    slack = 4 if rank < 3 else 2
    if kind == "patchify":
        spatial = [k * int(rng.integers(1, 4)) + int(rng.integers(0, k)) for k in kernel]
    elif auto_pad and auto_pad.startswith("SAME"):
        spatial = [int(rng.integers(1, 2 + slack)) for _ in range(rank)]
    else:
        spatial = [max(1, r - p) + int(rng.integers(0, slack + 1)) for r, p in zip(reach, padding)]
    batch = 1 + index % 2
    operands = {
        "x": scaled_normal(rng, (batch, in_channels, *spatial)),
        "w": scaled_normal(rng, (out_channels, in_channels // group, *kernel), in_channels // group * math.prod(kernel)),
    }
    if index % 2 == 0:
        operands["b"] = scaled_normal(rng, (out_channels,)) * np.float32(0.1)
    attrs: dict[str, Any] = {"kernel_shape": list(kernel), "strides": list(strides), "dilations": list(dilations), "group": group}
    attrs.update({"pads": list(pads)} if pads is not None else {"auto_pad": auto_pad})
    fed = tuple(operands) if index % 4 == 3 else ("x",)
    return NodeCase("conv", f"conv{rank}d_{kind}_{index}", "Conv", "", 17, attrs, operands, fed)


CONV_TRANSPOSE_KINDS = ("pads", "default", "output_padding", "SAME_UPPER", "SAME_LOWER", "VALID", "grouped", "dilated")


def conv_transpose_case(index: int, rng: np.random.Generator) -> NodeCase:
    """A small ConvTranspose of rank 1-3: explicit pads, none, output_padding, each auto_pad, groups,
    dilations; strides 1-3; bias on every other case; weights fed at run time on every fourth."""
    kind = CONV_TRANSPOSE_KINDS[index % len(CONV_TRANSPOSE_KINDS)]
    rank = (2, 1, 3)[index % 3]
    group = 2 if kind == "grouped" else 1
    in_channels, out_per_group = group * int(rng.integers(1, 3)), int(rng.integers(1, 4))
    kernel = ints(rng, 1, 3 if rank < 3 else 2, rank)
    strides = ints(rng, 2 if kind == "output_padding" else 1, 3 if rank < 3 else 2, rank)
    dilations = ints(rng, 1, 2, rank) if kind == "dilated" else (1,) * rank
    in_spatial = ints(rng, 1, 4 if rank < 3 else 3, rank)
    attrs: dict[str, Any] = {"kernel_shape": list(kernel), "strides": list(strides), "group": group}
    if kind == "dilated":
        attrs["dilations"] = list(dilations)
    if kind == "pads":
        natural = [s * (n - 1) + (k - 1) * d + 1 for s, n, k, d in zip(strides, in_spatial, kernel, dilations)]
        attrs["pads"] = [int(rng.integers(0, (size - 1) // 2 + 1)) for size in natural] * 2
    elif kind == "output_padding":
        attrs["output_padding"] = [int(rng.integers(0, s)) for s in strides]
    elif kind in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        attrs["auto_pad"] = kind
    operands = {
        "x": scaled_normal(rng, (1 + index % 2, in_channels, *in_spatial)),
        "w": scaled_normal(rng, (in_channels, out_per_group, *kernel), in_channels * math.prod(kernel) // group),
    }
    if index % 2 == 0:
        operands["b"] = scaled_normal(rng, (out_per_group * group,)) * np.float32(0.1)
    fed = tuple(operands) if index % 4 == 3 else ("x",)
    return NodeCase("convtranspose", f"convtranspose{rank}d_{kind}_{index}", "ConvTranspose", "", 18, attrs, operands, fed)


def col2im_case(index: int, rng: np.random.Generator) -> NodeCase:
    """A small Col2Im (fold) of rank 2 or 3 with strides, asymmetric pads and, at rank 2, dilations.
    Dilated 3-D images are left out: onnxruntime's CPU Col2Im, the reference, miscomputes them
    (`convlower.passes.col2im.COL2IM_DILATION_BUG`)."""
    from convlower.passes.col2im import sliding_blocks

    rank = (2, 3)[index % 2]
    block = ints(rng, 1, 3 if rank < 3 else 2, rank)
    strides = ints(rng, 1, 3 if rank < 3 else 2, rank)
    dilations = ints(rng, 1, 2, rank) if rank == 2 else (1,) * rank
    pads = ints(rng, 0, 2, 2 * rank)
    reach = [(k - 1) * d + 1 for k, d in zip(block, dilations)]
    image = [max(1, r - pads[i] - pads[i + rank]) + int(rng.integers(0, 4)) for i, r in enumerate(reach)]
    blocks = [sliding_blocks(*axis) for axis in zip(image, block, strides, dilations, pads, pads[rank:])]
    channels = int(rng.integers(1, 3))
    operands = {
        "x": scaled_normal(rng, (1 + index % 2, channels * math.prod(block), math.prod(blocks))),
        "image_shape": np.array(image, np.int64),
        "block_shape": np.array(block, np.int64),
    }
    attrs = {"strides": list(strides), "dilations": list(dilations), "pads": list(pads)}
    return NodeCase("col2im", f"col2im{rank}d_{index}", "Col2Im", "", 18, attrs, operands, ("x",))


def sliding_window(rng: np.random.Generator, rank: int) -> tuple[Any, list[int]]:
    """A window (kernels 1-3, strides and dilations 1-2, asymmetric pads 0-2) and an input extent it fits."""
    from convlower.passes.dynamic_filter import SlidingWindow

    largest = 3 if rank < 3 else 2
    window = SlidingWindow(ints(rng, 1, largest, rank), ints(rng, 1, 2, rank), ints(rng, 1, 2, rank), ints(rng, 0, 2, 2 * rank))
    spatial = [max(1, window.reach(i) - window.pads[i] - window.pads[i + rank]) + int(rng.integers(0, 4)) for i in range(rank)]
    return window, spatial


def dynamic_filter_case(index: int, rng: np.random.Generator) -> NodeCase:
    """A `convlower.DynamicFilter` of rank 1-3 with filter groups G = 1, C/2 and C in turn."""
    rank = (2, 1, 3)[index % 3]
    window, spatial = sliding_window(rng, rank)
    channels = (2, 4, 6)[index // 3 % 3]
    groups = (1, channels // 2, channels)[index % 3 - 1]
    batch = 1 + index % 2
    out = window.output_size(spatial)
    operands = {"x": scaled_normal(rng, (batch, channels, *spatial)),
                "f": scaled_normal(rng, (batch, groups, window.taps, *out), window.taps)}
    return NodeCase("dynamicfilter", f"dynamicfilter{rank}d_g{groups}_{index}", "DynamicFilter", "convlower", 18,
                    window.attrs(), operands, ("x", "f"), rank + 2)


def unfold_case(index: int, rng: np.random.Generator) -> NodeCase:
    """A `convlower.Unfold` (F.unfold at any rank) of rank 1-3."""
    rank = (2, 1, 3)[index % 3]
    window, spatial = sliding_window(rng, rank)
    operands = {"x": scaled_normal(rng, (1 + index % 2, int(rng.integers(1, 4)), *spatial))}
    return NodeCase("unfold", f"unfold{rank}d_{index}", "Unfold", "convlower", 18, window.attrs(), operands, ("x",), 3)


def pixel_adaptive_conv_case(index: int, rng: np.random.Generator) -> NodeCase:
    """A `convlower.PixelAdaptiveConv` of rank 1 or 2: kernel groups 1-3, bias on every other case,
    the static weight fed at run time on every fourth."""
    rank = (2, 1)[index % 2]
    window, spatial = sliding_window(rng, rank)
    groups = 1 + index % 3
    channels, out_channels, batch = groups * int(rng.integers(1, 3)), int(rng.integers(1, 5)), 1 + index % 2
    out = window.output_size(spatial)
    operands = {
        "x": scaled_normal(rng, (batch, channels, *spatial)),
        "k": scaled_normal(rng, (batch, groups, window.taps, *out)),
        "w": scaled_normal(rng, (out_channels, channels, *window.kernel_shape), channels * window.taps),
    }
    if index % 2 == 0:
        operands["b"] = scaled_normal(rng, (out_channels,)) * np.float32(0.1)
    fed = ("x", "k", "w") if index % 4 == 3 else ("x", "k")
    return NodeCase("pixeladaptiveconv", f"pixeladaptiveconv{rank}d_g{groups}_{index}", "PixelAdaptiveConv", "convlower", 18,
                    window.attrs(), operands, fed, rank + 2)


def local_correlation_case(index: int, rng: np.random.Generator) -> NodeCase:
    """A `convlower.LocalCorrelation` of rank 1-3: displacement windows one- or two-sided, steps
    1-2, channel groups, mean or sum, a scale on every third case."""
    rank = (2, 1, 3)[index % 3]
    steps = ints(rng, 1, 2, rank)
    counts = ints(rng, 1, 3 if rank < 3 else 2, rank)
    first = tuple(-int(rng.integers(0, (c - 1) * s + 1)) for c, s in zip(counts, steps))
    last = tuple(f + (c - 1) * s for f, c, s in zip(first, counts, steps))
    groups = 1 + index % 2
    channels = groups * int(rng.integers(1, 3))
    spatial = ints(rng, 1, 6 if rank < 3 else 3, rank)
    batch = 1 + index % 2
    attrs = {"displacement_first": list(first), "displacement_last": list(last), "displacement_step": list(steps),
             "groups": groups, "reduction": ("mean", "sum")[index % 2], "scale": 0.5 if index % 3 == 0 else 1.0}
    operands = {"a": scaled_normal(rng, (batch, channels, *spatial)), "b": scaled_normal(rng, (batch, channels, *spatial))}
    return NodeCase("localcorrelation", f"localcorrelation{rank}d_g{groups}_{index}", "LocalCorrelation", "convlower", 18,
                    attrs, operands, ("a", "b"), rank + 2)


GENERATORS: dict[str, Callable[[int, np.random.Generator], NodeCase]] = {
    "conv": conv_case,
    "convtranspose": conv_transpose_case,
    "col2im": col2im_case,
    "dynamicfilter": dynamic_filter_case,
    "unfold": unfold_case,
    "pixeladaptiveconv": pixel_adaptive_conv_case,
    "localcorrelation": local_correlation_case,
}
"""Node generators by registry key (`convlower.passes.FAMILIES`); a family without one is reported as not covered."""


@dataclass
class Tally:
    """The correctness figures, written into the section's record as they come in."""

    data: dict[str, Any]

    def __post_init__(self) -> None:
        self.data.setdefault("table", {})
        self.data.setdefault("failures", [])
        self.data.setdefault("provider_op", {})
        self.data.setdefault("refused_by_reference", [])
        self.data.setdefault("session_providers", [])

    def cell(self, family: str, variant: str) -> dict[str, Any]:
        row = self.data["table"].setdefault(f"{family}/{variant}", {"family": family, "variant": variant, "not_applicable": 0,
                                                                   "unsupported": 0})
        return row

    def outcome(self, family: str, variant: str, bucket: str, passed: bool, worst_abs: float, worst_vs_provider: float | None) -> None:
        counts = self.cell(family, variant).setdefault(bucket, {"run": 0, "passed": 0, "worst_abs_err": 0.0, "worst_vs_provider": None})
        counts["run"] += 1
        counts["passed"] += int(passed)
        counts["worst_abs_err"] = max(counts["worst_abs_err"], worst_abs)
        if worst_vs_provider is not None:
            counts["worst_vs_provider"] = max(counts["worst_vs_provider"] or 0.0, worst_vs_provider)

    def failure(self, family: str, variant: str, case: str, bucket: str, what: str) -> None:
        self.data["failures"].append({"family": family, "variant": variant, "case": case, "bucket": bucket, "what": what})

    def provider_op(self, family: str, bucket: str, agrees: bool | None) -> None:
        """The original node on the provider against the reference: agrees, disagrees, or None when the provider cannot run it."""
        counts = self.data["provider_op"].setdefault(family, {}).setdefault(bucket, {"run": 0, "agree": 0, "unavailable": 0})
        if agrees is None:
            counts["unavailable"] += 1
        else:
            counts["run"] += 1
            counts["agree"] += int(agrees)

    def saw_provider(self, providers: Sequence[str]) -> None:
        seen = self.data["session_providers"]
        seen.extend(p for p in providers if p not in seen)


@dataclass
class Ran:
    """A model run on a provider: its outputs and the providers its session got, or why it did not run."""

    outputs: list[np.ndarray] | None
    providers: list[str]
    reason: str | None = None


def run_on(runner: "Runner", model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> Ran:
    from convlower.errors import UsageError

    try:
        session = runner.session(model)
        return Ran(session.run(feeds), session.ort.get_providers())
    except UsageError as exc:
        return Ran(None, [], exc.what)


class Checker:
    """Lowers each case's node with every variant of its family, runs it on the provider, and
    compares it with (b) the reference and (a) the original node on the provider."""

    def __init__(self, ctx: Context, record: SectionRecord, tally: Tally):
        from convlower.passes import FAMILIES
        from convlower.runner import Runner

        self.families = FAMILIES
        self.record = record
        self.tally = tally
        self.cpu = Runner("cpu", quiet=True)
        # cuDNN's exhaustive search costs time on every new session; the answer does not depend on it
        self.provider = ctx.runner.with_settings(ctx.runner.settings.changed(cudnn_conv_algo_search="HEURISTIC")) if ctx.on_cuda else ctx.runner
        self.on_cpu = not ctx.on_cuda

    def check(self, family: str, case_name: str, bucket: str, model: onnx.ModelProto, feeds: dict[str, np.ndarray],
              reference: list[np.ndarray], native: Ran | None = None) -> None:
        """Every variant of `family` on this model against `reference` (in the model's dtype) and
        against the original on the provider (`native`, run here unless given)."""
        import convlower
        from convlower.verify import compare

        native = native or run_on(self.provider, model, feeds)
        self.tally.saw_provider(native.providers)
        self.tally.provider_op(family, bucket, None if native.outputs is None else
                               all(compare("y", r, o, None, None).passed for r, o in zip(reference, native.outputs)))
        for variant in self.families[family].variant_names:
            self.record.at(f"{case_name} {bucket} {variant}", show=False)
            try:
                result = convlower.lower(model, {family: variant})
            except Exception as exc:  # noqa: BLE001 - a variant that cannot build its lowering is a failure to report
                self.tally.outcome(family, variant, bucket, False, math.inf, None)
                self.tally.failure(family, variant, case_name, bucket, f"lower raised {short(exc)}")
                continue
            if not result.lowered:
                self.tally.cell(family, variant)["not_applicable"] += 1
                continue
            ran = run_on(self.provider, result.model, feeds)
            self.tally.saw_provider(ran.providers)
            if ran.outputs is None:
                if native.outputs is None:  # the provider runs neither the node nor its lowering
                    self.tally.cell(family, variant)["unsupported"] += 1
                else:
                    self.tally.outcome(family, variant, bucket, False, math.inf, None)
                    self.tally.failure(family, variant, case_name, bucket, f"does not run where the original does: {ran.reason}")
                continue
            diffs = [compare("y", r, o, None, None) for r, o in zip(reference, ran.outputs)]
            against_native = ([compare("y", n, o, None, None).max_abs_err for n, o in zip(native.outputs, ran.outputs)]
                              if native.outputs is not None else None)
            passed = all(d.passed for d in diffs)
            worst = max(d.max_abs_err for d in diffs)
            self.tally.outcome(family, variant, bucket, passed, worst, max(against_native) if against_native else None)
            if not passed:
                bad = next(d for d in diffs if not d.passed)
                self.tally.failure(family, variant, case_name, bucket,
                                   f"{bad.mismatches}/{bad.size} outside atol {bad.atol:g} + rtol {bad.rtol:g}; max abs err "
                                   f"{bad.max_abs_err:.3g} at {list(bad.worst_index)} ({bad.worst_candidate:.5g} vs {bad.worst_reference:.5g})"
                                   + (f"; {bad.note}" if bad.note else ""))

    def generated(self, case: NodeCase) -> None:
        """The case in float32 against its float32 CPU run, and in float16 against the float32 CPU
        run of the same values (rounded to float16), with convlower's tolerance for each dtype."""
        for dtype in FLOAT_DTYPES:
            source = case.rounded_to(dtype) if dtype != "float32" else case
            reference = run_on(self.cpu, source.model("float32"), source.feeds("float32"))
            if reference.outputs is None:
                self.tally.data["refused_by_reference"].append({"case": case.name, "dtype": dtype, "reason": reference.reason})
                return
            same_run = self.on_cpu and dtype == "float32"
            self.check(case.family, case.name, dtype, source.model(dtype), source.feeds(dtype),
                       [r.astype(dtype) for r in reference.outputs], reference if same_run else None)


def conformance_cases(op_types: dict[str, str]) -> Iterator[tuple[str, Any]]:
    """(family, case) for every official ONNX conformance case whose graph holds only one of these
    ops (`op_types`: op type -> family). collect_testcases() keeps module-global state: called once."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        cases = collect_testcases()
    for case in cases:
        ops = {n.op_type for n in case.model.graph.node}
        if len(ops) == 1 and next(iter(ops)) in op_types:
            yield op_types[next(iter(ops))], case


def with_operands_as_initializers(model: onnx.ModelProto, inputs: Sequence[np.ndarray]) -> onnx.ModelProto:
    """A conformance case's model with every graph input but the first an initializer holding the
    case's value (weights, bias, Col2Im's shapes), as exported models carry them."""
    constant = onnx.ModelProto()
    constant.CopyFrom(model)
    graph = constant.graph
    for value, array in list(zip(graph.input, inputs))[1:]:
        graph.initializer.append(numpy_helper.from_array(array, value.name))
    del graph.input[1:]
    return constant


def run_correctness(ctx: Context, record: SectionRecord) -> None:
    """Every variant of every family, on the provider, against references; see `Checker`."""
    from convlower.passes import FAMILIES

    data = record.data
    selected = selected_families(ctx.args.families, FAMILIES)
    data["provider"] = ctx.provider
    data["families"] = {key: {"op": FAMILIES[key].op_type, "domain": FAMILIES[key].domain or "ai.onnx",
                              "variants": FAMILIES[key].variant_names} for key in selected}
    data["not_covered"] = [key for key in selected if key not in GENERATORS]
    data["tolerances"] = tolerance_table()
    data["cases_per_family"] = ctx.args.cases
    if ctx.on_cuda:
        data["cudnn_conv_algo_search"] = "HEURISTIC (correctness only; timing sections use convlower's settings)"
    checker = Checker(ctx, record, Tally(data))
    standard = {FAMILIES[key].op_type: key for key in selected if not FAMILIES[key].domain}
    if standard:
        record.at("collecting the ONNX conformance cases")
        data["conformance_cases"] = []
        for family, case in conformance_cases(standard):
            data["conformance_cases"].append(case.name)
            for number, (inputs, expected) in enumerate(case.data_sets):
                model = with_operands_as_initializers(case.model, inputs)
                feeds = {model.graph.input[0].name: inputs[0]}
                checker.check(family, f"{case.name}[{number}]", "conformance", model, feeds, list(expected))
    covered = [key for key in selected if key in GENERATORS]
    record.at(f"generated nodes of {', '.join(covered)} ({ctx.args.cases} each, float32 and float16)")
    for index in range(ctx.args.cases):
        for key in covered:
            case = GENERATORS[key](index, np.random.default_rng([list(GENERATORS).index(key), index]))
            checker.generated(case)
        data["generated_per_family"] = index + 1


def selected_families(requested: str | None, families: dict[str, "OpFamily"]) -> list[str]:
    """The registry keys `--families` names (by key or op type, any case), or every family."""
    if not requested:
        return list(families)
    wanted = [name.strip().lower() for name in requested.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in families]
    if unknown:
        raise ValueError(f"--families: no family {', '.join(unknown)}; the registry has {', '.join(families)}")
    return wanted


def tolerance_table() -> dict[str, list[float]]:
    from convlower.verify import tolerances

    return {dtype: list(tolerances(np.dtype(dtype))) for dtype in FLOAT_DTYPES}


# ---- section 2: seed 000 ------------------------------------------------------------------------


def method_2(feature_map: "torch.Tensor", filters: "torch.Tensor") -> "torch.Tensor":
    """Seed 000's method_2 as the notebook writes it (it shifts `filters` in place)."""
    import torch

    n, c, h, w = feature_map.shape
    k = round(filters.shape[1] ** 0.5)
    filters = shift_all_directions(filters.view(n, k, k, h, w), k, reverse=False).view(n, k**2, h, w)
    multiplied = torch.einsum("nchw,nkhw->nckhw", feature_map, filters).view(n, c, k, k, h, w)
    return shift_all_directions(multiplied, k, reverse=True).view(n, c, k**2, h, w).sum(2)


def shift_all_directions(x: "torch.Tensor", k: int, reverse: bool) -> "torch.Tensor":
    """Seed 000's helper: shift each kernel channel by its own offset, row-major."""
    import torch.nn.functional as F

    for ind_h in range(k):
        for ind_w in range(k):
            shift_h, shift_w = (ind_h - k // 2) * (1 - 2 * int(reverse)), (ind_w - k // 2) * (1 - 2 * int(reverse))
            x[..., ind_h, ind_w, :, :] = F.pad(x[..., ind_h, ind_w, :, :], (shift_w, -shift_w, shift_h, -shift_h))
    return x


def run_seed(ctx: Context, record: SectionRecord) -> None:
    """Seed 000's headline at its shape: every way to run the layer, timed in one interleaved run.

    A candidate that fails or runs out of its share of the budget (the export, optimize, the
    compile) is a row saying so; the others are timed all the same."""
    import torch

    from convlower.models.seed_filter import SeedFilter

    batch = QUICK_CPU_SEED_BATCH if ctx.quick and not ctx.on_cuda else SEED_BATCH
    data = record.data
    data["shape"] = {"N": batch, "C": 1, "H": 32, "W": 32, "K": 3}
    if batch != SEED_BATCH:
        data["note"] = f"N={batch}, not the seed's {SEED_BATCH}: --quick on the CPU"
    timing_s = 3.0 if ctx.quick else 6.0
    reserve = timing_s + 4  # what the interleaved timing at the end needs
    rows: dict[str, dict[str, Any]] = data.setdefault("rows", {})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 1, 32, 32), dtype=np.float32)
    f = rng.random((batch, 9, 32, 32), dtype=np.float32)
    device = torch.device("cuda" if ctx.on_cuda else "cpu")
    data["torch_device"] = str(device)
    tx, tf = torch.from_numpy(x).to(device), torch.from_numpy(f).to(device)
    module = SeedFilter(3).eval()
    with torch.inference_mode():
        record.at("torch eager: method_1 and method_2")
        expected = module(tx, tf).cpu().numpy()
        seed_row(rows, "method_1", "torch eager (unfold + einsum)", expected, expected)
        seed_row(rows, "method_2", "torch eager (shift-and-sum)", expected, method_2(tx, tf.clone()).cpu().numpy())
        scratch = tf.clone()  # method_2 shifts its filters in place: time it on a copy of its own
        nbytes = x.nbytes + f.nbytes + expected.nbytes
        source = torch.empty(nbytes, dtype=torch.uint8, device=device)
        target = torch.empty_like(source)
        rows["copy floor"] = {"how": f"{'device-to-device' if ctx.on_cuda else 'host'} copy of the op's {nbytes / 2**20:.1f} MiB "
                                     "(inputs + output): twice the op's least memory traffic"}
        timers: dict[str, Timer] = {
            "method_1": torch_timer(lambda: module(tx, tf), device),
            "method_2": torch_timer(lambda: method_2(tx, scratch), device),
            "copy floor": torch_timer(lambda: target.copy_(source), device),
        }
        record.at("ONNX export on the provider")
        exported = seed_export(ctx, module, (x, f), expected, rows, timers)
        if exported is not None:
            record.at("convlower.optimize (guard on, no cache)")
            seed_optimized(ctx, exported, expected, rows, timers, (record.remaining() - reserve) * 0.6)
        record.at("torch.compile(method_1)")
        seed_compiled(module, (tx, tf), expected, rows, timers, record.remaining() - reserve)
        record.at(f"timing {len(timers)} candidates interleaved")
        timings = time_rounds(timers, timing_s)
    for name, timing in timings.items():
        rows[name].update(timing.to_dict())
        rows[name]["vs_method_1"] = timings["method_1"].median_ms / timing.median_ms
        if "ONNX export" in timings:
            rows[name]["vs_onnx_export"] = timings["ONNX export"].median_ms / timing.median_ms
    data["method_1_over_method_2"] = timings["method_1"].median_ms / timings["method_2"].median_ms
    data["timed_with"] = ("torch: CUDA events around each call; onnxruntime: wall time of one IOBinding run (device-resident "
                          "inputs and outputs; the run returns when the device is done)") if ctx.on_cuda else "wall time of each call"


def seed_row(rows: dict[str, dict[str, Any]], name: str, how: str, expected: np.ndarray, output: np.ndarray) -> None:
    """A candidate's row, with how far its output is from method_1's."""
    from convlower.verify import compare

    diff = compare("y", expected, output, None, None)
    rows[name] = {"how": how, "max_abs_err": diff.max_abs_err, "agrees": diff.passed}


def seed_export(ctx: Context, module: Any, arrays: tuple[np.ndarray, ...], expected: np.ndarray,
                rows: dict[str, dict[str, Any]], timers: dict[str, Timer]) -> Exported | None:
    """The layer exported as torch exports it, run on the provider through IOBinding; None if the export fails."""
    import torch

    try:
        exported = export_module(module, tuple(torch.from_numpy(a) for a in arrays))
        session = ctx.runner.session(exported.model, what="the exported seed filter")
        bound = session.runner_for(exported.feeds)
    except Exception as exc:  # noqa: BLE001 - a failed export is a row of the table
        rows["ONNX export"] = {"how": "torch.onnx export (TorchScript)", "note": f"failed: {short(exc)}"}
        return None
    seed_row(rows, "ONNX export", f"torch.onnx export (TorchScript) on onnxruntime {session.provider}", expected, bound.outputs()[0])
    timers["ONNX export"] = wall_timer(bound)
    return exported


def seed_optimized(ctx: Context, exported: Exported, expected: np.ndarray, rows: dict[str, dict[str, Any]],
                   timers: dict[str, Timer], seconds: float) -> None:
    """`convlower.optimize` of the export (guard on, no cache) within `seconds`, and its model bound on the provider."""
    import convlower

    name, how = "convlower optimized", "convlower.optimize's model on onnxruntime"
    started = time.perf_counter()
    with TimeLimit(seconds, "convlower.optimize of the seed filter") as optimizing:
        try:
            result = convlower.optimize(exported.model, inputs=exported.feeds, provider=ctx.provider_flag, cache=None)
            optimized = optimized_run(ctx, result, exported.feeds, expected)
        except Exception as exc:  # noqa: BLE001 - a failed optimize is a row of the table
            rows[name] = {"how": how, "note": f"failed: {short(exc)}"}
            return
    if optimizing.expired:
        rows[name] = {"how": how, "note": f"optimize ran out of its {optimizing.seconds:.0f} s"}
        return
    seed_row(rows, name, how, expected, optimized.outputs()[0])
    rows[name].update(optimize_summary(result, time.perf_counter() - started))
    timers[name] = wall_timer(optimized)


def seed_compiled(module: Any, tensors: tuple["torch.Tensor", ...], expected: np.ndarray, rows: dict[str, dict[str, Any]],
                  timers: dict[str, Timer], seconds: float) -> None:
    """`torch.compile(method_1)` compiled within `seconds` (compile time recorded, not timed)."""
    import torch

    name, how = "torch.compile(method_1)", "torch.compile (inductor), compile time excluded"
    started = time.perf_counter()
    with TimeLimit(seconds, "torch.compile of method_1") as compiling:
        try:
            compiled = torch.compile(module)
            output = compiled(*tensors).cpu().numpy()
        except Exception as exc:  # noqa: BLE001 - a failure to compile is a row of the table
            rows[name] = {"how": how, "note": f"compile failed: {short(exc)}"}
            return
    if compiling.expired:
        rows[name] = {"how": how, "note": f"compile ran out of its {compiling.seconds:.0f} s"}
        return
    seed_row(rows, name, how, expected, output)
    rows[name]["compile_s"] = time.perf_counter() - started
    timers[name] = torch_timer(lambda: compiled(*tensors), tensors[0].device)


def optimized_run(ctx: Context, result: "OptimizeResult", feeds: dict[str, np.ndarray], expected: np.ndarray) -> "BoundRun":
    """The optimized model bound to `feeds` in a session with the settings it was tuned with
    (its metadata: cuDNN search, layout, CUDA graph), as `convlower.session` would make it."""
    from convlower.settings import recorded

    settings = recorded(result.model)
    runner = ctx.runner.with_settings(settings) if settings is not None and settings.provider == ctx.provider else ctx.runner
    return runner.session(result.model, what="the optimized model").runner_for(feeds, outputs_like=[expected])


def optimize_summary(result: "OptimizeResult", seconds: float) -> dict[str, Any]:
    """What the report says of the whole model: choices, speedup with its interval, verification, settings."""
    from convlower.settings import SessionSettings

    report = result.report
    lowered = [n for n in report.nodes if n.chosen != "original"]
    profile = report.profiles[0] if report.profiles else {}
    chosen = report.session_settings.get("chosen")
    return {
        "nodes": len(report.nodes),
        "lowered": len(lowered),
        "variants": sorted({f"{n.op}={n.chosen}" for n in lowered}),
        "report_speedup": profile.get("speedup"),
        "report_interval": profile.get("interval"),
        "report_original_ms": profile.get("original_ms"),
        "report_optimized_ms": profile.get("optimized_ms"),
        "verification": report.verification,
        "reverted": report.reverted,
        "session_settings": SessionSettings.from_dict(chosen).changes_from_baseline() if chosen else {},
        "summary": report.summary(),
        "optimize_s": seconds,
    }


# ---- section 3: the zoo -------------------------------------------------------------------------


def run_zoo(ctx: Context, record: SectionRecord) -> None:
    """`convlower.optimize` (guard on, no cache) on each zoo model at its size, on the provider."""
    import convlower

    names, size = (QUICK_ZOO, "small") if ctx.quick else (ZOO_ORDER, "realistic")
    models: list[dict[str, Any]] = record.data.setdefault("models", [])
    record.data.update(size=size, planned=list(names), left_out={"seed_filter": "seed 000's layer: see the seed000 section"})
    for name in names:
        record.at(f"{name}: export")
        exported = ctx.zoo_export(name, size)
        record.at(f"{name}: convlower.optimize")
        started = time.perf_counter()
        result = convlower.optimize(exported.model, inputs=exported.feeds, provider=ctx.provider_flag, cache=None)
        shapes = {n: list(a.shape) for n, a in exported.feeds.items()}
        models.append({"model": name, "size": size, "inputs": shapes, **optimize_summary(result, time.perf_counter() - started)})


# ---- section 4: Conv shapes ---------------------------------------------------------------------


@dataclass(frozen=True)
class ConvLayer:
    """One Conv layer to time: bench_conv's `ConvShape` (batch 1) at a batch of its own, and where it comes from."""

    shape: "ConvShape"
    batch: int
    source: str

    def key(self) -> tuple:
        s = self.shape
        rank = len(s.spatial)
        return (s.in_channels, s.out_channels, tuple(s.spatial), tuple(s.kernel), tuple(s.strides or (1,) * rank),
                tuple(s.pads or (0,) * 2 * rank), tuple(s.dilations or (1,) * rank), s.group, self.batch)

    def model(self) -> onnx.ModelProto:
        model = self.shape.model()
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = self.batch
        return model

    def feeds(self) -> dict[str, np.ndarray]:
        dims = (self.batch, self.shape.in_channels, *self.shape.spatial)
        return {"x": np.random.default_rng(1).standard_normal(dims).astype(np.float32)}

    def describe(self) -> str:
        s = self.shape
        text = f"{self.batch}x{s.in_channels}x{'x'.join(map(str, s.spatial))} -> {s.out_channels}, k{'x'.join(map(str, s.kernel))}"
        if s.strides and max(s.strides) > 1:
            text += f" s{'x'.join(map(str, s.strides))}"
        if s.dilations and max(s.dilations) > 1:
            text += f" d{'x'.join(map(str, s.dilations))}"
        return text + (f" g{s.group}" if s.group > 1 else "")


def bench_layers(quick: bool) -> list[ConvLayer]:
    """bench_conv.py's representative layers; with --quick at a quarter of their extent (at least 4)."""
    from bench_conv import SHAPES

    if not quick:
        return [ConvLayer(shape, 1, "bench_conv") for shape in SHAPES]
    return [ConvLayer(dataclasses.replace(shape, name=f"{shape.name} (1/4 size)", spatial=tuple(max(4, s // 4) for s in shape.spatial)),
                      1, "bench_conv (1/4 size)") for shape in SHAPES]


def corpus_layers() -> list[ConvLayer]:
    """The real-model corpus's distinct Conv layers (benchmarks/corpus_conv_shapes.json), most frequent first."""
    from bench_conv import ConvShape

    layers = json.loads(CORPUS_SHAPES.read_text())["layers"]
    return [ConvLayer(ConvShape(layer["name"], layer["in_channels"], layer["out_channels"], tuple(layer["spatial"]),
                                tuple(layer["kernel"]), tuple(layer["strides"]), tuple(layer["pads"]), tuple(layer["dilations"]),
                                layer["group"]), layer["batch"], "corpus: " + ", ".join(layer["models"]))
            for layer in layers]


def zoo_layers(ctx: Context, size: str) -> list[ConvLayer]:
    """The Conv layers of the zoo's models with static Convs (exported here unless the zoo section did)."""
    from bench_conv import ConvShape
    from convlower.inspect import inspect_model

    layers = []
    for name in ("resnet", "mobilenet", "unet", "tcn", "conv3d", "kpn_denoiser"):
        for number, info in enumerate(i for i in inspect_model(ctx.zoo_export(name, size).model) if i.op == "Conv" and i.spec):
            spec = info.spec
            if spec["pads"] is None or spec["batch"] is None or None in spec["in_spatial"]:
                continue
            shape = ConvShape(f"zoo_{name}_{number}", spec["in_channels"], spec["out_channels"], tuple(spec["in_spatial"]),
                              tuple(spec["kernel_shape"]), tuple(spec["strides"]), tuple(spec["pads"]), tuple(spec["dilations"]),
                              spec["group"])
            layers.append(ConvLayer(shape, spec["batch"], f"zoo: {name} ({size})"))
    return layers


def interleaved(*sources: Sequence[ConvLayer]) -> list[ConvLayer]:
    """One layer of each source in turn, so that a budget cut off leaves every source timed; each distinct layer once."""
    seen: set[tuple] = set()
    order = []
    for index in range(max(len(s) for s in sources)):
        for source in sources:
            if index < len(source) and source[index].key() not in seen:
                seen.add(source[index].key())
                order.append(source[index])
    return order


def bound_variants(ctx: Context, layer: ConvLayer, lowerings: Sequence[str], row: dict[str, Any]) -> dict[str, "BoundRun"]:
    """The layer's native Conv and each applicable lowering that agrees with it, bound to the
    layer's input on the provider; a lowering that disagrees goes to `row` as wrong."""
    import convlower
    from convlower.verify import compare

    model, feeds = layer.model(), layer.feeds()
    native = ctx.runner.session(model, what=layer.shape.name)
    expected = native.run(feeds)[0]
    bound = {"native": native.runner_for(feeds)}
    for variant in lowerings:
        result = convlower.lower(model, {"conv": variant})
        if not result.lowered:
            continue
        session = ctx.runner.session(result.model, what=f"{layer.shape.name} {variant}")
        diff = compare("y", expected, session.run(feeds)[0], None, None)
        if diff.passed:
            bound[variant] = session.runner_for(feeds)
        else:
            row["variants"][variant] = {"wrong": f"max abs err {diff.max_abs_err:.3g}"}
    return bound


def run_conv_shapes(ctx: Context, record: SectionRecord) -> None:
    """Each Conv layer's applicable variants against the provider's own Conv (cuDNN on CUDA), timed interleaved."""
    from convlower.errors import UsageError
    from convlower.passes import FAMILIES
    from convlower.runner import TimingPolicy, time_calls
    from convlower.tune import MIN_GAIN

    data = record.data
    data["native"] = "cuDNN through onnxruntime's CUDA Conv (exhaustive search)" if ctx.on_cuda else "onnxruntime's CPU Conv (MLAS)"
    data["wins_when"] = f"a verified variant is at least {MIN_GAIN:.0%} faster than native (the tuner's margin)"
    record.at("layer lists")
    bench = bench_layers(ctx.quick)
    corpus = corpus_layers() if CORPUS_SHAPES.exists() else []
    data["corpus"] = str(CORPUS_SHAPES.relative_to(HERE.parent)) if corpus else "no real-model corpus shape list (benchmarks/corpus_conv_shapes.json): the gap is noted"
    zoo = zoo_layers(ctx, "small" if ctx.quick else "realistic")
    if ctx.quick:
        bench, corpus, zoo = bench[:8], corpus[:8], zoo[:8]
    layers = interleaved(bench, corpus, zoo)
    data["planned"] = {"bench_conv": len(bench), "corpus": len(corpus), "zoo": len(zoo), "distinct": len(layers)}
    policy = TimingPolicy(warmup=2, min_runs=6, max_runs=100, budget_s=0.15 if ctx.quick else 0.3)
    lowerings = [v for v in FAMILIES["conv"].variant_names if v != "native"]
    rows: list[dict[str, Any]] = data.setdefault("rows", [])
    for layer in layers:
        record.at(f"{layer.shape.name}", show=False)
        row: dict[str, Any] = {"name": layer.shape.name, "source": layer.source, "layer": layer.describe(), "variants": {}}
        try:
            bound = bound_variants(ctx, layer, lowerings, row)
        except UsageError as exc:  # the provider refuses the layer, or a lowering of it: a row, not the end of the section
            row["error"] = exc.what
            rows.append(row)
            continue
        timings = dict(zip(bound, time_calls(list(bound.values()), policy)))
        native_ms = timings["native"].median_ms
        row["native_ms"] = native_ms
        for variant, timing in timings.items():
            if variant != "native":
                row["variants"][variant] = {"ms": timing.median_ms, "speedup": native_ms / timing.median_ms}
        timed = {v: r["speedup"] for v, r in row["variants"].items() if "speedup" in r}
        if timed:
            row["best"] = max(timed, key=timed.__getitem__)
            row["best_speedup"] = timed[row["best"]]
            row["wins"] = row["best_speedup"] >= 1 + MIN_GAIN
        rows.append(row)


# ---- the run ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    name: str
    title: str
    budget_s: float
    quick_budget_s: float
    run: Callable[[Context, SectionRecord], None]


SECTIONS = (
    Section("environment", "Environment", 10, 10, run_environment),
    Section("correctness", "Correctness of every variant", 70, 50, run_correctness),
    Section("seed000", "Seed 000's headline", 80, 50, run_seed),
    Section("zoo", "convlower.optimize on the zoo", 70, 30, run_zoo),
    Section("conv_shapes", "Conv layers: each variant against the provider's own Conv", 40, 25, run_conv_shapes),
)
TOTAL_BUDGET_S, QUICK_TOTAL_BUDGET_S = 290.0, 175.0


def run_section(section: Section, ctx: Context, record: SectionRecord) -> None:
    """Run one section within its budget; record how it ended. The total's OutOfTime goes on up."""
    started = time.monotonic()
    record.status = "running"
    progress(f"{section.name}: start (budget {record.budget_s:.0f} s)")
    limit = TimeLimit(record.budget_s, section.name)
    record.deadline = started + record.budget_s
    try:
        with limit:
            section.run(ctx, record)
        record.status = "out of time" if limit.expired else "done"
        if limit.expired:
            record.message = f"ran out of time in {section.name} at {record.step}"
    except OutOfTime:
        record.status = "out of time"
        record.message = f"ran out of time in {section.name} at {record.step} (the whole check's budget was spent)"
        raise
    except Exception as exc:  # noqa: BLE001 - a section that breaks is reported, and the check goes on
        record.status = "error"
        record.message = f"stopped in {section.name} at {record.step}: {short(exc)}"
        record.data["traceback"] = traceback.format_exc()
    finally:
        record.elapsed_s = time.monotonic() - started
        progress(f"{section.name}: {record.status} in {record.elapsed_s:.1f} s" + (f" — {record.message}" if record.message else ""))


def section_budgets(args: argparse.Namespace, chosen: list[Section]) -> tuple[dict[str, float], float]:
    """Each chosen section's budget and the total, with `--budget` overrides applied."""
    budgets = {s.name: s.quick_budget_s if args.quick else s.budget_s for s in chosen}
    total = QUICK_TOTAL_BUDGET_S if args.quick else TOTAL_BUDGET_S
    for item in args.budget:
        name, _, seconds = item.partition("=")
        if name == "total":
            total = float(seconds)
        else:
            budgets[name] = float(seconds)
    return budgets, total


def fit_budgets(records: list[SectionRecord], seconds: float, check: dict[str, Any]) -> None:
    """Scale every section's budget down alike when together they would pass the time left
    (staging and startup took longer than the total's slack), so that each section still runs."""
    planned = sum(record.budget_s for record in records)
    if planned > seconds > 0:
        for record in records:
            record.budget_s *= seconds / planned
        check["budgets_scaled_by"] = seconds / planned


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the folder for summary.md and check.json")
    parser.add_argument("--provider", choices=("cuda", "cpu"), default="cuda", help="where onnxruntime runs (default cuda)")
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer cases (seed 000 at N=256 on the CPU)")
    parser.add_argument("--wheels", type=Path, metavar="PARTS_DIR", help="staged wheel parts to install first (gpu_stage.py)")
    parser.add_argument("--target", type=Path, metavar="DIR", help="where --wheels installs them")
    parser.add_argument("--sections", default=",".join(s.name for s in SECTIONS),
                        help=f"comma-separated, from {', '.join(s.name for s in SECTIONS)} (default: all)")
    parser.add_argument("--families", help="correctness: only these families (registry keys or op types, comma-separated)")
    parser.add_argument("--cases", type=int, help="correctness: generated nodes per family (default 24, --quick 8)")
    parser.add_argument("--budget", action="append", default=[], metavar="NAME=SECONDS",
                        help="override a section's time budget, or the total's (total=SECONDS); repeatable")
    args = parser.parse_args(argv)
    if (args.wheels is None) != (args.target is None):
        parser.error("--wheels and --target go together")
    names = {s.name for s in SECTIONS}
    unknown = [n for n in args.sections.split(",") if n not in names]
    if unknown:
        parser.error(f"--sections: no section {', '.join(unknown)}; sections: {', '.join(names)}")
    for item in args.budget:
        name, sep, seconds = item.partition("=")
        if not sep or (name not in names and name != "total") or not re.fullmatch(r"\d+(\.\d+)?", seconds):
            parser.error(f"--budget {item!r} is not NAME=SECONDS with NAME a section or total")
    if args.cases is None:
        args.cases = 8 if args.quick else 24
    return args


def main(argv: list[str] | None = None) -> int:
    tf32_before = os.environ.get("NVIDIA_TF32_OVERRIDE")
    os.environ["NVIDIA_TF32_OVERRIDE"] = "0"  # before anything initialises CUDA: true float32 in cuBLAS and cuDNN
    args = parse_args(argv)
    chosen = [s for s in SECTIONS if s.name in args.sections.split(",")]
    budgets, total = section_budgets(args, chosen)
    check: dict[str, Any] = {"command": [sys.executable, *sys.argv], "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                             "quick": args.quick, "provider_requested": args.provider, "budget_total_s": total}
    records = {s.name: SectionRecord(s.name, budgets[s.name]) for s in chosen}
    signal.signal(signal.SIGALRM, _on_alarm)
    code = 0
    with TimeLimit(total, "the whole check") as whole:
        staged, problem = stage(args, check)
        ctx = None
        if problem is None:
            ctx, problem = start(args, tf32_before, staged, check)
            if ctx is None and "environment" in records:  # what says why the provider did not load
                record_environment(records["environment"], args.provider, tf32_before, staged)
                records["environment"].status, records["environment"].message = "done", "facts only: the provider did not load"
        if ctx is None:
            check["problem"] = problem
            code = 2
        else:
            fit_budgets(list(records.values()), whole.remaining() - 2, check)
            for section in chosen:
                run_section(section, ctx, records[section.name])
    if whole.expired:
        check["problem"] = f"the whole check's {total:.0f} s were spent"
        for record in records.values():
            if record.status == "not run":
                record.message = "the whole check's budget was spent before it"
    check["wall_s"] = time.monotonic() - STARTED
    check["sections"] = {name: record.to_dict() for name, record in records.items()}
    broken = any(r.status == "error" for r in records.values())
    wrong = "correctness" in records and records["correctness"].data.get("failures")
    if code == 0 and (broken or wrong):
        code = 1
    write_outputs(args.out, check)
    progress(f"wrote {args.out / 'summary.md'} and {args.out / 'check.json'} ({check['wall_s']:.0f} s)")
    return code


def stage(args: argparse.Namespace, check: dict[str, Any]) -> tuple[list[str], str | None]:
    """Install the staged wheels when `--wheels` is given, before anything imports onnxruntime or
    convlower. Returns the installed `name==version`s, and why staging failed (None when it did not)."""
    if not args.wheels:
        return [], None
    progress(f"installing the staged wheels of {args.wheels} into {args.target}")
    from gpu_stage import install_staged

    try:
        staged = install_staged(args.wheels, args.target)
    except Exception as exc:  # noqa: BLE001 - any failure to stage stops the check, said in one line
        return [], f"staging failed: {short(exc)}"
    check["staged"] = staged
    progress(f"installed {', '.join(staged)}")
    return staged, None


def start(args: argparse.Namespace, tf32_before: str | None, staged: list[str], check: dict[str, Any]) -> tuple[Context | None, str | None]:
    """Make the runner on the provider and a probe session, whose `get_providers()` says what
    really runs. Returns the context, or why not."""
    if args.provider == "cuda":
        import torch  # noqa: F401 - first, so that onnxruntime.preload_dlls finds the CUDA libraries torch loaded
    from convlower.errors import UsageError
    from convlower.runner import Runner

    try:
        runner = Runner(args.provider, quiet=True)
        probe = runner.session(probe_model(), what="the probe Conv")
    except UsageError as exc:
        return None, f"{exc.what}; {exc.fix}" if exc.fix else exc.what
    providers = probe.ort.get_providers()
    check["session_providers"] = providers
    check["device"] = runner.device
    progress(f"sessions get {', '.join(providers)} on {runner.device}")
    return Context(args, runner, providers, tf32_before, staged), None


def probe_model() -> onnx.ModelProto:
    """One 3x3 Conv: a session of it shows whether the provider takes convolutions."""
    from convlower.modelio import runtime_compatible

    weight = numpy_helper.from_array(np.ones((1, 1, 3, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 8, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [weight])
    return runtime_compatible(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


# ---- the summary --------------------------------------------------------------------------------


def write_outputs(folder: Path, check: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "check.json").write_text(json.dumps(check, indent=1, default=str) + "\n", encoding="utf-8")
    (folder / "summary.md").write_text(summary(check) + "\n", encoding="utf-8")


def summary(check: dict[str, Any]) -> str:
    sections = check["sections"]
    parts = ["# convlower GPU check", "", verdict(check), ""]
    writers = {"environment": environment_md, "correctness": correctness_md, "seed000": seed_md, "zoo": zoo_md,
               "conv_shapes": conv_shapes_md}
    titles = {s.name: s.title for s in SECTIONS}
    for name, record in sections.items():
        status = record["status"] + (f": {record['message']}" if record["message"] else "")
        parts += [f"## {titles[name]}", "", f"*{status}; {record['elapsed_s']:.1f} s of a {record['budget_s']:.0f} s budget.*", ""]
        if record["data"]:
            parts += [writers[name](record["data"]), ""]
    parts.append(f"Command: `{' '.join(check['command'])}`; {check['wall_s']:.0f} s in all.")
    return "\n".join(parts)


def verdict(check: dict[str, Any]) -> str:
    """One paragraph: which provider really ran, whether every family is correct, where convlower wins."""
    if check.get("problem") and "session_providers" not in check:
        return f"**Verdict: nothing ran.** {check['problem']}."
    sections = check["sections"]
    providers = check["session_providers"]
    text = [f"**Verdict.** Sessions really ran on **{providers[0]}** ({check['device']}; a session got {', '.join(providers)}; "
            f"asked for {check['provider_requested']})."]
    correctness = sections.get("correctness")
    if correctness and correctness["data"].get("table"):
        data = correctness["data"]
        run = sum(c["run"] for row in data["table"].values() for b in ("conformance", *FLOAT_DTYPES) if (c := row.get(b)))
        failures = data["failures"]
        families = sorted({f["family"] for f in failures})
        scope = f"{len(data['families']) - len(data['not_covered'])} families"
        cut = "" if correctness["status"] == "done" else f" (partial: {correctness['message'] or correctness['status']})"
        if failures:
            text.append(f"Correctness: **{len(failures)} failure(s)** in {', '.join(families)}, of {run} lowered nodes run{cut}.")
        else:
            text.append(f"Correctness: every variant of {scope} is correct: {run} lowered nodes (conformance cases and generated "
                        f"float32 and float16 nodes) within convlower's tolerance{cut}.")
        if data["not_covered"]:
            text.append(f"Not covered (no node generator): {', '.join(data['not_covered'])}.")
    seed = sections.get("seed000", {}).get("data", {}).get("rows", {})
    if seed.get("convlower optimized", {}).get("median_ms") and seed.get("ONNX export", {}).get("median_ms"):
        row = seed["convlower optimized"]
        versus = [f"{seed[name]['median_ms'] / row['median_ms']:.2f}x vs {name}" for name in
                  ("method_1", "method_2", "torch.compile(method_1)") if seed.get(name, {}).get("median_ms")]
        text.append(f"Seed 000: convlower's model ({', '.join(row['variants']) or 'unchanged'}) takes {row['median_ms']:.3g} ms, "
                    f"{row['vs_onnx_export']:.1f}x faster than the ONNX export; {', '.join(versus)}.")
    zoo = sections.get("zoo", {}).get("data", {}).get("models", [])
    if zoo:
        wins = [f"{m['model']} {m['report_speedup']:.2f}x" for m in zoo
                if m.get("report_interval") and m["report_interval"][0] > 1 and m["lowered"]]
        kept = [m["model"] for m in zoo if not m["lowered"]]
        text.append(f"Zoo: faster with 95% confidence on {', '.join(wins) or 'none'}" + (f"; written unchanged: {', '.join(kept)}" if kept else "") + ".")
    shapes = sections.get("conv_shapes", {}).get("data", {}).get("rows", [])
    if shapes:
        won = sorted((r for r in shapes if r.get("wins")), key=lambda r: -r["best_speedup"])
        best = ", ".join(f"{r['name']} {r['best']} {r['best_speedup']:.2f}x" for r in won[:3])
        text.append(f"Conv layers: a variant beats the provider's own Conv on {len(won)} of {len(shapes)}" + (f" (best: {best})" if won else "") + ".")
    short_of_time = [f"{name} ({r['message']})" for name, r in sections.items() if r["status"] in ("out of time", "error")]
    if short_of_time:
        text.append("Cut short: " + "; ".join(short_of_time) + ".")
    return " ".join(text)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def environment_md(data: dict[str, Any]) -> str:
    torch_info, ort_info, smi = data.get("torch", {}), data.get("onnxruntime", {}), data.get("nvidia_smi", {})
    gpus = "; ".join(f"{g.get('name')} (driver {g.get('driver_version')}, {g.get('memory.total')}, compute {g.get('compute_cap')})"
                     for g in smi.get("gpus", [])) or smi.get("error", "-")
    rows = [
        ("providers a session got", ", ".join(data.get("session_providers", [])) or "none: the provider did not load"),
        ("device", data.get("device", "-")),
        ("GPU (nvidia-smi)", gpus + (f"; driver CUDA {smi['driver_cuda']}" if smi.get("driver_cuda") else "")),
        ("torch", f"{torch_info.get('version')}: CUDA {torch_info.get('cuda')}, cuDNN {torch_info.get('cudnn')}, "
                  f"device {torch_info.get('device', '-')} {torch_info.get('capability', '')}"),
        ("onnxruntime", f"{ort_info.get('version')} ({ort_info.get('package')}; built for CUDA {ort_info.get('built_for_cuda') or '-'}"
                        + (f", cuDNN {ort_info['built_for_cudnn']}" if ort_info.get("built_for_cudnn") else "")
                        + f"); available: {', '.join(ort_info.get('available_providers', []))}"),
        ("versions", ", ".join(f"{k} {v}" for k, v in data.get("versions", {}).items()) + f", Python {data.get('python')}"),
        ("NVIDIA_TF32_OVERRIDE", f"{data.get('NVIDIA_TF32_OVERRIDE', {}).get('value')} (was {data.get('NVIDIA_TF32_OVERRIDE', {}).get('before')})"),
        ("CPU", data.get("cpu")),
        ("staged wheels", ", ".join(data.get("staged", [])) or "none"),
        ("nvidia packages", ", ".join(f"{k} {v}" for k, v in sorted(data.get("nvidia_packages", {}).items())) or "none"),
        ("CUDA libraries loaded", "<br>".join(data.get("loaded_cuda_libraries", [])) or "none"),
    ]
    return table(("what", "value"), rows)


def correctness_md(data: dict[str, Any]) -> str:
    atol = data.get("tolerances", {})
    parts = [f"Provider: {data.get('provider')} (sessions got {', '.join(data.get('session_providers', []))}). "
             f"Reference: the conformance cases' expected outputs; for generated nodes the original node on "
             f"CPUExecutionProvider, in float32, on the same values (float16 nodes: their values rounded to float16). "
             f"\"The provider's original\" is the node as it is, run on the provider: onnxruntime's own op for Conv, ConvTranspose "
             f"and Col2Im, the model-local function body for convlower's canonical ops (onnxruntime has no kernel for them). "
             f"Tolerance `|a - b| <= atol + rtol·|b|`: " + ", ".join(f"{d} {a[0]:g}/{a[1]:g}" for d, a in atol.items())
             + f". {data.get('generated_per_family', 0)} generated nodes per family were run."
             + (" On CPUExecutionProvider most float16 ops run in float32 (onnxruntime inserts Casts around them), so there the "
                "float16 column checks dtype handling, not float16 rounding." if data.get("provider") == CPU else ""), ""]

    def cell(row: dict[str, Any], bucket: str) -> str:
        counts = row.get(bucket)
        return "-" if not counts else f"{counts['passed']}/{counts['run']}" + ("" if counts["passed"] == counts["run"] else " **FAIL**")

    def errors(row: dict[str, Any], key: str) -> str:
        return " / ".join(ms(row.get(b, {}).get(key)) for b in ("conformance", *FLOAT_DTYPES))

    rows = [(r["family"], r["variant"], cell(r, "conformance"), cell(r, "float32"), cell(r, "float16"), errors(r, "worst_abs_err"),
             errors(r, "worst_vs_provider"), r["not_applicable"], r["unsupported"]) for r in data.get("table", {}).values()]
    parts.append(table(("family", "variant", "conformance", "float32", "float16", "worst abs err (conf / f32 / f16)",
                        "worst vs provider's original", "n/a", "provider lacks op"), rows))
    never = [name for name, r in data.get("table", {}).items() if not any(r.get(b) for b in ("conformance", *FLOAT_DTYPES))]
    if never:
        parts += ["", f"Variants no case fitted (add a fitting node to the generator): {', '.join(never)}."]
    ops = data.get("provider_op", {})
    if ops:
        parts += ["", "The original node on the provider against the same reference: " + "; ".join(
            f"{family} " + ", ".join(f"{b} {c['agree']}/{c['run']}" + (f" ({c['unavailable']} not runnable)" if c["unavailable"] else "")
                                     for b, c in buckets.items()) for family, buckets in ops.items()) + "."]
    if data.get("not_covered"):
        parts += ["", f"**Not covered** (no node generator in gpu_check.py): {', '.join(data['not_covered'])}."]
    if data.get("refused_by_reference"):
        parts += ["", f"Generated nodes the CPU reference refused (a generator bug): {len(data['refused_by_reference'])}, in check.json."]
    failures = data.get("failures", [])
    if failures:
        parts += ["", f"Failures ({len(failures)}; all in check.json):", ""]
        parts += [f"- {f['family']}/{f['variant']} {f['case']} ({f['bucket']}): {f['what']}" for f in failures[:40]]
    return "\n".join(parts)


def seed_md(data: dict[str, Any]) -> str:
    shape = data.get("shape", {})
    parts = [f"Shape N={shape.get('N')}, C=1, 32x32, K=3 on {data.get('torch_device')}" + (f" ({data['note']})" if data.get("note") else "")
             + (f"; timed interleaved in one run: {data['timed_with']}" if data.get("timed_with") else "") + ".", ""]
    rows = []
    for name, row in data.get("rows", {}).items():
        spread = f"{ms(row.get('p10_ms'))}-{ms(row.get('p90_ms'))}" if row.get("median_ms") else "-"
        note = row.get("note", "")
        if row.get("variants") is not None:
            note = f"{', '.join(row['variants']) or 'unchanged'}; report {ms(row.get('report_speedup'))}x; optimize {row['optimize_s']:.0f} s"
        if row.get("compile_s"):
            note = f"compile {row['compile_s']:.1f} s"
        rows.append((name, row.get("how", ""), ms(row.get("median_ms")), spread,
                     f"{row['vs_method_1']:.2f}x" if row.get("vs_method_1") else "-",
                     f"{row['vs_onnx_export']:.2f}x" if row.get("vs_onnx_export") else "-",
                     f"{row['max_abs_err']:.2g}" + ("" if row.get("agrees", True) else " **WRONG**") if "max_abs_err" in row else "-", note))
    parts.append(table(("candidate", "how", "median ms", "p10-p90", "speedup vs method_1", "vs ONNX export", "max abs err vs method_1",
                        "note"), rows))
    if data.get("method_1_over_method_2"):
        parts += ["", f"method_1 / method_2: {data['method_1_over_method_2']:.1f}x (the seed reports about 10x on its GPU)."]
    return "\n".join(parts)


def zoo_md(data: dict[str, Any]) -> str:
    rows = []
    for m in data.get("models", []):
        interval = m.get("report_interval")
        speedup = f"{m['report_speedup']:.2f}x [{interval[0]:.2f}-{interval[1]:.2f}]" if m.get("report_speedup") and interval else "unchanged"
        verified = m["verification"].get("passed")
        rows.append((m["model"], "; ".join(f"{k} {'x'.join(map(str, v))}" for k, v in m["inputs"].items()), f"{m['lowered']}/{m['nodes']}",
                     ", ".join(m["variants"]) or "-", ms(m.get("report_original_ms")), ms(m.get("report_optimized_ms")), speedup,
                     "-" if verified is None else ("yes" if verified else "**NO**"),
                     ", ".join(f"{k}={v}" for k, v in m["session_settings"].items()) or "-", f"{m['optimize_s']:.0f}"))
    done = {m["model"] for m in data.get("models", [])}
    missing = [name for name in data.get("planned", []) if name not in done]
    text = table(("model", "inputs", "lowered", "variants", "original ms", "optimized ms", "speedup [95%]", "verified", "session settings",
                  "optimize s"), rows)
    return (f"Size: {data.get('size')}; guard on, no cache; speedup and interval from the report (the guard's paired timing).\n\n"
            + text + (f"\n\nNot reached: {', '.join(missing)}." if missing else ""))


def conv_shapes_md(data: dict[str, Any]) -> str:
    planned = data.get("planned", {})
    rows_data = data.get("rows", [])
    parts = [f"Native: {data.get('native')}. Layers: {planned.get('bench_conv', 0)} from bench_conv.py, {planned.get('corpus', 0)} "
             f"from the real-model corpus ({data.get('corpus')}), {planned.get('zoo', 0)} from the zoo; {planned.get('distinct', 0)} distinct, "
             f"{len(rows_data)} timed. Speedup = native ms / variant ms (> 1: the variant is faster); a win: {data.get('wins_when')}.", ""]
    rows = []
    for r in rows_data:
        cells = ", ".join(f"{v} {x['speedup']:.2f}x" if "speedup" in x else f"{v} **WRONG** ({x['wrong']})" for v, x in r["variants"].items())
        if r.get("error"):
            cells = f"error: {r['error']}"
        rows.append((r["name"], r["layer"], r["source"], ms(r.get("native_ms")), f"{r['best']} {r['best_speedup']:.2f}x" if r.get("best") else "-",
                     "**yes**" if r.get("wins") else "no", cells))
    parts.append(table(("layer", "shape", "source", "native ms", "best variant", "wins", "every variant"), rows))
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
