"""Dynamic filters on onnxruntime: idioms as users write them, end to end, and every variant per op.

    python benchmarks/bench_dynamic_filter.py [--idioms | --variants] [--only NAME,..] [--quick]
        [--threads 2] [--provider cpu|auto|cuda] [--no-compile] [--markdown PATH]

    # the README's idiom table: an estimated 10-12 minutes on 2 quiet cores, most of it the 32
    # optimize calls (10-15 s each) and 16 torch.compile compiles (--no-compile saves 2-3 minutes):
    python benchmarks/bench_dynamic_filter.py --idioms --markdown benchmarks/results/idioms.md

Part 1, the idiom table (`--idioms`): each dynamic-filter idiom of `convlower.models.idioms`
(F.unfold mul+sum, Tensor.unfold, a shift loop, KPN stacked shifts, F.unfold on a 1-D signal,
Tensor.unfold on a 1-D signal, PAC, seed 000's method_1) and each cost-volume idiom of
`convlower.models.correlation_idioms` in a two-frame net (GwcNet's slice-assignment volumes,
nn.Unfold stereo, a pad-once flow loop, F.unfold flow correlation, local attention) is exported by both torch exporters
(TorchScript `dynamo=False` opset 17, dynamo opset 18), each with static dims and with symbolic
batch and spatial dims, and optimized by `convlower.optimize(model, input_shapes=<profiling
shape>, cache=None)` with the guard on, exactly as a user would. Per row: the ops the report says
were recognized, the variants chosen, the exported and the optimized model's medians timed
interleaved at the profiling shape (and, for symbolic exports, at a second shape the tuner never
saw: the optimized model must not be slower there), and the max abs error against torch eager.
Beside them, once per idiom and shape, what a user would run instead: torch eager and
`torch.compile(module)` (compiled for that shape, compile time excluded), and the memcpy floor:
one `np.copyto` of as many bytes as the filter op's inputs and output hold. An idiom no
recognizer knows yet reads "not recognized", 1.00x (unchanged); an exporter that cannot export
an idiom reads "export failed: <reason>".

Part 2, the variant tables (`--variants`): seed 000's method_1 and a plain F.unfold exported by
the dynamo exporter, lowered with each DynamicFilter / Unfold variant by `convlower.lower`, each
checked against torch eager and timed interleaved with the graph as exported; torch eager apart.

How it measures (no candidate is favoured): onnxruntime sessions come from convlower's Runner
(worker threads do not spin); onnxruntime candidates are timed interleaved with
`time_interleaved` (rotating order, medians); torch runs apart, in a block after the onnxruntime
timings (torch's OpenMP threads spin after each call and would take the cores from the next
onnxruntime run), with the same thread count (`torch.set_num_threads`). A self-check row times the
exported model against itself through the same harness: its ratio must read 1.00x within the
noise figure printed beside it. Speedups are medians' ratios: above 1 is faster.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import re
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime
import torch
import torch.nn.functional as F

import convlower
from convlower.models.correlation_idioms import FlowNet, LocalAttention, StereoNet
from convlower.models.idioms import FilterNet, PixelAdaptive, StackedShifts, TensorUnfold, UnfoldSignal
from convlower.models.seed_filter import SeedFilter
from convlower.ops import dynamic_filter
from convlower.passes import FAMILIES
from convlower.runner import Runner, Timing, TimingPolicy, time_calls, time_interleaved
from convlower.tune import ORIGINAL
from convlower.verify import compare

# ---------------------------------------------------------------------------------------------
# Part 1: dynamic-filter idioms as users write them, end to end through convlower.optimize
# ---------------------------------------------------------------------------------------------

Shape = tuple[int, ...]
Feeds = dict[str, np.ndarray]
EXPORTERS = (("TorchScript", False, 17), ("dynamo", True, 18))
DIMS = ("static", "symbolic")
IMAGE_AXES = {0: "batch", 2: "height", 3: "width"}
SIGNAL_AXES = {0: "batch", 2: "time"}


def image(shape: Shape, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """An image `[N, C, H, W]` (a FilterNet predicts its own filters from it)."""
    return (rng.standard_normal(shape, dtype=np.float32),)


def with_filters(filter_shape: Callable[[Shape], Shape]) -> Callable[[Shape, np.random.Generator], tuple[np.ndarray, ...]]:
    """Inputs `(x, filters)`: x of the given shape, non-negative filters of `filter_shape(x's shape)`."""

    def inputs(shape: Shape, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        return rng.standard_normal(shape, dtype=np.float32), rng.random(filter_shape(shape), dtype=np.float32)

    return inputs


@dataclass(frozen=True)
class Idiom:
    """One idiom: the module, its inputs at a shape, how to export it with symbolic dims, and
    the shapes it is measured at (profiling, other; `quick` ones for smoke runs)."""

    name: str
    about: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[Shape, np.random.Generator], tuple[np.ndarray, ...]]
    names: tuple[str, ...]
    symbolic_axes: tuple[dict[int, str], ...]
    shapes: tuple[Shape, Shape]
    quick_shapes: tuple[Shape, Shape]
    filter_layer: Callable[[torch.nn.Module], torch.nn.Module] = lambda module: module
    """The filter op inside the model, whose inputs' and output's bytes set the memcpy floor."""
    inferred_ranges: bool = False
    """Symbolic dims for dynamo as `Dim.AUTO`, torch.export inferring their ranges: a stride-2
    encoder and slices by up to 24 disparities put guards on the sizes that a named `Dim(min=2)`
    violates."""


def _idioms() -> list[Idiom]:
    """Image nets at a KPN denoiser's size (K=5 at 2x3x160x160, then 1x3x96x128), a burst of 4
    frames, 1-D signals of 16 channels x 16000 steps (K=9, the size of the Tensor.unfold target),
    PAC at pacnet's size (16 -> 16 channels, K=5), and method_1 at seed 000's own shape."""

    def filter_net(idiom: str, layer: str) -> Idiom:
        return Idiom(
            idiom, f"FilterNet: a 3x3 conv predicts 5x5 softmax filters from the image x [N, 3, H, W]; the layer: {layer}",
            build=lambda: FilterNet(idiom, 3, 5), inputs=image, names=("x",), symbolic_axes=(IMAGE_AXES,),
            shapes=((2, 3, 160, 160), (1, 3, 96, 128)), quick_shapes=((2, 3, 24, 24), (1, 3, 16, 28)),
            filter_layer=lambda net: net.layer,
        )

    def signal(idiom: str, about: str, build: Callable[[], torch.nn.Module], filter_shape: Callable[[Shape], Shape]) -> Idiom:
        return Idiom(
            idiom, about, build, with_filters(filter_shape), names=("x", "filters"), symbolic_axes=(SIGNAL_AXES, SIGNAL_AXES),
            shapes=((4, 16, 16000), (2, 16, 8000)), quick_shapes=((2, 4, 400), (1, 4, 250)),
        )

    return [
        filter_net("unfold_mul_sum", "F.unfold(x).view(..) * filters, .sum(2)"),
        filter_net("tensor_unfold", "F.pad(x).unfold(2, 5, 1).unfold(3, 5, 1) * filters, summed"),
        filter_net("shift_loop", "a Python loop over 25 padded slices times filter channels, added up"),
        Idiom(
            "stacked_shifts",
            "StackedShifts (KPN burst): frames [B, 4, 3, H, W], 25 shifted slices stacked, times kernels [B, 4, 25, 3, H, W], summed",
            build=lambda: StackedShifts(5), inputs=with_filters(lambda s: (*s[:2], 25, *s[2:])), names=("frames", "kernels"),
            symbolic_axes=({0: "batch", 3: "height", 4: "width"}, {0: "batch", 4: "height", 5: "width"}),
            shapes=((2, 4, 3, 96, 96), (1, 4, 3, 64, 80)), quick_shapes=((2, 2, 3, 20, 20), (1, 2, 3, 12, 16)),
        ),
        signal("unfold_signal", "UnfoldSignal: F.unfold on x [N, C, T] viewed as [N, C, 1, T], times filters [N, 9, T], summed",
               lambda: UnfoldSignal(9), lambda s: (s[0], 9, s[2])),
        signal("tensor_unfold_1d", "TensorUnfold rank 1: F.pad(x).unfold(2, 9, 1) on x [N, C, T], times filters [N, 1, T, 9], summed",
               lambda: TensorUnfold(1, 9), lambda s: (s[0], 1, s[2], 9)),
        Idiom(
            "pac", "PixelAdaptive (pacnet's pacconv2d): x [N, 16, H, W], a given per-pixel kernel [N, 1, 5, 5, H, W], 16 outputs",
            build=lambda: PixelAdaptive(16, 16, 5), inputs=with_filters(lambda s: (s[0], 1, 5, 5, *s[2:])), names=("x", "kernel"),
            symbolic_axes=(IMAGE_AXES, {0: "batch", 4: "height", 5: "width"}),
            shapes=((2, 16, 96, 96), (1, 16, 64, 80)), quick_shapes=((2, 16, 20, 20), (1, 16, 12, 16)),
        ),
        Idiom(
            "method_1", "seed 000's method_1 (SeedFilter): F.unfold + view + einsum, x [N, 1, H, W], filters [N, 9, H, W], K=3",
            build=lambda: SeedFilter(3), inputs=with_filters(lambda s: (s[0], 9, *s[2:])), names=("x", "filters"),
            symbolic_axes=(IMAGE_AXES, IMAGE_AXES),
            shapes=((2048, 1, 32, 32), (1024, 1, 24, 40)), quick_shapes=((64, 1, 16, 16), (32, 1, 12, 20)),
        ),
        *_correlation_idioms(),
    ]


def two_frames(shape: Shape, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Two images of the same shape: a stereo pair, or consecutive video frames."""
    return rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape, dtype=np.float32)


