"""DynamicFilter and Unfold at spatial ranks 1, 2 and 3, under symbolic dims, and on non-finite inputs.

Every variant is checked against the NumPy oracles of tests/oracles.py, written from the
definitions in DESIGN.md (not convlower's reference or window helpers): `Y[n, c, p] = sum_k
Xpad[n, c, p*stride + k*dilation] * F[n, c // (C/G), k, p]`, and F.unfold's rows `[n, c*K + k, l]`.
Real onnxruntime, no mocks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper
from onnx.reference import ReferenceEvaluator
from hypothesis import given, settings
from hypothesis import strategies as st

import convlower
from convlower.cli import main
from convlower.modelio import runtime_compatible
from convlower.passes import FAMILIES
from convlower.passes.dynamic_filter import SlidingWindow
from convlower.passes.local_functions import DOMAIN, attach_functions
from tests.helpers import run, single_node_model, windows
from tests.oracles import filter_oracle, padded, unfold_oracle

torch = pytest.importorskip("torch")
ops = pytest.importorskip("convlower.ops")

pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]  # inf - inf in oracles


FILTER_VARIANTS = FAMILIES["dynamicfilter"].variant_names
UNFOLD_VARIANTS = FAMILIES["unfold"].variant_names
ELEM_TYPES = {
    np.dtype(np.float16): onnx.TensorProto.FLOAT16,
    np.dtype(np.float32): onnx.TensorProto.FLOAT,
    np.dtype(np.float64): onnx.TensorProto.DOUBLE,
}
TOLERANCES = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}


# --- cases ---------------------------------------------------------------------------------------------


@st.composite
def filter_cases(draw: st.DrawFn, rank: int) -> tuple[SlidingWindow, tuple[int, ...], np.dtype]:
    """(window, X shape, dtype) with C in {4, 6}, so that G = 1, 1 < G = C/2 < C and G = C all fit."""
    window, spatial = draw(windows(rank))
    dtype = draw(st.sampled_from([np.dtype(np.float32), np.dtype(np.float64)]))
    return window, (draw(st.integers(1, 2)), draw(st.sampled_from([4, 6])), *spatial), dtype


def groupings(channels: int) -> dict[str, int]:
    """The filter groups a test covers: shared filters, groups of several channels, per-channel filters."""
    return {"G=1": 1, "1<G<C": channels // 2, "G=C": channels}


def random_filter_inputs(window: SlidingWindow, x_shape: tuple[int, ...], groups: int, dtype: np.dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = window.output_size(x_shape[2:])
    x = rng.standard_normal(x_shape).astype(dtype)
    f = rng.standard_normal((x_shape[0], groups, window.taps, *out)).astype(dtype)
    return x, f


def filter_model(
    x_shape: tuple, f_shape: tuple, window: SlidingWindow, dtype: np.dtype = np.dtype(np.float32), opset: int = 18
) -> onnx.ModelProto:
    model = single_node_model(
        "DynamicFilter", [("x", x_shape), ("f", f_shape)], len(x_shape), attrs=window.attrs(), opset=opset,
        domain=DOMAIN, elem_type=ELEM_TYPES[np.dtype(dtype)],
    )
    return attach_functions(model)


def grouped_filters_model(x_shape: tuple, window: SlidingWindow, dtype: np.dtype) -> onnx.ModelProto:
    """X filtered three times, once per grouping of `groupings(C)`: inputs x, f_1, .., outputs y_1, .."""
    elem_type = ELEM_TYPES[np.dtype(dtype)]
    out = window.output_size(x_shape[2:])
    inputs, nodes, outputs = [helper.make_tensor_value_info("x", elem_type, list(x_shape))], [], []
    for i, groups in enumerate(groupings(x_shape[1]).values()):
        inputs.append(helper.make_tensor_value_info(f"f_{i}", elem_type, [x_shape[0], groups, window.taps, *out]))
        nodes.append(
            helper.make_node("DynamicFilter", ["x", f"f_{i}"], [f"y_{i}"], name=f"filter_{i}", domain=DOMAIN, **window.attrs())
        )
        outputs.append(helper.make_tensor_value_info(f"y_{i}", elem_type, None))
    graph = helper.make_graph(nodes, "grouped_filters", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])
    return runtime_compatible(attach_functions(model))


def unfold_model(
    x_shape: tuple, window: SlidingWindow, dtype: np.dtype = np.dtype(np.float32), opset: int = 18
) -> onnx.ModelProto:
    model = single_node_model(
        "Unfold", [("x", x_shape)], 3, attrs=window.attrs(), opset=opset, domain=DOMAIN, elem_type=ELEM_TYPES[np.dtype(dtype)]
    )
    return attach_functions(model)


def lowered(model: onnx.ModelProto, op: str, variant: str) -> onnx.ModelProto | None:
    """The model with every `op` node replaced by `variant`, or None where the variant says it does not apply."""
    result = convlower.lower(model, [f"{op}={variant}"])
    if any(n.variant is None for n in result.nodes):
        return None
    assert not [n for n in result.model.graph.node if n.domain == DOMAIN]
    return result.model


# --- the oracles (tests/oracles.py) against torch ------------------------------------------------------


def torch_unfold_oracle(x: np.ndarray, window: SlidingWindow) -> np.ndarray:
    """The same rows from torch's F.unfold (rank 2): the oracle of the oracle."""
    xpad = torch.from_numpy(padded(x, window))
    return torch.nn.functional.unfold(xpad, window.kernel_shape, dilation=window.dilations, stride=window.strides).numpy()


