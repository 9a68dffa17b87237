"""Live counters of one version under a traffic policy, in the current window (the policy's epoch).

Each replica counts what it served (per variant: requests, server errors, latencies) and what its shadow
comparisons found (per primary/candidate pair: rows compared, top-1 agreement, cosine, max abs error, the
candidate's errors and latencies). The decider writes ``to_dict()`` to the catalogue and reads back every
replica's, summed by ``merge``. Latencies are kept as the most recent ``KEEP`` values per entry (not histogram
buckets) so that the p99 over the merged window is exact up to that bound.

Everything here is touched on the event loop only (scheduler futures complete there), so there are no locks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

KEEP = 2048  # latencies kept per entry and replica: enough for a p99 that rests on ~20 values


@dataclass
class VariantWindow:
    requests: int = 0
    errors: int = 0  # server-side failures (5xx): a client's bad input does not count against a variant
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=KEEP))

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "errors": self.errors, "latencies": list(self.latencies)}


@dataclass
class PairWindow(VariantWindow):
    """Shadow comparisons of one candidate against one primary; ``requests``/``errors`` are the candidate's."""

    rows: int = 0
    top1_rows: int = 0  # rows of classifier outputs ([N, C]): the ones top-1 agreement is defined on
    top1_agree: float = 0.0
    cosine_sum: float = 0.0
    max_abs_error: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            **super().to_dict(),
            "rows": self.rows,
            "top1_rows": self.top1_rows,
            "top1_agree": self.top1_agree,
            "cosine_sum": self.cosine_sum,
            "max_abs_error": self.max_abs_error,
        }


@dataclass
class VersionWindow:
    epoch: int
    live: dict[str, VariantWindow] = field(default_factory=dict)
    pairs: dict[tuple[str, str], PairWindow] = field(default_factory=dict)
    dirty: bool = False  # counted something since the last write to the catalogue

    def variant(self, name: str) -> VariantWindow:
        w = self.live.get(name)
        if w is None:
            w = self.live[name] = VariantWindow()
        return w

    def pair(self, primary: str, candidate: str) -> PairWindow:
        w = self.pairs.get((primary, candidate))
        if w is None:
            w = self.pairs[(primary, candidate)] = PairWindow()
        return w

    def to_dict(self) -> dict[str, Any]:
        return {
            "live": {k: v.to_dict() for k, v in self.live.items()},
            "pairs": [{"primary": p, "candidate": c, **w.to_dict()} for (p, c), w in self.pairs.items()],
        }


@dataclass
class Totals:
    """One variant's or one pair's counters summed over replicas."""

    requests: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    rows: int = 0
    top1_rows: int = 0
    top1_agree: float = 0.0
    cosine_sum: float = 0.0
    max_abs_error: float = 0.0

    def add(self, d: dict[str, Any]) -> None:
        self.requests += int(d.get("requests", 0))
        self.errors += int(d.get("errors", 0))
        self.latencies.extend(float(x) for x in d.get("latencies", ()))
        self.rows += int(d.get("rows", 0))
        self.top1_rows += int(d.get("top1_rows", 0))
        self.top1_agree += float(d.get("top1_agree", 0.0))
        self.cosine_sum += float(d.get("cosine_sum", 0.0))
        self.max_abs_error = max(self.max_abs_error, float(d.get("max_abs_error", 0.0)))

    def p99(self) -> float | None:
        return float(np.percentile(self.latencies, 99)) if self.latencies else None

    @property
    def agreement(self) -> float | None:
        """Top-1 agreement on classifier outputs, else the mean cosine (the offline evaluation's measures)."""
        if self.top1_rows:
            return self.top1_agree / self.top1_rows
        if self.rows:
            return self.cosine_sum / self.rows
        return None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None


@dataclass
class Merged:
    live: dict[str, Totals] = field(default_factory=dict)
    pairs: dict[tuple[str, str], Totals] = field(default_factory=dict)
    replicas: int = 0


def merge(windows: list[dict[str, Any]]) -> Merged:
    out = Merged(replicas=len(windows))
    for w in windows:
        for name, d in w.get("live", {}).items():
            out.live.setdefault(name, Totals()).add(d)
        for d in w.get("pairs", []):
            out.pairs.setdefault((d["primary"], d["candidate"]), Totals()).add(d)
    return out