class AttentionNet(torch.nn.Module):
    """A stem conv, local self-attention over a 5x5 window with 4 heads (keys and values by
    Tensor.unfold), a 1x1 conv out: the smallest net around the idiom."""

    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, channels, 3, padding=1)
        self.attention = LocalAttention(channels, 4, 5)
        self.out = torch.nn.Conv2d(channels, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.attention(self.stem(x)))


def _correlation_idioms() -> list[Idiom]:
    """Cost volumes and local correlations (`convlower.models.correlation_idioms`) in the issue's
    nets: two 2x3x128x256 frames through a stride-2 encoder of 32 channels, then the volume (24
    disparities; GwcNet's 8 groups) or the 9x9 flow correlation; local attention (64 channels, 4
    heads, 5x5) on 2x3x64x64. Quick shapes keep the features wider than the 24 disparities."""

    def two_frame(name: str, about: str, build: Callable[[], torch.nn.Module], layer: str) -> Idiom:
        return Idiom(
            name, about, build, two_frames, names=("first", "second"), symbolic_axes=(IMAGE_AXES, IMAGE_AXES),
            shapes=((2, 3, 128, 256), (1, 3, 96, 192)), quick_shapes=((2, 3, 16, 64), (1, 3, 12, 56)),
            filter_layer=lambda net: getattr(net, layer), inferred_ranges=True,
        )

    return [
        two_frame("stereo_groupwise", "StereoNet: GwcNet's build_gwc_volume, a zero [B, 8, 24, H, W] volume filled by slice "
                  "assignment per disparity, mean over each group's channels", lambda: StereoNet("groupwise"), "volume"),
        two_frame("stereo_volume", "StereoNet: build_corr_volume, a zero [B, 24, H, W] volume filled by slice assignment, "
                  "mean over channels", lambda: StereoNet("correlation"), "volume"),
        two_frame("stereo_unfold", "StereoNet: a left zero pad, nn.Unfold((1, 24)) windows times the left map, summed over "
                  "channels, flipped", lambda: StereoNet("unfold"), "volume"),
        two_frame("flow_shift_loop", "FlowNet: pad once, 81 shifted slices times the first map, mean over channels, cat "
                  "(PWC-Net's loop form)", lambda: FlowNet("shift_loop"), "correlation"),
        two_frame("flow_unfold", "FlowNet: F.unfold(f2, 9, padding=4).view(b, c, 81, h, w) * f1[:, :, None], summed over "
                  "channels", lambda: FlowNet("unfold"), "correlation"),
        Idiom(
            "local_attention", "AttentionNet: keys and values by F.pad(k).unfold(2, 5, 1).unfold(3, 5, 1) per head, q.k summed "
            "over the head's channels, softmax, the weighted sum of the values",
            build=AttentionNet, inputs=image, names=("x",), symbolic_axes=(IMAGE_AXES,),
            shapes=((2, 3, 64, 64), (1, 3, 48, 80)), quick_shapes=((2, 3, 16, 16), (1, 3, 12, 20)),
            filter_layer=lambda net: net.attention, inferred_ranges=True,
        ),
    ]