@settings(max_examples=15)
@given(data=st.data())
def test_unfold_oracle_agrees_with_torch(data: st.DataObject) -> None:
    window, spatial = data.draw(windows(2))
    x = np.random.default_rng(0).standard_normal((2, 3, *spatial)).astype(np.float32)
    np.testing.assert_array_equal(unfold_oracle(x, window), torch_unfold_oracle(x, window))


# --- every rank, every variant ---------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("variant", FILTER_VARIANTS)
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_every_filter_variant_matches_the_oracle(rank: int, variant: str, data: st.DataObject) -> None:
    """Each example: one window and dtype, filters in all three groupings (G = 1, 1 < G < C, G = C)."""
    window, x_shape, dtype = data.draw(filter_cases(rank))
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal(x_shape).astype(dtype)}
    for i, groups in enumerate(groupings(x_shape[1]).values()):
        feeds[f"f_{i}"] = rng.standard_normal((x_shape[0], groups, window.taps, *window.output_size(x_shape[2:]))).astype(dtype)
    expected = [filter_oracle(feeds["x"], feeds[f"f_{i}"], window) for i in range(3)]
    model = grouped_filters_model(x_shape, window, dtype)
    tol = TOLERANCES[dtype]
    for got, want, grouping in zip(run(model, feeds), expected, groupings(x_shape[1])):
        np.testing.assert_allclose(got, want, atol=tol, rtol=tol, err_msg=f"function body, {grouping}")
    result = convlower.lower(model, [f"DynamicFilter={variant}"])
    if variant == "conv_unfold" and dtype != np.float32:
        assert all(n.variant is None and "float32 only" in n.reason for n in result.nodes)
        return
    assert [n.variant for n in result.nodes] == [variant] * 3, result.nodes
    for got, want, grouping in zip(run(result.model, feeds), expected, groupings(x_shape[1])):
        np.testing.assert_allclose(got, want, atol=tol, rtol=tol, err_msg=grouping)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("variant", UNFOLD_VARIANTS)
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_every_unfold_variant_matches_the_oracle(rank: int, variant: str, data: st.DataObject) -> None:
    window, spatial = data.draw(windows(rank))
    dtype = data.draw(st.sampled_from([np.dtype(np.float32), np.dtype(np.float64)]))
    x = np.random.default_rng(1).standard_normal((2, data.draw(st.integers(1, 3)), *spatial)).astype(dtype)
    model = unfold_model(x.shape, window, dtype)
    expected = unfold_oracle(x, window)
    np.testing.assert_array_equal(run(model, {"x": x})[0], expected, err_msg="function body")
    result = convlower.lower(model, [f"Unfold={variant}"])
    (outcome,) = result.nodes
    if variant == "conv_unfold" and dtype != np.float32:
        assert outcome.variant is None and "float32 only" in outcome.reason
        return
    assert outcome.variant == variant, outcome.reason
    np.testing.assert_allclose(run(result.model, {"x": x})[0], expected, atol=0, rtol=0)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_variants_in_float16_on_onnxruntime_and_onnx_reference(rank: int) -> None:
    """float16 end to end: every variant that applies runs on onnxruntime and on onnx.reference
    (an independent evaluator of the lowered graph) within float16 rounding of the float32 oracle."""
    window = SYMBOLIC_WINDOWS[rank]
    spatial = SIZES[rank][0][1:]
    x32, f32 = random_filter_inputs(window, (2, 4, *spatial), 2, np.dtype(np.float32))
    x, f = x32.astype(np.float16), f32.astype(np.float16)
    cases = [
        ("DynamicFilter", FILTER_VARIANTS, filter_model(x.shape, f.shape, window, np.dtype(np.float16)), {"x": x, "f": f},
         filter_oracle(x.astype(np.float32), f.astype(np.float32), window)),
        ("Unfold", UNFOLD_VARIANTS, unfold_model(x.shape, window, np.dtype(np.float16)), {"x": x}, unfold_oracle(x, window)),
    ]
    for op, variants, model, feeds, expected in cases:
        for variant in variants:
            result = convlower.lower(model, [f"{op}={variant}"])
            (outcome,) = result.nodes
            if variant == "conv_unfold":
                assert outcome.variant is None and "float32 only" in outcome.reason
                continue
            for runtime, got in (("onnxruntime", run(result.model, feeds)[0]),
                                 ("onnx.reference", ReferenceEvaluator(result.model).run(None, feeds)[0])):
                assert got.dtype == np.float16, (op, variant, runtime)
                np.testing.assert_allclose(
                    got.astype(np.float32), expected, atol=2e-2, rtol=1e-2, err_msg=f"{op} {variant} {runtime}"
                )


