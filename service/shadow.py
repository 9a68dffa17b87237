"""Shadow traffic: mirror sampled requests to candidate variants off the request path and compare the answers.

The primary's answer has left (or is leaving) when a sample is offered (``Tap`` offers it from the primary's
completed future), so the mirror can never slow or fail it beyond the offer itself: a ``put_nowait`` on a
bounded queue, and a full queue drops the sample and counts it (``slimserve_shadow_dropped_total``).

One background task drains the queue: it takes what has queued (up to ``_MAX_BATCH`` samples), joins the
samples of each pair into as few candidate requests as their shapes allow (``ShadowMirror.mirror``), and waits
for their answers before it takes more, so a candidate never has more than one such round of shadow requests
in flight and the primaries' CPU comes first. That is the "lower priority": the scheduler has no priority
classes, and with one round in flight it needs none; what arrives meanwhile waits in the bounded queue or is
dropped.

The candidate's outputs are compared with the primary's by ``compression.metrics.compare``, the
measure the offline evaluation reports (top-1 agreement, cosine, max abs error), and the results go to
Prometheus (per model, version, primary, candidate) and to the version's live window that the decider reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

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
#: how long the mirror lets samples gather before it sends them (their candidate latency is measured from the send)
_GATHER_S = 0.005
#: queued samples submitted together (the candidate's scheduler batches them) and compared in one call
_MAX_BATCH = 64
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
            "Mean per-row cosine similarity of the candidate's and the primary's outputs, per comparison (the "
            "shadow requests answered together).",
            PAIR,
            buckets=COSINE_BUCKETS,
            registry=r,
        )
        self.max_abs_error = Histogram(
            "slimserve_shadow_max_abs_error",
            "Largest absolute difference between the candidate's and the primary's outputs, per comparison (the "
            "shadow requests answered together).",
            PAIR,
            buckets=ERROR_BUCKETS,
            registry=r,
        )
        self.candidate_duration = Histogram(
            "slimserve_shadow_candidate_duration_seconds",
            "Time the candidate took to answer a shadow request (joined with the others queued at the time).",
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


@dataclass(frozen=True)
class _PairMetrics:
    """One pair's metric children, bound once (``labels()`` is a locked dict lookup per call)."""

    compared: Counter
    error: Counter
    dropped: Counter
    rows: Counter
    top1_rows: Counter
    top1_agree: Counter
    cosine: Histogram
    max_abs_error: Histogram
    duration: Histogram


