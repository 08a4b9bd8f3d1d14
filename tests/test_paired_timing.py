"""runner.time_paired: the paired timer the guard, the confirmation and `bench A B` share."""

from __future__ import annotations

import time

import pytest

from convlower.runner import PairedPolicy, time_paired


def sleeper(seconds: float):
    return lambda: time.sleep(seconds)


def test_long_runs_are_timed_one_a_round_and_the_ratio_is_found() -> None:
    """Runs of 50 ms and more: one timed run per side a round, no untimed run after a switch."""
    policy = PairedPolicy(warmup=1, min_rounds=6, max_rounds=6, budget_s=30)
    calls = {"a": 0, "b": 0}

    def counted(name: str, seconds: float):
        def call():
            calls[name] += 1
            time.sleep(seconds)
        return call

    paired = time_paired(counted("a", 0.06), counted("b", 0.03), policy)
    assert paired.rounds == 6
    assert paired.a.runs == paired.b.runs == 6, "one timed run per side a round"
    assert calls == {"a": 7, "b": 7}, "the warm-up run, then one run a round"
    assert paired.ratio == pytest.approx(0.5, rel=0.15)
    assert paired.low <= paired.ratio <= paired.high


def test_short_runs_keep_the_block_and_the_settling_run() -> None:
    policy = PairedPolicy(warmup=1, block=3, min_rounds=4, max_rounds=4, budget_s=30)
    paired = time_paired(sleeper(0.004), sleeper(0.002), policy)
    assert paired.a.runs == paired.b.runs == 12
    assert paired.ratio == pytest.approx(0.5, rel=0.3)


def test_a_clear_answer_still_measures_until_the_interval_is_precise() -> None:
    """Clear of the threshold after the first rounds, but wider than ±precision: more rounds,
    within the budget, make the estimate as precise as asked."""
    loose = PairedPolicy(warmup=1, block=1, min_rounds=4, max_rounds=200, budget_s=20, precision=0.5)
    tight = PairedPolicy(warmup=1, block=1, min_rounds=4, max_rounds=200, budget_s=20, precision=0.03)
    fast, slow = sleeper(0.002), sleeper(0.006)
    clear_at_once = time_paired(slow, fast, loose, threshold=0.9)
    precise = time_paired(slow, fast, tight, threshold=0.9)
    assert clear_at_once.rounds == 4 and clear_at_once.high < 0.9
    assert precise.high < 0.9
    assert precise.rounds >= clear_at_once.rounds
    assert precise.high / precise.low <= 1.03 / 0.97 or precise.rounds == 200


def test_an_answer_clearly_above_the_threshold_stops_at_once() -> None:
    """Slower than the threshold: dropped, so its precision does not matter."""
    tight = PairedPolicy(warmup=1, block=1, min_rounds=4, max_rounds=200, budget_s=20, precision=0.001)
    slower = time_paired(sleeper(0.002), sleeper(0.006), tight, threshold=0.9)
    assert slower.rounds == 4 and slower.low > 0.9


def test_the_budget_ends_an_answer_that_stays_unclear() -> None:
    """Two equal calls against a threshold of 1: the interval never leaves 1 out for long, and the
    budget stops the rounds."""
    policy = PairedPolicy(warmup=1, block=1, min_rounds=4, max_rounds=10_000, budget_s=0.5)
    started = time.perf_counter()
    paired = time_paired(sleeper(0.002), sleeper(0.002), policy, threshold=1.0)
    assert time.perf_counter() - started < 5
    assert paired.rounds >= 4
