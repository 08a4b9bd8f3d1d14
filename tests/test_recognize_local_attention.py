"""Recognition of local attention written with `Tensor.unfold` (passes/local_correlation/recognize_local_attention.py).

Real torch exports of `LocalAttention` (models/correlation_idioms.py) and of variations written here,
recognized as one `convlower.LocalCorrelation` (q·k) and one `convlower.DynamicFilter` (the weighted
sum of the values), run on onnxruntime as recognized (through the nodes' model-local functions) and
lowered, and compared with torch eager. What each exporter can export (torch 2.13): dynamo every
form, static or symbolic; TorchScript none (`F.pad(k).unfold(..)` fails, static dims or not,
checked below). Look-alikes must come out without a LocalCorrelation, their outputs unchanged.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

import convlower
from convlower.models.correlation_idioms import LocalAttention
from convlower.passes.local_functions import DOMAIN
from convlower.rewrite import import_graph
from tests.helpers import run
from tests.test_recognize import recognized_model

torch = pytest.importorskip("torch")
F = torch.nn.functional
nn = torch.nn

ATOL = RTOL = 1e-4
CHANNELS, HEADS, WINDOW = 8, 2, 3
PROFILE, OTHER = (1, CHANNELS, 6, 10), (3, CHANNELS, 9, 7)
"""Feature shapes: the one static exports and optimize's profile use, and another for symbolic exports."""
SYMBOLIC = {"x": {0: "batch", 2: "h", 3: "w"}}
CORRELATION_VARIANTS = ["shift_mul_reduce", "stacked_mul_reduce", "banded_matmul"]
FORMS = {
    "sum-keepdim": {},
    "sum": {"keepdim": False},
    "einsum": {"einsum": True},
}
"""The ways LocalAttention writes q·k and the weighted sum of the values (its keyword arguments)."""


# --- helpers -----------------------------------------------------------------------------------------------------


def export(module: nn.Module, shape: tuple[int, ...], symbolic: bool = False, dynamo: bool = True) -> onnx.ModelProto:
    """The module exported at feature `shape` (dynamo at opset 18, TorchScript at 17), with symbolic
    batch, H and W when `symbolic` (the example batch is then at least 2, as torch.export needs)."""
    module.eval()
    example = torch.randn(max(shape[0], 2) if symbolic else shape[0], *shape[1:])
    return convlower.export(module, example, dynamo=dynamo, opset=18 if dynamo else 17,
                            dynamic_axes=SYMBOLIC if symbolic else None)


def eager(module: nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    with torch.inference_mode():
        out = module(x)
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def assert_equal_to_torch(model: onnx.ModelProto, module: nn.Module, shapes: list[tuple[int, ...]]) -> None:
    for shape in shapes:
        x = torch.randn(*shape)
        for got, want in zip(run(model, {"x": x.numpy()}), eager(module, x), strict=True):
            np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)


def canonical(model: onnx.ModelProto) -> list[gs.Node]:
    return [n for n in import_graph(model).nodes if n.domain == DOMAIN]


def assert_recognized(model: onnx.ModelProto, heads: Sequence[int] = (HEADS,), window: int = WINDOW, rank: int = 2) -> None:
    """Per attention layer (one per entry of `heads`), one LocalCorrelation of the queries with the
    keys (offsets -p..p, G = heads, summed) and one DynamicFilter of the values (the unfold's window,
    G = heads filter groups); nothing of the unfolds left."""
    graph = import_graph(model)
    nodes = [n for n in graph.nodes if n.domain == DOMAIN]
    assert sorted(n.op for n in nodes) == ["DynamicFilter"] * len(heads) + ["LocalCorrelation"] * len(heads), [n.op for n in nodes]
    p = window // 2
    correlations = [n.attrs for n in nodes if n.op == "LocalCorrelation"]
    assert sorted(c["groups"] for c in correlations) == sorted(heads)
    window_attrs = {"displacement_first": [-p] * rank, "displacement_last": [p] * rank, "displacement_step": [1] * rank,
                    "reduction": "sum", "scale": 1.0}
    assert all({k: v for k, v in c.items() if k != "groups"} == window_attrs for c in correlations)
    filters = [n for n in nodes if n.op == "DynamicFilter"]
    assert all(n.attrs == {"kernel_shape": [window] * rank, "strides": [1] * rank, "dilations": [1] * rank, "pads": [p] * 2 * rank}
               for n in filters)
    assert sorted(n.inputs[1].shape[1] for n in filters) == sorted(heads)
    assert all(n.inputs[1].shape[2] == window**rank for n in filters)
    assert not [n.op for n in graph.nodes if n.op in ("Gather", "Pad", "ReduceSum", "Einsum")]


