"""Two shape profiles on models convlower really lowers: dynamic filters exported with symbolic dims.

The zoo's dynamic-filter models (seed 000's filter, an involution net) and the pacnet layer are
exported by both torch exporters with symbolic batch, height and width, then optimized for two
profiles. Every node is tuned at each profile; the variant that replaces it runs at both, so the
written model must keep the symbolic dims and equal torch eager at both profiles and at a third
shape it was never tuned for. A variant whose subgraph needs static shapes is refused by its
`why_not`, and the reason reaches the report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest

import convlower
from convlower.cli import main
from convlower.passes.local_functions import DOMAIN
from tests.helpers import run
from tests.test_recognize import ATOL, EXPORTERS, RTOL

torch = pytest.importorskip("torch")

from convlower.models.idioms import PixelAdaptive  # noqa: E402 - needs torch
from convlower.models.involution import InvolutionNet  # noqa: E402
from convlower.models.seed_filter import SeedFilter  # noqa: E402

SPATIAL = {0: "batch", 2: "height", 3: "width"}
Shapes = Callable[[int, int, int], dict[str, tuple[int, ...]]]
"""(batch, height, width) -> each input's shape."""


def seed_filter_shapes(n: int, h: int, w: int) -> dict[str, tuple[int, ...]]:
    return {"feature_map": (n, 2, h, w), "filters": (n, 9, h, w)}


def involution_shapes(n: int, h: int, w: int) -> dict[str, tuple[int, ...]]:
    return {"x": (n, 3, h, w)}


def pac_shapes(n: int, h: int, w: int) -> dict[str, tuple[int, ...]]:
    return {"x": (n, 4, h, w), "kernel": (n, 1, 3, 3, h, w)}


MODELS = {
    "seed_filter": (lambda: SeedFilter(3), seed_filter_shapes, {"feature_map": SPATIAL, "filters": SPATIAL}),
    "involution": (lambda: InvolutionNet(width=16, kernel_size=3, group_channels=8), involution_shapes, {"x": SPATIAL}),
}
PROFILES = [(1, 16, 16), (1, 24, 24)]
UNSEEN = (3, 20, 12)
"""A batch and a size neither profile has (a multiple of 4: the involution net halves it twice)."""


def export_symbolic(make: Callable[[], torch.nn.Module], shapes: Shapes, axes: dict, dynamo: bool, opset: int) -> tuple:
    """The module (seeded) and its export with the given axes symbolic, at a size no profile has."""
    torch.manual_seed(0)
    module = make().eval()
    example = tuple(torch.randn(s) for s in shapes(2, 12, 8).values())
    model = convlower.export(module, example, dynamo=dynamo, opset=opset, input_names=list(shapes(1, 1, 1)), dynamic_axes=axes)
    return module, model


def profile_shapes(shapes: Shapes) -> dict[str, list[tuple[int, ...]]]:
    """`input_shapes` for the two profiles: each input's shape at each."""
    return {name: [shapes(*p)[name] for p in PROFILES] for name in shapes(1, 1, 1)}


def declared_dims(values) -> list[list[str | int]]:
    return [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values]


def assert_equals_torch_at(module: torch.nn.Module, model: onnx.ModelProto, shapes: Shapes, sizes: list[tuple[int, int, int]]) -> None:
    rng = np.random.default_rng(1)
    for size in sizes:
        feeds = {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes(*size).items()}
        with torch.inference_mode():
            expected = module(*(torch.from_numpy(a) for a in feeds.values())).numpy()
        np.testing.assert_allclose(run(model, feeds)[0], expected, atol=ATOL, rtol=RTOL, err_msg=f"at {size}")


