"""The PixelAdaptiveConv op: every variant and the model-local function body against a NumPy oracle
written from the definition, and pacnet's `pacconv2d` idiom exported by both torch exporters,
recognized, run on onnxruntime and lowered, against torch eager. Look-alikes stay as they are.

Real torch.onnx.export, real onnxruntime (CPU), models written under tmp_path; no mocks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import convlower
from convlower.cli import main
from convlower.inspect import inspect_model
from convlower.modelio import runtime_compatible
from convlower.passes import FAMILIES, NotLowerable
from convlower.passes.dynamic_filter import SlidingWindow
from convlower.passes.local_functions import DOMAIN, attach_functions
from convlower.passes.pixel_adaptive_conv import make_spec
from convlower.rewrite import import_graph
from tests.helpers import op_types, run, single_node_model, windows

torch = pytest.importorskip("torch")
F = torch.nn.functional
nn = torch.nn
from convlower.models.idioms import PixelAdaptive  # noqa: E402  (imports torch)


OP = "PixelAdaptiveConv"
VARIANTS = FAMILIES["pixeladaptiveconv"].variant_names
SHAPE_GENERIC = [v for v in VARIANTS if v != "unfold_einsum"]
EXPORTERS = [pytest.param(False, 17, id="legacy-opset17"), pytest.param(True, 18, id="dynamo-opset18")]
ATOL = RTOL = 1e-4


# --- the oracle, from the definition -------------------------------------------------------------------


def oracle(x: np.ndarray, kernel: np.ndarray, w: np.ndarray, bias: np.ndarray | None, window: SlidingWindow) -> np.ndarray:
    """`Y[n, o, p] = B[o] + sum_c sum_k W[o, c, k] * K[n, c // (C/G), k, p] * Xpad[n, c, p*stride + k*dilation]`,
    one tap at a time, in float64."""
    rank = window.rank
    x, kernel, w = (a.astype(np.float64) for a in (x, kernel, w))
    n, c = x.shape[:2]
    out = window.output_size(x.shape[2:])
    padded = np.pad(x, [(0, 0), (0, 0)] + [(window.pads[i], window.pads[i + rank]) for i in range(rank)])
    per_channel = np.repeat(kernel, c // kernel.shape[1], axis=1)  # [N, C, K, *S_out]
    y = np.zeros((n, w.shape[0], *out))
    for k, offset in enumerate(window.offsets()):
        index = tuple(
            slice(o * d, o * d + (size - 1) * s + 1, s) for o, d, s, size in zip(offset, window.dilations, window.strides, out)
        )
        modulated = padded[(slice(None), slice(None), *index)] * per_channel[:, :, k]
        y += np.einsum("nc...,oc->no...", modulated, w.reshape(w.shape[0], c, -1)[:, :, k])
    if bias is not None:
        y += bias.astype(np.float64).reshape(-1, *(1,) * rank)
    return y


def test_oracle_with_a_constant_kernel_is_torch_conv() -> None:
    """A kernel of ones everywhere makes PAC a plain convolution: torch's conv checks the oracle."""
    window = SlidingWindow((3, 2), (2, 1), (1, 2), (1, 0, 2, 1))
    x, w, bias = (torch.randn(*shape, dtype=torch.float64) for shape in ((2, 4, 7, 8), (5, 4, 3, 2), (5,)))
    out = window.output_size((7, 8))
    kernel = np.ones((2, 1, 6, *out))
    expected = F.conv2d(F.pad(x, (0, 1, 1, 2)), w, bias, stride=(2, 1), dilation=(1, 2))
    np.testing.assert_allclose(oracle(x.numpy(), kernel, w.numpy(), bias.numpy(), window), expected.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dilation", [1, 2])
def test_oracle_is_pacnet_pacconv2d(dilation: int) -> None:
    module = PixelAdaptive(3, 5, 3, dilation=dilation).double().eval()
    x, kernel = torch.randn(2, 3, 6, 7, dtype=torch.float64), torch.randn(2, 1, 3, 3, 6, 7, dtype=torch.float64)
    window = SlidingWindow((3, 3), (1, 1), (dilation,) * 2, (dilation,) * 4)
    with torch.inference_mode():
        expected = module(x, kernel).numpy()
    weight, bias = module.weight.detach().numpy(), module.bias.detach().numpy()
    got = oracle(x.numpy(), kernel.reshape(2, 1, 9, 6, 7).numpy(), weight, bias, window)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


# --- single-node models ----------------------------------------------------------------------------------


@st.composite
def pac_cases(draw: st.DrawFn) -> dict:
    """Ranks 1 and 2, kernels 1..3, strides and dilations 1..2, asymmetric pads, G in {1, C, a
    divisor}, with and without bias; the kernel always fits the padded input."""
    rank = draw(st.sampled_from([1, 2]))
    small = st.integers(1, 2)
    window, spatial = draw(windows(rank, slack=4))
    groups = draw(st.sampled_from([1, 2, 3]))
    channels = groups * draw(st.integers(1, 2))
    return dict(window=window, x_shape=(draw(small), channels, *spatial), groups=groups,
                out_channels=draw(st.integers(1, 4)), bias=draw(st.booleans()))


def arrays(window: SlidingWindow, x_shape: tuple, groups: int, out_channels: int, bias: bool, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = window.output_size(x_shape[2:])
    return {
        "x": rng.standard_normal(x_shape).astype(np.float32),
        "k": rng.standard_normal((x_shape[0], groups, window.taps, *out)).astype(np.float32),
        "w": rng.standard_normal((out_channels, x_shape[1], *window.kernel_shape)).astype(np.float32),
        "b": rng.standard_normal(out_channels).astype(np.float32) if bias else None,
    }


def canonical_model(
    window: SlidingWindow, x_shape: tuple, k_shape: tuple, w: np.ndarray, b: np.ndarray | None, *, weight_input: bool = False,
    elem_type: int = onnx.TensorProto.FLOAT,
) -> onnx.ModelProto:
    """One convlower.PixelAdaptiveConv node with its function; W (and B) initializers unless `weight_input`."""
    inputs: list = [("x", x_shape), ("k", k_shape), ("w", w.shape if weight_input else w)]
    if b is not None:
        inputs.append(("b", b))
    model = single_node_model(OP, inputs, len(x_shape), attrs=window.attrs(), opset=18, domain=DOMAIN, elem_type=elem_type)
    return attach_functions(model)


def assert_body_and_variants_match(model: onnx.ModelProto, feeds: dict, expected: np.ndarray, variants: list[str]) -> None:
    (body,) = run(model, feeds)
    np.testing.assert_allclose(body, expected, atol=ATOL, rtol=RTOL, err_msg="function body")
    for variant in variants:
        result = convlower.lower(model, [f"{OP}={variant}"])
        assert [n.variant for n in result.nodes] == [variant], result.nodes
        assert not [n for n in result.model.graph.node if n.domain == DOMAIN]
        (got,) = run(result.model, feeds)
        np.testing.assert_allclose(got, expected, atol=ATOL, rtol=RTOL, err_msg=variant)


@settings(max_examples=12, deadline=None)
@given(case=pac_cases(), weight_input=st.booleans())
def test_every_variant_and_the_function_body_match_the_oracle(case: dict, weight_input: bool) -> None:
    """Weights as initializers (rearranged in NumPy) or as graph inputs (rearranged by nodes)."""
    a = arrays(**case)
    model = canonical_model(case["window"], a["x"].shape, a["k"].shape, a["w"], a["b"], weight_input=weight_input)
    expected = oracle(a["x"], a["k"], a["w"], a["b"], case["window"])
    assert_body_and_variants_match(model, {k: v for k, v in a.items() if v is not None}, expected, VARIANTS)


@pytest.mark.parametrize("variant", SHAPE_GENERIC)
def test_variants_keep_symbolic_batch_and_spatial_dims(variant: str) -> None:
    window = SlidingWindow((3, 3), (2, 1), (1, 2), (1, 2, 0, 2))
    weights = arrays(window, (1, 4, 7, 6), 2, 3, True)
    model = canonical_model(window, ("N", 4, "H", "W"), ("N", 2, 9, "Ho", "Wo"), weights["w"], weights["b"])
    lowered = convlower.lower(model, [f"{OP}={variant}"]).model
    assert [d.dim_param for d in lowered.graph.input[0].type.tensor_type.shape.dim] == ["N", "", "H", "W"]
    for seed, x_shape in enumerate([(1, 4, 7, 6), (3, 4, 9, 11)]):
        a = arrays(window, x_shape, 2, 3, True, seed=seed)
        (got,) = run(lowered, {"x": a["x"], "k": a["k"]})
        np.testing.assert_allclose(got, oracle(a["x"], a["k"], weights["w"], weights["b"], window), atol=ATOL, rtol=RTOL)


def test_unfold_einsum_keeps_a_symbolic_batch() -> None:
    """Its Gather indices need the spatial extents, not the batch."""
    window = SlidingWindow((2, 3), (1, 2), (2, 1), (1, 0, 0, 1))
    weights = arrays(window, (1, 3, 6, 7), 3, 2, False)
    model = canonical_model(window, ("N", 3, 6, 7), ("N", *weights["k"].shape[1:]), weights["w"], None)
    lowered = convlower.lower(model, [f"{OP}=unfold_einsum"]).model
    for seed, batch in enumerate((1, 3)):
        a = arrays(window, (batch, 3, 6, 7), 3, 2, False, seed=seed)
        (got,) = run(lowered, {"x": a["x"], "k": a["k"]})
        np.testing.assert_allclose(got, oracle(a["x"], a["k"], weights["w"], None, window), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("elem_type, tolerance", [(onnx.TensorProto.DOUBLE, 1e-12), (onnx.TensorProto.FLOAT16, 2e-2)])
def test_function_body_runs_for_any_shape_and_float_type(bias: bool, elem_type: int, tolerance: float) -> None:
    """One body serves every node with these attributes, the bias given or not (Gemm's optional C)."""
    window = SlidingWindow((3,), (2,), (1,), (1, 0))
    inputs: list = [("x", ("N", "C", "L")), ("k", ("N", "G", 3, "M")), ("w", ("O", "C", 3))]
    inputs += [("b", ("O",))] if bias else []
    model = single_node_model(OP, inputs, 3, attrs=window.attrs(), opset=18, domain=DOMAIN, elem_type=elem_type)
    attach_functions(model)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    for x_shape, groups, out_channels in (((2, 6, 11), 3, 4), ((1, 4, 4), 4, 1)):
        drawn = arrays(window, x_shape, groups, out_channels, bias)
        a = {k: v.astype(dtype) for k, v in drawn.items() if v is not None}
        (got,) = run(model, a)
        assert got.dtype == dtype
        expected = oracle(a["x"], a["k"], a["w"], a.get("b"), window)
        np.testing.assert_allclose(got.astype(np.float64), expected, rtol=tolerance, atol=tolerance)


def test_spec_and_reasons_a_variant_does_not_apply() -> None:
    window = SlidingWindow((3, 3), (1, 1), (1, 1), (1, 1, 1, 1))
    w = np.zeros((5, 4, 3, 3), np.float64)
    model = canonical_model(window, (2, 4, "H", 8), (2, 2, 9, "H", 8), w, None, elem_type=onnx.TensorProto.DOUBLE)
    (node,) = gs.import_onnx(model).nodes
    spec = make_spec(node, 18)
    assert (spec.batch, spec.channels, spec.groups, spec.out_channels, spec.bias) == (2, 4, 2, 5, False)
    assert (spec.in_spatial, spec.out_spatial) == ((None, 8), (None, 8))
    assert spec.key() == make_spec(node, 18).key()
    reasons = {v.name: v.why_not(spec) for v in FAMILIES["pixeladaptiveconv"].variants}
    assert reasons["shift_modulate_matmul"] is None and reasons["modulated_im2col"] is None
    assert "float32 only" in reasons["conv_unfold"] and "float32 only" in reasons["shift_modulate_conv"]
    assert "static" in reasons["unfold_einsum"]


@pytest.mark.parametrize(
    "k_shape, w_shape, b_shape, reason",
    [
        ((1, 1, 8, 6, 6), (3, 4, 3, 3), None, "K has 8 taps"),
        ((1, 3, 9, 6, 6), (3, 4, 3, 3), None, "not a multiple of the kernel groups"),
        ((1, 1, 9, 4, 4), (3, 4, 3, 3), None, "is not the output extent"),
        ((1, 1, 9, 6, 6), (3, 4, 3, 2), None, "is not kernel_shape"),
        ((1, 1, 9, 6, 6), (3, 2, 3, 3), None, "X has 4 channels, W expects 2"),
        ((1, 1, 9, 6, 6), ("O", 4, 3, 3), None, "static shape"),
        ((1, 1, 9, 6, 6), (3, 4, 3, 3), (4,), "B must have shape"),
        ((1, "G", 9, 6, 6), (3, 4, 3, 3), None, "group axis"),
    ],
)
def test_nodes_that_cannot_be_described_say_why(k_shape: tuple, w_shape: tuple, b_shape: tuple | None, reason: str) -> None:
    inputs: list = [("x", (1, 4, 6, 6)), ("k", k_shape), ("w", w_shape)] + ([("b", b_shape)] if b_shape else [])
    model = single_node_model(OP, inputs, 4, attrs={"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, domain=DOMAIN)
    (node,) = gs.import_onnx(model).nodes
    with pytest.raises(NotLowerable, match=reason):
        make_spec(node, 18)


# --- pacnet's pacconv2d, exported ----------------------------------------------------------------------


def export(
    module: nn.Module, inputs: tuple, dynamo: bool, opset: int, path: Path, dynamic: bool = False
) -> tuple[onnx.ModelProto, dict, np.ndarray]:
    """The module exported by plain torch.onnx.export (batch, height and width symbolic when
    `dynamic`), its feeds and torch eager's output."""
    module.eval()
    names = [f"in{i}" for i in range(len(inputs))]
    kwargs: dict = {}
    if dynamic and dynamo:
        batch, height, width = torch.export.Dim("batch"), torch.export.Dim("height"), torch.export.Dim("width")
        kwargs["dynamic_shapes"] = tuple(
            {0: batch, t.dim() - 2: height, t.dim() - 1: width} for t in inputs
        )
    elif dynamic:
        axes = {name: {0: "batch", t.dim() - 2: "height", t.dim() - 1: "width"} for name, t in zip(names, inputs)}
        kwargs["dynamic_axes"] = {**axes, "y": {0: "batch", 2: "height", 3: "width"}}
    torch.onnx.export(module, inputs, path, dynamo=dynamo, opset_version=opset, input_names=names, output_names=["y"], **kwargs)
    with torch.inference_mode():
        expected = module(*inputs).numpy()
    return onnx.load(path), {n: t.numpy() for n, t in zip(names, inputs)}, expected


def recognized(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as recognition leaves it, canonical nodes carried by their functions."""
    return runtime_compatible(attach_functions(gs.export_onnx(import_graph(model), do_type_check=False)))


def canonical_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in recognized(model).graph.node if n.domain == DOMAIN]


def pac_inputs(batch: int = 2, channels: int = 4, size: tuple[int, int] = (7, 6), groups: int = 1) -> tuple:
    """X and a 3x3 kernel `[N, G, 3, 3, H, W]` as pacnet's layer takes them."""
    return torch.randn(batch, channels, *size), torch.randn(batch, groups, 3, 3, *size)


@pytest.mark.parametrize("dynamo, opset", EXPORTERS)
@pytest.mark.parametrize("dilation, bias", [(1, True), (2, False), (2, True)])
def test_pacnet_layer_is_recognized_run_and_lowered(dilation: int, bias: bool, dynamo: bool, opset: int, tmp_path: Path) -> None:
    model, feeds, expected = export(PixelAdaptive(4, 8, 3, dilation, bias), pac_inputs(), dynamo, opset, tmp_path / "pac.onnx")
    as_recognized = recognized(model)
    (node,) = [n for n in as_recognized.graph.node if n.domain == DOMAIN]
    assert node.op_type == OP and node.input[0] == "in0" and len(node.input) == (4 if bias else 3)
    assert "Einsum" not in op_types(as_recognized) and "Add" not in op_types(as_recognized)
    np.testing.assert_allclose(run(as_recognized, feeds)[0], expected, atol=ATOL, rtol=RTOL)
    for variant in VARIANTS:
        result = convlower.lower(model, [f"{OP}={variant}"])
        assert [n.variant for n in result.nodes] == [variant], result.nodes
        np.testing.assert_allclose(run(result.model, feeds)[0], expected, atol=ATOL, rtol=RTOL, err_msg=variant)


def test_optimize_runs_on_the_pacnet_layer(tmp_path: Path) -> None:
    model, feeds, expected = export(PixelAdaptive(4, 8, 3, 2), pac_inputs(1), True, 18, tmp_path / "pac.onnx")
    result = convlower.optimize(model, guard=False, cache=None)
    (entry,) = [n for n in result.report.nodes if n.op == OP]
    assert {name: v["status"] for name, v in entry.variants.items()} == {name: "ok" for name in VARIANTS}
    assert entry.recognized and entry.chosen in VARIANTS, entry.chosen  # a recognized node takes its fastest variant
    assert OP not in {n.op_type for n in result.model.graph.node}
    np.testing.assert_allclose(run(result.model, feeds)[0], expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("dynamo, opset", EXPORTERS)
def test_pacnet_layer_under_symbolic_batch_and_spatial_dims(dynamo: bool, opset: int, tmp_path: Path) -> None:
    """Recognized once for every size: the recognized, optimized (tuned at one profile) and lowered
    models keep the symbolic dims and equal torch at two other sizes."""
    module = PixelAdaptive(4, 6, 3, 2).eval()
    model, _, _ = export(module, pac_inputs(2, size=(8, 7)), dynamo, opset, tmp_path / "pac.onnx", dynamic=True)
    assert [n.op_type for n in canonical_nodes(model)] == [OP]
    profile = {"in0": (2, 4, 16, 12), "in1": (2, 1, 3, 3, 16, 12)}
    optimized = convlower.optimize(model, input_shapes=profile, guard=False, cache=None)
    (entry,) = optimized.report.nodes
    assert entry.variants["unfold_einsum"]["status"] == "not_applicable"
    assert all(entry.variants[v]["status"] == "ok" for v in SHAPE_GENERIC), entry.variants
    lowerings = {variant: convlower.lower(model, [f"{OP}={variant}"]).model for variant in SHAPE_GENERIC}
    for variant, lowered in {"recognized": recognized(model), "optimized": optimized.model, **lowerings}.items():
        dims = [d.dim_param or d.dim_value for d in lowered.graph.input[0].type.tensor_type.shape.dim]
        assert isinstance(dims[0], str) and isinstance(dims[2], str) and isinstance(dims[3], str), dims
        for batch, size in ((1, (8, 7)), (3, (11, 13))):
            x, kernel = pac_inputs(batch, size=size)
            with torch.inference_mode():
                expected = module(x, kernel).numpy()
            (got,) = run(lowered, {"in0": x.numpy(), "in1": kernel.numpy()})
            np.testing.assert_allclose(got, expected, atol=ATOL, rtol=RTOL, err_msg=variant)


class GuidedPac(nn.Module):
    """pacnet's joint filtering: a Gaussian kernel from guidance features (its `packernel2d`: unfold
    the guide, distance to the centre tap, exp), then `pacconv2d`."""

    def __init__(self):
        super().__init__()
        self.pac = PixelAdaptive(3, 4, 3)

    def forward(self, x, guide):
        n, c, h, w = guide.shape
        cols = F.unfold(guide, 3, padding=1).view(n, c, 3, 3, h, w)
        diff = cols - cols[:, :, 1:2, 1:2]
        return self.pac(x, torch.exp(-0.5 * (diff * diff).sum(dim=1, keepdim=True)))


@pytest.mark.parametrize("dynamo, opset", EXPORTERS)
def test_pacnet_joint_filter_with_its_guidance_kernel(dynamo: bool, opset: int, tmp_path: Path) -> None:
    """The guide's unfold becomes a plain Unfold, the PAC a PixelAdaptiveConv; both lower."""
    inputs = (torch.randn(2, 3, 8, 7), torch.randn(2, 2, 8, 7))
    model, feeds, expected = export(GuidedPac(), inputs, dynamo, opset, tmp_path / "guided.onnx")
    assert sorted(n.op_type for n in canonical_nodes(model)) == [OP, "Unfold"]
    np.testing.assert_allclose(run(recognized(model), feeds)[0], expected, atol=ATOL, rtol=RTOL)
    result = convlower.lower(model, [f"{OP}=shift_modulate_matmul", "Unfold=slice_concat"])
    assert sorted(n.variant for n in result.nodes) == ["shift_modulate_matmul", "slice_concat"]
    np.testing.assert_allclose(run(result.model, feeds)[0], expected, atol=ATOL, rtol=RTOL)


# --- other ways of writing it, recognized ----------------------------------------------------------------


class PacVariants(nn.Module):
    """pacnet's layer written otherwise: merged taps (`view(n, c, k*k, h, w)`, weight `[O, C, k*k]`),
    a weight whose letters come in another order, a per-channel kernel (G = C), a kernel per group
    of channels (G = 2 of C = 4), a weight that is a graph input, or a bias of another shape."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.weight = nn.Parameter(torch.randn(5, 4, 3, 3) / 6)
        self.bias = nn.Parameter(torch.randn(5))

    def forward(self, x, kernel, *weight):
        n, c, h, w = x.shape
        cols = F.unfold(x, 3, padding=1)
        if self.form == "merged_taps":
            product = cols.view(n, c, 9, h, w) * kernel.view(n, 1, 9, h, w)
            return torch.einsum("nckhw,ock->nohw", product, self.weight.view(5, 4, 9))
        if self.form == "two_kernel_groups":  # a kernel per group of 2 channels: G = 2
            grouped = cols.view(n, 2, 2, 3, 3, h, w) * kernel.view(n, 2, 1, 3, 3, h, w)
            return torch.einsum("igaklmn,ogakl->iomn", grouped, self.weight.view(5, 2, 2, 3, 3))
        product = cols.view(n, c, 3, 3, h, w) * kernel
        if self.form == "weight_order":
            return torch.einsum("ijklmn,lkjo->iomn", product, self.weight.permute(3, 2, 1, 0))
        if self.form == "weight_input":
            return torch.einsum("ijklmn,ojkl->iomn", product, weight[0])
        y = torch.einsum("ijklmn,ojkl->iomn", product, self.weight)
        return y + self.bias.view(5, 1, 1) if self.form == "bias_3d" else y + self.bias.view(1, 5, 1, 1)


@pytest.mark.parametrize("dynamo, opset", EXPORTERS)
@pytest.mark.parametrize(
    "form, groups, extra",
    [("merged_taps", 1, 0), ("weight_order", 1, 0), ("per_channel", 4, 0), ("two_kernel_groups", 2, 0),
     ("weight_input", 1, 1), ("bias_3d", 1, 0)],
)
def test_other_forms_are_recognized(form: str, groups: int, extra: int, dynamo: bool, opset: int, tmp_path: Path) -> None:
    """A weight that is not constant (a graph input here) is recognized too: W becomes a node input."""
    inputs = pac_inputs(2, 4, (6, 5), groups) + ((torch.randn(5, 4, 3, 3),) if extra else ())
    model, feeds, expected = export(PacVariants(form), inputs, dynamo, opset, tmp_path / "form.onnx")
    (node,) = [n for n in import_graph(model).nodes if n.domain == DOMAIN]
    assert node.op == OP and (node.inputs[2].name == "in2") == (form == "weight_input")
    assert node.inputs[1].shape[1:3] == [groups, 9] and list(node.inputs[2].shape) == [5, 4, 3, 3]
    np.testing.assert_allclose(run(recognized(model), feeds)[0], expected, atol=ATOL, rtol=RTOL)
    for variant in ("shift_modulate_matmul", "unfold_einsum"):
        lowered = convlower.lower(model, [f"{OP}={variant}"]).model
        np.testing.assert_allclose(run(lowered, feeds)[0], expected, atol=ATOL, rtol=RTOL, err_msg=variant)


# --- look-alikes, left alone -------------------------------------------------------------------------------


class LookAlike(nn.Module):
    """Close to pacnet's layer, but not a PAC."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.weight = nn.Parameter(torch.randn(5, 4, 3, 3))

    def forward(self, x, kernel):
        n, c, h, w = x.shape
        if self.form == "inner_channel_kernel":  # a kernel per position within each group of channels
            grouped = F.unfold(x, 3, padding=1).view(n, 2, 2, 3, 3, h, w) * kernel.view(n, 1, 2, 3, 3, h, w)
            return torch.einsum("igaklmn,ogakl->iomn", grouped, self.weight.view(5, 2, 2, 3, 3))
        product = F.unfold(x, 3, padding=1).view(n, c, 3, 3, h, w) * kernel
        if self.form == "sums_other_axes":  # keeps the kernel's column axis
            return torch.einsum("ijklmn,ojk->iolmn", product, self.weight[:, :, :, 0])
        if self.form == "other_output_order":
            return torch.einsum("ijklmn,ojkl->ionm", product, self.weight)
        if self.form == "sums_spatial":
            return torch.einsum("ijklmn,ojkl->iom", product, self.weight)
        return torch.einsum("ijklmn,ojkl->iomn", product, self.weight)


@pytest.mark.parametrize("dynamo, opset", EXPORTERS)
@pytest.mark.parametrize(
    "form, kernel_shape",
    [
        ("sums_other_axes", (2, 1, 3, 3, 6, 5)),
        ("other_output_order", (2, 1, 3, 3, 6, 5)),
        ("sums_spatial", (2, 1, 3, 3, 6, 5)),
        ("pac", (1, 1, 3, 3, 6, 5)),  # the kernel broadcast over the batch
        ("pac", (2, 1, 3, 3, 1, 5)),  # the kernel broadcast over rows
        ("inner_channel_kernel", (2, 2, 3, 3, 6, 5)),
    ],
)
def test_look_alikes_are_left_alone(form: str, kernel_shape: tuple, dynamo: bool, opset: int, tmp_path: Path) -> None:
    inputs, module = (torch.randn(2, 4, 6, 5), torch.randn(kernel_shape)), LookAlike(form)
    model, feeds, expected = export(module, inputs, dynamo, opset, tmp_path / "m.onnx")
    assert OP not in [n.op_type for n in canonical_nodes(model)]
    assert convlower.lower(model, [f"{OP}=shift_modulate_matmul"]).nodes == []
    np.testing.assert_allclose(run(recognized(model), feeds)[0], expected, atol=ATOL, rtol=RTOL)


def test_a_bias_that_is_not_a_constant_stays_an_add(tmp_path: Path) -> None:
    class RuntimeBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.pac = PixelAdaptive(4, 5, 3, bias=False)

        def forward(self, x, kernel, bias):
            return self.pac(x, kernel) + bias.view(1, -1, 1, 1)

    model, feeds, expected = export(RuntimeBias(), pac_inputs() + (torch.randn(5),), True, 18, tmp_path / "rb.onnx")
    as_recognized = recognized(model)
    (node,) = [n for n in as_recognized.graph.node if n.domain == DOMAIN]
    assert len(node.input) == 3 and "Add" in op_types(as_recognized)
    np.testing.assert_allclose(run(as_recognized, feeds)[0], expected, atol=ATOL, rtol=RTOL)


# --- the command line ---------------------------------------------------------------------------------------


def test_inspect_lower_and_optimize_on_the_command_line_know_the_op(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "pac.onnx"
    model, feeds, expected = export(PixelAdaptive(4, 8, 3), pac_inputs(), False, 17, path)
    (info,) = [i for i in inspect_model(model) if i.op == OP]
    assert set(info.variants) == set(VARIANTS) and all(why is None for why in info.variants.values())
    assert main(["inspect", str(path)]) == 0 and OP in capsys.readouterr().out
    target = tmp_path / "lowered.onnx"
    assert main(["lower", str(path), "--variant", "pixeladaptiveconv=modulated_im2col", "-o", str(target)]) == 0
    assert "modulated_im2col" in capsys.readouterr().out
    np.testing.assert_allclose(run(onnx.load(target), feeds)[0], expected, atol=ATOL, rtol=RTOL)
    report = tmp_path / "report.json"
    args = ["--variants", "PixelAdaptiveConv=shift_modulate_matmul", "--no-cache", "--no-guard", "--report", str(report)]
    assert main(["optimize", str(path), "-o", str(target), *args]) == 0
    (entry,) = [n for n in json.loads(report.read_text())["nodes"] if n["op"] == OP]
    assert {name for name, v in entry["variants"].items() if v["status"] == "ok"} == {"shift_modulate_matmul"}
    np.testing.assert_allclose(run(onnx.load(target), feeds)[0], expected, atol=ATOL, rtol=RTOL)


def test_the_look_alikes_own_pac_form_is_recognized(tmp_path: Path) -> None:
    """The control for the look-alikes above: the same module, written as a PAC, is recognized."""
    inputs = (torch.randn(2, 4, 6, 5), torch.randn(2, 1, 3, 3, 6, 5))
    model, feeds, expected = export(LookAlike("pac"), inputs, True, 18, tmp_path / "m.onnx")
    assert [n.op_type for n in canonical_nodes(model)] == [OP]
    np.testing.assert_allclose(run(recognized(model), feeds)[0], expected, atol=ATOL, rtol=RTOL)
