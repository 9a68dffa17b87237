"""Dynamic batching and model instances for one served variant.

Each instance is a backend object driven by its own instance thread (ONNX Runtime releases the GIL while
it computes, so threads run in parallel). Requests wait in one bounded queue; an idle instance thread takes the
oldest request and every queued request compatible with it (same non-batch shapes, dtypes and requested
outputs) up to ``max_batch_size``, optionally waiting up to ``max_queue_delay`` for a preferred size.
With a delay of 0 (the default) nothing waits: a batch forms only from requests that queued while the
instances were busy, so an idle server answers at single-request latency and a loaded one batches.

**Inline runs.** Handing a request to an instance thread and its answer back to the event loop costs two thread
wake-ups, GIL hand-offs and a ``call_soon_threadsafe``: more than a small model's inference (at c=1, inline runs
save 7% of the server's CPU per call: docs/benchmarks/grpc-h2load.md). So ``submit`` runs a request on the calling
thread (the event loop) when that cannot hurt anyone: nothing is queued (no batch to join, no request to overtake),
an instance is idle (it is borrowed, so no thread runs it meanwhile), the config asks for no queue delay, the
backend's work is bounded by its inputs' shapes (``Backend.inline_safe``: ONNX Runtime on the CPU, for a graph
without control flow or sizes read from run-time values, so a request with small inputs cannot compute for seconds
on the loop), and the request's predicted compute time is at most ``inline_max_ns``. The prediction is an average of
the time per input element of earlier executions that served one request (inline or on a thread), times the
request's elements: a larger request is predicted as costlier, never cheaper. Until a few executions are measured
nothing runs inline, and a model that computes for longer than the limit never does, so a loop blocked by it cannot
starve the other connections. Inline runs keep every count: queue time (the few microseconds from submit to the
run), compute, a batch of one request, Triton's statistics.

Failures are blamed as Triton and KServe blame them: a runtime that refuses the caller's values
(``InvalidInput``) answers 400; any other runtime failure, or outputs that cannot be split back into the
merged requests, answers 500. Outcomes (success, rejected, timeout, ...) are counted by the data plane,
which sees every request end; the scheduler records queue, compute and batch-size metrics.

Written by hand rather than taken from a library: no maintained Python package batches numpy requests
across threads with Triton's semantics (preferred sizes, per-request timeouts, shape-aware grouping).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backends import Backend, InvalidInput
from service.errors import BadRequest, InternalError, Unavailable
from service.metrics import VariantMetrics


class QueueTimeout(Unavailable):
    """The request's deadline passed while it waited (Triton answers UNAVAILABLE too)."""