class ShadowMirror:
    def __init__(self, loaded: LoadedVariants, metrics: TrafficMetrics, max_queue: int) -> None:
        self.loaded = loaded
        self.metrics = metrics
        self.queue: asyncio.Queue[ShadowSample] = asyncio.Queue(max_queue)
        self._task: asyncio.Task[None] | None = None
        self._pairs: dict[tuple[str, int, str, str], _PairMetrics] = {}

    def pair_metrics(self, model: str, version: int, primary: str, candidate: str) -> _PairMetrics:
        key = (model, version, primary, candidate)
        pm = self._pairs.get(key)
        if pm is None:
            m, lv = self.metrics, (model, str(version), primary, candidate)
            pm = self._pairs[key] = _PairMetrics(
                m.compared.labels(*lv, "compared"),
                m.compared.labels(*lv, "error"),
                m.dropped.labels(*lv),
                m.rows.labels(*lv),
                m.top1_rows.labels(*lv),
                m.top1_agree.labels(*lv),
                m.cosine.labels(*lv),
                m.max_abs_error.labels(*lv),
                m.candidate_duration.labels(*lv),
            )
        return pm

    def full(self) -> bool:
        return self.queue.full()

    def offer(self, s: ShadowSample) -> None:
        try:
            self.queue.put_nowait(s)
        except asyncio.QueueFull:
            self.drop(s.model, s.version, s.primary, s.candidate)

    def drop(self, model: str, version: int, primary: str, candidate: str) -> None:
        self.pair_metrics(model, version, primary, candidate).dropped.inc()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            # Let more samples arrive (the requests that finish with this one): joined, they cost one candidate
            # request, one thread hand-off and one comparison instead of one each (bench/shadow.py measures it)
            await asyncio.sleep(_GATHER_S)
            while len(batch) < _MAX_BATCH and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            try:
                await self.mirror(batch)
            except Exception:  # a comparison that cannot run must not stop the mirror
                log.exception("shadow comparison of %d samples failed", len(batch))

    async def mirror(self, batch: list[ShadowSample]) -> None:
        """Send the queued samples to their candidates as few requests as their shapes allow (samples of one
        pair with the same input shapes are joined on the batch axis, up to the candidate's max batch size),
        then compare each answer with the primaries' joined outputs in one vectorized call. The per-sample
        cost of the mirror is what decides its cost to the primary, so it is paid once per joined request."""
        groups: dict[tuple[Any, ...], list[ShadowSample]] = {}
        for s in batch:
            shapes = tuple((k, a.dtype.str, a.shape[1:]) for k, a in s.inputs.items())
            key = (s.model, s.version, s.primary, s.candidate, id(s.window), s.requested, shapes)
            groups.setdefault(key, []).append(s)
        jobs: list[tuple[list[ShadowSample], asyncio.Future[dict[str, np.ndarray]]]] = []
        done_at: dict[int, int] = {}
        t0 = time.perf_counter_ns()
        for samples in groups.values():
            s0 = samples[0]
            candidate = self.loaded.served(s0.model, s0.version, s0.candidate)
            if candidate is None:
                for s in samples:
                    self.drop(s.model, s.version, s.primary, s.candidate)
                continue
            for chunk in _chunks(samples, candidate.max_batch_size):
                if len(chunk) == 1:
                    inputs = s0.inputs if chunk[0] is s0 else chunk[0].inputs
                else:
                    inputs = {k: np.concatenate([s.inputs[k] for s in chunk]) for k in s0.inputs}
                try:
                    fut = candidate.scheduler.submit(inputs, s0.requested, sum(s.rows for s in chunk), None)
                except Exception as e:  # its queue is full, or it is being unloaded
                    for s in chunk:
                        self._failed(s, e, 0.0)
                    continue
                n = len(jobs)
                fut.add_done_callback(lambda _f, n=n: done_at.__setitem__(n, time.perf_counter_ns()))
                jobs.append((chunk, fut))
        if not jobs:
            return
        await asyncio.wait([f for _, f in jobs])
        for n, (chunk, fut) in enumerate(jobs):
            seconds = (done_at.get(n, time.perf_counter_ns()) - t0) / 1e9
            exc = fut.exception()
            if exc is not None:
                for s in chunk:
                    self._failed(s, exc, seconds)
            else:
                await self._compare(chunk, fut.result(), seconds)

    def _failed(self, s: ShadowSample, exc: BaseException, seconds: float) -> None:
        pair = s.window.pair(s.primary, s.candidate)
        pair.requests += 1
        pair.latencies.append(seconds)
        if is_server_error(exc):
            pair.errors += 1
        s.window.dirty = True
        self.pair_metrics(s.model, s.version, s.primary, s.candidate).error.inc()
        log.info("shadow request to %s:%s failed: %s", s.model, s.candidate, exc)

    async def _compare(self, chunk: list[ShadowSample], answer: dict[str, np.ndarray], seconds: float) -> None:
        s0 = chunk[0]
        primary = _stack([s.outputs for s in chunk])
        if primary is not None:
            parts = [(primary, answer)]
        else:  # the primaries' outputs do not join (shapes that depend on values): row by row of the answer
            bounds = np.cumsum([s.rows for s in chunk])[:-1]
            split = {k: np.split(v, bounds) for k, v in answer.items()}
            parts = [(s.outputs, {k: v[i] for k, v in split.items()}) for i, s in enumerate(chunk)]
        pair = s0.window.pair(s0.primary, s0.candidate)
        pm = self.pair_metrics(s0.model, s0.version, s0.primary, s0.candidate)
        for p_out, c_out in parts:
            if max(a.size for a in p_out.values()) <= _INLINE_ELEMENTS:
                c = compare_outputs(p_out, c_out)
            else:
                c = await asyncio.to_thread(compare_outputs, p_out, c_out)
            pair.rows += c.rows
            pair.top1_rows += c.top1_rows
            pair.top1_agree += c.top1_agree
            pair.cosine_sum += c.cosine_sum
            pair.max_abs_error = max(pair.max_abs_error, c.max_abs_error)
            pm.rows.inc(c.rows)
            if c.top1_rows:
                pm.top1_rows.inc(c.top1_rows)
                pm.top1_agree.inc(c.top1_agree)
            pm.cosine.observe(c.cosine_sum / c.rows if c.rows else 1.0)
            pm.max_abs_error.observe(c.max_abs_error)
        pair.requests += len(chunk)
        pair.latencies.extend([seconds] * len(chunk))
        for _ in chunk:
            pm.duration.observe(seconds)
        pm.compared.inc(len(chunk))
        s0.window.dirty = True


def _chunks(samples: list[ShadowSample], max_batch_size: int) -> list[list[ShadowSample]]:
    """Samples joined into requests of at most ``max_batch_size`` rows (0: the model has no batch axis)."""
    if max_batch_size <= 0:
        return [[s] for s in samples]
    out: list[list[ShadowSample]] = []
    rows = max_batch_size + 1
    for s in samples:
        if rows + s.rows > max_batch_size:
            out.append([])
            rows = 0
        out[-1].append(s)
        rows += s.rows
    return out


def _stack(outputs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray] | None:
    """Outputs of several requests joined on axis 0, or None when they do not join (other names or shapes)."""
    if len(outputs) == 1:
        return outputs[0]
    first = outputs[0]
    for o in outputs[1:]:
        if o.keys() != first.keys() or any(o[k].shape[1:] != first[k].shape[1:] or o[k].ndim == 0 for k in o):
            return None
    if any(a.ndim == 0 for a in first.values()):
        return None
    return {k: np.concatenate([o[k] for o in outputs]) for k in first}
