"""Conv variants: every one agrees with Conv itself across the whole attribute space.

References: the official ONNX conformance cases' expected outputs; onnxruntime's own Conv on the
same model for hypothesis-generated nodes (onnx.reference where onnxruntime has no kernel: dilated
SAME_* pads, float64); and onnx.reference for a float16 sample.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto
from onnx.backend.test.case.node import collect_testcases
from onnx.reference import ReferenceEvaluator

import convlower
from convlower.cli import main
from convlower.errors import UsageError, VerificationError
from convlower.models.builders import conv_block
from convlower.passes import NotLowerable, family_for
from convlower.passes.conv import ConvSpec, make_spec
from convlower.rewrite import remaining_ops
from convlower.runner import Runner
from convlower.testing import assert_equivalent
from convlower.verify import tolerances
from tests.helpers import op_types, run, single_node_model

CONV = family_for("Conv")
VARIANTS = CONV.variant_names
STATIC_PAD_VARIANTS = ["im2col", "shift_matmul", "einsum"]
"""The variants that apply to every Conv whose pads are known at rewrite time (opset >= 12)."""
LAYOUTS_2D = ["conv2d_row", "conv2d_column"]
"""The variants that run a 1-D Conv as a 2-D one: they apply to every 1-D Conv."""
KEEPS_A_CONV = {"native", *LAYOUTS_2D}
"""The variants whose lowering is itself a Conv: like Conv, they take SAME_* pads left to run time,
and onnxruntime refuses them where it refuses Conv."""

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    CONFORMANCE = [c for c in collect_testcases() if any(n.op_type == "Conv" for n in c.model.graph.node)]


# ---- checks shared by every test ---------------------------------------------------------------


def assert_well_formed(original: onnx.ModelProto, lowered: onnx.ModelProto) -> None:
    """Full checker, unique names, no dead nodes, and the original's interface kept exactly.

    Nodes the original left unnamed (the conformance cases' do) may stay so; every node a
    lowering adds is named.
    """
    onnx.checker.check_model(lowered, full_check=True)
    graph = lowered.graph
    node_names = [n.name for n in graph.node if n.name]
    assert len(set(node_names)) == len(node_names), node_names
    assert len(graph.node) - len(node_names) <= sum(not n.name for n in original.graph.node)
    produced = [o for n in graph.node for o in n.output if o] + [t.name for t in graph.initializer]
    produced += [i.name for i in graph.input]
    assert len(set(produced)) == len(produced), "a tensor name is defined twice"
    consumed = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    assert not [n.name for n in graph.node if not set(n.output) & consumed], "dead nodes"
    assert not [t.name for t in graph.initializer if t.name not in consumed], "unused initializers"
    for ours, theirs in ((graph.input, original.graph.input), (graph.output, original.graph.output)):
        assert [(v.name, v.type) for v in ours] == [(v.name, v.type) for v in theirs]


def assert_close(actual: np.ndarray, expected: np.ndarray, atol: float | None = None, rtol: float | None = None) -> None:
    """Within convlower's tolerance for the dtype (lowering reorders float sums)."""
    atol, rtol = tolerances(expected.dtype, atol, rtol)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def lower_every_conv(model: onnx.ModelProto, variant: str) -> onnx.ModelProto | None:
    """The model with every Conv lowered by `variant` and checked well formed; None where the
    variant fits none of them (these models hold one Conv, or Convs alike)."""
    result = convlower.lower(model, {"conv": variant})
    if not result.lowered:
        return None
    assert result.nodes and all(n.variant == variant for n in result.nodes), result.nodes
    assert_well_formed(model, result.model)
    return result.model


def loads_in_onnxruntime(model: onnx.ModelProto) -> bool:
    try:
        Runner("cpu", quiet=True).session(model)
    except UsageError:
        return False
    return True


# ---- (a) the official ONNX conformance cases ---------------------------------------------------


def test_the_conformance_cases_are_collected() -> None:
    names = {c.name for c in CONFORMANCE}
    assert {"test_basic_conv_with_padding", "test_conv_with_autopad_same"} <= names and len(names) >= 19


@pytest.mark.parametrize("case", CONFORMANCE, ids=lambda c: c.name)
def test_conformance_case(case) -> None:  # noqa: ANN001 - onnx's TestCase
    """Every applicable variant reproduces the case's expected outputs.

    Cases at an opset this onnxruntime cannot load run on onnx.reference. Float16 outputs get
    convlower's float16 tolerance: a lowering rounds each partial sum to float16, Conv does not.
    The 1-D cases (causal convs) must take the 2-D layouts too. No case has strides equal to its
    kernel and no pads, so `patchify_matmul` is checked by the tests further down only.
    """
    on_ort = loads_in_onnxruntime(case.model)
    input_names = [i.name for i in case.model.graph.input if i.name not in {t.name for t in case.model.graph.initializer}]
    applied = set()
    for variant in VARIANTS:
        model = lower_every_conv(case.model, variant)
        if model is None:
            continue
        applied.add(variant)
        for inputs, expected in case.data_sets:
            feeds = dict(zip(input_names, inputs))
            outputs = run(model, feeds) if on_ort else ReferenceEvaluator(model).run(None, feeds)
            for got, want in zip(outputs, expected):
                loose = want.dtype == np.float16
                assert_close(got, want, None if loose else case.atol, None if loose else case.rtol)
    one_d = conv_rank(case.model) == 1
    assert {"native", *STATIC_PAD_VARIANTS, *(LAYOUTS_2D if one_d else [])} <= applied


def conv_rank(model: onnx.ModelProto) -> int:
    """The number of spatial dims of the model's (first) Conv, read off its weight's inferred shape."""
    inferred = onnx.shape_inference.infer_shapes(model)
    conv = next(n for n in inferred.graph.node if n.op_type == "Conv")
    values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.initializer]
    weight = next(v for v in values if v.name == conv.input[1])
    dims = weight.dims if isinstance(weight, onnx.TensorProto) else weight.type.tensor_type.shape.dim
    return len(dims) - 2


