"""`convlower inspect`: each Conv-like node with its shapes, attributes and the variants that apply."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import onnx_graphsurgeon as gs

from convlower.passes import spec_dict

from .modelio import ModelLike, default_opset, load_model
from .rewrite import import_graph, plan_nodes

UNTOUCHED = {
    "ConvInteger": "quantized convolutions are left to the runtime",
    "QLinearConv": "quantized convolutions are left to the runtime",
}
"""Conv-like ops convlower reports but never rewrites, with the reason."""


@dataclass
class NodeInfo:
    name: str
    op: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    attributes: dict[str, Any]
    spec: dict[str, Any] | None = None
    variants: dict[str, str | None] = field(default_factory=dict)
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _tensor(t: gs.Tensor) -> dict[str, Any]:
    shape = None if t.shape is None else [d if isinstance(d, int) else str(d) for d in t.shape]
    return {"name": t.name, "shape": shape, "constant": isinstance(t, gs.Constant)}


def _attr(value: Any) -> Any:
    if isinstance(value, (int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_attr(v) for v in value]
    return str(value)


def inspect_model(model: ModelLike) -> list[NodeInfo]:
    """The Conv-like nodes of the model's main graph, in graph order."""
    proto = load_model(model)
    graph = import_graph(proto)
    planned = {p.name: p for p in plan_nodes(graph, default_opset(proto))}
    infos = []
    for node in graph.nodes:
        entry = planned.get(node.name)
        if entry is None and node.op not in UNTOUCHED:
            continue
        info = NodeInfo(
            node.name, node.op, [_tensor(t) for t in node.inputs if t.name], [_tensor(t) for t in node.outputs],
            {k: _attr(v) for k, v in node.attrs.items()},
        )
        if entry is None:
            info.reason = UNTOUCHED[node.op]
        else:
            info.reason = entry.reason
            info.spec = spec_dict(entry.spec) if entry.spec is not None else None
            info.variants = dict(entry.why_not)
        infos.append(info)
    return infos


def to_json(infos: list[NodeInfo]) -> str:
    return json.dumps({"nodes": [i.to_dict() for i in infos]}, indent=2)


def to_table(infos: list[NodeInfo]) -> str:
    if not infos:
        return "no Conv-like nodes"
    lines = []
    for info in infos:
        shapes = " , ".join("x".join(map(str, t["shape"])) if t["shape"] else "?" for t in info.inputs)
        out = " , ".join("x".join(map(str, t["shape"])) if t["shape"] else "?" for t in info.outputs)
        lines.append(f"{info.name} [{info.op}] {shapes} -> {out}")
        if info.attributes:
            lines.append("  attributes: " + ", ".join(f"{k}={v}" for k, v in info.attributes.items()))
        if info.reason:
            lines.append(f"  not lowered: {info.reason}")
        applies = [n for n, why in info.variants.items() if why is None]
        if info.variants:
            lines.append(f"  variants: {', '.join(applies) or '(none apply)'}")
            for name, why in info.variants.items():
                if why is not None:
                    lines.append(f"    {name}: {why}")
    return "\n".join(lines)
