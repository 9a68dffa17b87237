"""The serving-config tuner (Triton Model Analyzer's job): measure a variant behind the real scheduler, pick the
best config under the latency budget.

For the variant an optimize job chose, configs of ``max_batch_size`` x ``instances`` x intra-op threads x queue
delay x ``allow_spinning`` are measured by a closed-loop load generator: ``concurrency`` clients, each sending one
single-sample request to a real ``service.scheduler.Scheduler`` over real ONNX Runtime sessions and sending the
next as soon as the answer comes, for ``WINDOW_S`` seconds after a warm-up. The search is coordinate descent from
the server's defaults (one knob at a time, the best value kept), not the full grid: about ten measurements.

The best config: with ``latency_budget_ms``, the highest throughput whose p99 is within the budget (the lowest
p99 when none is, said so); without one, the lowest p99 for the latency objective, else the highest throughput.
Single measurements on a shared machine are noisy: a change that wins by more than ``MIN_GAIN`` is measured
again against the current best, interleaved, ``CONFIRM_ROUNDS`` more times, and kept only when it wins every
round. Thread counts are sized from ``settings.usable_cpus`` (affinity mask and cgroup CPU quota).

Runs in a job worker, injected as the optimize job's ``tuner`` (compression must not import service).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from backends import BackendOptions, load_backend
from compression.calibration import Samples
from compression.optimize.spec import OptimizeSpec
from service.metrics import Metrics
from service.scheduler import Scheduler, SchedulerConfig, Stats
from service.settings import Settings, usable_cpus

WINDOW_S = 1.5  # measured seconds per config, after the warm-up
MIN_GAIN = 0.05  # a knob's new value is kept only when it wins by more than this
CONFIRM_ROUNDS = 2  # interleaved re-measurements of a winning change before it is kept
MAX_QUEUE = 100_000
#: what the server batches up to when a config does not say (SLIMSERVE_DEFAULT_MAX_BATCH_SIZE's default)
DEFAULT_MAX_BATCH: int = Settings.model_fields["default_max_batch_size"].default
BACKEND = "onnxruntime-cpu"


def measure(
    model: bytes, samples: Samples, config: dict[str, Any], concurrency: int, window_s: float = WINDOW_S
) -> dict[str, Any]:
    """p50/p99 latency (ms) and throughput (requests/s) of ``concurrency`` closed-loop clients against a real
    scheduler with ``config``'s instances, threads, batching and spinning."""
    opts = BackendOptions(intra_op_threads=config["intra_op_threads"], allow_spinning=config["allow_spinning"])
    instances = [load_backend(BACKEND, model, opts) for _ in range(config["instances"])]
    metrics = Metrics(CollectorRegistry()).bind("tuning", 1, "candidate", BACKEND)
    scheduler = Scheduler(
        "tuning",
        instances,
        SchedulerConfig(
            max_batch_size=config["max_batch_size"],
            batching=config["max_batch_size"] > 1,
            max_queue_delay_ns=config["max_queue_delay_us"] * 1000,
            preferred_batch_sizes=(),
            max_queue_size=MAX_QUEUE,
            default_timeout_ns=None,
        ),
        metrics,
        Stats(),
    )
    feeds = [{k: v[i : i + 1] for k, v in samples.arrays.items()} for i in range(min(samples.count, 64))]
    try:
        latencies = asyncio.run(_drive(scheduler, feeds, concurrency, window_s))
    finally:
        scheduler.stop()
        for b in instances:
            b.unload()
    lat = np.asarray(latencies[1]) * 1000.0
    return {
        "p50_ms": round(float(np.percentile(lat, 50)), 3),
        "p99_ms": round(float(np.percentile(lat, 99)), 3),
        "throughput": round(len(lat) / latencies[0], 2),
        "requests": len(lat),
    }


async def _drive(
    scheduler: Scheduler, feeds: list[dict[str, np.ndarray]], concurrency: int, window_s: float
) -> tuple[float, list[float]]:
    """(seconds measured, latencies in s): a warm-up round, then closed-loop clients for ``window_s``."""
    await asyncio.gather(*(scheduler.submit(feeds[i % len(feeds)], None, 1) for i in range(concurrency)))
    latencies: list[float] = []
    start = time.perf_counter()
    end = start + window_s

    async def client(i: int) -> None:
        n = i
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            await scheduler.submit(feeds[n % len(feeds)], None, 1)
            latencies.append(time.perf_counter() - t0)
            n += concurrency

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return time.perf_counter() - start, latencies


