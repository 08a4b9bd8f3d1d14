"""The DynamicFilter op: the torch reference against independent oracles, every ONNX variant and
the model-local function against the torch reference, and export by both torch exporters.

Real torch.onnx.export, real onnxruntime (CPU), models written under tmp_path; no mocks.
"""

from __future__ import annotations

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

torch = pytest.importorskip("torch")
F = torch.nn.functional
ops = pytest.importorskip("convlower.ops")


VARIANTS = FAMILIES["dynamicfilter"].variant_names
ATOL = RTOL = 1e-4


# --- cases -------------------------------------------------------------------------------------------


@st.composite
def filter_cases(draw: st.DrawFn) -> tuple[SlidingWindow, tuple[int, ...], int]:
    """(window, x shape, G): ranks 1 and 2, groups 1..3, kernels 1..4, strides and dilations 1..3,
    asymmetric pads; the kernel always fits the padded input."""
    rank = draw(st.sampled_from([1, 2]))
    axis = st.integers(1, 3)
    window = SlidingWindow(
        tuple(draw(st.integers(1, 4)) for _ in range(rank)),
        tuple(draw(axis) for _ in range(rank)),
        tuple(draw(axis) for _ in range(rank)),
        tuple(draw(st.integers(0, 2)) for _ in range(2 * rank)),
    )
    minimum = [max(1, window.reach(i) - window.pads[i] - window.pads[i + rank]) for i in range(rank)]
    spatial = tuple(draw(st.integers(m, m + 6)) for m in minimum)
    groups = draw(st.integers(1, 3))
    x_shape = (draw(st.integers(1, 2)), groups * draw(st.integers(1, 3)), *spatial)
    return window, x_shape, groups