# --- symbolic batch and spatial dims ---------------------------------------------------------------------

SYMBOLIC_WINDOWS = {
    1: SlidingWindow((3,), (2,), (2,), (2, 1)),
    2: SlidingWindow((3, 2), (1, 2), (2, 1), (2, 0, 1, 1)),
    3: SlidingWindow((2, 3, 2), (2, 1, 1), (1, 1, 2), (0, 1, 1, 1, 1, 0)),
}
SIZES = {1: [(2, 11), (1, 16)], 2: [(2, 9, 8), (3, 12, 7)], 3: [(2, 5, 6, 7), (1, 4, 8, 5)]}
"""Per rank, two (batch, *spatial) sizes the symbolic models run at."""


def symbolic_dims(rank: int, prefix: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(rank))


def assert_symbolic_output(model: onnx.ModelProto, rank: int) -> None:
    """Shape inference on the lowered model finds no static batch or spatial extent in its output."""
    (output,) = onnx.shape_inference.infer_shapes(model).graph.output
    dims = output.type.tensor_type.shape.dim
    assert len(dims) in (0, 3, rank + 2)
    assert not any(d.HasField("dim_value") for i, d in enumerate(dims) if i != 1)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("variant", FILTER_VARIANTS)
@pytest.mark.parametrize("groups, channels", [(1, 3), (2, 4)])
def test_filter_variants_keep_symbolic_batch_and_spatial_dims(rank: int, variant: str, groups: int, channels: int) -> None:
    window = SYMBOLIC_WINDOWS[rank]
    model = filter_model(
        ("N", channels, *symbolic_dims(rank, "S")), ("N", groups, window.taps, *symbolic_dims(rank, "O")), window
    )
    result = lowered(model, "DynamicFilter", variant)
    assert result is not None
    assert_symbolic_output(result, rank)
    for seed, (batch, *spatial) in enumerate(SIZES[rank]):
        x, f = random_filter_inputs(window, (batch, channels, *spatial), groups, np.dtype(np.float32), seed)
        np.testing.assert_allclose(run(result, {"x": x, "f": f})[0], filter_oracle(x, f, window), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", FILTER_VARIANTS)
def test_filter_variants_with_symbolic_channels_and_groups(variant: str) -> None:
    """Unknown C and G: G is read off F's shape; only conv_unfold, whose kernel has C groups, cannot."""
    window = SYMBOLIC_WINDOWS[2]
    model = filter_model(("N", "C", "H", "W"), ("N", "G", window.taps, "Ho", "Wo"), window)
    result = convlower.lower(model, [f"DynamicFilter={variant}"])
    (outcome,) = result.nodes
    if variant == "conv_unfold":
        assert outcome.variant is None and "static channels" in outcome.reason
        return
    for seed, (groups, channels) in enumerate([(1, 3), (2, 4), (3, 3)]):
        x, f = random_filter_inputs(window, (2, channels, 9, 8), groups, np.dtype(np.float32), seed)
        np.testing.assert_allclose(run(result.model, {"x": x, "f": f})[0], filter_oracle(x, f, window), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("variant", UNFOLD_VARIANTS)
def test_unfold_variants_keep_symbolic_batch_and_spatial_dims(rank: int, variant: str) -> None:
    window = SYMBOLIC_WINDOWS[rank]
    result = lowered(unfold_model(("N", 3, *symbolic_dims(rank, "S")), window), "Unfold", variant)
    assert result is not None
    assert_symbolic_output(result, rank)
    for seed, (batch, *spatial) in enumerate(SIZES[rank]):
        x = np.random.default_rng(seed).standard_normal((batch, 3, *spatial)).astype(np.float32)
        np.testing.assert_array_equal(run(result, {"x": x})[0], unfold_oracle(x, window))


@pytest.mark.parametrize("variant", UNFOLD_VARIANTS)
def test_unfold_variants_with_symbolic_channels(variant: str) -> None:
    window = SYMBOLIC_WINDOWS[2]
    result = convlower.lower(unfold_model(("N", "C", "H", "W"), window), [f"Unfold={variant}"])
    (outcome,) = result.nodes
    if variant == "conv_unfold":
        assert outcome.variant is None and "static channels" in outcome.reason
        return
    for channels in (1, 4):
        x = np.random.default_rng(channels).standard_normal((2, channels, 7, 9)).astype(np.float32)
        np.testing.assert_array_equal(run(result.model, {"x": x})[0], unfold_oracle(x, window))


@pytest.mark.parametrize("opset", [13, 17])
def test_symbolic_lowerings_before_opset_15(opset: int) -> None:
    """Before opset 15 Shape has no start/end: the run-time dims come from a Slice of the whole shape."""
    window = SYMBOLIC_WINDOWS[2]
    filters = filter_model(("N", 4, "H", "W"), ("N", 2, window.taps, "Ho", "Wo"), window, opset=opset)
    unfolds = unfold_model(("N", 3, "H", "W"), window, opset=opset)
    filter_variants = {variant: lowered(filters, "DynamicFilter", variant) for variant in FILTER_VARIANTS}
    unfold_variants = {variant: lowered(unfolds, "Unfold", variant) for variant in UNFOLD_VARIANTS}
    for seed, (batch, *spatial) in enumerate(SIZES[2]):
        x, f = random_filter_inputs(window, (batch, 4, *spatial), 2, np.dtype(np.float32), seed)
        for variant, model in filter_variants.items():
            np.testing.assert_allclose(
                run(model, {"x": x, "f": f})[0], filter_oracle(x, f, window), atol=1e-4, rtol=1e-4, err_msg=variant
            )
        for variant, model in unfold_variants.items():
            np.testing.assert_array_equal(run(model, {"x": x[:, :3]})[0], unfold_oracle(x[:, :3], window), err_msg=variant)


# --- non-finite inputs ---------------------------------------------------------------------------------------


def with_nonfinite(a: np.ndarray, seed: int) -> np.ndarray:
    """A copy with +inf, -inf and NaN at a few random places, and some exact zeros (0 * inf = NaN)."""
    rng = np.random.default_rng(seed)
    a = a.copy()
    flat = a.reshape(-1)
    places = rng.choice(flat.size, size=min(flat.size, 7), replace=False)
    for place, value in zip(places, [np.inf, -np.inf, np.nan, np.inf, 0.0, -np.inf, 0.0]):
        flat[place] = value
    return a


def assert_same_nonfinite(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert np.isnan(expected).any() or np.isinf(expected).any(), "the case must reach the output"
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected), err_msg=f"{what}: NaN positions")
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(expected), err_msg=f"{what}: +inf positions")
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(expected), err_msg=f"{what}: -inf positions")
    finite = np.isfinite(expected)
    np.testing.assert_allclose(got[finite], expected[finite], atol=1e-4, rtol=1e-4, err_msg=what)


