"""The DynamicFilter op: the torch reference, every ONNX variant, the model-local function and the
models `convlower.export` writes, each checked against the NumPy oracle of tests/oracles.py (written
from the definition, not from convlower's window helpers), which is itself checked against torch's
grouped convolution.

Real torch.onnx.export, real onnxruntime (CPU), models written under tmp_path; no mocks.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import convlower
from convlower.passes import FAMILIES
from convlower.passes.dynamic_filter import SlidingWindow, make_spec
from convlower.passes.local_functions import DOMAIN, attach_functions
from tests.helpers import run, single_node_model
from tests.oracles import filter_oracle, output_extent

torch = pytest.importorskip("torch")
F = torch.nn.functional
ops = pytest.importorskip("convlower.ops")


VARIANTS = FAMILIES["dynamicfilter"].variant_names
ATOL = RTOL = 1e-4
TOLERANCE = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}
ELEM_TYPES = {np.dtype(np.float32): onnx.TensorProto.FLOAT, np.dtype(np.float64): onnx.TensorProto.DOUBLE}


# --- cases -------------------------------------------------------------------------------------------


@st.composite
def filter_cases(draw: st.DrawFn) -> tuple[SlidingWindow, tuple[int, ...], int]:
    """(window, x shape, G): ranks 1 to 3, groups 1..3, kernels 1..4, strides and dilations 1..3,
    asymmetric pads; the kernel always fits the padded input. Rank 3 draws smaller kernels and
    extents, so that it stays cheap."""
    rank = draw(st.sampled_from([1, 2, 3]))
    kernel, axis = (st.integers(1, 4), st.integers(1, 3)) if rank < 3 else (st.integers(1, 2), st.integers(1, 2))
    window = SlidingWindow(
        tuple(draw(kernel) for _ in range(rank)),
        tuple(draw(axis) for _ in range(rank)),
        tuple(draw(axis) for _ in range(rank)),
        tuple(draw(st.integers(0, 2)) for _ in range(2 * rank)),
    )
    minimum = [
        max(1, d * (k - 1) + 1 - window.pads[i] - window.pads[i + rank])
        for i, (k, d) in enumerate(zip(window.kernel_shape, window.dilations))
    ]
    spatial = tuple(draw(st.integers(m, m + (6 if rank < 3 else 2))) for m in minimum)
    groups = draw(st.integers(1, 3))
    x_shape = (draw(st.integers(1, 2)), groups * draw(st.integers(1, 3)), *spatial)
    return window, x_shape, groups


dtypes = st.sampled_from([np.dtype(np.float32), np.dtype(np.float64)])


def random_pair(
    window: SlidingWindow, x_shape: tuple[int, ...], groups: int, seed: int = 0, dtype: np.dtype = np.dtype(np.float32)
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = output_extent(window, x_shape[2:])
    x = rng.standard_normal(x_shape).astype(dtype)
    f = rng.standard_normal((x_shape[0], groups, math.prod(window.kernel_shape), *out)).astype(dtype)
    return x, f


def canonical_model(
    x_shape: tuple, f_shape: tuple, window: SlidingWindow, opset: int = 18, dtype: np.dtype = np.dtype(np.float32)
) -> onnx.ModelProto:
    """One convlower.DynamicFilter node with its model-local function."""
    model = single_node_model(
        "DynamicFilter", [("x", x_shape), ("f", f_shape)], len(x_shape), attrs=window.attrs(), opset=opset, domain=DOMAIN,
        elem_type=ELEM_TYPES[np.dtype(dtype)],
    )
    return attach_functions(model)


# --- the oracle, and the torch reference against it -----------------------------------------------------


@settings(max_examples=15)
@given(case=filter_cases())
def test_oracle_with_the_same_filter_everywhere_is_a_depthwise_conv(case) -> None:
    """Filters constant over positions make DynamicFilter (G = C) a grouped conv: torch's conv, at
    ranks 1 to 3, checks the oracle the rest of this file relies on."""
    window, x_shape, _ = case
    channels, rank = x_shape[1], window.rank
    x = np.random.default_rng(0).standard_normal(x_shape)
    weight = np.random.default_rng(1).standard_normal((channels, 1, *window.kernel_shape))
    out = output_extent(window, x_shape[2:])
    filters = np.broadcast_to(weight.reshape(1, channels, -1, *([1] * rank)), (x_shape[0], channels, weight[0].size, *out))
    torch_pads = [p for i in reversed(range(rank)) for p in (window.pads[i], window.pads[i + rank])]
    conv = (F.conv1d, F.conv2d, F.conv3d)[rank - 1]
    expected = conv(
        F.pad(torch.from_numpy(x), torch_pads), torch.from_numpy(weight),
        stride=window.strides, dilation=window.dilations, groups=channels,
    )
    np.testing.assert_allclose(filter_oracle(x, filters, window), expected.numpy(), atol=1e-12, rtol=1e-12)


@settings(max_examples=20)
@given(case=filter_cases(), dtype=dtypes)
def test_torch_reference_matches_the_oracle(case, dtype: np.dtype) -> None:
    """`convlower.ops.reference` (what the torch op computes in eager runs and training) is product
    code built on the window helpers the lowerings share: the oracle checks it."""
    window, x_shape, groups = case
    x, f = random_pair(window, x_shape, groups, dtype=dtype)
    got = ops.reference(torch.from_numpy(x), torch.from_numpy(f), window).numpy()
    assert got.dtype == dtype
    np.testing.assert_allclose(got, filter_oracle(x, f, window), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("channels, kernel", [(1, 3), (4, 3), (2, 5)])
def test_op_matches_seed_000_method_1(channels: int, kernel: int) -> None:
    """`dynamic_filter(x, filters, K)` is seed 000's unfold + einsum with padding K // 2."""
    x, filters = torch.randn(2, channels, 9, 7), torch.rand(2, kernel**2, 9, 7)
    unfolded = F.unfold(x, kernel, padding=kernel // 2).view(2, channels, kernel**2, 9, 7)
    expected = torch.einsum("nckhw,nkhw->nchw", unfolded, filters)
    torch.testing.assert_close(ops.dynamic_filter(x, filters, kernel), expected)


def test_op_gradients_match_finite_differences() -> None:
    x = torch.randn(1, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    filters = torch.randn(1, 2, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.dynamic_filter(a, b, (2, 3), stride=2, padding=1), (x, filters))


@pytest.mark.parametrize(
    "args, pads",
    [
        (dict(kernel_size=3), (1, 1, 1, 1)),
        (dict(kernel_size=4, dilation=2), (3, 3, 3, 3)),
        (dict(kernel_size=(2, 3)), (0, 1, 1, 1)),  # the odd pad goes to the end, as torch's conv does
        (dict(kernel_size=3, stride=2, padding=(1, 0)), (1, 0, 1, 0)),
        (dict(kernel_size=3, padding="valid"), (0, 0, 0, 0)),
    ],
)
def test_sliding_window_resolves_torch_style_arguments(args: dict, pads: tuple[int, ...]) -> None:
    assert ops.sliding_window(2, **args).pads == pads


@pytest.mark.parametrize(
    "args, message",
    [
        (dict(kernel_size=3, stride=2), "padding='same' needs stride 1"),
        (dict(kernel_size=(3, 3, 3)), "kernel_size has 3 values"),
        (dict(kernel_size=3, padding="full"), "is not 'same', 'valid'"),
        (dict(kernel_size=0), "must be positive"),
    ],
)
def test_sliding_window_rejects_bad_arguments(args: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ops.sliding_window(2, **args)


def test_op_rejects_filters_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match="filters must be"):
        ops.dynamic_filter(torch.randn(1, 4, 8, 8), torch.randn(1, 2, 8, 8, 8), 3)
    with pytest.raises(ValueError, match="not a multiple of the filter groups"):
        ops.dynamic_filter(torch.randn(1, 4, 8, 8), torch.randn(1, 3, 9, 8, 8), 3)


# --- the ONNX variants and the function body ----------------------------------------------------------


@settings(max_examples=20)
@given(case=filter_cases(), dtype=dtypes)
def test_every_variant_and_the_function_body_match_the_oracle(case, dtype: np.dtype) -> None:
    window, x_shape, groups = case
    x, f = random_pair(window, x_shape, groups, dtype=dtype)
    expected = filter_oracle(x, f, window)
    tol = TOLERANCE[dtype]
    model = canonical_model(x.shape, f.shape, window, dtype=dtype)
    (body,) = run(model, {"x": x, "f": f})
    np.testing.assert_allclose(body, expected, atol=tol, rtol=tol, err_msg="function body")
    for variant in VARIANTS:
        result = convlower.lower(model, [f"DynamicFilter={variant}"])
        if variant == "conv_unfold" and dtype != np.float32:
            assert [n.variant for n in result.nodes] == [None] and "float32 only" in result.nodes[0].reason
            continue
        assert [n.variant for n in result.nodes] == [variant], result.nodes
        assert not [n for n in result.model.graph.node if n.domain == DOMAIN]
        (got,) = run(result.model, {"x": x, "f": f})
        np.testing.assert_allclose(got, expected, atol=tol, rtol=tol, err_msg=variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_keep_a_symbolic_batch(variant: str) -> None:
    window = SlidingWindow((3, 3), (1, 1), (2, 2), (2, 2, 2, 2))
    model = canonical_model(("N", 6, 8, 9), ("N", 3, 9, 8, 9), window)
    lowered = convlower.lower(model, [f"DynamicFilter={variant}"]).model
    for batch in (1, 3):
        x, f = random_pair(window, (batch, 6, 8, 9), 3, seed=batch)
        (got,) = run(lowered, {"x": x, "f": f})
        np.testing.assert_allclose(got, filter_oracle(x, f, window), atol=ATOL, rtol=RTOL)


def test_function_body_runs_for_any_shape_and_dtype() -> None:
    """One body serves every node with these attributes: symbolic dims everywhere, float64 too."""
    window = SlidingWindow((3,), (2,), (1,), (1, 0))
    model = single_node_model(
        "DynamicFilter", [("x", ("N", "C", "L")), ("f", ("N", "G", 3, "M"))], 3,
        attrs=window.attrs(), opset=18, domain=DOMAIN, elem_type=onnx.TensorProto.DOUBLE,
    )
    attach_functions(model)
    for x_shape, groups in (((2, 6, 11), 3), ((1, 4, 4), 4)):
        x, f = random_pair(window, x_shape, groups, dtype=np.dtype(np.float64))
        (got,) = run(model, {"x": x, "f": f})
        np.testing.assert_allclose(got, filter_oracle(x, f, window), rtol=1e-12, atol=1e-12)


def test_spec_and_reasons_a_variant_does_not_apply() -> None:
    window = SlidingWindow((3, 3), (1, 1), (1, 1), (1, 1, 1, 1))
    model = single_node_model(
        "DynamicFilter", [("x", (2, 4, "H", 8)), ("f", (2, 2, 9, "H", 8))], 4,
        attrs=window.attrs(), opset=18, domain=DOMAIN, elem_type=onnx.TensorProto.DOUBLE,
    )
    (node,) = gs.import_onnx(model).nodes
    spec = make_spec(node, 18)
    assert (spec.batch, spec.channels, spec.groups, spec.in_spatial, spec.out_spatial) == (2, 4, 2, (None, 8), (None, 8))
    assert spec.key() == make_spec(node, 18).key()
    reasons = {v.name: v.why_not(spec) for v in FAMILIES["dynamicfilter"].variants}
    assert "float32 only" in reasons["conv_unfold"]
    assert [name for name, why in reasons.items() if why is not None] == ["conv_unfold"]


@pytest.mark.parametrize(
    "attrs, f_shape, reason",
    [
        ({"strides": [1, 1]}, (1, 1, 9, 6, 6), "kernel_shape is required"),
        ({"kernel_shape": [3, 3]}, (1, 1, 8, 4, 4), "F has 8 taps"),
        ({"kernel_shape": [3, 3]}, (1, 3, 9, 4, 4), "not a multiple of the filter groups"),
        ({"kernel_shape": [3, 3]}, (1, 1, 9, 6, 6), "is not the output extent"),
    ],
)
def test_nodes_that_cannot_be_described_say_why(attrs: dict, f_shape: tuple, reason: str) -> None:
    model = single_node_model("DynamicFilter", [("x", (1, 4, 6, 6)), ("f", f_shape)], 4, attrs=attrs, domain=DOMAIN)
    (node,) = gs.import_onnx(model).nodes
    with pytest.raises(convlower.passes.NotLowerable, match=reason):
        make_spec(node, 18)


# --- export --------------------------------------------------------------------------------------------


class TwoFilters(torch.nn.Module):
    """Two DynamicFilter calls with different attributes (two function overloads) and G > 1."""

    windows = (SlidingWindow((3, 3), (1, 1), (1, 1), (1, 1, 1, 1)), SlidingWindow((3, 3), (1, 1), (2, 2), (2, 2, 2, 2)))
    """The two calls' windows, written out ('same' padding: (K - 1) * dilation / 2 on each side)."""

    @classmethod
    def oracle(cls, x: np.ndarray, filters: np.ndarray) -> np.ndarray:
        return np.stack([filter_oracle(x, filters, window) for window in cls.windows])

    def forward(self, x, filters):
        near = ops.dynamic_filter(x, filters, 3)
        far = ops.dynamic_filter(x, filters, 3, dilation=2, padding=2)
        return torch.stack([near, far])  # side by side: an error common to both calls cannot cancel


class Filter1d(torch.nn.Module):
    window = SlidingWindow((5,), (2,), (1,), (2, 2))

    def forward(self, x, filters):
        return ops.dynamic_filter(x, filters, 5, stride=2, padding=(2,))


def example_2d(batch: int = 2) -> tuple:
    return torch.randn(batch, 4, 10, 9), torch.randn(batch, 2, 9, 10, 9)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_export_emits_the_canonical_op_with_its_functions(dynamo: bool, tmp_path: Path) -> None:
    x, filters = example_2d()
    path = tmp_path / "two_filters.onnx"
    model = convlower.export(TwoFilters().eval(), (x, filters), path, dynamo=dynamo, dynamic_batch=True)
    assert onnx.load(path) == model
    nodes = [n for n in model.graph.node if n.domain == DOMAIN]
    assert [n.op_type for n in nodes] == ["DynamicFilter", "DynamicFilter"]
    assert {n.overload for n in nodes} == {f.overload for f in model.functions} == {
        "k3x3_s1x1_d1x1_p1x1x1x1", "k3x3_s1x1_d2x2_p2x2x2x2"
    }
    assert [i.name for i in model.graph.input] == ["x", "filters"]
    onnx.checker.check_model(model, full_check=True)
    for batch in (2, 3):
        x, filters = example_2d(batch)
        feeds = {"x": x.numpy(), "filters": filters.numpy()}
        expected = TwoFilters.oracle(feeds["x"], feeds["filters"])
        (got,) = run(model, feeds)
        np.testing.assert_allclose(got, expected, atol=ATOL, rtol=RTOL)
        for variant in VARIANTS:
            lowered = convlower.lower(model, [f"DynamicFilter={variant}"])
            assert [n.variant for n in lowered.nodes] == [variant, variant]
            (got,) = run(lowered.model, feeds)
            np.testing.assert_allclose(got, expected, atol=ATOL, rtol=RTOL, err_msg=variant)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_export_of_a_1d_filter_runs_before_and_after_lowering(dynamo: bool) -> None:
    """Filters given as `[N, K, T_out]` (G = 1)."""
    x, filters = torch.randn(2, 3, 17), torch.randn(2, 5, 9)
    model = convlower.export(Filter1d().eval(), (x, filters), dynamo=dynamo)
    feeds = {"x": x.numpy(), "filters": filters.numpy()}
    expected = filter_oracle(feeds["x"], feeds["filters"][:, None], Filter1d.window)
    np.testing.assert_allclose(run(model, feeds)[0], expected, atol=ATOL, rtol=RTOL)
    for variant in VARIANTS:
        lowered = convlower.lower(model, [f"DynamicFilter={variant}"]).model
        np.testing.assert_allclose(run(lowered, feeds)[0], expected, atol=ATOL, rtol=RTOL, err_msg=variant)


def test_attach_functions_restores_what_graph_surgery_drops() -> None:
    """onnx-graphsurgeon drops function overloads: attach_functions rebuilds them from attributes."""
    model = convlower.export(TwoFilters(), example_2d(), dynamo=False)
    after_surgery = gs.export_onnx(gs.import_onnx(model))
    assert {f.overload for f in after_surgery.functions} == {""}
    attach_functions(after_surgery)
    after_surgery.ir_version = model.ir_version
    assert after_surgery.functions == model.functions
    assert [n.overload for n in after_surgery.graph.node] == [n.overload for n in model.graph.node]
    x, filters = example_2d()
    feeds = {"x": x.numpy(), "filters": filters.numpy()}
    np.testing.assert_allclose(run(after_surgery, feeds)[0], TwoFilters.oracle(feeds["x"], feeds["filters"]), atol=ATOL, rtol=RTOL)
    before = copy.deepcopy(after_surgery)
    assert attach_functions(after_surgery) is after_surgery  # in place
    assert after_surgery == before, "a second attach_functions changed the model"


def test_import_convlower_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, convlower; convlower.export; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_overload_names_follow_the_resolved_attributes() -> None:
    window = SlidingWindow.from_attrs({"kernel_shape": [3]})
    assert (window.strides, window.dilations, window.pads) == ((1,), (1,), (0, 0))
    assert window.overload() == "k3_s1_d1_p0x0"
    assert math.prod(window.kernel_shape) == window.taps == len(window.offsets())
