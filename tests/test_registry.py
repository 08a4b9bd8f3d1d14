"""The registry (passes/__init__.py) is the one list of what exists: every family module and every
recognizer module under passes/ appears in it, once; and the reduction reader that recognizers share
reads what the ONNX spec says (passes/matching/reduction.py)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import numpy as np
import onnx_graphsurgeon as gs
import pytest

import convlower.passes as passes
from convlower.passes import FAMILIES, RECOGNIZERS, OpFamily
from convlower.passes.matching.reduction import Reduction, read_reduction

SHARED = {"base", "local_functions", "matching"}
"""The modules of passes/ that define no family."""


def _family_modules() -> list[str]:
    return [info.name for info in pkgutil.iter_modules(passes.__path__) if info.name not in SHARED]


def test_every_family_module_is_registered_once() -> None:
    registered = [family.op_type.lower() for family in FAMILIES.values()]
    assert len(registered) == len(set(registered))
    for name in _family_modules():
        family = importlib.import_module(f"convlower.passes.{name}").FAMILY
        assert isinstance(family, OpFamily)
        assert FAMILIES[family.op_type.lower()] is family, f"passes/{name} is not in the registry"
    assert len(FAMILIES) == len(_family_modules())


def test_every_recognizer_module_sits_with_its_family_and_is_registered_once() -> None:
    """A recognizer module holds one public `recognize_*` function, which RECOGNIZERS lists; none
    is registered twice, and none lives outside a family package."""
    assert len(RECOGNIZERS) == len(set(RECOGNIZERS))
    found = []
    for name in _family_modules():
        package = importlib.import_module(f"convlower.passes.{name}")
        if not hasattr(package, "__path__"):
            continue
        for info in pkgutil.iter_modules(package.__path__):
            assert info.name.startswith("recognize_"), f"passes/{name}/{info.name}.py: a family package holds recognizers only"
            module = importlib.import_module(f"convlower.passes.{name}.{info.name}")
            public = [f for n, f in inspect.getmembers(module, inspect.isfunction)
                      if n.startswith("recognize_") and f.__module__ == module.__name__]
            assert len(public) == 1, f"{module.__name__} defines {len(public)} recognize_* functions"
            found.append(public[0])
    assert sorted(found, key=RECOGNIZERS.index) == RECOGNIZERS
    top_level = [info.name for info in pkgutil.iter_modules(passes.__path__) if info.name.startswith("recognize_")]
    assert not top_level


def _reduce(op: str, axes: list[int] | None, opset: int, keepdims: int = 1, noop: int = 0) -> gs.Node:
    x = gs.Variable("x", np.float32, [2, 3, 4])
    attrs: dict = {"keepdims": keepdims}
    if noop:
        attrs["noop_with_empty_axes"] = noop
    inputs = [x]
    as_input = opset >= (13 if op == "ReduceSum" else 18)
    if axes is not None and as_input:
        inputs.append(gs.Constant("axes", np.array(axes, np.int64)))
    elif axes is not None:
        attrs["axes"] = axes
    return gs.Node(op, attrs=attrs, inputs=inputs, outputs=[gs.Variable("y", np.float32)])


@pytest.mark.parametrize("opset", [11, 13, 17, 18])
@pytest.mark.parametrize("op, kind", [("ReduceSum", "sum"), ("ReduceMean", "mean")])
def test_read_reduction_reads_axes_as_attribute_or_input(op: str, kind: str, opset: int) -> None:
    assert read_reduction(_reduce(op, [-1, 1], opset, keepdims=0), 3, opset) == Reduction(kind, frozenset({1, 2}), False)
    assert read_reduction(_reduce(op, [0], opset), 3, opset) == Reduction(kind, frozenset({0}), True)


@pytest.mark.parametrize(
    "node, why",
    [
        (_reduce("ReduceSum", None, 18), "no axes: reduces every axis"),
        (_reduce("ReduceSum", [], 18), "empty axes: reduces every axis"),
        (_reduce("ReduceSum", [1], 18, noop=1), "noop_with_empty_axes"),
        (_reduce("ReduceMean", [3], 18), "axis outside the rank"),
        (_reduce("ReduceMean", [-4], 18), "axis outside the rank"),
        (_reduce("ReduceMax", [1], 18), "not a sum or a mean"),
    ],
)
def test_read_reduction_refuses_what_no_idiom_means(node: gs.Node, why: str) -> None:
    assert read_reduction(node, 3, 18) is None, why
