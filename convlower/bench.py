"""`convlower bench`: latency of one model, or of two interleaved A/B on the same inputs."""

from __future__ import annotations

import json
from dataclasses import dataclass

import onnx

from .modelio import ModelLike, load_model
from .runner import Runner, Timing, TimingPolicy, time_interleaved
from .verify import input_sets


@dataclass
class BenchResult:
    provider: str
    device: str
    timings: list[Timing]
    labels: list[str]

    @property
    def ratio(self) -> float | None:
        """First model's median over the second's: > 1 means the second is faster."""
        if len(self.timings) < 2:
            return None
        return self.timings[0].median_ms / self.timings[1].median_ms

    def to_dict(self) -> dict:
        return {
            "provider": self.provider,
            "device": self.device,
            "models": [{"model": label} | t.to_dict() for label, t in zip(self.labels, self.timings)],
            "ratio": self.ratio,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        lines = [f"{'model':<40} {'median ms':>10} {'p10':>9} {'p90':>9} {'runs':>5}"]
        for label, t in zip(self.labels, self.timings):
            lines.append(f"{label[-40:]:<40} {t.median_ms:>10.3f} {t.p10_ms:>9.3f} {t.p90_ms:>9.3f} {t.runs:>5}")
        if self.ratio is not None:
            lines.append(f"ratio (first / second): {self.ratio:.2f}x")
        lines.append(f"on {self.provider} ({self.device})")
        return "\n".join(lines)


def bench(
    model: ModelLike,
    other: ModelLike | None = None,
    *,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    inputs: str | None = None,
    provider: str = "auto",
    threads: int | None = None,
    runs: int = 200,
    budget_s: float = 5.0,
) -> BenchResult:
    """Median latency of `model` (and `other`, interleaved with it, on the same inputs)."""
    models = [load_model(m) for m in (model, other) if m is not None]
    labels = [f"model {i + 1}" if isinstance(m, onnx.ModelProto) else str(m) for i, m in enumerate((model, other)) if m is not None]
    runner = Runner(provider, threads)
    feeds = input_sets(models[0], input_shapes=input_shapes, inputs=inputs, runs=1)[0]
    sessions = [runner.session(m, what=label) for m, label in zip(models, labels)]
    policy = TimingPolicy(min_runs=min(20, runs), max_runs=runs, budget_s=budget_s)
    return BenchResult(runner.provider, runner.device, time_interleaved(sessions, feeds, policy), labels)