class QueueFull(Unavailable):
    """The bounded queue is full: shed load fast, with Retry-After."""


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def to_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class Stats:
    """Counters for Triton's statistics extension (GET /v2/models/{m}/stats)."""

    success: _Duration = field(default_factory=_Duration)
    fail: _Duration = field(default_factory=_Duration)
    queue: _Duration = field(default_factory=_Duration)
    compute_input: _Duration = field(default_factory=_Duration)
    compute_infer: _Duration = field(default_factory=_Duration)
    compute_output: _Duration = field(default_factory=_Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batch: dict[int, tuple[_Duration, _Duration, _Duration]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, rows: int, start: int, t_in: int, t_inf: int, t_out: int, enqueued: list[int]) -> None:
        """One execution of ``len(enqueued)`` requests carrying ``rows`` rows (perf_counter_ns marks: batch start,
        inputs ready, inference done, outputs split). One method, attributes updated in place: the hot path."""
        n = len(enqueued)
        ready, infer, out = t_in - start, t_inf - t_in, t_out - t_inf
        with self.lock:
            self.execution_count += 1
            self.inference_count += rows
            self.compute_input.add(ready, n)
            self.compute_infer.add(infer, n)
            self.compute_output.add(out, n)
            self.queue.add(start * n - sum(enqueued), n)  # each request's wait, start - enqueued, summed
            bs = self.batch.get(rows)
            if bs is None:
                bs = self.batch[rows] = (_Duration(), _Duration(), _Duration())
            bs[0].add(ready)
            bs[1].add(infer)
            bs[2].add(out)
            self.last_inference_ms = time.time_ns() // 1_000_000

    def to_dict(self) -> dict[str, Any]:
        with self.lock:
            return {
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {
                    "success": self.success.to_dict(),
                    "fail": self.fail.to_dict(),
                    "queue": self.queue.to_dict(),
                    "compute_input": self.compute_input.to_dict(),
                    "compute_infer": self.compute_infer.to_dict(),
                    "compute_output": self.compute_output.to_dict(),
                    "cache_hit": {"count": 0, "ns": 0},
                    "cache_miss": {"count": 0, "ns": 0},
                },
                "batch_stats": [
                    {
                        "batch_size": bs,
                        "compute_input": ci.to_dict(),
                        "compute_infer": cf.to_dict(),
                        "compute_output": co.to_dict(),
                    }
                    for bs, (ci, cf, co) in sorted(self.batch.items())
                ],
            }


@dataclass(eq=False)
class _Pending:
    inputs: dict[str, np.ndarray]
    outputs: tuple[str, ...] | None
    rows: int
    key: tuple[Any, ...] | None  # what a batch's requests share (None: an inline run, never batched)
    enqueued_ns: int
    deadline_ns: int | None
    future: asyncio.Future[dict[str, np.ndarray]]
    loop: asyncio.AbstractEventLoop | None = None  # None: an inline run, resolved on the loop itself


#: a request and what it gets: its outputs, or the error to raise
_Outcome = tuple[_Pending, dict[str, np.ndarray] | None, BaseException | None]


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int  # 0: the model has no batch dimension, never merge
    batching: bool
    max_queue_delay_ns: int
    preferred_batch_sizes: tuple[int, ...]
    max_queue_size: int
    default_timeout_ns: int | None
    #: run a request on the event loop when its predicted compute time is at most this (0: never); see above
    inline_max_ns: int = 0


#: single-request executions measured before a request may run inline, and the weight of each new one
_INLINE_MIN_SAMPLES = 8
_INLINE_EWMA_WEIGHT = 0.125


class Scheduler:
    def __init__(
        self,
        label: str,
        instances: list[Backend],
        config: SchedulerConfig,
        metrics: VariantMetrics,
        stats: Stats,
    ) -> None:
        if not instances:
            raise ValueError("a scheduler needs at least one instance")
        self.label = label
        self.config = config
        self.metrics = metrics
        self.stats = stats
        self._instances = instances
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._stopped = False
        self._merge = config.batching and config.max_batch_size > 1
        #: instance i is running a batch on its thread, or is lent to an inline run (guarded by _cond)
        self._busy = [False] * len(instances)
        self._inline = (
            config.inline_max_ns > 0 and config.max_queue_delay_ns == 0 and all(b.inline_safe for b in instances)
        )
        #: compute ns per input element of single-request executions (EWMA), and how many were measured
        self._ns_per_element = 0.0
        self._cost_samples = 0
        self._threads = [
            threading.Thread(target=self._instance_loop, args=(i,), name=f"slimserve-{label}-{i}", daemon=True)
            for i in range(len(instances))
        ]
        for t in self._threads:
            t.start()

    # -- called on the event loop -----------------------------------------------------------------

    def submit(
        self,
        inputs: dict[str, np.ndarray],
        outputs: tuple[str, ...] | None,
        rows: int,
        timeout_ns: int | None = None,
    ) -> asyncio.Future[dict[str, np.ndarray]]:
        """Queue a request (or run it inline, see the module docstring); the future resolves to its outputs or
        raises an ApiError."""
        loop = asyncio.get_running_loop()
        now = time.perf_counter_ns()
        timeout_ns = timeout_ns or self.config.default_timeout_ns
        deadline = now + timeout_ns if timeout_ns else None
        if self._inline:
            lent = self._lend(inputs)
            if lent >= 0:
                p = _Pending(inputs, outputs, rows, None, now, deadline, loop.create_future())
                return self._run_inline(lent, p)
        key = (
            tuple((n, a.dtype.str, a.shape[1:]) for n, a in inputs.items()) if self._merge else None,
            outputs,
        )
        p = _Pending(inputs, outputs, rows, key, now, deadline, loop.create_future(), loop)
        with self._cond:
            if self._stopped:
                raise Unavailable("the model is being unloaded", retry_after=1)
            if len(self._queue) >= self.config.max_queue_size:
                raise QueueFull(
                    f"the queue of {self.label} is full ({self.config.max_queue_size} requests)", retry_after=1
                )
            self._queue.append(p)
            self._cond.notify()
        self.metrics.queue_depth.inc()
        return p.future

    def _lend(self, inputs: dict[str, np.ndarray]) -> int:
        """The index of an idle instance lent to an inline run of ``inputs``, or -1 when the request must queue."""
        with self._cond:
            if self._stopped or self._queue or self._cost_samples < _INLINE_MIN_SAMPLES:
                return -1
            if self._ns_per_element * sum(a.size for a in inputs.values()) > self.config.inline_max_ns:
                return -1
            try:
                lent = self._busy.index(False)
            except ValueError:  # every instance is busy
                return -1
            self._busy[lent] = True
            return lent

    def _run_inline(self, lent: int, p: _Pending) -> asyncio.Future[dict[str, np.ndarray]]:
        self.metrics.inline.inc()
        cost = None
        try:
            ((_, result, exc),), cost = self._run(self._instances[lent], [p])
            _set(p.future, result, exc)
        finally:
            self._release(lent, cost)
        return p.future

    # -- instance threads -------------------------------------------------------------------------------

    def _take_batch(self, i: int) -> list[_Pending] | None:
        cfg = self.config
        with self._cond:
            while (not self._queue or self._busy[i]) and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return None
            self._busy[i] = True
            first = self._queue.popleft()
            batch = [first]
            if not self._merge:
                return batch
            rows = first.rows
            wait_until = first.enqueued_ns + cfg.max_queue_delay_ns
            while True:
                rows = self._gather(batch, rows)
                if rows >= cfg.max_batch_size or cfg.max_queue_delay_ns == 0:
                    break
                if cfg.preferred_batch_sizes and rows in cfg.preferred_batch_sizes:
                    break
                remaining = wait_until - time.perf_counter_ns()
                if remaining <= 0 or self._stopped:
                    break
                self._cond.wait(remaining / 1e9)
            return batch

    def _gather(self, batch: list[_Pending], rows: int) -> int:
        """Move compatible queued requests into ``batch`` (lock held). Returns the new row count."""
        key = batch[0].key
        limit = self.config.max_batch_size
        keep: deque[_Pending] = deque()
        while self._queue:
            p = self._queue.popleft()
            if p.key == key and rows + p.rows <= limit:
                batch.append(p)
                rows += p.rows
                if rows >= limit:
                    break
            else:
                keep.append(p)
        if keep:
            keep.extend(self._queue)
            self._queue = keep
        return rows

    def _instance_loop(self, i: int) -> None:
        backend = self._instances[i]
        while True:
            batch = self._take_batch(i)
            if batch is None:
                return
            self.metrics.queue_depth.dec(len(batch))
            outcomes, cost = self._run(backend, batch)
            self._release(i, cost)  # before the answers go out: the next request may already borrow the instance
            for p, result, exc in outcomes:
                _resolve(p, result, exc)

    def _release(self, i: int, cost: float | None) -> None:
        """Instance ``i`` is free again; learn the compute cost of a single-request execution (ns per element)."""
        with self._cond:
            self._busy[i] = False
            if cost is not None:
                if self._cost_samples == 0:
                    self._ns_per_element = cost
                else:
                    self._ns_per_element += _INLINE_EWMA_WEIGHT * (cost - self._ns_per_element)
                self._cost_samples += 1
            if self._queue or self._stopped:
                self._cond.notify_all()  # a request may wait for this very instance (its thread skipped a wake-up)

    def _run(self, backend: Backend, batch: list[_Pending]) -> tuple[list[_Outcome], float | None]:
        """Run a batch and do its accounting. Returns each request's outcome, for the caller to deliver, and the
        compute time per input element when the batch was one request (what predicts inline costs), else None."""
        m = self.metrics
        start = time.perf_counter_ns()
        outcomes: list[_Outcome] = []
        live: list[_Pending] = []
        for p in batch:
            if p.deadline_ns is not None and start > p.deadline_ns:
                outcomes.append((p, None, QueueTimeout("the request timed out in the queue", retry_after=1)))
            else:
                live.append(p)
        if not live:
            return outcomes, None
        try:
            if len(live) == 1:
                feeds = live[0].inputs
            else:
                feeds = {n: np.concatenate([p.inputs[n] for p in live]) for n in live[0].inputs}
            t_in = time.perf_counter_ns()
            outs = backend.infer(feeds, list(live[0].outputs) if live[0].outputs else None)
            t_inf = time.perf_counter_ns()
            parts = [outs] if len(live) == 1 else _split(outs, [p.rows for p in live])
            t_out = time.perf_counter_ns()
        except InvalidInput as e:  # the runtime refused the caller's values: the caller's fault
            return outcomes + [(p, None, BadRequest(f"the model refused the input: {e}")) for p in live], None
        except Exception as e:  # the runtime failed, or the outputs do not split: ours; never kill the thread
            return outcomes + [(p, None, InternalError(_describe(e))) for p in live], None
        n = len(live)
        rows = sum(p.rows for p in live)
        compute_ns = t_inf - t_in
        compute_s = compute_ns / 1e9
        self.stats.record(rows, start, t_in, t_inf, t_out, [p.enqueued_ns for p in live])
        m.batch.observe(rows)
        for p, out in zip(live, parts, strict=True):
            m.queue.observe((start - p.enqueued_ns) / 1e9)
            m.compute.observe(compute_s)
            outcomes.append((p, out, None))
        cost = compute_ns / max(1, sum(a.size for a in feeds.values())) if n == 1 and self._inline else None
        return outcomes, cost

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for p in pending:
            _resolve(p, exc=Unavailable("the model was unloaded", retry_after=1))
        for t in self._threads:
            t.join(timeout=30)
        with self._cond:  # an inline run on the event loop still holds its instance: let it finish
            self._cond.wait_for(lambda: not any(self._busy), timeout=30)
        for b in self._instances:
            b.unload()


class SplitError(RuntimeError):
    """A batched output does not have one row per input row: the model does not batch as its config says."""


def _describe(e: Exception) -> str:
    if isinstance(e, SplitError):
        return str(e)
    text = str(e).strip()
    first = text.splitlines()[0][:500] if text else type(e).__name__
    return f"inference failed: {first}"


def _split(outs: dict[str, np.ndarray], rows: list[int]) -> list[dict[str, np.ndarray]]:
    total = sum(rows)
    bounds = np.cumsum([0, *rows])
    parts: list[dict[str, np.ndarray]] = [{} for _ in rows]
    for name, arr in outs.items():
        if arr.ndim == 0 or arr.shape[0] != total:
            raise SplitError(
                f"output {name!r} of a merged batch of {total} rows has shape {list(arr.shape)}, not one row per "
                "input row: the model does not batch along its first dimension (set max_batch_size 0 for it)"
            )
        for i in range(len(rows)):
            parts[i][name] = arr[bounds[i] : bounds[i + 1]]
    return parts


def _set(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if fut.done():
        return  # the caller gave up (client disconnected)
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


def _resolve(p: _Pending, result: Any = None, exc: BaseException | None = None) -> None:
    # RuntimeError: the event loop is closed, nobody is waiting any more
    assert p.loop is not None, "an inline run resolves its future itself"
    with contextlib.suppress(RuntimeError):
        p.loop.call_soon_threadsafe(_set, p.future, result, exc)
