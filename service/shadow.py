"""Shadow traffic: mirror sampled requests to candidate variants off the request path and compare the answers.

The primary's answer has left (or is leaving) when a sample is offered (``Tap`` offers it from the primary's
completed future), so the mirror can never slow or fail it beyond the offer itself: a ``put_nowait`` on a
bounded queue, and a full queue drops the sample and counts it (``slimserve_shadow_dropped_total``).

One background task drains the queue one sample at a time: a candidate never has more than one shadow
request queued, so the candidate's live traffic (a canary in the split) and the primaries' CPU come first.
That is the "lower priority": the scheduler has no priority classes, and at one in-flight shadow request it
needs none. The candidate's outputs are compared with the primary's by ``compression.metrics.compare``, the
measure the offline evaluation reports (top-1 agreement, cosine, max abs error), and the results go to
Prometheus (per model, version, primary, candidate) and to the version's live window that the decider reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

from compression.metrics import compare
from service.loaded import LoadedVariants
from service.metrics import LATENCY_BUCKETS
from service.traffic import ShadowSample, is_server_error

log = logging.getLogger("slimserve.shadow")

PAIR = ("model", "version", "primary", "candidate")
COSINE_BUCKETS = (0.0, 0.5, 0.9, 0.99, 0.999, 0.9999, 0.99999, 1.0)
ERROR_BUCKETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)
#: outputs up to this many elements are compared on the event loop (tens of microseconds); larger ones in a thread
_INLINE_ELEMENTS = 1 << 16


class TrafficMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.compared = Counter(
            "slimserve_shadow_requests_total",
            "Shadow requests to a candidate, by outcome (compared, error).",
            (*PAIR, "outcome"),
            registry=r,
        )
        self.dropped = Counter(
            "slimserve_shadow_dropped_total",
            "Sampled requests not mirrored: the shadow queue was full, or the candidate was not loaded here.",
            PAIR,
            registry=r,
        )
        self.rows = Counter(
            "slimserve_shadow_rows_total", "Rows (samples) of shadow requests compared.", PAIR, registry=r
        )
        self.top1_rows = Counter(
            "slimserve_shadow_top1_rows_total",
            "Compared rows of classifier outputs ([N, C]): the rows top-1 agreement is defined on.",
            PAIR,
            registry=r,
        )
        self.top1_agree = Counter(
            "slimserve_shadow_top1_agree_total",
            "Compared rows whose top-1 class matched the primary's (agreement = this / top1_rows_total).",
            PAIR,
            registry=r,
        )
        self.cosine = Histogram(
            "slimserve_shadow_cosine",
            "Mean per-row cosine similarity of the candidate's and the primary's outputs, per shadow request.",
            PAIR,
            buckets=COSINE_BUCKETS,
            registry=r,
        )
        self.max_abs_error = Histogram(
            "slimserve_shadow_max_abs_error",
            "Largest absolute difference between the candidate's and the primary's outputs, per shadow request.",
            PAIR,
            buckets=ERROR_BUCKETS,
            registry=r,
        )
        self.candidate_duration = Histogram(
            "slimserve_shadow_candidate_duration_seconds",
            "Time the candidate took to answer a shadow request (queue and compute, one at a time).",
            PAIR,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.decisions = Counter(
            "slimserve_traffic_decisions_total",
            "Promotion and rollback decisions taken by this replica (dry-run ones as would_promote, would_rollback).",
            ("model", "version", "variant", "action"),
            registry=r,
        )

    def touch(self, model: str, version: int, primary: str, candidate: str) -> None:
        """Create a shadow pair's counters at 0 (dashboards and alerts then see a 0 rate, not an absent series)."""
        labels = (model, str(version), primary, candidate)
        self.dropped.labels(*labels)
        for outcome in ("compared", "error"):
            self.compared.labels(*labels, outcome)


@dataclass
class _Compared:
    rows: int
    top1_rows: int
    top1_agree: float
    cosine_sum: float
    max_abs_error: float


def compare_outputs(primary: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> _Compared:
    """The candidate's outputs against the primary's: top-1 and cosine on the first output (the offline
    evaluation's "primary" measure), max abs error over every output both returned."""
    names = [n for n in primary if n in candidate]
    if not names:
        raise ValueError("the candidate returned none of the primary's outputs")
    first = compare(primary[names[0]], candidate[names[0]])
    worst = max([first.max_abs_error, *(compare(primary[n], candidate[n]).max_abs_error for n in names[1:])])
    top1_rows = first.samples if first.top1_agreement is not None else 0
    return _Compared(
        rows=first.samples,
        top1_rows=top1_rows,
        top1_agree=(first.top1_agreement or 0.0) * top1_rows,
        cosine_sum=first.mean_cosine * first.samples,
        max_abs_error=worst,
    )


class ShadowMirror:
    def __init__(self, loaded: LoadedVariants, metrics: TrafficMetrics, max_queue: int) -> None:
        self.loaded = loaded
        self.metrics = metrics
        self.queue: asyncio.Queue[ShadowSample] = asyncio.Queue(max_queue)
        self._task: asyncio.Task[None] | None = None

    def offer(self, s: ShadowSample) -> None:
        try:
            self.queue.put_nowait(s)
        except asyncio.QueueFull:
            self.metrics.dropped.labels(s.model, str(s.version), s.primary, s.candidate).inc()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            s = await self.queue.get()
            try:
                await self.mirror(s)
            except Exception:  # a comparison that cannot run must not stop the mirror
                log.exception("shadow comparison of %s:%s against %s failed", s.model, s.candidate, s.primary)

    async def mirror(self, s: ShadowSample) -> None:
        labels = (s.model, str(s.version), s.primary, s.candidate)
        candidate = self.loaded.served(s.model, s.version, s.candidate)
        if candidate is None:
            self.metrics.dropped.labels(*labels).inc()
            return
        pair = s.window.pair(s.primary, s.candidate)
        t0 = time.perf_counter_ns()
        try:
            outputs = await candidate.scheduler.submit(s.inputs, s.requested, s.rows, None)
        except Exception as e:
            seconds = (time.perf_counter_ns() - t0) / 1e9
            pair.requests += 1
            pair.latencies.append(seconds)
            if is_server_error(e):
                pair.errors += 1
            s.window.dirty = True
            self.metrics.compared.labels(*labels, "error").inc()
            log.info("shadow request to %s:%s failed: %s", s.model, s.candidate, e)
            return
        seconds = (time.perf_counter_ns() - t0) / 1e9
        if max(a.size for a in s.outputs.values()) <= _INLINE_ELEMENTS:
            c = compare_outputs(s.outputs, outputs)
        else:
            c = await asyncio.to_thread(compare_outputs, s.outputs, outputs)
        pair.requests += 1
        pair.latencies.append(seconds)
        pair.rows += c.rows
        pair.top1_rows += c.top1_rows
        pair.top1_agree += c.top1_agree
        pair.cosine_sum += c.cosine_sum
        pair.max_abs_error = max(pair.max_abs_error, c.max_abs_error)
        s.window.dirty = True
        m = self.metrics
        m.compared.labels(*labels, "compared").inc()
        m.candidate_duration.labels(*labels).observe(seconds)
        m.rows.labels(*labels).inc(c.rows)
        if c.top1_rows:
            m.top1_rows.labels(*labels).inc(c.top1_rows)
            m.top1_agree.labels(*labels).inc(c.top1_agree)
        m.cosine.labels(*labels).observe(c.cosine_sum / c.rows if c.rows else 1.0)
        m.max_abs_error.labels(*labels).observe(c.max_abs_error)