IDIOMS = {idiom.name: idiom for idiom in _idioms()}
TARGETS = {
    "method_1": "every method_1 row >= 15x faster than its export",
    "tensor_unfold_1d": "optimized <= 5.8 ms at 4x16x16000 (16.7 ms as exported), measured on the lead's machine",
}
SPEEDUP_TARGETS = {
    "stereo_groupwise": 4.0, "stereo_volume": 4.0, "local_attention": 4.0, "stereo_unfold": 6.0, "flow_unfold": 6.0,
    "flow_shift_loop": 1.0,
}
"""Issue 20's must-show: every exported row at least this much faster than its export at the profiling
shape (1.0: not slower, for a loop that already pads once), and not slower at the other shape."""


@dataclass
class IdiomRow:
    """One idiom exported by one exporter with static or symbolic dims, and what optimize made of it."""

    idiom: str
    exporter: str
    dims: str
    note: str = ""
    recognized: str = ""
    chosen: str = ""
    unchanged: bool = True
    max_abs_err: float | None = None
    wrong: bool = False
    ms: dict[Shape, tuple[float, float]] = field(default_factory=dict)
    """Per shape timed: (exported median, optimized median)."""
    provider: str = ""
    """The execution provider the row's sessions really got."""
    exported: onnx.ModelProto | None = field(default=None, repr=False)
    optimized: onnx.ModelProto | None = field(default=None, repr=False)

    def speedup(self, shape: Shape) -> float | None:
        if shape not in self.ms:
            return None
        exported, optimized = self.ms[shape]
        return exported / optimized


@dataclass
class Baseline:
    """What a user would run instead, and the floor, at one shape (the same for every row)."""

    op_bytes: int
    memcpy_ms: float | None = None
    eager_ms: float | None = None
    compiled_ms: float | None = None
    compile_note: str = ""


@dataclass
class SelfCheck:
    """One exported model timed against itself through the same harness."""

    model: str
    first: Timing
    second: Timing


@dataclass
class IdiomResult:
    idiom: Idiom
    shapes: tuple[Shape, Shape]
    rows: list[IdiomRow]
    baselines: dict[Shape, Baseline]
    self_check: SelfCheck | None = None
    stages: dict[str, float] = field(default_factory=dict)
    """Seconds spent exporting, optimizing, timing onnxruntime, timing torch."""


def short(exc: BaseException, width: int = 120) -> str:
    """An exception's first line, without onnxruntime's source location, cut after the first
    sentence that says something (40 characters or more), short enough for a table cell."""
    line = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    line = re.sub(r"\[ONNXRuntimeError\][^)]*\)\s*(This is an invalid model\.\s*)?", "", line).replace("|", "/")
    text = ""
    for sentence in line.split(". "):
        text = f"{text}. {sentence}" if text else sentence
        if len(text) >= 40:
            break
    return text if len(text) <= width else text[: width - 1] + "…"