# ---- (b) hypothesis: the whole attribute space against onnxruntime's Conv ----------------------


@dataclass(frozen=True)
class ConvCase:
    """One Conv node and how it sits in its model."""

    batch: int
    in_channels: int
    out_channels: int
    group: int
    spatial: tuple[int, ...]
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    auto_pad: str
    pads: tuple[int, ...] | None
    bias: bool
    kernel_shape_attr: bool
    weights_as_inputs: bool
    dynamic_batch: bool
    dynamic_spatial: bool
    opset: int
    dtype: str = "float32"

    @property
    def elem_type(self) -> int:
        return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(self.dtype))

    def arrays(self, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        shapes = {
            "x": (self.batch, self.in_channels, *self.spatial),
            "w": (self.out_channels, self.in_channels // self.group, *self.kernel),
            "b": (self.out_channels,),
        }
        return {name: rng.standard_normal(shape).astype(self.dtype) for name, shape in shapes.items()}

    def model(self) -> onnx.ModelProto:
        arrays = self.arrays()
        x_dims = ("N" if self.dynamic_batch else self.batch, self.in_channels)
        x_dims += tuple(f"s{i}" for i in range(len(self.spatial))) if self.dynamic_spatial else self.spatial
        names = ["w", "b"] if self.bias else ["w"]
        params = [(n, arrays[n].shape if self.weights_as_inputs else arrays[n]) for n in names]
        attrs: dict = {"strides": list(self.strides), "dilations": list(self.dilations), "group": self.group}
        if self.kernel_shape_attr:
            attrs["kernel_shape"] = list(self.kernel)
        if self.auto_pad != "NOTSET":
            attrs["auto_pad"] = self.auto_pad
        if self.pads is not None:
            attrs["pads"] = list(self.pads)
        model = single_node_model("Conv", [("x", x_dims), *params], attrs=attrs, opset=self.opset, elem_type=self.elem_type)
        model.graph.output[0].CopyFrom(onnx.helper.make_tensor_value_info("y", self.elem_type, self.output_dims()))
        return model

    def output_dims(self) -> tuple[int | str, ...]:
        """Y's shape by the ONNX spec's formulas, symbolic where the input's dims are."""
        if self.dynamic_spatial:
            spatial: tuple[int | str, ...] = tuple(f"o{i}" for i in range(len(self.spatial)))
        elif self.auto_pad.startswith("SAME"):
            spatial = tuple(-(-n // s) for n, s in zip(self.spatial, self.strides))
        else:
            pads = self.pads or (0,) * (2 * len(self.spatial))
            spatial = tuple(
                (n + pads[i] + pads[i + len(self.spatial)] - (k - 1) * d - 1) // s + 1
                for i, (n, k, s, d) in enumerate(zip(self.spatial, self.kernel, self.strides, self.dilations))
            )
        return ("N" if self.dynamic_batch else self.batch, self.out_channels, *spatial)

    def feeds(self) -> dict[str, np.ndarray]:
        arrays = self.arrays()
        return {n: a for n, a in arrays.items() if n == "x" or self.weights_as_inputs}

    @property
    def dilated_same(self) -> bool:
        """onnxruntime refuses SAME_* pads with dilations; onnx.reference follows the ONNX spec."""
        return self.auto_pad.startswith("SAME") and max(self.dilations) > 1

    def reference(self) -> np.ndarray:
        """Conv's own output: onnxruntime's in float32, onnx.reference's in other types and where
        onnxruntime refuses the node."""
        if self.dtype != "float32" or self.dilated_same:
            return ReferenceEvaluator(self.model()).run(None, self.feeds())[0]
        return run(self.model(), self.feeds())[0]

    def output_of(self, lowered: onnx.ModelProto, variant: str) -> np.ndarray:
        """The lowered model's output on onnxruntime; on onnx.reference only where the lowering is a
        Conv that onnxruntime cannot run (float64, or dilated SAME_* pads left to run time)."""
        keeps_refused_conv = variant in KEEPS_A_CONV and (
            self.dtype == "float64" or (self.dilated_same and self.dynamic_spatial)
        )
        if keeps_refused_conv:
            return ReferenceEvaluator(lowered).run(None, self.feeds())[0]
        return run(lowered, self.feeds())[0]


BASE = ConvCase(
    batch=1, in_channels=4, out_channels=8, group=1, spatial=(7, 9), kernel=(3, 3), strides=(1, 1), dilations=(1, 1),
    auto_pad="NOTSET", pads=None, bias=False, kernel_shape_attr=False, weights_as_inputs=False, dynamic_batch=True,
    dynamic_spatial=False, opset=17,
)
"""A plain 3x3 conv that the spec and structure tests vary one field at a time."""


@dataclass(frozen=True)
class Geometry:
    """How a Conv's kernel sits on its input: the ConvCase fields that decide its output's size."""

    spatial: tuple[int, ...]
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    auto_pad: str
    pads: tuple[int, ...] | None


@st.composite
def sliding_windows(draw: st.DrawFn, rank: int, largest_kernel: int) -> Geometry:
    """Any kernel up to `largest_kernel`, strides, dilations, explicit or auto pads, and an input it fits."""
    kernel = tuple(draw(st.lists(st.integers(1, largest_kernel), min_size=rank, max_size=rank)))
    strides = tuple(draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank)))
    dilations = tuple(draw(st.lists(st.integers(1, 2), min_size=rank, max_size=rank)))
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"]))
    pads = None
    if auto_pad == "NOTSET" and draw(st.booleans()):
        pads = tuple(draw(st.lists(st.integers(0, 2), min_size=2 * rank, max_size=2 * rank)))
    extents = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    padding = [0] * rank if pads is None else [pads[i] + pads[i + rank] for i in range(rank)]
    smallest = [1 if auto_pad.startswith("SAME") else max(1, e - p) for e, p in zip(extents, padding)]
    spatial = tuple(draw(st.integers(lo, lo + (6 if rank < 3 else 3))) for lo in smallest)
    return Geometry(spatial, kernel, strides, dilations, auto_pad, pads)


@st.composite
def patch_embeddings(draw: st.DrawFn, rank: int) -> Geometry:
    """Strides equal to a kernel larger than 1x1, no pads (none, zeros, VALID, or SAME_* where the
    size is a multiple of the kernel, so that they resolve to zero), dilation 1; the input 1-3
    patches long per axis plus, unless SAME_*, a remainder the conv leaves unread."""
    largest = 3 if rank < 3 else 2
    kernel = draw(st.lists(st.integers(1, largest), min_size=rank, max_size=rank))
    if max(kernel) == 1:
        kernel[draw(st.integers(0, rank - 1))] = draw(st.integers(2, largest))
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"]))
    pads = (0,) * (2 * rank) if auto_pad == "NOTSET" and draw(st.booleans()) else None
    remainder = (lambda k: st.just(0)) if auto_pad.startswith("SAME") else (lambda k: st.integers(0, k - 1))
    spatial = tuple(k * draw(st.integers(1, 3)) + draw(remainder(k)) for k in kernel)
    return Geometry(spatial, tuple(kernel), tuple(kernel), (1,) * rank, auto_pad, pads)


@st.composite
def conv_cases(draw: st.DrawFn, variant: str, dtypes: tuple[str, ...] = ("float32",)) -> ConvCase:
    """Conv nodes across the attribute space, narrowed to where `variant` applies."""
    rank = 1 if variant in LAYOUTS_2D else draw(st.integers(1, 3))
    if variant == "depthwise_shift":
        groups_kind = "depthwise"
    elif variant == "patchify_matmul":
        groups_kind = "dense"
    else:
        groups_kind = draw(st.sampled_from(["dense", "grouped", "depthwise", "depthwise_multiplier"]))
    if groups_kind.startswith("depthwise"):
        group = in_channels = draw(st.integers(1, 4))
        multiplier = draw(st.integers(2, 3)) if groups_kind == "depthwise_multiplier" else draw(st.integers(1, 2))
        out_channels = in_channels * multiplier
    else:
        group = 1 if groups_kind == "dense" else draw(st.integers(2, 3))
        in_channels = group * draw(st.integers(1, 3))
        out_channels = group * draw(st.integers(1, 3))
    if variant == "patchify_matmul":
        geometry = draw(patch_embeddings(rank))
    else:
        geometry = draw(sliding_windows(rank, largest_kernel=1 if variant == "pointwise_matmul" else (3 if rank < 3 else 2)))
    dynamic_spatial = draw(st.booleans()) and (variant in KEEPS_A_CONV or not geometry.auto_pad.startswith("SAME"))
    return ConvCase(
        batch=draw(st.integers(1, 2)),
        in_channels=in_channels,
        out_channels=out_channels,
        group=group,
        spatial=geometry.spatial,
        kernel=geometry.kernel,
        strides=geometry.strides,
        dilations=geometry.dilations,
        auto_pad=geometry.auto_pad,
        pads=geometry.pads,
        bias=draw(st.booleans()),
        kernel_shape_attr=draw(st.booleans()),
        weights_as_inputs=draw(st.booleans()),
        dynamic_batch=draw(st.booleans()),
        dynamic_spatial=dynamic_spatial,
        opset=draw(st.sampled_from([12, 13, 17, 22] if variant == "einsum" else [11, 13, 17, 22])),
        dtype=draw(st.sampled_from(dtypes)),
    )


@pytest.mark.parametrize("variant", VARIANTS)
@given(data=st.data())
def test_variant_matches_onnxruntime_conv(variant: str, data: st.DataObject) -> None:
    case = data.draw(conv_cases(variant))
    lowered = lower_every_conv(case.model(), variant)
    assert lowered is not None
    assert_close(case.output_of(lowered, variant), case.reference())


# ---- (c) float16 and float64, checked against onnx.reference ----------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@settings(max_examples=25)
@given(data=st.data())
def test_variant_in_float16_and_float64_matches_onnx_reference(variant: str, data: st.DataObject) -> None:
    """onnxruntime's CPU provider has no float64 Conv, and onnx.reference is an independent check
    of float16. The lowered models run on onnxruntime, which has float16 and float64 kernels for
    every op they use (Conv aside)."""
    case = data.draw(conv_cases(variant, dtypes=("float16", "float64")))
    lowered = lower_every_conv(case.model(), variant)
    assert lowered is not None
    assert_close(case.output_of(lowered, variant), case.reference())


# ---- (d) the rewritten model as a whole ---------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_model_of_several_convs_keeps_its_interface(variant: str) -> None:
    """conv_block (dense 3x3, depthwise 3x3/2, 1x1; symbolic batch) lowered where the variant fits:
    not at all by the patch embedding and the 2-D layouts of 1-D Convs, which must leave it as it was."""
    model = conv_block(channels=4, size=8)
    result = convlower.lower(model, {"conv": variant})
    assert_well_formed(model, result.model)
    applied = {n.name for n in result.lowered}
    expected = {"native": 3, "im2col": 3, "shift_matmul": 3, "einsum": 3, "pointwise_matmul": 1, "depthwise_shift": 1,
                "patchify_matmul": 0, "conv2d_row": 0, "conv2d_column": 0}
    assert len(applied) == expected[variant]
    assert len(remaining_ops(result.model, {"Conv"})) == (3 if variant == "native" else 3 - len(applied))
    assert_equivalent(model, result.model, input_shapes={"x": (2, 3, 8, 8)})


PATCH_EMBEDDINGS = {
    "vit_16x16": dataclasses.replace(
        BASE, in_channels=3, out_channels=16, spatial=(64, 64), kernel=(16, 16), strides=(16, 16), bias=True
    ),
    "vit_16x16_ragged": dataclasses.replace(
        BASE, in_channels=3, out_channels=16, spatial=(70, 50), kernel=(16, 16), strides=(16, 16), bias=True
    ),
    "video_2x4x4": dataclasses.replace(
        BASE, in_channels=3, out_channels=8, spatial=(4, 8, 12), kernel=(2, 4, 4), strides=(2, 4, 4), dilations=(1, 1, 1),
        bias=True,
    ),
}
"""Patch embeddings of a ViT (3 -> 16 channels here, 768 in ViT-B) and of a video transformer
(Conv3d); one whose input is no multiple of its patch, so the conv leaves a border unread."""


@pytest.mark.parametrize("name", PATCH_EMBEDDINGS)
def test_a_patch_embedding_becomes_one_matmul(name: str) -> None:
    """Reshape, Transpose, Reshape, MatMul, Add, Reshape: no Conv, one GEMM, and a Slice only to
    drop an unread border."""
    case = PATCH_EMBEDDINGS[name]
    lowered = lower_every_conv(case.model(), "patchify_matmul")
    ops = op_types(lowered)
    assert "Conv" not in ops and ops.count("MatMul") == 1
    assert ops.count("Slice") == (1 if name.endswith("ragged") else 0)
    assert_close(case.output_of(lowered, "patchify_matmul"), case.reference())


def test_a_patch_embedding_on_symbolic_sizes_finds_its_patch_grid_at_run_time() -> None:
    """One lowered model, input sizes that are and are not multiples of the patch: the crop and
    every reshape are computed from the input's shape when it runs."""
    model = dataclasses.replace(PATCH_EMBEDDINGS["vit_16x16"], dynamic_spatial=True).model()
    lowered = lower_every_conv(model, "patchify_matmul")
    assert op_types(lowered).count("MatMul") == 1
    rng = np.random.default_rng(0)
    for shape in [(2, 3, 64, 64), (1, 3, 70, 50), (1, 3, 16, 31)]:
        x = rng.standard_normal(shape).astype(np.float32)
        assert_close(run(lowered, {"x": x})[0], run(model, {"x": x})[0])


@pytest.mark.parametrize(("variant", "kernel_shape"), [("conv2d_row", [1, 3]), ("conv2d_column", [3, 1])])
def test_a_1d_conv_with_same_pads_on_a_symbolic_length_stays_same_in_2d(variant: str, kernel_shape: list[int]) -> None:
    """SAME_* pads that are only known at run time: the 2-D Conv gets the same auto_pad, which
    pads its unit axis by nothing, and agrees with the 1-D Conv at every length."""
    case = dataclasses.replace(
        BASE, group=4, spatial=(11,), kernel=(3,), strides=(2,), dilations=(1,), auto_pad="SAME_LOWER",
        dynamic_spatial=True, bias=True,
    )
    model = case.model()
    lowered = lower_every_conv(model, variant)
    assert op_types(lowered) == ["Unsqueeze", "Conv", "Squeeze"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in lowered.graph.node[1].attribute}
    assert attrs["auto_pad"] == b"SAME_LOWER" and attrs["kernel_shape"] == kernel_shape and "pads" not in attrs
    rng = np.random.default_rng(0)
    for length in (11, 16, 1):
        x = rng.standard_normal((2, 4, length)).astype(np.float32)
        assert_close(run(lowered, {"x": x})[0], run(model, {"x": x})[0])


def test_constant_weights_are_rearranged_at_rewrite_time_and_input_weights_in_the_graph() -> None:
    case = dataclasses.replace(BASE, group=2, out_channels=6, bias=True, dtype="float64")
    as_constants = lower_every_conv(case.model(), "shift_matmul")
    assert not {"Transpose", "Gather"} & {n.op_type for n in as_constants.graph.node}
    assert {t.data_type for t in as_constants.graph.initializer} == {TensorProto.DOUBLE, TensorProto.INT64}
    as_inputs = lower_every_conv(dataclasses.replace(case, weights_as_inputs=True).model(), "shift_matmul")
    assert {"Transpose", "Gather"} <= {n.op_type for n in as_inputs.graph.node}


# ---- specs and why_not --------------------------------------------------------------------------


def conv_node(case: ConvCase) -> gs.Node:
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(case.model()))
    return graph.nodes[0]


def spec_of(**changes) -> ConvSpec:  # noqa: ANN003 - ConvCase fields
    case = dataclasses.replace(BASE, **changes)
    return make_spec(conv_node(case), case.opset)


def test_spec_resolves_every_default() -> None:
    spec = spec_of()
    assert (spec.rank, spec.batch, spec.in_channels, spec.out_channels) == (2, None, 4, 8)
    assert (spec.kernel_shape, spec.strides, spec.dilations, spec.pads) == ((3, 3), (1, 1), (1, 1), (0, 0, 0, 0))
    assert (spec.out_spatial, spec.group, spec.has_bias, spec.dtype) == ((5, 7), 1, False, "float32")
    assert spec.weight_is_constant and not spec.bias_is_constant
    assert spec == spec_of(kernel_shape_attr=True) and hash(spec) == hash(spec_of())
    assert json.loads(spec.key())["pads"] == [0, 0, 0, 0]


@pytest.mark.parametrize(
    ("auto_pad", "spatial", "strides", "dilations", "pads", "out"),
    [
        ("SAME_UPPER", (8, 9), (2, 2), (1, 1), (0, 1, 1, 1), (4, 5)),  # odd total: the extra pad at the end
        ("SAME_LOWER", (8, 9), (2, 2), (1, 1), (1, 1, 0, 1), (4, 5)),  # ... and at the beginning
        ("SAME_UPPER", (7, 9), (1, 1), (2, 1), (2, 1, 2, 1), (7, 9)),  # dilation widens the kernel
        ("VALID", (7, 9), (1, 2), (1, 1), (0, 0, 0, 0), (5, 4)),
    ],
)
def test_spec_resolves_auto_pad(auto_pad: str, spatial: tuple, strides: tuple, dilations: tuple, pads: tuple, out: tuple) -> None:
    spec = spec_of(auto_pad=auto_pad, spatial=spatial, strides=strides, dilations=dilations)
    assert (spec.resolved_pads, spec.out_spatial, spec.auto_pad) == (pads, out, auto_pad)


def test_same_pads_on_dynamic_spatial_dims_are_left_to_run_time() -> None:
    spec = spec_of(auto_pad="SAME_UPPER", dynamic_spatial=True)
    assert spec.pads is None and spec.out_spatial == (None, None)
    with pytest.raises(ValueError, match="only known at run time"):
        spec.resolved_pads
    why_not = {v.name: v.why_not(spec) for v in CONV.variants}
    assert why_not["native"] is None
    assert all("only known at run time" in why_not[v] for v in STATIC_PAD_VARIANTS)


def test_explicit_pads_on_dynamic_spatial_dims_lower_with_every_variant() -> None:
    spec = spec_of(pads=(1, 0, 2, 1), dynamic_spatial=True)
    assert spec.pads == (1, 0, 2, 1) and spec.out_spatial == (None, None)
    assert all(CONV.variant(v).why_not(spec) is None for v in ["native", *STATIC_PAD_VARIANTS])


@pytest.mark.parametrize(
    ("variant", "changes", "reason"),
    [
        ("pointwise_matmul", {}, "kernel 3x3 is not 1x1"),
        ("depthwise_shift", {}, "group=1 with 4 input channels is not depthwise"),
        ("depthwise_shift", {"group": 2}, "group=2 with 4 input channels is not depthwise"),
        ("einsum", {"opset": 11}, "Einsum needs opset 12; the model is opset 11"),
        ("im2col", {"auto_pad": "SAME_LOWER", "dynamic_spatial": True}, "auto_pad=SAME_LOWER on a dynamic spatial dim"),
        ("patchify_matmul", {}, "strides (1, 1) differ from kernel_shape (3, 3)"),
        ("patchify_matmul", {"kernel": (1, 1)}, "kernel 1x1 with stride 1 is pointwise"),
        ("patchify_matmul", {"strides": (3, 3), "dilations": (2, 1)}, "dilations (2, 1) are not 1"),
        ("patchify_matmul", {"strides": (3, 3), "group": 2}, "group=2 is not 1"),
        ("patchify_matmul", {"strides": (3, 3), "pads": (1, 1, 1, 1)}, "pads (1, 1, 1, 1) are not zero"),
        ("patchify_matmul", {"strides": (3, 3), "auto_pad": "SAME_UPPER"}, "pads (1, 0, 1, 0) are not zero"),
        ("patchify_matmul", {"strides": (3, 3), "auto_pad": "SAME_UPPER", "dynamic_spatial": True},
         "auto_pad=SAME_UPPER on a dynamic spatial dim"),
        ("conv2d_row", {}, "rank 2 Conv: the 2-D layouts are for 1-D Convs"),
        ("conv2d_column", {"spatial": (4, 5, 6), "kernel": (3, 3, 3), "strides": (1, 1, 1), "dilations": (1, 1, 1)},
         "rank 3 Conv: the 2-D layouts are for 1-D Convs"),
    ],
)
def test_why_not_says_why(variant: str, changes: dict, reason: str) -> None:
    assert reason in CONV.variant(variant).why_not(spec_of(**changes))


def test_variants_that_fit_say_nothing() -> None:
    assert CONV.variant("pointwise_matmul").why_not(spec_of(kernel=(1, 1), strides=(2, 1))) is None
    assert CONV.variant("depthwise_shift").why_not(spec_of(group=4, out_channels=8)) is None
    patchify = CONV.variant("patchify_matmul")
    assert patchify.why_not(spec_of(strides=(3, 3))) is None
    assert patchify.why_not(spec_of(strides=(3, 3), pads=(0, 0, 0, 0), dynamic_spatial=True)) is None
    assert patchify.why_not(spec_of(strides=(3, 3), auto_pad="SAME_LOWER", spatial=(6, 9))) is None
    one_d_same = spec_of(
        spatial=(9,), kernel=(3,), strides=(2,), dilations=(2,), auto_pad="SAME_UPPER", dynamic_spatial=True
    )
    assert all(CONV.variant(v).why_not(one_d_same) is None for v in LAYOUTS_2D)


def test_node_that_cannot_be_described_is_not_lowerable() -> None:
    bfloat16 = single_node_model("Conv", [("x", (1, 2, 5)), ("w", (2, 2, 3))], opset=22, elem_type=TensorProto.BFLOAT16)
    with pytest.raises(NotLowerable, match="element type bfloat16"):
        make_spec(gs.import_onnx(bfloat16).nodes[0], 22)
    no_rank = single_node_model("Conv", [("x", (1, 2, 5)), ("w", np.ones((2, 2, 3), np.float32))])
    no_rank.graph.input[0].type.tensor_type.ClearField("shape")
    result = convlower.lower(no_rank, {"conv": "im2col"})
    assert result.lowered == [] and "rank is unknown" in result.nodes[0].reason


# ---- (f) the command line and the Python API ---------------------------------------------------


def cli(*argv: object) -> int:
    return main([str(a) for a in argv])


@pytest.fixture
def block_path(tmp_path: Path) -> Path:
    path = tmp_path / "block.onnx"
    onnx.save(conv_block(channels=4, size=8), path)
    return path


def test_cli_lower_then_verify(block_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lowered.onnx"
    assert cli("lower", block_path, "--variant", "conv=im2col", "-o", out, "--no-ops", "Conv") == 0
    assert "lowered 3 of 3 node(s)" in capsys.readouterr().out
    assert remaining_ops(onnx.load(out), {"Conv"}) == []
    assert cli("verify", block_path, out, "--input-shape", "x:2x3x8x8") == 0
    assert "equivalent over 3 input set(s)" in capsys.readouterr().out


def test_cli_no_ops_fails_when_a_conv_is_left(block_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lowered.onnx"
    assert cli("lower", block_path, "--variant", "Conv=depthwise_shift", "-o", out, "--no-ops", "Conv") == 1
    err = capsys.readouterr().err
    assert "2 node(s) of Conv remain" in err and "is not depthwise" in err and "Traceback" not in err
    assert not out.exists()


def test_cli_without_no_ops_leaves_unfit_convs_and_says_why(block_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("lower", block_path, "--variant", "conv=pointwise_matmul", "-o", tmp_path / "out.onnx") == 0
    out = capsys.readouterr().out
    assert "pwconv3 [Conv]: pointwise_matmul" in out and "conv1 [Conv]: left as is: kernel 3x3 is not 1x1" in out


def test_cli_unknown_variant_is_a_usage_error(block_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("lower", block_path, "--variant", "conv=winograd") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Conv has no variant 'winograd'" in err and "im2col" in err


def test_cli_inspect_lists_the_variants_that_apply(block_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("inspect", block_path) == 0
    text = capsys.readouterr().out
    assert "variants: native, im2col, shift_matmul, einsum, depthwise_shift" in text
    assert "variants: native, im2col, shift_matmul, einsum, pointwise_matmul" in text
    assert cli("inspect", block_path, "--json") == 0
    nodes = json.loads(capsys.readouterr().out)["nodes"]
    assert nodes[1]["spec"]["group"] == 4 and nodes[1]["variants"]["depthwise_shift"] is None
    assert nodes[0]["variants"]["pointwise_matmul"] == "kernel 3x3 is not 1x1"


def test_python_lower_raises_under_no_ops() -> None:
    with pytest.raises(VerificationError, match="node\\(s\\) of Conv remain"):
        convlower.lower(conv_block(channels=4, size=8), ["conv=pointwise_matmul"], no_ops=["Conv"])