NONFINITE_WINDOWS = [
    SlidingWindow((3,), (1,), (2,), (2, 2)),
    SlidingWindow((3, 3), (2, 1), (1, 1), (1, 1, 1, 1)),
    SlidingWindow((2, 2, 3), (1, 2, 1), (2, 1, 1), (1, 0, 1, 0, 1, 1)),
]


@pytest.mark.parametrize("window", NONFINITE_WINDOWS, ids=["rank1", "rank2", "rank3"])
@pytest.mark.parametrize("where", ["x", "f", "both"])
@pytest.mark.parametrize("variant", FILTER_VARIANTS)
def test_filter_variants_keep_the_nonfinite_pattern(window: SlidingWindow, where: str, variant: str) -> None:
    x_shape = (2, 4, *([6] * window.rank))
    x, f = random_filter_inputs(window, x_shape, 2, np.dtype(np.float32))
    if where in ("x", "both"):
        x = with_nonfinite(x, 1)
    if where in ("f", "both"):
        f = with_nonfinite(f, 2)
    expected = filter_oracle(x, f, window)
    model = filter_model(x.shape, f.shape, window)
    assert_same_nonfinite(run(model, {"x": x, "f": f})[0], expected, "function body")
    result = lowered(model, "DynamicFilter", variant)
    assert result is not None
    assert_same_nonfinite(run(result, {"x": x, "f": f})[0], expected, variant)


