"""`convlower lower`: apply one named variant to every node it fits, with no timing.

For runtimes that lack an op (`--no-ops Conv`), and for studying one variant in isolation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import onnx

from convlower.passes import FAMILIES

from .errors import UsageError, VerificationError
from .modelio import ModelLike, default_opset, load_model
from .rewrite import apply_choices, import_graph, plan_nodes, remaining_ops


@dataclass(frozen=True)
class NodeOutcome:
    """What `lower` did with one node: the variant it applied, or why it left the node alone."""

    name: str
    op: str
    variant: str | None
    reason: str | None = None


@dataclass
class LowerResult:
    model: onnx.ModelProto
    nodes: list[NodeOutcome]

    @property
    def lowered(self) -> list[NodeOutcome]:
        return [n for n in self.nodes if n.variant]


def parse_variant_choices(items: Iterable[str] | Mapping[str, str]) -> dict[str, str]:
    """`["conv=im2col", "ConvTranspose=col2im"]` -> {"conv": "im2col", "convtranspose": "col2im"}, checked."""
    pairs = items.items() if isinstance(items, Mapping) else (_split(item) for item in items)
    choices: dict[str, str] = {}
    for op, name in pairs:
        family = FAMILIES.get(op.lower())
        if family is None:
            raise UsageError(
                f"no variants are registered for op {op!r}",
                f"ops with variants: {', '.join(f.op_type for f in FAMILIES.values())}",
            )
        if family.variant(name) is None:
            raise UsageError(
                f"{family.op_type} has no variant {name!r}", f"its variants: {', '.join(family.variant_names)}"
            )
        choices[op.lower()] = name
    return choices


def _split(item: str) -> tuple[str, str]:
    op, sep, name = item.partition("=")
    if not sep or not op or not name:
        raise UsageError(f"--variant {item!r} is not OP=NAME", "write it like conv=im2col")
    return op.strip(), name.strip()


def lower(
    model: ModelLike, variants: Iterable[str] | Mapping[str, str], *, no_ops: Iterable[str] = ()
) -> LowerResult:
    """Replace every node of the named ops by the named variant where it applies.

    A node the variant does not fit stays as it was, with the reason in the result. `no_ops`
    names op types that must not remain anywhere in the result (raises `VerificationError`).
    """
    proto = load_model(model)
    choices = parse_variant_choices(variants)
    planned = plan_nodes(import_graph(proto), default_opset(proto))
    outcomes, chosen = [], {}
    for entry in planned:
        name = choices.get(entry.op.lower())
        if name is None:
            continue
        reason = entry.reason or entry.why_not.get(name)
        outcomes.append(NodeOutcome(entry.name, entry.op, None if reason else name, reason))
        if reason is None:
            chosen[entry.name] = name
    result = apply_choices(proto, chosen) if chosen else proto
    banned = set(no_ops)
    left = remaining_ops(result, banned) if banned else []
    if left:
        reasons = "; ".join(f"{o.name}: {o.reason}" for o in outcomes if o.reason) or "no variant was chosen for them"
        raise VerificationError(
            f"{len(left)} node(s) of {', '.join(sorted(banned))} remain ({', '.join(left[:5])}): {reasons}",
            "choose a variant that applies with --variant OP=NAME",
        )
    return LowerResult(result, outcomes)