@contextlib.contextmanager
def quiet():
    """Silence the exporters' and the compiler's progress prints, log lines and warnings."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as devnull, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            os.dup2(devnull.fileno(), 1)  # the TorchScript exporter prints graphs from C++
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)
        logger.setLevel(level)


def export_idiom(module: torch.nn.Module, args: tuple[torch.Tensor, ...], idiom: Idiom, dynamo: bool, opset: int,
                 symbolic: bool) -> onnx.ModelProto:
    """`module` exported as a user would: symbolic axes through `dynamic_shapes` (dynamo) or
    `dynamic_axes` (TorchScript)."""
    names = list(idiom.names)
    options: dict[str, Any] = {}
    if symbolic and dynamo:
        dims: dict[str, Any] = {}
        options["dynamic_shapes"] = tuple(
            {axis: torch.export.Dim.AUTO if idiom.inferred_ranges else dims.setdefault(name, torch.export.Dim(name, min=2))
             for axis, name in axes.items()} for axes in idiom.symbolic_axes
        )
    elif symbolic:
        options["dynamic_axes"] = dict(zip(names, idiom.symbolic_axes))
    buffer = io.BytesIO()
    with quiet():
        torch.onnx.export(module, args, buffer, dynamo=dynamo, opset_version=opset, input_names=names, output_names=["y"], **options)
    return onnx.load_from_string(buffer.getvalue())


def torch_reference(module: torch.nn.Module, idiom: Idiom, tensors: dict[Shape, tuple[torch.Tensor, ...]]
                    ) -> tuple[dict[Shape, np.ndarray], dict[Shape, int]]:
    """Torch eager's output at each shape, and the bytes the filter op reads and writes there."""
    expected, op_bytes = {}, {}
    for shape, args in tensors.items():
        seen: list[int] = []
        hook = idiom.filter_layer(module).register_forward_hook(
            lambda layer, inputs, output: seen.append(
                sum(t.nbytes for t in (*inputs, output, *layer.parameters()) if isinstance(t, torch.Tensor))
            )
        )
        with torch.inference_mode():
            expected[shape] = module(*args).numpy()
        hook.remove()
        op_bytes[shape] = seen[0]
    return expected, op_bytes


def export_rows(module: torch.nn.Module, idiom: Idiom, args: tuple[torch.Tensor, ...]) -> list[IdiomRow]:
    """One row per exporter and static/symbolic dims, holding the exported model or why it failed."""
    rows = []
    for exporter, dynamo, opset in EXPORTERS:
        for dims in DIMS:
            row = IdiomRow(idiom.name, exporter, dims)
            try:
                row.exported = export_idiom(module, args, idiom, dynamo, opset, symbolic=dims == "symbolic")
            except Exception as exc:  # noqa: BLE001 - any exporter failure is a row of the table
                row.note = f"export failed: {short(exc)}"
            rows.append(row)
    return rows


def optimize_row(row: IdiomRow, feeds: Feeds, runner: Runner) -> None:
    """`convlower.optimize` at the profiling shape, guard on, no cache; the row records what the
    report says was recognized and chosen."""
    shapes = {name: array.shape for name, array in feeds.items()}
    try:
        with quiet():  # graphsurgeon warns about the tensors recognizers rename
            result = convlower.optimize(row.exported, input_shapes=shapes, provider=runner.requested, threads=runner.threads,
                                        cache=None)
    except Exception as exc:  # noqa: BLE001 - a failure to optimize is a row of the table
        row.note = f"optimize failed: {short(exc)}"
        return
    report = result.report
    recognized = Counter(node.op for node in report.nodes if node.recognized)
    row.recognized = ", ".join(op + (f" x{count}" if count > 1 else "") for op, count in recognized.items()) or "not recognized"
    lowered = [node for node in report.nodes if node.chosen != ORIGINAL]
    row.chosen = ", ".join(sorted({f"{node.op}={node.chosen}" for node in lowered})) or "-"
    row.unchanged = not lowered
    reverted = [node.reason for node in report.nodes if node.name in report.reverted and node.reason]
    if reverted:
        row.note = f"guard: {reverted[0]}"
    row.optimized = result.model


def check_row(row: IdiomRow, feeds: dict[Shape, Feeds], expected: dict[Shape, np.ndarray], runner: Runner) -> None:
    """Max abs error of the optimized model against torch eager, at every shape the row is timed at."""
    session = runner.session(row.optimized)
    for shape in row_shapes(row, list(feeds)):
        diff = compare("y", expected[shape], session.run(feeds[shape])[0], None, None)
        row.max_abs_err = max(row.max_abs_err or 0.0, diff.max_abs_err)
        row.wrong |= not diff.passed


def row_shapes(row: IdiomRow, shapes: list[Shape]) -> list[Shape]:
    """Static rows run at the profiling shape only; symbolic ones at both."""
    return shapes if row.dims == "symbolic" else shapes[:1]


def time_row(row: IdiomRow, feeds: dict[Shape, Feeds], runner: Runner, policy: TimingPolicy) -> None:
    """The exported and the optimized model timed interleaved at each of the row's shapes (the
    exported one alone when optimize left the model unchanged)."""
    sessions = [runner.session(row.exported)] + ([] if row.unchanged else [runner.session(row.optimized)])
    row.provider = sessions[-1].provider
    for shape in row_shapes(row, list(feeds)):
        timings = time_interleaved(sessions, feeds[shape], policy)
        row.ms[shape] = (timings[0].median_ms, timings[-1].median_ms)