@pytest.mark.parametrize("window", NONFINITE_WINDOWS, ids=["rank1", "rank2", "rank3"])
@pytest.mark.parametrize(
    "variant",
    [
        pytest.param(v, marks=pytest.mark.xfail(strict=True, reason="the identity-kernel Conv's 0 * inf spreads NaN"))
        if v == "conv_unfold" else v
        for v in UNFOLD_VARIANTS
    ],
)
def test_unfold_variants_keep_the_nonfinite_pattern(window: SlidingWindow, variant: str) -> None:
    x = with_nonfinite(np.random.default_rng(0).standard_normal((2, 3, *([6] * window.rank))).astype(np.float32), 3)
    expected = unfold_oracle(x, window)
    model = unfold_model(x.shape, window)
    assert_same_nonfinite(run(model, {"x": x})[0], expected, "function body")
    result = lowered(model, "Unfold", variant)
    assert result is not None
    assert_same_nonfinite(run(result, {"x": x})[0], expected, variant)


@pytest.mark.parametrize("wrong", [np.nan, -np.inf, 0.0])
def test_verification_rejects_a_changed_infinity(wrong: float) -> None:
    """What the tuner and the guard use to accept a variant (NaN == NaN counts as equal there)."""
    from convlower.verify import compare

    reference = np.array([1.0, np.inf, -np.inf, np.nan], np.float32)
    candidate = reference.copy()
    candidate[1] = wrong
    assert not compare("y", reference, candidate, None, None).passed


# --- the torch op, export, lower, inspect and optimize at every rank -------------------------------------

class Filter(torch.nn.Module):
    """One dynamic filter with 'same' padding, so the filters' spatial dims are the input's."""

    def __init__(self, kernel: tuple[int, ...], dilation: int = 1) -> None:
        super().__init__()
        self.kernel, self.dilation = kernel, dilation

    def forward(self, x, filters):
        return ops.dynamic_filter(x, filters, self.kernel, dilation=self.dilation)


RANK_MODULES = {
    1: (Filter((5,), dilation=2), 3, 3),  # audio features: X [N, C, T], one filter per channel, per timestep
    2: (Filter((3, 2)), 4, 2),
    3: (Filter((3, 2, 3)), 4, 1),  # video: X [N, C, D, H, W]
}
"""Per rank: the module, C and G."""
SPATIAL_NAMES = {1: ("time",), 2: ("height", "width"), 3: ("depth", "height", "width")}


def rank_inputs(rank: int, batch: int, spatial: tuple[int, ...], seed: int = 0) -> tuple:
    module, channels, groups = RANK_MODULES[rank]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, channels, *spatial)).astype(np.float32)
    f = rng.standard_normal((batch, groups, int(np.prod(module.kernel)), *spatial)).astype(np.float32)
    return x, f


