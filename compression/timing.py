"""Is A faster than B? Interleaved A/B timing, and a confidence interval for the ratio of their times.

The machine is shared and drifts (other processes, frequency scaling, caches), so timing A for a while and
then B mixes the difference up with the drift. Here the two alternate: each round times A and B back to back,
in ABBA order across rounds so that neither always runs second, and gives one paired ratio ``t_A / t_B``.
Each timed block starts after one untimed call, so it does not pay for what the other side left behind (ONNX
Runtime's thread pool spins on for a while after a run).
The estimate is the median of those ratios, and the interval is the distribution-free confidence interval of
a median (order statistics, binomial coverage): it assumes no normal distribution, and a preempted run moves
it little. ``Comparison.faster(margin)`` says "faster by more than ``margin``, beyond the noise": the whole
interval lies below ``1 - margin``.

Written by hand because it is a few lines: scipy's ``binomtest`` would give the same order statistics, but
scipy is not otherwise a dependency of the server.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

MIN_ROUNDS = 6  # the fewest paired rounds whose [min, max] covers the median with >= 95% confidence
MIN_TIMING_S = 0.002  # automatic ``calls``: enough calls that one timing takes at least this long
MAX_CALLS = 1000


@dataclass(frozen=True)
class Comparison:
    """Paired timings of A and B: the median ratio t_A / t_B (< 1: A is faster) and its confidence interval."""

    ratio: float
    low: float
    high: float
    confidence: float  # the interval's actual coverage (at least the confidence asked for)
    rounds: int
    calls: int  # calls per timing
    a_ms: float  # median time of one call of A
    b_ms: float

    def faster(self, margin: float = 0.0) -> bool:
        """A is faster than B by more than ``margin`` (a fraction), beyond the noise."""
        return self.high < 1.0 - margin

    def to_dict(self) -> dict[str, Any]:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}


def median_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(low, high, coverage): order statistics x_(k) <= median <= x_(n+1-k) with coverage >= ``confidence``.

    The coverage of [x_(k), x_(n+1-k)] is 1 - 2 P(Binomial(n, 1/2) <= k - 1); the narrowest such interval is
    returned. Needs enough values for even [min, max] to reach the confidence (6 for 95%).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    xs = sorted(values)
    n = len(xs)
    best = None
    below = 0  # the number of outcomes of n fair coin flips with at most k - 1 heads
    for k in range(1, n // 2 + 1):
        below += math.comb(n, k - 1)
        coverage = 1.0 - 2 * below / 2**n
        if coverage < confidence:
            break
        best = (xs[k - 1], xs[n - k], coverage)
    if best is None:
        raise ValueError(f"{n} values cannot bound a median with {confidence:.0%} confidence (need more rounds)")
    return best


def compare_timings(
    run_a: Callable[[], object],
    run_b: Callable[[], object],
    rounds: int = 30,
    warmup: int = 3,
    calls: int | None = None,
    confidence: float = 0.95,
    clock: Callable[[], float] = time.perf_counter,
) -> Comparison:
    """Time ``run_a`` and ``run_b`` interleaved, ``rounds`` times ``calls`` calls each, after ``warmup`` calls.

    ``calls=None`` picks enough calls per timing for the slower of the two to take ``MIN_TIMING_S``, so that
    sub-millisecond calls are not timed one by one at the clock's resolution.
    """
    if rounds < MIN_ROUNDS or (calls is not None and calls < 1) or warmup < 0:
        raise ValueError(f"rounds must be >= {MIN_ROUNDS}, calls >= 1 and warmup >= 0")
    slowest = 0.0  # the slower of A and B in the last warm-up round (the first calls are cold)
    for _ in range(max(warmup, 1)):
        slowest = 0.0
        for fn in (run_a, run_b):
            t0 = clock()
            fn()
            slowest = max(slowest, clock() - t0)
    if calls is None:
        calls = max(1, min(MAX_CALLS, math.ceil(MIN_TIMING_S / max(slowest, 1e-9) - 1e-6)))
    ratios, a_times, b_times = [], [], []
    for r in range(rounds):
        took = [0.0, 0.0]
        for i in (0, 1) if r % 2 == 0 else (1, 0):
            fn = run_a if i == 0 else run_b
            fn()  # untimed: the first call after the other side pays for its leftovers (spinning threads, caches)
            t0 = clock()
            for _ in range(calls):
                fn()
            took[i] = (clock() - t0) / calls
        a_times.append(took[0])
        b_times.append(took[1])
        ratios.append(took[0] / max(took[1], 1e-12))
    low, high, coverage = median_interval(ratios, confidence)
    return Comparison(
        ratio=_median(ratios),
        low=low,
        high=high,
        confidence=coverage,
        rounds=rounds,
        calls=calls,
        a_ms=_median(a_times) * 1000.0,
        b_ms=_median(b_times) * 1000.0,
    )


def is_faster(run_a: Callable[[], object], run_b: Callable[[], object], margin: float = 0.05, **kw: Any) -> bool:
    """A is faster than B by more than ``margin`` beyond the noise (see ``compare_timings`` for ``kw``)."""
    return compare_timings(run_a, run_b, **kw).faster(margin)


def _median(values: Sequence[float]) -> float:
    xs = sorted(values)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2.0
