"""Whole-model measurements made once: paired timings kept in the tuning cache by what they compared.

Trying a session setting, confirming a choice in context and the guard's timing each time two
versions of one model against each other (`runner.time_paired`). Such an answer depends on the
model, the choices on each side, the profiles' inputs and the environment (provider and session
settings, device, onnxruntime, threads) and on nothing else, so `Measurements.paired` keys it by
those, in the same stores as the node tunings (file, Redis): a re-run of an unchanged model with a
warm cache times nothing at all. Outputs are still compared on every run: a cached measurement
says how fast, never whether a model is right.

The model is named by `model_digest`: its proto's bytes and, for weights kept in external files,
each file's name, size and modification time (the proto refers to them, it does not hold them).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from typing import Any, Callable, Sequence

import onnx

from . import weights
from .cache import TuningCache
from .runner import PairedPolicy, PairedRatio, Timing, time_paired

Runs = list[Callable[[], object]]
"""One zero-argument run per profile of a model (the whole model, or a group's neighbourhood)."""
PAIRED = "paired"
"""The `variant` part of a measurement's cache key: what tells it from a node tuning's outcome."""


def model_digest(model: onnx.ModelProto) -> str:
    """A SHA-256 of the model: its serialized proto and, for each external data file it refers
    to, the file's path, size and modification time."""
    digest = hashlib.sha256(model.SerializeToString(deterministic=True))
    for path in sorted({weights.data_path(t) for t in weights.external_tensors(model)}):
        try:
            stat = os.stat(path)
            digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        except OSError:
            digest.update(f"{path}|missing".encode())
    return digest.hexdigest()


class Measurements:
    """Paired timings of one model's versions, from the cache when measured before.

    `environment` is the key's tail (`TuningCache.key(problem, variant, *environment)`), as for
    node tunings; `inputs` names what the runs are fed (the profiles' shapes and the seed), so a
    measurement at other shapes is another key. `timed` and `cached` count what was measured and
    what was read back."""

    def __init__(self, cache: TuningCache, digest: str, inputs: object, environment: Sequence[object]):
        self.cache, self.digest, self.inputs, self.environment = cache, digest, inputs, list(environment)
        self.timed = 0
        self.cached = 0

    @classmethod
    def in_memory(cls) -> "Measurements":
        """Measurements kept for this call only (of one model: nothing else reads them, so it needs no digest)."""
        return cls(TuningCache.open(None), "", None, [])

    def paired(self, what: str, before: Any, after: Any, runs: Callable[[], tuple[Runs, Runs]],
               policy: PairedPolicy, threshold: float | None) -> list[PairedRatio]:
        """The time ratio after/before at every profile. `what` says which comparison this is
        (a confirmation and its replicate are two), `before` and `after` describe the two sides
        (their choices: anything JSON can write); `runs` makes both sides' runs and is called only
        when the cache does not have the answer."""
        key = TuningCache.key(json.dumps([what, self.digest, self.inputs, before, after, policy.confidence, threshold],
                                         sort_keys=True, default=str), PAIRED, *self.environment)
        hit = self.cache.get(key)
        if hit is not None:
            self.cached += 1
            return [paired_from_dict(entry) for entry in hit["pairs"]]
        before_runs, after_runs = runs()
        pairs = [time_paired(a, b, policy, threshold) for a, b in zip(before_runs, after_runs)]
        del before_runs, after_runs
        self.timed += 1
        self.cache.put(key, {"pairs": [p.to_dict() for p in pairs]})
        return pairs


def paired_from_dict(entry: dict[str, Any]) -> PairedRatio:
    """A PairedRatio as `PairedRatio.to_dict` wrote it: the medians stand for both sides' timings
    (the spread of the runs is not kept)."""
    low, high = entry["interval"]
    rounds = int(entry["rounds"])
    return PairedRatio(entry["ratio"], low, high, entry["confidence"], rounds,
                       _median_only(entry["a_median_ms"], rounds), _median_only(entry["b_median_ms"], rounds), cached=True)


def _median_only(median_ms: float, runs: int) -> Timing:
    return Timing(median_ms, median_ms, median_ms, runs)


class Deadline:
    """Where `optimize(budget=...)` stops starting new work: `seconds` after it was made (never,
    with None). Stages ask `spent` before each step and cut their timing budgets to `left`."""

    def __init__(self, seconds: float | None, *, start: float | None = None, whole: float | None = None):
        self.seconds = seconds
        self.whole = seconds if whole is None else whole
        self.start = time.perf_counter() if start is None else start

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - (time.perf_counter() - self.start)

    def spent(self, share: float = 1.0) -> bool:
        """Whether `share` of the budget has passed (a stage that must leave time for the next
        stops at its share)."""
        return self.seconds is not None and time.perf_counter() - self.start >= share * self.seconds

    def share(self, fraction: float) -> "Deadline":
        """The deadline at `fraction` of this one's budget, from the same start."""
        return Deadline(None if self.seconds is None else self.seconds * fraction, start=self.start, whole=self.whole)

    def describe(self) -> str:
        return f"the --budget of {self.whole:g} s left no time for it"


class Stopwatch:
    """Seconds per stage of a run: `lap(stage)` ends the stage begun at the last lap (or at the
    start) and adds its seconds to `stages`, which ends with the "total"."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.stages: dict[str, float] = {}

    def lap(self, stage: str) -> float:
        now = time.perf_counter()
        seconds = round(now - self.last, 3)
        self.stages[stage] = round(self.stages.get(stage, 0.0) + seconds, 3)
        self.stages["total"] = round(now - self.start, 3)
        self.last = now
        return seconds