def same_window(rank: int) -> SlidingWindow:
    """The window of RANK_MODULES[rank], written out from torch's 'same' rule (odd remainder at the end)."""
    module = RANK_MODULES[rank][0]
    total = [(k - 1) * module.dilation for k in module.kernel]
    pads = tuple(t // 2 for t in total) + tuple(t - t // 2 for t in total)
    return SlidingWindow(module.kernel, (1,) * rank, (module.dilation,) * rank, pads)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_the_torch_op_matches_the_oracle_at_every_rank(rank: int) -> None:
    x, f = rank_inputs(rank, 2, (6, 5, 4)[:rank])
    module = RANK_MODULES[rank][0]
    got = module(torch.from_numpy(x), torch.from_numpy(f)).numpy()
    np.testing.assert_allclose(got, filter_oracle(x, f, same_window(rank)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_export_keeps_symbolic_dims_and_every_variant_runs_at_two_sizes(rank: int, dynamo: bool) -> None:
    module = RANK_MODULES[rank][0].eval()
    names = SPATIAL_NAMES[rank]
    axes = {"x": {2 + i: n for i, n in enumerate(names)}, "filters": {3 + i: n for i, n in enumerate(names)}}
    sizes = [(2, (9, 7, 6)[:rank]), (3, (5, 8, 4)[:rank])]
    example = tuple(torch.from_numpy(a) for a in rank_inputs(rank, *sizes[0]))
    model = convlower.export(module, example, dynamo=dynamo, dynamic_batch=True, dynamic_axes=axes)
    assert [(n.domain, n.op_type) for n in model.graph.node] == [(DOMAIN, "DynamicFilter")]
    x_dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert x_dims == ["batch", "", *names]
    lowered_models = {"function body": model}
    for variant in FILTER_VARIANTS:
        lowered_models[variant] = lowered(model, "DynamicFilter", variant)
        assert lowered_models[variant] is not None, variant
    for seed, (batch, spatial) in enumerate(sizes):
        x, f = rank_inputs(rank, batch, spatial, seed)
        expected = filter_oracle(x, f, same_window(rank))
        for what, candidate in lowered_models.items():
            (got,) = run(candidate, {"x": x, "filters": f})
            np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4, err_msg=what)


@pytest.mark.parametrize("rank", [1, 3])
def test_inspect_lower_and_optimize_handle_rank_1_and_rank_3_models(rank: int, tmp_path: Path, capsys) -> None:
    module = RANK_MODULES[rank][0].eval()
    spatial = (12, 6, 5)[:rank]
    x, f = rank_inputs(rank, 2, spatial)
    path = tmp_path / f"rank{rank}.onnx"
    model = convlower.export(module, (torch.from_numpy(x), torch.from_numpy(f)), path, dynamo=True)
    expected = filter_oracle(x, f, same_window(rank))
    capsys.readouterr()  # the exporter's progress lines

    assert main(["inspect", str(path), "--json"]) == 0
    (info,) = json.loads(capsys.readouterr().out)["nodes"]
    assert info["op"] == "DynamicFilter" and info["reason"] is None
    assert tuple(info["spec"]["in_spatial"]) == spatial and tuple(info["spec"]["window"]["kernel_shape"]) == module.kernel
    assert info["variants"] == {v: None for v in FILTER_VARIANTS}

    lowered_path = tmp_path / f"rank{rank}.lowered.onnx"
    assert main(["lower", str(path), "--variant", "DynamicFilter=conv_unfold", "-o", str(lowered_path)]) == 0
    (got,) = run(onnx.load(lowered_path), {"x": x, "filters": f})
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4, err_msg="convlower lower")

    result = convlower.optimize(model, guard=False, cache=None)
    (node,) = result.report.nodes
    assert node.op == "DynamicFilter"
    assert {name: entry["status"] for name, entry in node.variants.items()} == {v: "ok" for v in FILTER_VARIANTS}
    (got,) = run(result.model, {"x": x, "filters": f})
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4, err_msg="convlower.optimize")


def test_verification_counts_equal_infinities_as_equal() -> None:
    from convlower.verify import compare

    reference = np.array([1.0, np.inf, -np.inf, np.nan], np.float32)
    diff = compare("y", reference, reference.copy(), None, None)
    assert diff.passed and diff.max_abs_err == 0.0