def lowered(model: onnx.ModelProto, correlation: str) -> onnx.ModelProto:
    """The model with its LocalCorrelations lowered to `correlation` and its DynamicFilters to shift_sum."""
    result = convlower.lower(model, [f"LocalCorrelation={correlation}", "DynamicFilter=shift_sum"])
    assert {n.op: n.variant for n in result.nodes} == {"LocalCorrelation": correlation, "DynamicFilter": "shift_sum"}, result.nodes
    assert all(n.variant for n in result.nodes), result.nodes
    assert not [n for n in result.model.graph.node if n.domain == DOMAIN]
    return result.model


def dim_params(values) -> list[list[str]]:
    return [[d.dim_param for d in v.type.tensor_type.shape.dim] for v in values]


def assert_keeps_symbolic_dims(written: onnx.ModelProto, exported: onnx.ModelProto) -> None:
    """The written model declares its inputs and outputs as the export did, batch, h and w symbolic."""
    assert dim_params(written.graph.input) == dim_params(exported.graph.input) == [["batch", "", "h", "w"]]
    assert [v.type for v in written.graph.output] == [v.type for v in exported.graph.output]
    assert dim_params(written.graph.output) == [["batch", "", "h", "w"]]


class Several(nn.Module):
    """Several layers on the same input, one output each: one export for them all."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        return tuple(layer(x) for layer in self.layers)


# --- recognized: static and symbolic dims ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def static_export() -> tuple[nn.Module, onnx.ModelProto]:
    module = LocalAttention(CHANNELS, HEADS, WINDOW)
    return module, export(module, PROFILE)


@pytest.fixture(scope="module", params=list(FORMS), ids=list(FORMS))
def symbolic_export(request: pytest.FixtureRequest) -> tuple[nn.Module, onnx.ModelProto]:
    module = LocalAttention(CHANNELS, HEADS, WINDOW, **FORMS[request.param])
    return module, export(module, PROFILE, symbolic=True)


def test_static_export_is_two_canonical_nodes(static_export: tuple[nn.Module, onnx.ModelProto]) -> None:
    """dynamo, static dims: as recognized and with each LocalCorrelation lowering, equal to torch."""
    module, model = static_export
    assert_recognized(model)
    assert_equal_to_torch(recognized_model(model), module, [PROFILE])
    for variant in CORRELATION_VARIANTS:
        assert_equal_to_torch(lowered(model, variant), module, [PROFILE])


def test_recognition_is_deterministic(static_export: tuple[nn.Module, onnx.ModelProto]) -> None:
    """Planning and rewriting each import the model afresh: both must find the same graph."""
    assert recognized_model(static_export[1]) == recognized_model(static_export[1])


def test_symbolic_export_is_two_canonical_nodes(symbolic_export: tuple[nn.Module, onnx.ModelProto]) -> None:
    """dynamo, symbolic batch, H and W, each way of writing the products: recognized, symbolic dims
    kept, equal to torch at two sizes as recognized and lowered."""
    module, model = symbolic_export
    assert_recognized(model)
    written = lowered(model, "shift_mul_reduce")
    assert_keeps_symbolic_dims(written, model)
    for candidate in (recognized_model(model), written, lowered(model, "banded_matmul")):
        assert_equal_to_torch(candidate, module, [PROFILE, OTHER])


def test_optimize_recognizes_a_symbolic_export_at_one_profile(symbolic_export: tuple[nn.Module, onnx.ModelProto]) -> None:
    """`convlower.optimize` at one profiling shape: both nodes recognized and tuned, the model it
    writes keeps the symbolic dims and equals torch at the profile and at another shape."""
    module, model = symbolic_export
    result = convlower.optimize(model, input_shapes={"x": PROFILE}, guard=False, cache=None, threads=1,
                                variants=["LocalCorrelation=stacked_mul_reduce", "DynamicFilter=shift_sum"])
    recognized = {n.op: n for n in result.report.nodes if n.recognized}
    assert set(recognized) == {"LocalCorrelation", "DynamicFilter"}
    assert not [n for n in result.model.graph.node if n.domain == DOMAIN or n.op_type == "Gather"]
    assert_keeps_symbolic_dims(result.model, model)
    assert_equal_to_torch(result.model, module, [PROFILE, OTHER])


def test_one_head_and_one_channel_per_head() -> None:
    """G = 1 (the view's head axis has extent 1) and C/G = 1 (the values' weights then run along the
    head's channels too, trivially), one export for both."""
    module = Several([LocalAttention(CHANNELS, 1, WINDOW), LocalAttention(CHANNELS, CHANNELS, WINDOW)])
    model = export(module, PROFILE)
    assert_recognized(model, heads=(1, CHANNELS))
    assert_equal_to_torch(lowered(model, "stacked_mul_reduce"), module, [PROFILE])


class OneSided(nn.Module):
    """Local attention over a window padded on one side only (`F.pad(k, [0, 2w-2, ..])`): each query
    attends to the keys at offsets 0..w-1 below and right of it (offsets -(w-1)..0 with `before`)."""

    def __init__(self, before: bool) -> None:
        super().__init__()
        self.before = before
        self.qkv = nn.Conv2d(CHANNELS, 3 * CHANNELS, 1, bias=False)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=1)
        reach = WINDOW - 1
        pads = [reach, 0, reach, 0] if self.before else [0, reach, 0, reach]
        k = F.pad(k, pads).unfold(2, WINDOW, 1).unfold(3, WINDOW, 1).reshape(b, HEADS, c // HEADS, h, w, WINDOW**2)
        v = F.pad(v, pads).unfold(2, WINDOW, 1).unfold(3, WINDOW, 1).reshape(b, HEADS, c // HEADS, h, w, WINDOW**2)
        attention = (q.reshape(b, HEADS, c // HEADS, h, w, 1) * k).sum(2, keepdim=True).softmax(-1)
        return (attention * v).sum(-1).reshape(b, c, h, w)


def test_one_sided_windows() -> None:
    """The offsets follow the padding: first = -pad_begin, last = reach - pad_begin (both sides, one export)."""
    module = Several([OneSided(before=False), OneSided(before=True)])
    model = export(module, PROFILE)
    nodes = canonical(model)
    reach = WINDOW - 1
    windows = sorted((n.attrs["displacement_first"], n.attrs["displacement_last"]) for n in nodes if n.op == "LocalCorrelation")
    assert windows == [([-reach] * 2, [0] * 2), ([0] * 2, [reach] * 2)]
    pads = sorted(n.attrs["pads"] for n in nodes if n.op == "DynamicFilter")
    assert pads == [[0, 0, reach, reach], [reach, reach, 0, 0]]
    assert_equal_to_torch(recognized_model(model), module, [PROFILE])
    assert_equal_to_torch(lowered(model, "banded_matmul"), module, [PROFILE])


class HeadsLast(nn.Module):
    """Local attention with queries and results laid out `[B, heads, H, W, C/heads]` (as
    neighbourhood-attention code keeps a head's channels last), both products einsums, the scores
    `[B, H, W, heads, K]`: the queries are transposed back before the LocalCorrelation, its result
    into the scores' layout, and the scores into the DynamicFilter's `[B, heads, K, H, W]`."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Conv2d(CHANNELS, 3 * CHANNELS, 1, bias=False)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=1)
        pad, g = WINDOW // 2, HEADS
        k = F.pad(k, [pad] * 4).unfold(2, WINDOW, 1).unfold(3, WINDOW, 1).reshape(b, g, c // g, h, w, WINDOW**2)
        v = F.pad(v, [pad] * 4).unfold(2, WINDOW, 1).unfold(3, WINDOW, 1).reshape(b, g, c // g, h, w, WINDOW**2)
        q = q.reshape(b, g, c // g, h, w).permute(0, 1, 3, 4, 2)
        attention = torch.einsum("bgxyc,bgcxyk->bxygk", q, k).softmax(-1)
        return torch.einsum("bxygk,bgcxyk->bgxyc", attention, v).permute(0, 1, 4, 2, 3).reshape(b, c, h, w)


def test_heads_last_layout_with_symbolic_dims() -> None:
    module = HeadsLast()
    model = export(module, PROFILE, symbolic=True)
    assert_recognized(model)
    written = lowered(model, "stacked_mul_reduce")
    assert_keeps_symbolic_dims(written, model)
    for candidate in (recognized_model(model), written):
        assert_equal_to_torch(candidate, module, [PROFILE, OTHER])


class Attention1d(nn.Module):
    """Local attention along a sequence `[N, C, T]`: one `Tensor.unfold`, heads, a window of 5."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Conv1d(CHANNELS, 3 * CHANNELS, 1, bias=False)

    def forward(self, x):
        b, c, t = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=1)
        k = F.pad(k, [2, 2]).unfold(2, 5, 1).reshape(b, HEADS, c // HEADS, t, 5)
        v = F.pad(v, [2, 2]).unfold(2, 5, 1).reshape(b, HEADS, c // HEADS, t, 5)
        attention = (q.reshape(b, HEADS, c // HEADS, t, 1) * k).sum(2, keepdim=True).softmax(-1)
        return (attention * v).sum(-1).reshape(b, c, t)


def test_one_dimensional_attention() -> None:
    module = Attention1d()
    model = export(module, (2, CHANNELS, 11))
    assert_recognized(model, window=5, rank=1)
    assert_equal_to_torch(lowered(model, "stacked_mul_reduce"), module, [(2, CHANNELS, 11)])


# --- what the TorchScript exporter cannot export -------------------------------------------------------------------


@pytest.mark.parametrize("symbolic", [False, True], ids=["static", "symbolic"])
def test_torchscript_cannot_export_local_attention(symbolic: bool) -> None:
    """`F.pad(k).unfold(..)`: the padded keys' shape is not known to TorchScript's unfold symbolic."""
    with pytest.raises(torch.onnx.errors.SymbolicValueError, match="Unfold, input size not accessible"):
        export(LocalAttention(CHANNELS, HEADS, WINDOW), PROFILE, symbolic=symbolic, dynamo=False)


# --- look-alikes: no LocalCorrelation, outputs unchanged ------------------------------------------------------------


class LookAlike(nn.Module):
    """Local attention with one thing changed (`change`):

    window-sum      q·k summed over the window, not over the head's channels
    reflect         keys padded by reflection
    replicate       keys padded by replication
    fill            keys padded with 0.5
    key-stride      keys (and values) windows 2 apart, queries at every other position
    per-channel     softmax of q * k per channel, no sum over the head's channels (the
                    Stand-Alone-Self-Attention repository's form)
    relative        a learned relative-position term added to the unfolded keys
    """

    def __init__(self, change: str) -> None:
        super().__init__()
        self.change = change
        self.qkv = nn.Conv2d(CHANNELS, 3 * CHANNELS, 1, bias=False)
        self.relative = nn.Parameter(torch.randn(1, CHANNELS, 1, 1, WINDOW, WINDOW))

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=1)
        pad, change, g = WINDOW // 2, self.change, HEADS
        modes = {"reflect": {"mode": "reflect"}, "replicate": {"mode": "replicate"}, "fill": {"value": 0.5}}
        stride = 2 if change == "key-stride" else 1
        k = F.pad(k, [pad] * 4, **modes.get(change, {})).unfold(2, WINDOW, stride).unfold(3, WINDOW, stride)
        v = F.pad(v, [pad] * 4).unfold(2, WINDOW, stride).unfold(3, WINDOW, stride)
        if change == "relative":
            k = k + self.relative
        if change == "key-stride":
            q = q[:, :, ::2, ::2]
        ho, wo = k.shape[2:4]
        k = k.reshape(b, g, c // g, ho, wo, WINDOW**2)
        v = v.reshape(b, g, c // g, ho, wo, WINDOW**2)
        q = q.reshape(b, g, c // g, ho, wo, 1)
        if change == "window-sum":
            return (q * k).sum(-1).reshape(b, c, ho, wo)
        if change == "per-channel":
            return torch.einsum("bgcxyk,bgcxyk->bgcxy", (q * k).softmax(-1), v).reshape(b, c, ho, wo)
        attention = (q * k).sum(2, keepdim=True).softmax(-1)
        return (attention * v).sum(-1).reshape(b, c, ho, wo)


LOOK_ALIKES = ["window-sum", "reflect", "replicate", "fill", "key-stride", "per-channel", "relative"]


def test_look_alikes_are_left_alone() -> None:
    """No q·k of them is a LocalCorrelation; that of their twin, which differs from each in its change
    alone, is. Whatever else is recognized (a DynamicFilter over the zero-padded values where the
    values are still a local attention's) leaves every output as torch computes it."""
    module = Several([LookAlike(change) for change in LOOK_ALIKES] + [LookAlike("none")])
    model = export(module, PROFILE)
    assert len(model.graph.output) == len(LOOK_ALIKES) + 1
    (twin,) = [n for n in canonical(model) if n.op == "LocalCorrelation"]
    assert twin.attrs["groups"] == HEADS and twin.attrs["displacement_first"] == [-(WINDOW // 2)] * 2
    assert_equal_to_torch(recognized_model(model), module, [PROFILE])