def random_pair(window: SlidingWindow, x_shape: tuple[int, ...], groups: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = window.output_size(x_shape[2:])
    x = rng.standard_normal(x_shape).astype(np.float32)
    f = rng.standard_normal((x_shape[0], groups, window.taps, *out)).astype(np.float32)
    return x, f


def torch_reference(x: np.ndarray, f: np.ndarray, window: SlidingWindow) -> np.ndarray:
    return ops.reference(torch.from_numpy(x), torch.from_numpy(f), window).numpy()


def canonical_model(x_shape: tuple, f_shape: tuple, window: SlidingWindow, opset: int = 18) -> onnx.ModelProto:
    """One convlower.DynamicFilter node with its model-local function."""
    model = single_node_model(
        "DynamicFilter", [("x", x_shape), ("f", f_shape)], len(x_shape), attrs=window.attrs(), opset=opset, domain=DOMAIN
    )
    return attach_functions(model)


# --- the torch reference -----------------------------------------------------------------------------


@settings(max_examples=30)
@given(case=filter_cases())
def test_reference_with_the_same_filter_everywhere_is_a_depthwise_conv(case) -> None:
    """Filters constant over positions make DynamicFilter (G = C) a grouped conv: torch's conv is an
    oracle independent of the reference."""
    window, x_shape, _ = case
    channels, rank = x_shape[1], window.rank
    x = torch.randn(x_shape, dtype=torch.float64)
    weight = torch.randn(channels, 1, *window.kernel_shape, dtype=torch.float64)
    out = window.output_size(x_shape[2:])
    filters = weight.reshape(1, channels, window.taps, *([1] * rank)).expand(x_shape[0], -1, -1, *out)
    torch_pads = [p for i in reversed(range(rank)) for p in (window.pads[i], window.pads[i + rank])]
    conv = (F.conv1d, F.conv2d)[rank - 1]
    expected = conv(F.pad(x, torch_pads), weight, stride=window.strides, dilation=window.dilations, groups=channels)
    torch.testing.assert_close(ops.reference(x, filters, window), expected)


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


@settings(max_examples=25)
@given(case=filter_cases())
def test_every_variant_and_the_function_body_match_the_torch_reference(case) -> None:
    window, x_shape, groups = case
    x, f = random_pair(window, x_shape, groups)
    expected = torch_reference(x, f, window)
    model = canonical_model(x.shape, f.shape, window)
    (body,) = run(model, {"x": x, "f": f})
    np.testing.assert_allclose(body, expected, atol=ATOL, rtol=RTOL, err_msg="function body")
    for variant in VARIANTS:
        result = convlower.lower(model, [f"DynamicFilter={variant}"])
        assert [n.variant for n in result.nodes] == [variant], result.nodes
        assert not [n for n in result.model.graph.node if n.domain == DOMAIN]
        (got,) = run(result.model, {"x": x, "f": f})
        np.testing.assert_allclose(got, expected, atol=ATOL, rtol=RTOL, err_msg=variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_keep_a_symbolic_batch(variant: str) -> None:
    window = SlidingWindow((3, 3), (1, 1), (2, 2), (2, 2, 2, 2))
    model = canonical_model(("N", 6, 8, 9), ("N", 3, 9, 8, 9), window)
    lowered = convlower.lower(model, [f"DynamicFilter={variant}"]).model
    for batch in (1, 3):
        x, f = random_pair(window, (batch, 6, 8, 9), 3, seed=batch)
        (got,) = run(lowered, {"x": x, "f": f})
        np.testing.assert_allclose(got, torch_reference(x, f, window), atol=ATOL, rtol=RTOL)


def test_function_body_runs_for_any_shape_and_dtype() -> None:
    """One body serves every node with these attributes: symbolic dims everywhere, float64 too."""
    window = SlidingWindow((3,), (2,), (1,), (1, 0))
    model = single_node_model(
        "DynamicFilter", [("x", ("N", "C", "L")), ("f", ("N", "G", 3, "M"))], 3,
        attrs=window.attrs(), opset=18, domain=DOMAIN, elem_type=onnx.TensorProto.DOUBLE,
    )
    attach_functions(model)
    for x_shape, groups in (((2, 6, 11), 3), ((1, 4, 4), 4)):
        x, f = (a.astype(np.float64) for a in random_pair(window, x_shape, groups))
        (got,) = run(model, {"x": x, "f": f})
        np.testing.assert_allclose(got, torch_reference(x, f, window), rtol=1e-12, atol=1e-12)


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

    def forward(self, x, filters):
        near = ops.dynamic_filter(x, filters, 3)
        far = ops.dynamic_filter(x, filters, 3, dilation=2, padding=2)
        return near - far


class Filter1d(torch.nn.Module):
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
        expected = TwoFilters()(x, filters).numpy()
        feeds = {"x": x.numpy(), "filters": filters.numpy()}
        (got,) = run(model, feeds)
        np.testing.assert_allclose(got, expected, atol=ATOL, rtol=RTOL)
        for variant in ("shift_sum", "conv_unfold", "nhwc_shift_sum"):
            lowered = convlower.lower(model, [f"DynamicFilter={variant}"])
            assert [n.variant for n in lowered.nodes] == [variant, variant]
            (got,) = run(lowered.model, feeds)
            np.testing.assert_allclose(got, expected, atol=ATOL, rtol=RTOL, err_msg=variant)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_export_of_a_1d_filter_runs_before_and_after_lowering(dynamo: bool) -> None:
    x, filters = torch.randn(2, 3, 17), torch.randn(2, 5, 9)
    expected = Filter1d()(x, filters).numpy()
    model = convlower.export(Filter1d().eval(), (x, filters), dynamo=dynamo)
    feeds = {"x": x.numpy(), "filters": filters.numpy()}
    np.testing.assert_allclose(run(model, feeds)[0], expected, atol=ATOL, rtol=RTOL)
    lowered = convlower.lower(model, ["DynamicFilter=concat_shifts"]).model
    np.testing.assert_allclose(run(lowered, feeds)[0], expected, atol=ATOL, rtol=RTOL)


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
    np.testing.assert_allclose(run(after_surgery, feeds)[0], run(model, feeds)[0])
    assert attach_functions(after_surgery) == after_surgery


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