@pytest.mark.parametrize("dynamo, opset", EXPORTERS)
@pytest.mark.parametrize("name", list(MODELS))
def test_a_dynamic_filter_with_symbolic_dims_is_lowered_for_two_profiles(name: str, dynamo: bool, opset: int) -> None:
    """shift_sum forced (guard off, so timing noise cannot keep the idiom): each DynamicFilter is
    tuned at both profiles and lowered; the written model runs at both and at an unseen shape."""
    make, shapes, axes = MODELS[name]
    module, model = export_symbolic(make, shapes, axes, dynamo, opset)
    assert all(isinstance(dims[axis], str) for dims in declared_dims(model.graph.input) for axis in (0, 2, 3))

    result = convlower.optimize(model, input_shapes=profile_shapes(shapes), cache=None, provider="cpu", guard=False,
                                variants={"DynamicFilter": ["shift_sum"], "conv": ["native"]})
    report = result.report
    assert [p["shapes"] for p in report.profiles] == [{k: list(s) for k, s in shapes(*p).items()} for p in PROFILES]
    filters = [n for n in report.nodes if n.op == "DynamicFilter"]
    assert filters and all(n.recognized and n.chosen == "shift_sum" for n in filters), [(n.name, n.chosen, n.reason) for n in filters]
    for node in filters:
        assert node.profiles is not None and len(node.profiles) == 2
        assert node.profiles[0]["shape"] != node.profiles[1]["shape"], "the node's inputs grow with the profile"
        assert all(p["original_ms"] > 0 and p["variants"]["shift_sum"]["status"] == "ok" and p["variants"]["shift_sum"]["ms"] > 0
                   for p in node.profiles)

    written = result.model
    assert not [n for n in written.graph.node if n.domain == DOMAIN], "every DynamicFilter is lowered"
    assert declared_dims(written.graph.input) == declared_dims(model.graph.input)
    assert declared_dims(written.graph.output) == declared_dims(model.graph.output)
    metadata = {p.key: p.value for p in written.metadata_props}
    assert json.loads(metadata["convlower.profiles"]) == [{k: list(s) for k, s in shapes(*p).items()} for p in PROFILES]
    assert_equals_torch_at(module, written, shapes, [*PROFILES, UNSEEN])


@pytest.mark.parametrize("dynamo, opset", EXPORTERS)
def test_a_variant_that_needs_static_shapes_is_refused_at_every_profile(dynamo: bool, opset: int) -> None:
    """pacnet's layer: `unfold_einsum` bakes the output extents into Gather indices, so under
    symbolic height and width it is refused with its reason in the report; the variant chosen
    among the others runs at both profiles and an unseen shape."""
    shapes_axes = {"x": SPATIAL, "kernel": {0: "batch", 4: "height", 5: "width"}}
    module, model = export_symbolic(lambda: PixelAdaptive(4, 6, 3), pac_shapes, shapes_axes, dynamo, opset)
    result = convlower.optimize(model, input_shapes=profile_shapes(pac_shapes), cache=None, provider="cpu", guard=False)
    (node,) = [n for n in result.report.nodes if n.op == "PixelAdaptiveConv"]
    refused = node.variants["unfold_einsum"]
    assert refused["status"] == "not_applicable" and "static output extents" in refused["reason"]
    assert node.profiles is not None and all("unfold_einsum" not in p["variants"] for p in node.profiles)
    assert node.chosen not in ("original", "unfold_einsum")
    assert all(p["variants"][node.chosen]["status"] == "ok" for p in node.profiles)
    assert declared_dims(result.model.graph.input) == declared_dims(model.graph.input)
    assert_equals_torch_at(module, result.model, pac_shapes, [*PROFILES, UNSEEN])


def test_the_command_line_with_two_inputs_at_two_profiles_and_the_guard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Both of seed 000's inputs named once per profile; the guard on: whatever it keeps, the
    report lists both profiles, and where it kept a lowering it timed the model at both."""
    module, model = export_symbolic(*MODELS["seed_filter"], dynamo=False, opset=17)
    path, out = tmp_path / "seed.onnx", tmp_path / "seed.opt.onnx"
    onnx.save(model, path)
    args = [f"--input-shape={name}:{'x'.join(map(str, shape))}" for p in PROFILES for name, shape in seed_filter_shapes(*p).items()]
    code = main(["optimize", str(path), "-o", str(out), "--no-cache", "--provider", "cpu", *args])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.with_suffix(".json").read_text())
    assert [p["shapes"] for p in report["profiles"]] == [{k: list(s) for k, s in seed_filter_shapes(*p).items()} for p in PROFILES]
    if report["verification"]["unchanged"] is False:
        assert report["verification"]["passed"] is True
        assert {t["profile"] for t in report["guard"]["timings"]} == {0, 1}
        assert all(len(p["interval"]) == 2 and p["interval"][1] > 1 for p in report["profiles"]), "not slower at either"
    written = onnx.load(out)
    assert declared_dims(written.graph.input) == declared_dims(model.graph.input)
    assert_equals_torch_at(module, written, seed_filter_shapes, [*PROFILES, UNSEEN])