def time_memcpy(nbytes: int, policy: TimingPolicy) -> float:
    """One np.copyto of `nbytes` between preallocated arrays: the floor of any implementation
    that reads the op's inputs and writes its output once."""
    source = np.ones(max(nbytes // 4, 1), dtype=np.float32)
    target = np.zeros_like(source)
    return time_calls([lambda: np.copyto(target, source)], replace(policy, budget_s=policy.budget_s / 4))[0].median_ms


def time_torch(module: torch.nn.Module, args: tuple[torch.Tensor, ...], policy: TimingPolicy, compile_it: bool,
               baseline: Baseline) -> None:
    """Torch eager and `torch.compile(module)` (compiled afresh for this shape, warmed up first,
    so compile time is excluded), timed interleaved with each other."""
    calls: list[Callable[[], object]] = [lambda: module(*args)]
    with torch.inference_mode():
        if compile_it:
            torch.compiler.reset()  # a fresh compile for this shape, as a user compiling for it gets
            compiled = torch.compile(module)
            try:
                with quiet():
                    compiled(*args)
                calls.append(lambda: compiled(*args))
            except Exception as exc:  # noqa: BLE001 - a failure to compile is a cell of the table
                baseline.compile_note = f"compile failed: {short(exc, 40)}"
        else:
            baseline.compile_note = "not run"
        timings = time_calls(calls, policy)
    baseline.eager_ms = timings[0].median_ms
    if len(timings) > 1:
        baseline.compiled_ms = timings[1].median_ms


def bench_idiom(idiom: Idiom, runner: Runner, policy: TimingPolicy, *, quick: bool, compile_it: bool,
                self_check: bool) -> IdiomResult:
    """Export, optimize, check and time one idiom: torch work first (reference, exports), then
    onnxruntime (optimize, checks, interleaved timings, the self-check, memcpy), torch timings last."""
    clock = Stopwatch()
    torch.manual_seed(0)
    module = idiom.build().eval()
    shapes = idiom.quick_shapes if quick else idiom.shapes
    rng = np.random.default_rng(0)
    feeds = {shape: dict(zip(idiom.names, idiom.inputs(shape, rng))) for shape in shapes}
    tensors = {shape: tuple(torch.from_numpy(array) for array in f.values()) for shape, f in feeds.items()}
    expected, op_bytes = torch_reference(module, idiom, tensors)
    rows = export_rows(module, idiom, tensors[shapes[0]])
    result = IdiomResult(idiom, shapes, rows, {shape: Baseline(op_bytes[shape]) for shape in shapes})
    clock.lap("export")

    ready = [row for row in rows if row.exported is not None]
    for row in ready:
        optimize_row(row, feeds[shapes[0]], runner)
    ready = [row for row in ready if row.optimized is not None]
    for row in ready:
        check_row(row, feeds, expected, runner)
    clock.lap("optimize")
    for row in ready:
        time_row(row, feeds, runner, policy)
    if self_check and ready:
        same = [runner.session(ready[0].exported) for _ in range(2)]
        first, second = time_interleaved(same, feeds[shapes[0]], policy)
        result.self_check = SelfCheck(f"{idiom.name}'s {ready[0].exporter} {ready[0].dims} export", first, second)
    for shape, baseline in result.baselines.items():
        baseline.memcpy_ms = time_memcpy(baseline.op_bytes, policy)
    clock.lap("onnxruntime timing")
    for shape, baseline in result.baselines.items():
        # --quick compiles at the profiling shape only: each compile takes 10-30 s here
        time_torch(module, tensors[shape], policy, compile_it and not (quick and shape != shapes[0]), baseline)
    clock.lap("torch timing")
    result.stages = clock.laps
    return result


class Stopwatch:
    """Seconds spent in each stage, for the progress lines."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = now - self.last
        self.last = now


def ratio_cell(speedup: float | None, unchanged: bool, noise: float) -> str:
    if speedup is None:
        return "-"
    flag = " (unchanged)" if unchanged else (" SLOWER" if speedup < 1 - noise else "")
    return f"{speedup:.2f}x{flag}"


def ms_cell(value: float | None, note: str = "") -> str:
    return f"{value:.2f}" if value is not None else (note or "-")


def shape_text(shape: Shape) -> str:
    return "x".join(map(str, shape))


def idiom_table(results: list[IdiomResult], noise: float) -> tuple[list[str], list[list[str]]]:
    """One line per idiom x exporter x dims, at the profiling shape (plus the symbolic rows'
    speedup at the other shape); torch and the floor at the profiling shape beside them."""
    header = ["idiom", "shape", "exporter", "dims", "recognized", "variants chosen", "exported ms", "optimized ms",
              "speedup", "speedup @ other shape", "max abs err", "torch eager ms", "torch.compile ms", "memcpy floor ms"]
    lines = []
    for result in results:
        profile, other = result.shapes
        base = result.baselines[profile]
        torch_cells = [ms_cell(base.eager_ms), ms_cell(base.compiled_ms, base.compile_note), ms_cell(base.memcpy_ms)]
        for row in result.rows:
            label = [row.idiom, shape_text(profile), row.exporter, row.dims]
            if profile not in row.ms:
                lines.append(label + [row.note or "-", "-", "-", "-", "-", "-", "-"] + torch_cells)
                continue
            exported, optimized = row.ms[profile]
            chosen = row.chosen + (f" ({row.note})" if row.note else "")
            error = f"{row.max_abs_err:.1e}" + (" WRONG" if row.wrong else "")
            lines.append(label + [
                row.recognized, chosen, ms_cell(exported), ms_cell(optimized),
                ratio_cell(row.speedup(profile), row.unchanged, noise),
                ratio_cell(row.speedup(other), row.unchanged, noise) if row.dims == "symbolic" else "",
                error,
            ] + torch_cells)
    return header, lines


def shape_table(results: list[IdiomResult]) -> tuple[list[str], list[list[str]]]:
    """Per idiom and shape: the best optimized model beside torch eager, torch.compile and the floor."""
    header = ["idiom", "shape", "op MB", "memcpy floor ms", "torch eager ms", "torch.compile ms", "best optimized ms",
              "best of", "vs eager", "vs compile", "floor / best"]
    lines = []
    for result in results:
        for shape, base in result.baselines.items():
            timed = [(row.ms[shape][1], f"{row.exporter} {row.dims}") for row in result.rows if shape in row.ms and not row.wrong]
            best, who = min(timed) if timed else (None, "-")
            lines.append([
                result.idiom.name, shape_text(shape), f"{base.op_bytes / 2**20:.1f}", ms_cell(base.memcpy_ms),
                ms_cell(base.eager_ms), ms_cell(base.compiled_ms, base.compile_note), ms_cell(best), who,
                *(f"{ref / best:.2f}x" if ref and best else "-" for ref in (base.eager_ms, base.compiled_ms)),
                f"{base.memcpy_ms / best:.2f}" if best and base.memcpy_ms else "-",
            ])
    return header, lines


def render(header: list[str], lines: list[list[str]], markdown: bool) -> str:
    """An aligned text table, or a markdown one whose number columns are right-aligned."""
    if markdown:
        rule = ["---:" if _mostly_numbers([cells[i] for cells in lines]) else "---" for i in range(len(header))]
        return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, rule, *lines])
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]
    text = [" ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip() for cells in [header, *lines]]
    return "\n".join([text[0], "-" * len(text[0]), *text[1:]])


def _mostly_numbers(cells: list[str]) -> bool:
    """Whether most filled cells of a column start with a number (ms, ratios, errors)."""
    filled = [cell for cell in cells if cell not in ("", "-")]
    return bool(filled) and 2 * sum(bool(re.match(r"^\d[\d.e+-]*x?( |$)", cell)) for cell in filled) >= len(filled)


def self_check_line(results: list[IdiomResult]) -> tuple[str, float]:
    """The exported model against itself: its ratio, and the noise figure (half the wider p10-p90
    spread of the two) that every ratio in the table should be read against."""
    check = next((r.self_check for r in results if r.self_check), None)
    if check is None:
        return "self-check: not run (nothing exported)", 0.0
    ratio = check.first.median_ms / check.second.median_ms
    noise = max(check.first.spread, check.second.spread) / 2
    verdict = "within noise" if abs(ratio - 1) <= noise else "OUTSIDE the noise: the machine is not quiet"
    return (f"self-check: {check.model} timed against itself: {ratio:.2f}x; noise ±{noise:.1%} (half the p10-p90 "
            f"spread); {verdict}"), noise


def target_lines(results: list[IdiomResult], quick: bool) -> list[str]:
    lines = []
    for result in results:
        least = SPEEDUP_TARGETS.get(result.idiom.name)
        if least is not None:
            profile, other = result.shapes
            rows = [row for row in result.rows if profile in row.ms]
            at_profile = [row.speedup(profile) for row in rows]
            at_other = [row.speedup(other) for row in rows if other in row.ms]
            got = ", ".join(f"{row.exporter} {row.dims} " + (f"{s:.1f}x" if s else "not timed") for row, s in zip(rows, at_profile))
            met = bool(rows) and all(s is not None and s >= least for s in at_profile) and all(s is None or s >= 0.97 for s in at_other)
            verdict = "not judged (--quick shapes)" if quick else ("met" if met else "NOT met")
            lines.append(f"target {result.idiom.name}: every export >= {least:g}x at the profiling shape, not slower at the "
                         f"other: {got or 'nothing exported'}: {verdict}")
            continue
        target = TARGETS.get(result.idiom.name)
        if target is None:
            continue
        profile = result.shapes[0]
        if result.idiom.name == "method_1":
            speedups = [row.speedup(profile) for row in result.rows]
            got = ", ".join(f"{row.exporter} {row.dims} " + (f"{s:.1f}x" if s else "not timed") for row, s in zip(result.rows, speedups))
            met = all(s is not None and s >= 15 for s in speedups)
        else:
            best = min((row.ms[profile][1] for row in result.rows if profile in row.ms), default=None)
            got = f"best optimized {ms_cell(best)} ms"
            met = best is not None and best <= 5.8
        verdict = "not judged (--quick shapes)" if quick else ("met" if met else "NOT met")
        lines.append(f"target {result.idiom.name}: {target}: {got}: {verdict}")
    return lines


COLUMNS = (
    "speedup = exported median / optimized median, timed interleaved (> 1: faster); speedup @ other shape: symbolic "
    "exports only, at the second shape, which the tuner never saw; max abs err: optimized vs torch eager at every shape "
    "the row runs at; torch.compile: compiled afresh for each shape, compile time excluded; memcpy floor: one np.copyto "
    "of as many bytes as the filter op's inputs and output hold; floor / best: how close the best model is to it"
)


def idiom_report(results: list[IdiomResult], runner: Runner, threads: int, quick: bool) -> tuple[str, str]:
    """The idiom part as terminal text and as markdown."""
    check, noise = self_check_line(results)
    providers = sorted({row.provider for r in results for row in r.rows if row.provider}) or [runner.provider]
    about = (f"onnxruntime {onnxruntime.__version__} on {', '.join(providers)} (the provider that ran); torch {torch.__version__} "
             f"eager and torch.compile on CPU; device: {runner.device}; threads: {threads} (onnxruntime intra-op and "
             f"torch.set_num_threads)")
    notes = [about, COLUMNS, check, *target_lines(results, quick)]
    if quick:
        notes.insert(0, "QUICK SMOKE RUN: small shapes, tiny timing budgets: the numbers mean nothing.")
    notes += [f"{r.idiom.name}: {r.idiom.about}" for r in results]
    tables = [idiom_table(results, noise), shape_table(results)]
    text = "\n\n".join(render(h, lines, False) for h, lines in tables) + "\n" + "\n".join(notes)
    titles = ["### Dynamic-filter idioms end to end (profiling shape)", "### Per idiom and shape: torch and the floor"]
    markdown = "\n\n".join(f"{title}\n\n{render(h, lines, True)}" for title, (h, lines) in zip(titles, tables))
    return text, markdown + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


# ---------------------------------------------------------------------------------------------
# Part 2: every DynamicFilter / Unfold variant against the graph torch exports, and torch eager
# ---------------------------------------------------------------------------------------------

VARIANT_SHAPES = [(2048, 1, 32, 32, 3), (8, 16, 64, 64, 3), (1, 64, 128, 128, 5)]


class Method1(torch.nn.Module):
    """Seed 000's method_1 (K fixed at construction)."""

    def __init__(self, kernel: int):
        super().__init__()
        self.kernel = kernel

    def forward(self, feature_map: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
        n, c, h, w = feature_map.shape
        k = self.kernel
        unfolded = F.unfold(feature_map, k, padding=k // 2).view(n, c, k**2, h, w)
        return torch.einsum("nckhw,nkhw->nchw", unfolded, filters)


class Unfold(torch.nn.Module):
    """A plain `F.unfold(x, K, padding=K // 2)`."""

    def __init__(self, kernel: int):
        super().__init__()
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.unfold(x, self.kernel, padding=self.kernel // 2)


class Eager:
    """A torch callable that `time_interleaved` can time beside onnxruntime sessions."""

    provider = "torch eager (CPU)"

    def __init__(self, fn: Callable[..., torch.Tensor]):
        self.fn = fn

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [self.runner_for(feeds)().numpy()]

    def runner_for(self, feeds: dict[str, np.ndarray]) -> Callable[[], torch.Tensor]:
        tensors = [torch.from_numpy(a) for a in feeds.values()]

        def once() -> torch.Tensor:
            with torch.inference_mode():
                return self.fn(*tensors)

        return once


@dataclass
class Row:
    candidate: str
    timing: Timing | None
    provider: str = ""
    note: str = ""


@dataclass
class Comparison:
    """One op at one shape: the exported graph, its lowerings, torch eager."""

    exported: str
    eager: str
    variants: list[str]
    rows: list[Row]


def export(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], names: list[str]) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with quiet():
        torch.onnx.export(module, inputs, buffer, dynamo=True, opset_version=18, input_names=names, output_names=["y"])
    return onnx.load_from_string(buffer.getvalue())


def compare_candidates(
    exported: onnx.ModelProto,
    op: str,
    eager: dict[str, Callable[..., torch.Tensor]],
    feeds: dict[str, np.ndarray],
    runner: Runner,
    policy: TimingPolicy,
) -> Comparison:
    """Lower `exported` with each variant of `op`; check every candidate against the first eager
    callable's output; time the onnxruntime candidates interleaved, then the torch ones apart."""
    variants = FAMILIES[op.lower()].variant_names
    exported_name = "exported graph"
    candidates: dict[str, Any] = {exported_name: runner.session(exported, what=exported_name)}
    rows = []
    for variant in variants:
        result = convlower.lower(exported, [f"{op}={variant}"])
        if result.lowered:
            candidates[variant] = runner.session(result.model, what=variant)
        else:
            rows.append(Row(variant, None, note="; ".join(o.reason or "" for o in result.nodes) or "not recognized"))
    candidates.update({name: Eager(fn) for name, fn in eager.items()})
    reference = next(iter(eager))
    expected = candidates[reference].run(feeds)[0]
    for name, candidate in list(candidates.items()):
        diff = compare("y", expected, candidate.run(feeds)[0], None, None)
        if not diff.passed:
            rows.append(Row(name, None, note=f"WRONG (max abs err {diff.max_abs_err:.3g})"))
            del candidates[name]
    # onnxruntime first, torch apart after it: torch's OpenMP threads spin after each call and
    # would steal the cores from the next onnxruntime run.
    onnx_names = [name for name, c in candidates.items() if not isinstance(c, Eager)]
    torch_names = [name for name, c in candidates.items() if isinstance(c, Eager)]
    timings = dict(zip(onnx_names, time_interleaved([candidates[n] for n in onnx_names], feeds, policy)))
    timings.update(zip(torch_names, time_interleaved([candidates[n] for n in torch_names], feeds, policy)))
    timed = [Row(name, timings[name], c.provider) for name, c in candidates.items()]
    return Comparison(exported_name, reference, variants, timed + rows)


def bench_dynamic_filter(shape: tuple[int, ...], runner: Runner, policy: TimingPolicy) -> Comparison:
    n, c, h, w, k = shape
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((n, c, h, w)).astype(np.float32), "f": rng.random((n, k * k, h, w)).astype(np.float32)}
    exported = export(Method1(k), (torch.from_numpy(feeds["x"]), torch.from_numpy(feeds["f"])), ["x", "f"])
    eager = {"torch eager method_1": Method1(k), "torch eager dynamic_filter": lambda x, f: dynamic_filter(x, f, k)}
    return compare_candidates(exported, "DynamicFilter", eager, feeds, runner, policy)


def bench_unfold(shape: tuple[int, ...], runner: Runner, policy: TimingPolicy) -> Comparison:
    n, c, h, w, k = shape
    feeds = {"x": np.random.default_rng(0).standard_normal((n, c, h, w)).astype(np.float32)}
    exported = export(Unfold(k), (torch.from_numpy(feeds["x"]),), ["x"])
    return compare_candidates(exported, "Unfold", {"torch eager F.unfold": Unfold(k)}, feeds, runner, policy)


def table(title: str, results: dict[tuple[int, ...], Comparison]) -> str:
    header = f"{'shape (N, C, H, W, K)':<22} {title:<28} {'median ms':>10} {'p10-p90 ms':>17} {'vs exported':>12} {'vs eager':>9}"
    lines = [header, "-" * len(header)]
    for shape, comparison in results.items():
        timed = {r.candidate: r.timing.median_ms for r in comparison.rows if r.timing is not None}
        exported, eager = timed[comparison.exported], timed[comparison.eager]
        label = str(shape)
        for row in comparison.rows:
            if row.timing is None:
                lines.append(f"{label:<22} {row.candidate:<28} {row.note}")
            else:
                t = row.timing
                spread = f"{t.p10_ms:.2f}-{t.p90_ms:.2f}"
                lines.append(
                    f"{label:<22} {row.candidate:<28} {t.median_ms:>10.2f} {spread:>17} "
                    f"{exported / t.median_ms:>11.1f}x {eager / t.median_ms:>8.2f}x"
                )
            label = ""
        best = min((name for name in timed if name in comparison.variants), key=timed.__getitem__)
        lines.append(
            f"{'':<22} best: {best}, {exported / timed[best]:.1f}x faster than the exported graph, "
            f"{eager / timed[best]:.2f}x {comparison.eager}"
        )
    return "\n".join(lines)


def run_idioms(args: argparse.Namespace, runner: Runner, threads: int) -> None:
    policy = (
        TimingPolicy(warmup=1, min_runs=3, max_runs=6, budget_s=0.2)
        if args.quick
        else TimingPolicy(warmup=2, min_runs=15, max_runs=200, budget_s=1.5, stable_within=0.01)
    )
    names = args.only.split(",") if args.only else list(IDIOMS)
    unknown = [name for name in names if name not in IDIOMS]
    if unknown:
        raise SystemExit(f"unknown idiom {unknown[0]!r}; choose from {', '.join(IDIOMS)}")
    started = time.perf_counter()
    results = []
    for name in names:
        results.append(bench_idiom(IDIOMS[name], runner, policy, quick=args.quick, compile_it=not args.no_compile,
                                   self_check=not any(r.self_check for r in results)))
        stages = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in results[-1].stages.items())
        print(f"  {name} done ({stages}; {time.perf_counter() - started:.0f} s in all)", file=sys.stderr)
    text, markdown = idiom_report(results, runner, threads, args.quick)
    print(text)
    if args.markdown:
        path = Path(args.markdown)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(markdown)
        print(f"wrote {path}")


def run_variants(args: argparse.Namespace, runner: Runner, threads: int) -> None:
    policy = (
        TimingPolicy(warmup=1, min_runs=5, max_runs=10, budget_s=0.5)
        if args.quick
        else TimingPolicy(warmup=3, min_runs=20, max_runs=200, budget_s=20.0, stable_within=0.01)
    )
    filters, unfolds = {}, {}
    for shape in VARIANT_SHAPES:
        filters[shape] = bench_dynamic_filter(shape, runner, policy)
        unfolds[shape] = bench_unfold(shape, runner, policy)
        print(f"  {shape} done", file=sys.stderr)
    print(table("DynamicFilter (method_1)", filters))
    print()
    print(table("Unfold (plain F.unfold)", unfolds))
    comparisons = [*filters.values(), *unfolds.values()]
    ran = sorted({r.provider for c in comparisons for r in c.rows if r.timing is not None and r.provider != Eager.provider})
    print(f"onnxruntime {onnxruntime.__version__}, providers that ran: {', '.join(ran)}; torch {torch.__version__} eager on CPU; "
          f"device: {runner.device}; threads: {threads} (onnxruntime intra-op and torch)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    part = parser.add_mutually_exclusive_group()
    part.add_argument("--idioms", action="store_true", help="only part 1, the idiom table")
    part.add_argument("--variants", action="store_true", help="only part 2, the variant tables")
    parser.add_argument("--only", help=f"idioms to run, comma-separated (default all: {','.join(IDIOMS)})")
    parser.add_argument("--quick", action="store_true", help="small shapes and tiny timing budgets: a smoke run")
    parser.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="threads for onnxruntime and torch (default 2)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (each compile takes 10-30 s)")
    parser.add_argument("--markdown", metavar="PATH", help="also write the idiom tables as markdown to PATH")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    runner = Runner(args.provider, args.threads)
    if not args.variants:
        run_idioms(args, runner, args.threads)
    if not args.idioms:
        if not args.variants:
            print()
        run_variants(args, runner, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
