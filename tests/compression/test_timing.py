"""The noise-aware A/B comparison (compression.timing): the median's confidence interval, interleaving, and
the decision "faster beyond the noise". Timings come from a virtual clock, so each test proves the same thing on
every run; one test times real calls whose difference is a thousandfold."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest

from compression.timing import MIN_ROUNDS, compare_timings, is_faster, median_interval


class VirtualClock:
    """A clock that moves only when a timed function runs: each call costs its base time, times a drift that
    grows with every call (a machine that slows down), times seeded noise."""

    def __init__(self, drift: float = 0.0, noise: float = 0.0, seed: int = 0) -> None:
        self.now = 0.0
        self.calls = 0
        self.drift = drift
        self.noise = noise
        self.rng = np.random.default_rng(seed)

    def __call__(self) -> float:
        return self.now

    def work(self, seconds: float) -> Callable[[], None]:
        def run() -> None:
            self.calls += 1
            jitter = 1.0 + self.noise * float(self.rng.standard_normal())
            self.now += seconds * (1.0 + self.drift * self.calls) * max(jitter, 0.1)

        return run


def test_median_interval_matches_the_binomial_tables() -> None:
    # n = 30 at 95%: the 10th and 21st order statistics (coverage 0.957); n = 6: min and max (0.969)
    low, high, coverage = median_interval(list(range(1, 31)))
    assert (low, high) == (10, 21) and coverage == pytest.approx(0.9572, abs=1e-4)
    assert median_interval([5, 1, 4, 2, 6, 3]) == (1, 6, pytest.approx(0.96875))
    assert median_interval(list(range(1, 101)), 0.99)[:2] == (37, 64)
    with pytest.raises(ValueError, match="need more rounds"):
        median_interval([1, 2, 3, 4, 5])


def test_a_clear_difference_is_faster_beyond_noise() -> None:
    clock = VirtualClock(noise=0.05)
    c = compare_timings(clock.work(0.001), clock.work(0.002), rounds=30, calls=1, clock=clock)
    assert c.ratio == pytest.approx(0.5, abs=0.05) and c.low <= c.ratio <= c.high < 0.95
    assert c.faster(0.05) and not c.faster(0.6)
    assert c.a_ms == pytest.approx(1.0, rel=0.1) and c.b_ms == pytest.approx(2.0, rel=0.1)
    back = compare_timings(clock.work(0.002), clock.work(0.001), rounds=30, calls=1, clock=clock)
    assert not back.faster(0.0) and back.low > 1.0


def test_equal_work_is_never_called_faster_even_on_a_drifting_machine() -> None:
    # each call 0.5% slower than the one before: timing A then B would always call A faster
    for seed in range(5):
        clock = VirtualClock(drift=0.005, noise=0.1, seed=seed)
        c = compare_timings(clock.work(0.001), clock.work(0.001), rounds=30, calls=1, clock=clock)
        assert 0.9 < c.ratio < 1.1 and c.low < 1.05 and c.high > 0.95, (seed, c)
        assert not c.faster(0.05), (seed, c)
    # a small real difference hidden in large noise is not claimed either
    clock = VirtualClock(noise=0.3, seed=1)
    c = compare_timings(clock.work(0.00097), clock.work(0.001), rounds=30, calls=1, clock=clock)
    assert not c.faster(0.05)


def test_calls_per_timing_and_arguments() -> None:
    clock = VirtualClock()
    c = compare_timings(clock.work(0.0001), clock.work(0.0002), rounds=MIN_ROUNDS, clock=clock)
    assert c.calls == 10  # 2 ms per timing of the slower one
    assert c.rounds == MIN_ROUNDS and set(c.to_dict()) >= {"ratio", "low", "high", "confidence", "rounds"}
    for bad in ({"rounds": MIN_ROUNDS - 1}, {"calls": 0}, {"warmup": -1}):
        with pytest.raises(ValueError):
            compare_timings(clock.work(0.001), clock.work(0.001), clock=clock, **bad)  # type: ignore[arg-type]


def test_real_calls_a_thousandfold_apart() -> None:
    def sleep_1ms() -> None:
        time.sleep(0.001)

    assert is_faster(lambda: None, sleep_1ms, margin=0.5, rounds=MIN_ROUNDS)
    assert not is_faster(sleep_1ms, lambda: None, margin=0.0, rounds=MIN_ROUNDS)
