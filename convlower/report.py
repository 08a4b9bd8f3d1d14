"""The optimize report: per-node timings and choices, the whole-model result, verification.

`to_json()` has the stable keys DESIGN.md fixes; `table()` is what the terminal shows.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

from .settings import SessionSettings


@dataclass
class NodeReport:
    name: str
    op: str
    shape: str
    spec: dict[str, Any] | None
    chosen: str
    original_ms: float | None
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    cached: bool = False
    reason: str | None = None
    recognized: bool = False
    """Made by a recognizer from an exported idiom: `original_ms` is then its canonical function body's."""
    context: dict[str, Any] | None = None
    """The choice confirmed in context: time ratio with/without it, its interval, kept or not, and
    the method, "model" (the whole model) or "neighbours" (its fusable neighbourhood, with the
    milliseconds saved there as "saved_ms")."""
    profiles: list[dict[str, Any]] | None = None
    """With several shape profiles: each one's input shapes, original median and variant outcomes."""

    @property
    def chosen_ms(self) -> float | None:
        return self.variants.get(self.chosen, {}).get("ms", self.original_ms)

    @property
    def speedup(self) -> float | None:
        if self.original_ms is None or not self.chosen_ms:
            return None
        return self.original_ms / self.chosen_ms

    def to_dict(self) -> dict[str, Any]:
        data = {
            "name": self.name, "op": self.op, "shape": self.shape, "spec": self.spec, "chosen": self.chosen,
            "original_ms": self.original_ms, "speedup": self.speedup, "cached": self.cached,
            "recognized": self.recognized, "variants": self.variants,
        }
        if self.reason:
            data["reason"] = self.reason
        if self.context:
            data["context"] = self.context
        if self.profiles:
            data["profiles"] = self.profiles
        return data


