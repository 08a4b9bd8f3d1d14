"""The LocalCorrelation op: every ONNX variant, the model-local function, the torch op and the
models `convlower.export` writes, each checked against the NumPy oracle of tests/oracles.py
(written from the definition: loops over displacements, groups and channels), which is itself
checked against a loop over every output element.

    Y[n, g, k, p] = scale * reduce_{c in group g} A[n, c, p] * B[n, c, p + δ_k]   (B zero outside)

Real torch.onnx.export, real onnxruntime (CPU); no mocks. Shapes are small and exports shared, so
that the file stays quick.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx.reference import ReferenceEvaluator

import convlower
from convlower.passes import FAMILIES, NotLowerable
from convlower.passes.base import Builder
from convlower.passes.local_correlation import BAND_WASTE_LIMIT, Correlation, emit_local_correlation, make_spec
from convlower.passes.local_functions import DOMAIN, attach_functions
from tests.helpers import run, single_node_model
from tests.oracles import displacements, local_correlation

torch = pytest.importorskip("torch")
ops = pytest.importorskip("convlower.ops")

pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]  # inf - inf in the oracle

VARIANTS = FAMILIES["localcorrelation"].variant_names
ELEM_TYPES = {
    np.dtype(np.float16): onnx.TensorProto.FLOAT16,
    np.dtype(np.float32): onnx.TensorProto.FLOAT,
    np.dtype(np.float64): onnx.TensorProto.DOUBLE,
}
TOLERANCE = 1e-4
MAX_EXTENT = {1: 9, 2: 6, 3: 4}
"""Per spatial rank, the largest extent drawn: rank 3 stays small, so that it stays cheap."""


# --- cases -----------------------------------------------------------------------------------------------


@st.composite
def axis_windows(draw: st.DrawFn, max_steps: int = 3) -> tuple[int, int, int]:
    """(first, last, step) of one axis: none (0..0), one-sided (0..d), negative (-d..0), symmetric
    (-d..d), descending (0..-d step -1, GwcNet's disparities, or d..-d), or a window away from 0
    (a single displacement among them); steps 1 or 2."""
    kind = draw(st.sampled_from(["none", "one-sided", "negative", "symmetric", "descending", "away"]))
    step = draw(st.sampled_from([1, 2]))
    reach = draw(st.integers(1, max_steps)) * step
    if kind == "none":
        return 0, 0, 1
    if kind == "one-sided":
        return 0, reach, step
    if kind == "negative":
        return -reach, 0, step
    if kind == "symmetric":
        return -reach, reach, step
    if kind == "descending":
        return draw(st.sampled_from([0, reach])), -reach, -step
    first = draw(st.integers(-5, 5))
    return first, first + draw(st.integers(0, max_steps - 1)) * step, step


@st.composite
def correlation_cases(draw: st.DrawFn, rank: int, max_steps: int = 3) -> tuple[Correlation, tuple[int, ...]]:
    """(attributes, A's shape) at this rank: windows per axis, G in 1..3 with 1..3 channels each,
    mean or sum, scale 1 or not, extents from 1 (windows wider than the input included)."""
    windows = [draw(axis_windows(max_steps)) for _ in range(rank)]
    groups = draw(st.integers(1, 3))
    correlation = Correlation(
        tuple(w[0] for w in windows), tuple(w[1] for w in windows), tuple(w[2] for w in windows),
        groups, draw(st.sampled_from(["mean", "sum"])), draw(st.sampled_from([1.0, 0.5, -1.25])),
    )
    spatial = tuple(draw(st.integers(1, MAX_EXTENT[rank])) for _ in range(rank))
    return correlation, (draw(st.integers(1, 2)), groups * draw(st.integers(1, 3)), *spatial)


def random_pair(shape: tuple[int, ...], dtype: np.dtype = np.dtype(np.float32), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype)


def correlation_model(
    shape: tuple, correlation: Correlation, dtype: np.dtype = np.dtype(np.float32), opset: int = 18
) -> onnx.ModelProto:
    """One convlower.LocalCorrelation node of inputs a and b (both `shape`; str dims symbolic) with its function."""
    model = single_node_model(
        "LocalCorrelation", [("a", shape), ("b", shape)], len(shape) + 1, attrs=correlation.attrs(), opset=opset,
        domain=DOMAIN, elem_type=ELEM_TYPES[np.dtype(dtype)],
    )
    return attach_functions(model)


def lowered(model: onnx.ModelProto, variant: str) -> onnx.ModelProto:
    """The model with its LocalCorrelation nodes replaced by `variant`, which must apply to them."""
    result = convlower.lower(model, [f"LocalCorrelation={variant}"])
    assert result.nodes and all(n.variant == variant for n in result.nodes), result.nodes
    assert not [n for n in result.model.graph.node if n.domain == DOMAIN]
    return result.model


# --- the oracle, against a loop over every output element ------------------------------------------------


def element_loop(a: np.ndarray, b: np.ndarray, correlation: Correlation) -> np.ndarray:
    """The definition read literally: for every output element, the products of the group's
    channels where p + δ lies inside B, summed (or averaged), times scale; in float64."""
    batch, channels, *spatial = a.shape
    per_group = channels // correlation.groups
    moves = displacements(correlation)
    y = np.zeros((batch, correlation.groups, len(moves), *spatial))
    for n, g, k, *p in np.ndindex(*y.shape):
        q = tuple(pi + di for pi, di in zip(p, moves[k]))
        if all(0 <= qi < size for qi, size in zip(q, spatial)):
            total = sum(float(a[(n, c, *p)]) * float(b[(n, c, *q)]) for c in range(g * per_group, (g + 1) * per_group))
            y[(n, g, k, *p)] = correlation.scale * (total / per_group if correlation.reduction == "mean" else total)
    return y


@pytest.mark.parametrize("rank", [1, 2, 3])
@settings(max_examples=10)
@given(data=st.data())
def test_oracle_matches_a_loop_over_every_output_element(rank: int, data: st.DataObject) -> None:
    correlation, shape = data.draw(correlation_cases(rank, max_steps=2))
    a, b = random_pair(shape, np.dtype(np.float64))
    np.testing.assert_allclose(local_correlation(a, b, correlation), element_loop(a, b, correlation), rtol=1e-12, atol=1e-12)


def test_displacements_are_row_major_first_axis_slowest() -> None:
    correlation = Correlation((-1, 0), (1, 4), (1, 2), 1, "sum", 1.0)
    assert displacements(correlation)[:4] == [(-1, 0), (-1, 2), (-1, 4), (0, 0)]
    assert correlation.counts == (3, 3) and correlation.taps == 9
    descending = Correlation((0, 2), (0, -4), (1, -3), 1, "sum", 1.0)
    assert displacements(descending) == [(0, 2), (0, -1), (0, -4)] and descending.reaches == (0, 6)


# --- every variant and the function body, ranks 1 to 3 ---------------------------------------------------


@pytest.mark.parametrize("rank", [1, 2, 3])
@settings(max_examples=8)
@given(data=st.data())
def test_every_variant_and_the_function_body_match_the_oracle(rank: int, data: st.DataObject) -> None:
    correlation, shape = data.draw(correlation_cases(rank))
    a, b = random_pair(shape)
    expected = local_correlation(a, b, correlation)
    model = correlation_model(shape, correlation)
    np.testing.assert_allclose(run(model, {"a": a, "b": b})[0], expected, atol=TOLERANCE, rtol=TOLERANCE, err_msg="function body")
    for variant in VARIANTS:
        (got,) = run(lowered(model, variant), {"a": a, "b": b})
        assert got.shape == expected.shape, variant
        np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=TOLERANCE, err_msg=variant)


FLOAT16_CASES = [
    Correlation((-1, -3), (1, 0), (1, 1), 2, "mean", 1.0),  # a 3x4 window, stereo-like along W
    Correlation((-2, -2), (2, 2), (2, 2), 1, "sum", 0.25),  # FlowNetC-like: step 2 on both axes
]


@pytest.mark.parametrize("correlation", FLOAT16_CASES, ids=["mean", "sum-scale-step2"])
def test_float16_on_onnxruntime_and_onnx_reference(correlation: Correlation) -> None:
    """float16 end to end: the function body and every variant run on onnxruntime, the variants
    also on onnx.reference (an independent evaluator), within float16 rounding of the float32 oracle."""
    a32, b32 = random_pair((2, 8, 5, 7))
    a, b = a32.astype(np.float16), b32.astype(np.float16)
    expected = local_correlation(a.astype(np.float32), b.astype(np.float32), correlation)
    model = correlation_model(a.shape, correlation, np.dtype(np.float16))
    candidates = {"function body": run(model, {"a": a, "b": b})[0]}
    for variant in VARIANTS:
        variant_model = lowered(model, variant)
        candidates[variant] = run(variant_model, {"a": a, "b": b})[0]
        candidates[f"{variant} (onnx.reference)"] = ReferenceEvaluator(variant_model).run(None, {"a": a, "b": b})[0]
    for what, got in candidates.items():
        assert got.dtype == np.float16, what
        np.testing.assert_allclose(got.astype(np.float32), expected, atol=2e-2, rtol=1e-2, err_msg=what)


# --- symbolic dims, opsets, dtypes ---------------------------------------------------------------------------

SYMBOLIC_CASES = {
    1: Correlation((-4,), (2,), (2,), 2, "mean", 1.0),
    2: Correlation((1, 0), (-1, -3), (-1, -1), 2, "sum", 0.5),  # descending on both axes
    3: Correlation((0, -1, 1), (0, 1, 3), (1, 1, 2), 2, "mean", -1.0),
}
SIZES = {1: [(2, 11), (1, 6)], 2: [(2, 5, 9), (3, 7, 4)], 3: [(2, 3, 5, 4), (1, 4, 3, 6)]}
"""Per rank, two (batch, *spatial) sizes the symbolic models run at."""


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("channels", ["static", "symbolic"], ids=["static-C", "symbolic-C"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_keep_symbolic_batch_channels_and_spatial_dims(rank: int, channels: str, variant: str) -> None:
    correlation = SYMBOLIC_CASES[rank]
    spatial = tuple(f"S{i}" for i in range(rank))
    result = lowered(correlation_model(("N", 4 if channels == "static" else "C", *spatial), correlation), variant)
    (output,) = onnx.shape_inference.infer_shapes(result).graph.output
    dims = output.type.tensor_type.shape.dim
    assert not [d for i, d in enumerate(dims) if i not in (1, 2) and d.HasField("dim_value")], "a symbolic dim became static"
    for seed, ((batch, *extents), channel_count) in enumerate(zip(SIZES[rank], (4, 6 if channels == "symbolic" else 4))):
        a, b = random_pair((batch, channel_count, *extents), seed=seed)
        (got,) = run(result, {"a": a, "b": b})
        np.testing.assert_allclose(got, local_correlation(a, b, correlation), atol=TOLERANCE, rtol=TOLERANCE)


def test_function_body_runs_for_any_shape_and_dtype() -> None:
    """One body serves every node with these attributes: symbolic dims everywhere, float64, a
    scale (cast like A at run time)."""
    correlation = Correlation((-2, 0), (2, 3), (2, 1), 3, "mean", 0.375)
    model = correlation_model(("N", "C", "H", "W"), correlation, np.dtype(np.float64))
    for seed, shape in enumerate([(2, 6, 5, 7), (1, 9, 3, 2)]):
        a, b = random_pair(shape, np.dtype(np.float64), seed)
        np.testing.assert_allclose(run(model, {"a": a, "b": b})[0], local_correlation(a, b, correlation), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_opset_13_lowerings_and_body(reduction: str) -> None:
    """Before opset 18 ReduceMean takes axes as an attribute, before 15 Shape has no start/end."""
    correlation = Correlation((0, -2), (1, 1), (1, 1), 2, reduction, 1.0)
    model = correlation_model(("N", "C", "H", "W"), correlation, opset=13)
    candidates = {"function body": model} | {variant: lowered(model, variant) for variant in VARIANTS}
    a, b = random_pair((2, 6, 4, 5))
    for what, candidate in candidates.items():
        np.testing.assert_allclose(run(candidate, {"a": a, "b": b})[0], local_correlation(a, b, correlation),
                                   atol=TOLERANCE, rtol=TOLERANCE, err_msg=what)


def test_a_scaled_body_needs_opset_15() -> None:
    with pytest.raises(ValueError, match="opset 15 or later"):
        correlation_model((1, 2, 3, 4), Correlation((0, 0), (0, 1), (1, 1), 1, "sum", 2.0), opset=13)


def with_nonfinite(x: np.ndarray, seed: int) -> np.ndarray:
    """A copy with +inf, -inf and NaN at a few random places."""
    rng = np.random.default_rng(seed)
    x = x.copy()
    flat = x.reshape(-1)
    for place, value in zip(rng.choice(flat.size, size=5, replace=False), [np.inf, -np.inf, np.nan, np.inf, -np.inf]):
        flat[place] = value
    return x


@pytest.mark.parametrize("where", ["a", "b", "both"])
def test_variants_keep_the_nonfinite_pattern(where: str) -> None:
    """±inf and NaN reach exactly the outputs the definition gives (an inf in A times B's zero
    outside its extent is NaN, as in the sum of products)."""
    correlation = Correlation((-1, -2), (1, 1), (1, 1), 2, "mean", 1.0)
    a, b = random_pair((1, 4, 5, 6))
    a = with_nonfinite(a, 1) if where in ("a", "both") else a
    b = with_nonfinite(b, 2) if where in ("b", "both") else b
    expected = local_correlation(a, b, correlation)
    assert not np.isfinite(expected).all()
    model = correlation_model(a.shape, correlation)
    for what, candidate in {"function body": model, **{v: lowered(model, v) for v in VARIANTS}}.items():
        (got,) = run(candidate, {"a": a, "b": b})
        for test in (np.isnan, np.isposinf, np.isneginf):
            np.testing.assert_array_equal(test(got), test(expected), err_msg=f"{what}: {test.__name__}")
        finite = np.isfinite(expected)
        np.testing.assert_allclose(got[finite], expected[finite], atol=TOLERANCE, rtol=TOLERANCE, err_msg=what)


# --- specs and reasons -----------------------------------------------------------------------------------------


def spec_of(model: onnx.ModelProto):
    (node,) = gs.import_onnx(model).nodes
    return make_spec(node, 18)


def test_spec_resolves_defaults_and_keeps_symbolic_dims() -> None:
    model = single_node_model(
        "LocalCorrelation", [("a", (2, 8, "H", 64)), ("b", (2, 8, "H", 64))], 5,
        attrs={"displacement_first": [0, -4], "displacement_last": [0, 0], "groups": 4}, opset=18, domain=DOMAIN,
    )
    spec = spec_of(model)
    assert (spec.batch, spec.channels, spec.spatial, spec.group_channels, spec.dtype) == (2, 8, (None, 64), 2, "float32")
    assert spec.correlation == Correlation((0, -4), (0, 0), (1, 1), 4, "mean", 1.0)
    assert spec.band_axis == 1 and spec.key() == spec_of(model).key()
    assert spec.correlation.overload() == "0..0s1x-4..0s1_g4_mean"
    assert {v.name: v.why_not(spec) for v in FAMILIES["localcorrelation"].variants} == {v: None for v in VARIANTS}


def test_overload_names_are_those_of_the_attributes_as_onnx_stores_them() -> None:
    """A scale is a float32 attribute: a node read back names the body the torch op's arguments name."""
    correlation = Correlation((0, -3), (0, 3), (1, 2), 4, "sum", 16 ** -0.5 / 3)
    node = onnx.helper.make_node("LocalCorrelation", ["a", "b"], ["y"], domain=DOMAIN, **correlation.attrs())
    stored = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert stored["scale"] != correlation.scale
    assert Correlation.from_attrs(stored).overload() == correlation.overload() == "0..0s1x-3..3s2_g4_sum_scale0.0833333358"


@pytest.mark.parametrize(
    "shape, window, applies",
    [
        ((1, 8, 16, 128), [(0, 0, 1), (-3, 3, 1)], False),  # 134 columns for a band of 7: 19x
        ((1, 8, 16, 128), [(0, 0, 1), (-47, 0, 1)], True),  # stereo: 175 columns for 48
        ((1, 8, 128, 16), [(-3, 3, 1), (0, 0, 1)], False),  # the band runs along H when W has no displacement
        ((1, 8, 16, "W"), [(0, 0, 1), (-3, 3, 1)], True),  # unknown W: the tuner measures
    ],
)
def test_banded_matmul_does_not_apply_where_the_all_pairs_product_is_mostly_waste(shape, window, applies: bool) -> None:
    correlation = Correlation(*(tuple(w[i] for w in window) for i in range(3)), 1, "sum", 1.0)  # type: ignore[arg-type]
    spec = spec_of(correlation_model(shape, correlation))
    reason = FAMILIES["localcorrelation"].variant("banded_matmul").why_not(spec)
    if applies:
        assert reason is None
        return
    axis = 0 if window[1] == (0, 0, 1) else 1
    assert reason == (
        f"the all-pairs MatMul along spatial axis {axis} would compute 134 columns per row for a band of 7 "
        f"displacement(s), 19x the work (more than {BAND_WASTE_LIMIT}x cannot pay)"
    )


def test_stacked_mul_reduce_does_not_apply_where_its_stack_would_pass_a_gibibyte() -> None:
    """FlowNetC's 21x21 window of stride 2 over 256 channels at 48x64: 441 copies of B."""
    flownetc = Correlation((-20, -20), (20, 20), (2, 2), 1, "mean", 1.0)
    stacked = FAMILIES["localcorrelation"].variant("stacked_mul_reduce")
    reason = stacked.why_not(spec_of(correlation_model((1, 256, 48, 64), flownetc)))
    assert reason == "its stack of K=441 shifted copies of B would take 1.3 GiB (more than 1 GiB)"
    assert stacked.why_not(spec_of(correlation_model(("N", 256, 48, 64), flownetc))) is None


@pytest.mark.parametrize(
    "attrs, shapes, reason",
    [
        ({"displacement_last": [0, 1]}, None, "displacement_first is required"),
        ({"displacement_first": [0, 0], "displacement_last": [0, 3], "displacement_step": [1, 2]}, None, "do not end on the last one"),
        ({"displacement_first": [0, 0], "displacement_last": [0, 1], "displacement_step": [1, 0]}, None, "has a 0"),
        ({"displacement_first": [0, 0], "displacement_last": [0, -2], "displacement_step": [1, 1]}, None, "non-negative multiple"),
        ({"displacement_first": [0, 0], "displacement_last": [0, 1], "groups": 3}, None, "C=4 is not a multiple of groups=3"),
        ({"displacement_first": [0, 0], "displacement_last": [0, 1], "reduction": "max"}, None, "reduction 'max' is not one of"),
        ({"displacement_first": [0], "displacement_last": [1]}, None, "A must have rank 3 for a 1-D displacement window"),
        ({"displacement_first": [0, 0], "displacement_last": [0, 1]}, ((1, 4, 6, 6), (1, 4, 6, 5)), "A and B must have one shape"),
    ],
)
def test_nodes_that_cannot_be_described_say_why(attrs: dict, shapes, reason: str) -> None:
    a_shape, b_shape = shapes or ((1, 4, 6, 6), (1, 4, 6, 6))
    model = single_node_model("LocalCorrelation", [("a", a_shape), ("b", b_shape)], 5, attrs=attrs, domain=DOMAIN)
    (node,) = gs.import_onnx(model).nodes
    with pytest.raises(NotLowerable, match=reason):
        make_spec(node, 18)


def test_emit_local_correlation_builds_the_node_and_its_functions() -> None:
    """What a recognizer calls: two nodes of different attributes in one graph, each with its body."""
    graph = gs.Graph(opset=18)
    a, b = (gs.Variable(name, dtype=np.float32, shape=(1, 4, 5, 6)) for name in "ab")
    graph.inputs = [a, b]
    builder = Builder(graph, 18, "corr")
    stereo, flow = Correlation((0, -3), (0, 0), (1, 1), 2, "mean", 1.0), Correlation((-1, -1), (1, 1), (1, 1), 1, "sum", 0.5)
    outputs = [emit_local_correlation(builder, a, b, correlation) for correlation in (stereo, flow)]
    assert [(y.dtype, list(y.shape)) for y in outputs] == [(np.float32, [1, 2, 4, 5, 6]), (np.float32, [1, 1, 9, 5, 6])]
    graph.outputs = outputs
    model = attach_functions(gs.export_onnx(graph))
    assert {n.overload for n in model.graph.node} == {f.overload for f in model.functions} == {stereo.overload(), flow.overload()}
    onnx.checker.check_model(model, full_check=True)
    x, y = random_pair((1, 4, 5, 6))
    for got, correlation in zip(run(model, {"a": x, "b": y}), (stereo, flow)):
        np.testing.assert_allclose(got, local_correlation(x, y, correlation), atol=TOLERANCE, rtol=TOLERANCE)


# --- the torch op -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 2, 3])
@settings(max_examples=8)
@given(data=st.data(), dtype=st.sampled_from([np.dtype(np.float32), np.dtype(np.float64)]))
def test_torch_reference_matches_the_oracle(rank: int, data: st.DataObject, dtype: np.dtype) -> None:
    correlation, shape = data.draw(correlation_cases(rank))
    a, b = random_pair(shape, dtype)
    got = ops.correlation_reference(torch.from_numpy(a), torch.from_numpy(b), correlation).numpy()
    assert got.dtype == dtype
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, local_correlation(a, b, correlation), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize(
    "rank, displacements, window",
    [
        (2, 4, ((-4, -4), (4, 4), (1, 1))),
        (2, [0, (-47, 0)], ((0, -47), (0, 0), (1, 1))),
        (2, [0, (0, -47, -1)], ((0, 0), (0, -47), (1, -1))),
        (2, [(-20, 20, 2)] * 2, ((-20, -20), (20, 20), (2, 2))),
        (1, [(1, 5, 2)], ((1,), (5,), (2,))),
        (3, [1, 0, 2], ((-1, 0, -2), (1, 0, 2), (1, 1, 1))),
    ],
)
def test_correlation_window_reads_torch_style_displacements(rank: int, displacements, window) -> None:
    correlation = ops.correlation_window(rank, displacements, groups=2, reduction="sum", scale=0.5)
    assert (correlation.first, correlation.last, correlation.step) == window
    assert (correlation.groups, correlation.reduction, correlation.scale) == (2, "sum", 0.5)


@pytest.mark.parametrize(
    "args, message",
    [
        (dict(displacements=[1]), "displacements has 1 entries; the input has 2 spatial axes"),
        (dict(displacements=[-1, 1]), "radius must be >= 0"),
        (dict(displacements=[1, (0, 1, 2, 3)]), "is not d, \\(first, last\\) or \\(first, last, step\\)"),
        (dict(displacements=[1, (0, 3, 2)]), "do not end on the last one"),
        (dict(displacements=1, reduction="max"), "reduction 'max'"),
    ],
)
def test_correlation_window_rejects_bad_arguments(args: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ops.correlation_window(2, **args)


def test_op_rejects_inputs_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match="one shape"):
        ops.local_correlation(torch.randn(1, 4, 5, 6), torch.randn(1, 4, 5, 7), 1)
    with pytest.raises(ValueError, match="not a multiple of groups=3"):
        ops.local_correlation(torch.randn(1, 4, 5, 6), torch.randn(1, 4, 5, 6), 1, groups=3)


def test_op_gradients_match_finite_differences() -> None:
    a = torch.randn(1, 4, 4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, 4, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: ops.local_correlation(x, y, [1, (-3, 1, 2)], groups=2, scale=0.5), (a, b))


# --- export, lower and optimize ------------------------------------------------------------------------------------


class CostVolumes(torch.nn.Module):
    """Two correlations of different attributes (two function overloads): a GwcNet-like stereo
    volume (disparities 0..5 along W, descending displacements, groups) and a flow window (both
    axes, step 2, a scaled sum)."""

    correlations = (
        Correlation((0, 0), (0, -5), (1, -1), 2, "mean", 1.0),
        Correlation((-2, -2), (2, 2), (2, 2), 1, "sum", 0.25),
    )

    @classmethod
    def oracle(cls, left: np.ndarray, right: np.ndarray) -> list[np.ndarray]:
        return [local_correlation(left, right, correlation) for correlation in cls.correlations]

    def forward(self, left, right):
        return ops.local_correlation(left, right, [0, (0, -5, -1)], groups=2), ops.local_correlation(
            left, right, [(-2, 2, 2)] * 2, reduction="sum", scale=0.25
        )


SPATIAL_AXES = {2: "height", 3: "width"}
EXPORT_SIZES = [(2, 4, 6, 9), (3, 4, 5, 7)]
"""The example's shape, and another the symbolic exports also run at."""


@pytest.fixture(scope="module")
def exports() -> dict[tuple[bool, str], onnx.ModelProto]:
    """CostVolumes exported by each exporter with static dims and with symbolic batch, height and width."""
    example = tuple(torch.from_numpy(x) for x in random_pair(EXPORT_SIZES[0]))
    models = {}
    for dynamo in (True, False):
        for dims in ("static", "symbolic"):
            symbolic = dims == "symbolic"
            axes = {"left": SPATIAL_AXES, "right": SPATIAL_AXES} if symbolic else None
            models[dynamo, dims] = convlower.export(
                CostVolumes().eval(), example, dynamo=dynamo, dynamic_batch=symbolic, dynamic_axes=axes
            )
    return models


@pytest.mark.parametrize("dims", ["static", "symbolic"])
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_export_emits_the_canonical_op_and_every_variant_matches_torch(exports, dynamo: bool, dims: str) -> None:
    model = exports[dynamo, dims]
    assert [(n.domain, n.op_type) for n in model.graph.node] == [(DOMAIN, "LocalCorrelation")] * 2
    expected_overloads = {correlation.overload() for correlation in CostVolumes.correlations}
    assert {n.overload for n in model.graph.node} == {f.overload for f in model.functions} == expected_overloads
    assert [i.name for i in model.graph.input] == ["left", "right"]
    onnx.checker.check_model(model, full_check=True)
    if dims == "symbolic":
        assert [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim] == ["batch", "", "height", "width"]
    candidates = {"as exported": model} | {variant: lowered(model, variant) for variant in VARIANTS}
    for seed, shape in enumerate(EXPORT_SIZES if dims == "symbolic" else EXPORT_SIZES[:1]):
        left, right = random_pair(shape, seed=seed)
        with torch.inference_mode():
            eager = [y.numpy() for y in CostVolumes()(torch.from_numpy(left), torch.from_numpy(right))]
        for want, oracle in zip(eager, CostVolumes.oracle(left, right)):
            np.testing.assert_allclose(want, oracle, atol=TOLERANCE, rtol=TOLERANCE, err_msg="torch against the oracle")
        for what, candidate in candidates.items():
            for got, want in zip(run(candidate, {"left": left, "right": right}), eager):
                np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=TOLERANCE, err_msg=f"{what} at {shape}")


def test_optimize_tunes_every_variant_and_keeps_a_verified_one(exports) -> None:
    model = exports[True, "static"]
    result = convlower.optimize(model, provider="cpu", guard=False, confirm=False, cache=None)
    nodes = result.report.nodes
    assert [node.op for node in nodes] == ["LocalCorrelation"] * 2
    for node in nodes:
        assert {name: entry["status"] for name, entry in node.variants.items()} == {v: "ok" for v in VARIANTS}
        assert node.chosen in ("original", *VARIANTS)
    left, right = random_pair(EXPORT_SIZES[0], seed=5)
    for got, want in zip(run(result.model, {"left": left, "right": right}), CostVolumes.oracle(left, right)):
        np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=TOLERANCE)
