"""`convlower bench`: latency of one model, or of two on the same inputs, timed in paired rounds.

Two models are timed as the guard times them (`runner.time_paired`): rounds of both back to back,
the order alternating, and the ratio with its 95% bootstrap interval over rounds. Timing a model
against itself reads 1.00x with an interval around it: the noise of this machine at this moment.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import onnx

from .modelio import ModelLike, load_model
from .runner import PairedPolicy, PairedRatio, Runner, Timing, TimingPolicy, time_paired
from .verify import input_sets


@dataclass
class BenchResult:
    provider: str
    device: str
    timings: list[Timing]
    labels: list[str]
    paired: PairedRatio | None = None

    @property
    def ratio(self) -> float | None:
        """First model's time over the second's (paired estimate): > 1 means the second is faster."""
        return 1 / self.paired.ratio if self.paired else None

    @property
    def interval(self) -> tuple[float, float] | None:
        """The ratio's confidence interval."""
        return (1 / self.paired.high, 1 / self.paired.low) if self.paired else None

    def to_dict(self) -> dict:
        return {
            "provider": self.provider,
            "device": self.device,
            "models": [{"model": label} | t.to_dict() for label, t in zip(self.labels, self.timings)],
            "ratio": self.ratio,
            "interval": list(self.interval) if self.interval else None,
            "confidence": self.paired.confidence if self.paired else None,
            "rounds": self.paired.rounds if self.paired else None,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        lines = [f"{'model':<40} {'median ms':>10} {'p10':>9} {'p90':>9} {'runs':>5}"]
        for label, t in zip(self.labels, self.timings):
            lines.append(f"{label[-40:]:<40} {t.median_ms:>10.3f} {t.p10_ms:>9.3f} {t.p90_ms:>9.3f} {t.runs:>5}")
        if self.paired is not None and self.interval is not None:
            low, high = self.interval
            lines.append(f"ratio (first / second): {self.ratio:.3f}x, {self.paired.confidence:.0%} interval "
                         f"{low:.3f}-{high:.3f}x over {self.paired.rounds} paired rounds")
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
    """Median latency of `model`; with `other`, both in paired rounds and the ratio's interval.
    `runs` bounds the timed runs of each model, `budget_s` the time."""
    models = [load_model(m) for m in (model, other) if m is not None]
    labels = [f"model {i + 1}" if isinstance(m, onnx.ModelProto) else str(m) for i, m in enumerate((model, other)) if m is not None]
    runner = Runner(provider, threads)
    feeds = input_sets(models[0], input_shapes=input_shapes, inputs=inputs, runs=1)[0]
    sessions = [runner.session(m, what=label) for m, label in zip(models, labels)]
    if len(sessions) == 1:
        policy = TimingPolicy(min_runs=min(20, runs), max_runs=runs, budget_s=budget_s)
        return BenchResult(runner.provider, runner.device, [sessions[0].time(feeds, policy)], labels)
    rounds = max(2, runs // PairedPolicy.block)
    pairs = PairedPolicy(min_rounds=min(PairedPolicy.min_rounds, rounds), max_rounds=rounds, budget_s=budget_s)
    paired = time_paired(sessions[0].runner_for(feeds), sessions[1].runner_for(feeds), pairs)
    return BenchResult(runner.provider, runner.device, [paired.a, paired.b], labels, paired)