def _better(a: dict[str, Any], b: dict[str, Any], spec: OptimizeSpec) -> bool:
    """Measurement ``a`` beats ``b`` by more than MIN_GAIN under the spec's goal (see the module doc)."""
    budget = spec.latency_budget_ms
    if budget is not None:
        a_ok, b_ok = a["p99_ms"] <= budget, b["p99_ms"] <= budget
        if a_ok != b_ok:
            return a_ok
        if not a_ok:
            return a["p99_ms"] < (1 - MIN_GAIN) * b["p99_ms"]
    if spec.objective == "latency" and budget is None:
        return a["p99_ms"] < (1 - MIN_GAIN) * b["p99_ms"]
    return a["throughput"] > (1 + MIN_GAIN) * b["throughput"]


def candidates(cpus: int, concurrency: int, batchable: bool) -> dict[str, list[Any]]:
    """Each knob's values, the server's default first. Batching knobs and instances are measured only under
    concurrent load (one client never forms a batch nor keeps two instances busy, so its measurement cannot choose
    them; the server's defaults stay), and so are intra-op threads for a model with a batch dimension."""
    grid: dict[str, list[Any]] = {}
    if batchable and concurrency > 1:
        grid["max_batch_size"] = [min(32, 1 << (concurrency - 1).bit_length()), 1]
        grid["max_queue_delay_us"] = [0, 2000]
    if concurrency > 1:  # one client keeps one instance busy: a second one only takes its threads away
        grid["instances"] = sorted({1, min(2, cpus)})
    # Fewer intra-op threads win on single-row requests (little work per call) and lose on batched ones (a batch of
    # 32 MiniLM rows ran ~1.7x faster on two threads than on one here). One client's single-row measurement cannot
    # speak for the batches the server also runs, so with a batch dimension threads are tuned only under concurrent
    # load, where requests are batched in the measurement too; a fixed batch is the whole load, so it is tuned.
    grid["intra_op_threads"] = [cpus, 1] if cpus > 1 and (concurrency > 1 or not batchable) else [cpus]
    grid["allow_spinning"] = [True, False]
    return grid


def tune(model: bytes, samples: Samples, spec: OptimizeSpec, progress: Callable[[float], None]) -> dict[str, Any]:
    """The best serving config for ``model`` at the spec's concurrency and budget, with every measurement."""
    cpus = usable_cpus()
    grid = candidates(cpus, spec.concurrency, samples.batch is None)
    untuned = {"max_batch_size": DEFAULT_MAX_BATCH if samples.batch is None else 1, "max_queue_delay_us": 0}
    untuned["instances"] = 1
    config = {k: v[0] for k, v in grid.items()}
    tried: list[dict[str, Any]] = []

    def run(cfg: dict[str, Any]) -> dict[str, Any]:
        threads = max(1, min(cfg["intra_op_threads"], cpus // cfg.get("instances", 1)))
        cfg = {**cfg, "intra_op_threads": threads}
        row = {"config": cfg, **measure(model, samples, {**untuned, **cfg}, spec.concurrency)}
        tried.append(row)
        progress(min(1.0, len(tried) / (1 + sum(len(v) - 1 for v in grid.values()))))  # confirmations go past 1
        return row

    best = run(config)
    for knob, values in grid.items():
        for value in values[1:]:
            row = run({**best["config"], knob: value})
            if not _better(row, best, spec):
                continue
            # a win on one window may be the machine's noise: the pair is measured again, interleaved, and the
            # change is kept only when it wins every round (a sign test; see the module doc)
            rounds = [(row, best)]
            for _ in range(CONFIRM_ROUNDS):
                rounds.append((run(row["config"]), run(best["config"])))
            if all(_better(a, b, spec) for a, b in rounds):
                best = rounds[-1][0]
    within = spec.latency_budget_ms is None or best["p99_ms"] <= spec.latency_budget_ms
    return {
        "config": best["config"],
        "measured": {k: best[k] for k in ("p50_ms", "p99_ms", "throughput", "requests")},
        "concurrency": spec.concurrency,
        "latency_budget_ms": spec.latency_budget_ms,
        "within_budget": within,
        "cpus": cpus,
        "trials": tried,
        "note": None if within else f"no config met p99 <= {spec.latency_budget_ms} ms: the lowest p99 is kept",
    }