@dataclass
class Report:
    provider: str
    device: str
    threads: int | None
    nodes: list[NodeReport] = field(default_factory=list)
    original_ms: float | None = None
    optimized_ms: float | None = None
    verification: dict[str, Any] = field(default_factory=dict)
    reverted: list[str] = field(default_factory=list)
    guard_timings: list[dict[str, Any]] = field(default_factory=list)
    profiles: list[dict[str, Any]] = field(default_factory=list)
    """The shape profiles tuned for: each one's input shapes and, once the guard timed it, its
    original and optimized medians, speedup and the speedup's interval."""
    """Each whole-model check of the guard: time ratio optimized/original, its interval, rounds."""
    notices: list[str] = field(default_factory=list)
    tuning: dict[str, Any] = field(default_factory=dict)
    unlowered_ops: dict[str, int] = field(default_factory=dict)
    session_settings: dict[str, Any] = field(default_factory=dict)
    """The session settings the model was tuned and written with ("chosen", `SessionSettings.to_dict`)
    and every setting tried at the model level ("tried": its ratio and interval, or why not)."""
    """Convolution ops in the model that no pass family lowers (ConvInteger, QLinearConv, ...), by count."""
    onnxruntime: str = ort.__version__
    provider_reason: str | None = None
    """Why `auto` did not get CUDA, in onnxruntime's words, and the fix (the notice is the short line)."""
    confirmation: dict[str, Any] = field(default_factory=dict)
    """How the choices were confirmed in context: the number of groups, and the measurement of
    all of them together ("together") when there were several."""
    measurements: dict[str, int] = field(default_factory=dict)
    """Whole-model measurements (settings, confirmation, guard) "timed" in this run and "cached"."""
    timing: dict[str, float] = field(default_factory=dict)
    """Seconds by stage: recognition (load, checks, shapes, recognizers), settings, tuning,
    confirmation, guard, and the total."""
    budget: dict[str, Any] = field(default_factory=dict)
    """With `--budget`: its seconds and the nodes it left untuned ("not_tuned")."""

    @property
    def speedup(self) -> float | None:
        """The guard's last paired estimate (original over optimized), else the ratio of medians."""
        check = self._primary_check()
        if check:
            return 1 / check["ratio"]
        if not self.original_ms or not self.optimized_ms:
            return None
        return self.original_ms / self.optimized_ms

    @property
    def predicted_speedup(self) -> float | None:
        """What the kept choices predict for the whole model, beside the measured `speedup`: the
        product of the whole-model ratios of the groups confirmed in context (`_kept_factors`),
        else (no confirmation ran) `isolated_predicted_speedup`."""
        if not self._kept_contexts():
            return self.isolated_predicted_speedup
        factors = self._kept_factors()
        return 1 / float(np.prod([c["ratio"] for c in factors])) if factors else None

    @property
    def predicted_interval(self) -> list[float] | None:
        """The interval of `predicted_speedup` from its factors' intervals, their errors taken as
        independent (added in quadrature on the log scale): a measured speedup outside it
        disagrees with the prediction by more than the noise of the measurements behind it."""
        kept = self._kept_factors()
        if not kept:
            return None
        center = sum(np.log(c["ratio"]) for c in kept)
        below = np.sqrt(sum(np.log(c["ratio"] / c["interval"][0]) ** 2 for c in kept))
        above = np.sqrt(sum(np.log(c["interval"][1] / c["ratio"]) ** 2 for c in kept))
        return [float(np.exp(-(center + above))), float(np.exp(-(center - below)))]

    def _kept_contexts(self) -> list[dict[str, Any]]:
        """The in-context measurement of every group whose choice is in the written model, once each."""
        kept = {id(n.context): n.context for n in self.nodes if n.context and n.context["kept"] and n.chosen != "original"}
        return list(kept.values())

    def _kept_factors(self) -> list[dict[str, Any]] | None:
        """The kept groups' measurements as whole-model time ratios with intervals: a group
        confirmed in the whole model as measured; the groups confirmed in their neighbourhoods
        together as one, the milliseconds they saved there (summed, their intervals' errors in
        quadrature) taken off the whole model's original median (the guard's `original_ms`). A
        neighbourhood's ratio is not the whole model's: the same milliseconds are a smaller share
        of a larger model. None when neighbourhoods were kept and there is no original median."""
        kept = self._kept_contexts()
        factors = [c for c in kept if c.get("method", "model") == "model"]
        near = [c for c in kept if c.get("method") == "neighbours"]
        if not near:
            return factors
        total = self.original_ms
        saved = sum(c["saved_ms"] for c in near)
        less = float(np.sqrt(sum((c["saved_ms"] - c["a_median_ms"] * (1 - c["interval"][1])) ** 2 for c in near)))
        more = float(np.sqrt(sum((c["a_median_ms"] * (1 - c["interval"][0]) - c["saved_ms"]) ** 2 for c in near)))
        if not total or saved + more >= total:
            return None
        return factors + [{"ratio": (total - saved) / total, "interval": [(total - saved - more) / total, (total - saved + less) / total]}]

    @property
    def isolated_predicted_speedup(self) -> float | None:
        """What the nodes timed alone predict: the model's original time over that time less every
        kept choice's gain measured alone."""
        if not self.original_ms:
            return None
        gain = sum(n.original_ms - n.chosen_ms for n in self.nodes
                   if n.chosen != "original" and n.original_ms is not None and n.chosen_ms is not None)
        return self.original_ms / (self.original_ms - gain) if gain < self.original_ms else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "device": self.device,
            "onnxruntime": self.onnxruntime,
            "profiles": self.profiles,
            "threads": self.threads,
            "nodes": [n.to_dict() for n in self.nodes],
            "model": {"original_ms": self.original_ms, "optimized_ms": self.optimized_ms, "speedup": self.speedup,
                      "predicted_speedup": self.predicted_speedup, "predicted_interval": self.predicted_interval,
                      "isolated_predicted_speedup": self.isolated_predicted_speedup},
            "verification": self.verification,
            "guard": {"reverted": self.reverted, "timings": self.guard_timings},
            "tuning": self.tuning,
            "unlowered_ops": self.unlowered_ops,
            "session_settings": self.session_settings,
            "confirmation": self.confirmation,
            "measurements": self.measurements,
            "timing": self.timing,
            "budget": self.budget,
            "notices": self.notices,
            "provider_reason": self.provider_reason,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> Table:
        """Per node: op, input shapes, the original's median, each timed variant's, the choice and its speedup.

        Variants are listed fastest first; those that do not apply or were rejected are counted
        (the JSON report says why).
        """
        table = Table(title="convlower: per-node tuning", title_justify="left")
        for column, justify in (("node", "left"), ("op", "left"), ("input shapes", "left"), ("original ms", "right"),
                                ("variants (ms)", "left"), ("chosen", "left"), ("speedup", "right")):
            table.add_column(column, justify=justify)  # type: ignore[arg-type]
        for node in self.nodes:
            table.add_row(
                _tail(node.name, 32), node.op + (" (recognized)" if node.recognized else ""), node.shape,
                _ms(node.original_ms), _variants_cell(node) or (node.reason or ""),
                node.chosen + (" (cached)" if node.cached else ""),
                f"{node.speedup:.2f}x" if node.speedup else "",
            )
        return table

    def summary(self) -> str:
        """One line: how many nodes the written model lowers, what the guard found, and whether the
        model written is the input unchanged (then no end-to-end speedup is claimed)."""
        where = f"on {self.provider} ({self.device})"
        chosen = self.session_settings.get("chosen")
        changes = SessionSettings.from_dict(chosen).changes_from_baseline() if chosen else {}
        if changes:
            where += " with " + ", ".join(f"{k}={v}" for k, v in changes.items())
        found = ", ".join(f"{count} {op}" for op, count in self.unlowered_ops.items())
        if all(n.original_ms is None for n in self.nodes) and not self.budget.get("not_tuned"):
            why = f"{len(self.nodes)} node(s) cannot be lowered (the table says why)" if self.nodes else "no Conv, ConvTranspose or known idiom"
            return (f"nothing to lower: {why}" + (f"; found {found}, which convlower does not lower" if found else "")
                    + f"; wrote the input unchanged; {where}{self._time_spent()}")
        lowered = sum(1 for n in self.nodes if n.chosen != "original")
        losers = [n for n in self.nodes if n.context and not n.context["kept"]]
        lost = len(losers)
        lost_in = ("in their neighbourhoods" if losers and all(n.context.get("method") == "neighbours" for n in losers)
                   else "in the whole model")
        notes = ([f"{lost} won alone but not {lost_in}"] if lost else []) + ([f"{len(self.reverted)} reverted"] if self.reverted else [])
        counted = f"{lowered} of {len(self.nodes)} node(s) lowered" + (f" ({'; '.join(notes)})" if notes else "")
        if found:
            counted += f" ({found} not lowered: convlower has no variants for them)"
        check = self.verification
        if check.get("passed") is False:
            outcome = f"outputs disagreed ({check.get('reason')}); wrote the input unchanged"
        elif check.get("passed") and check.get("unchanged"):
            outcome = (f"outputs agreed but the optimized model was not faster ({_ms(self.optimized_ms)} vs "
                       f"{_ms(self.original_ms)} ms); wrote the input unchanged")
        elif check.get("passed"):
            outcome = f"{self._speed()}; verified"
        elif check.get("unchanged"):
            outcome = (f"no choice held {lost_in}" if lost else "no variant beat the original") + "; wrote the input unchanged"
        else:
            outcome = f"{self._speed()}; NOT verified" + (" (guard off)" if check.get("skipped") else "")
        return f"{counted}; {outcome}; {where}{self._time_spent()}"

    def _time_spent(self) -> str:
        """"; 12.3 s: recognition 1.0, tuning 6.2, ...", with how many whole-model measurements came
        from the cache, and what a budget left out ("" before the run has a total)."""
        if "total" not in self.timing:
            return ""
        stages = ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in self.timing.items()
                           if stage != "total" and seconds >= 0.05)
        text = f"; {self.timing['total']:.1f} s" + (f" ({stages})" if stages else "")
        timed, cached = self.measurements.get("timed", 0), self.measurements.get("cached", 0)
        if not timed and not self.tuning.get("timed") and (cached or self.tuning.get("cached")):
            text += "; nothing timed: every measurement came from the cache"
        elif cached:
            text += f"; {cached} whole-model measurement(s) from the cache"
        left_out = len(self.budget.get("not_tuned", []))
        if left_out:
            text += f"; the --budget left {left_out} node(s) untuned"
        return text

    def _speed(self) -> str:
        if not self.speedup:
            return "end-to-end timing skipped"
        interval = ""
        check = self._primary_check()
        if check:
            low, high = check["interval"]
            interval = f", {check['confidence']:.0%} interval {1 / high:.2f}-{1 / low:.2f}x"
        text = f"{self.speedup:.2f}x end to end ({_ms(self.original_ms)} -> {_ms(self.optimized_ms)} ms{interval})"
        others = [p for p in self.profiles[1:] if p.get("speedup")]
        if others:
            text += "".join(f"; {p['speedup']:.2f}x at {_profile_text(p)}" for p in others)
        return text

    def _primary_check(self) -> dict[str, Any] | None:
        """The guard's last timing of the first profile."""
        return next((t for t in reversed(self.guard_timings) if t.get("profile", 0) == 0), None)

    def __str__(self) -> str:
        console = Console(width=160, record=True, file=io.StringIO())
        console.print(self.table())
        return console.export_text() + self.summary()


def _profile_text(profile: dict[str, Any]) -> str:
    return " ".join(f"{name} {'x'.join(map(str, dims))}" for name, dims in profile["shapes"].items())


def _ms(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"


def _tail(text: str, width: int) -> str:
    """The end of a long node name, where exporters put the distinguishing part."""
    return text if len(text) <= width else "…" + text[-(width - 1):]


def _variants_cell(node: NodeReport) -> str:
    timed = sorted((v["ms"], name) for name, v in node.variants.items() if v.get("status") == "ok" and name != "native")
    cell = ", ".join(f"{name} {ms:.3f}" for ms, name in timed)
    others = {status: sum(1 for v in node.variants.values() if v.get("status") == status)
              for status in ("rejected", "not_applicable", "skipped")}
    notes = ", ".join(f"{count} {status.replace('_', ' ')}" for status, count in others.items() if count)
    return f"{cell} ({notes})" if notes and cell else cell or notes
