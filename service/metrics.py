"""Prometheus metrics, defined once on an injectable registry.

Base units with unit suffixes, histograms (not summaries) so quantiles aggregate across replicas, and
bounded labels: model, version, variant, backend, and ``protocol`` (rest, grpc) on the request series
(duration, outcome, in flight). Children are bound once per served variant at load time (``VariantMetrics``),
so the request path does no label lookups.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LABELS = ("model", "version", "variant", "backend")
#: the front ends of the data plane: the ``protocol`` label of the request series (a closed set)
PROTOCOLS = ("rest", "grpc")
REQUEST_LABELS = (*LABELS, "protocol")
OUTCOMES = ("success", "client_error", "server_error", "rejected", "timeout")
# Latency buckets from 100 us to 30 s: CPU small models sit at the low end, large batches at the top.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_duration = Histogram(
            "slimserve_request_duration_seconds",
            "Inference request time inside the server, from body received to response built.",
            REQUEST_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "slimserve_queue_duration_seconds",
            "Time a request waited in the scheduler queue before its batch started.",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_duration = Histogram(
            "slimserve_compute_duration_seconds",
            "Backend execution time of the batch that carried a request.",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "slimserve_batch_size",
            "Rows (batch-dimension entries, summed over the merged requests) in one backend execution.",
            LABELS,
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.inline_executions = Counter(
            "slimserve_inline_executions_total",
            "Backend executions run on the event loop instead of an instance thread: a lone request predicted to "
            "compute within SLIMSERVE_INLINE_MAX_US (also counted in slimserve_batch_size, as batches of one request).",
            LABELS,
            registry=r,
        )
        self.requests = Counter(
            "slimserve_requests_total",
            "Inference requests by outcome (success, client_error, server_error, rejected, timeout).",
            (*REQUEST_LABELS, "outcome"),
            registry=r,
        )
        self.inflight = Gauge(
            "slimserve_inflight_requests",
            "Inference requests being handled now.",
            REQUEST_LABELS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "slimserve_queue_depth",
            "Requests waiting in the scheduler queue.",
            LABELS,
            registry=r,
        )
        self.load_duration = Histogram(
            "slimserve_model_load_duration_seconds",
            "Time to load and warm up one variant on one backend.",
            LABELS,
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.variant_size = Gauge(
            "slimserve_variant_size_bytes",
            "Stored size of a variant's artifact.",
            LABELS,
            registry=r,
        )
        self.variant_accuracy_delta = Gauge(
            "slimserve_variant_accuracy_delta",
            "Measured accuracy change of a variant against the original (negative: a loss).",
            LABELS,
            registry=r,
        )
        self.variant_ready = Gauge(
            "slimserve_variant_ready",
            "1 when the variant is loaded and serving.",
            LABELS,
            registry=r,
        )
        self.variant_engine_fallback = Gauge(
            "slimserve_variant_engine_fallback",
            "1 while the variant serves without its engine: on its engine_fallback backend (GPU), or as the plain "
            "ONNX model (CPU), until the engine is built and swapped in.",
            LABELS,
            registry=r,
        )
        self.variant_engine_waiting = Gauge(
            "slimserve_variant_engine_waiting",
            "1 while the variant is not served because its engine is still being built (no fallback configured).",
            LABELS,
            registry=r,
        )

        self.client_aborts = Counter(
            "slimserve_client_aborts_total",
            "Requests whose client disconnected before the server had read the whole request.",
            ("route",),
            registry=r,
        )
        self.http_refused = Counter(
            "slimserve_http_refused_total",
            "Connections refused before a request reached the app "
            "(header_bytes, header_count: 431; header_timeout: 408 or closed).",
            ("reason",),
            registry=r,
        )
        for reason in ("header_bytes", "header_count", "header_timeout"):
            self.http_refused.labels(reason)

    def bind(self, model: str, version: int, variant: str, backend: str) -> VariantMetrics:
        lv = (model, str(version), variant, backend)
        by_protocol = {
            p: RequestMetrics(
                request=self.request_duration.labels(*lv, p),
                ok=self.requests.labels(*lv, p, "success"),
                client_error=self.requests.labels(*lv, p, "client_error"),
                server_error=self.requests.labels(*lv, p, "server_error"),
                rejected=self.requests.labels(*lv, p, "rejected"),
                timeout=self.requests.labels(*lv, p, "timeout"),
                inflight=self.inflight.labels(*lv, p),
            )
            for p in PROTOCOLS
        }
        return VariantMetrics(
            labels=lv,
            by_protocol=by_protocol,
            queue=self.queue_duration.labels(*lv),
            compute=self.compute_duration.labels(*lv),
            batch=self.batch_size.labels(*lv),
            inline=self.inline_executions.labels(*lv),
            queue_depth=self.queue_depth.labels(*lv),
            load=self.load_duration.labels(*lv),
            size=self.variant_size.labels(*lv),
            ready=self.variant_ready.labels(*lv),
            engine_fallback=self.variant_engine_fallback.labels(*lv),
        )

    def set_accuracy_delta(self, labels: tuple[str, str, str, str], delta: float) -> None:
        """Only measured deltas are exported: a missing series means unknown, not 'no loss'."""
        self.variant_accuracy_delta.labels(*labels).set(delta)

    def mark_failed(self, model: str, version: int, variant: str, backend: str, waiting: bool = False) -> None:
        """A variant that failed to load (or waits for its engine) stays visible as not ready (alerts key on the 0)."""
        self.variant_ready.labels(model, str(version), variant, backend).set(0)
        self.variant_engine_waiting.labels(model, str(version), variant, backend).set(1 if waiting else 0)

    def forget_failed(self, model: str, version: int, variant: str, backend: str) -> None:
        for metric in (self.variant_ready, self.variant_engine_waiting):
            with contextlib.suppress(KeyError):
                metric.remove(model, str(version), variant, backend)

    def forget(self, vm: VariantMetrics) -> None:
        """Drop an unloaded variant's series so label sets stay bounded by what is loaded."""
        for metric in (
            self.queue_duration,
            self.compute_duration,
            self.batch_size,
            self.inline_executions,
            self.queue_depth,
            self.load_duration,
            self.variant_size,
            self.variant_accuracy_delta,
            self.variant_ready,
            self.variant_engine_fallback,
        ):
            with contextlib.suppress(KeyError):
                metric.remove(*vm.labels)
        for p in PROTOCOLS:
            for per_protocol in (self.request_duration, self.inflight):
                with contextlib.suppress(KeyError):
                    per_protocol.remove(*vm.labels, p)
            for outcome in OUTCOMES:
                with contextlib.suppress(KeyError):
                    self.requests.remove(*vm.labels, p, outcome)


@dataclass
class RequestMetrics:
    """One variant's request series for one protocol."""

    request: Histogram
    ok: Counter
    client_error: Counter
    server_error: Counter
    rejected: Counter
    timeout: Counter
    inflight: Gauge


@dataclass
class VariantMetrics:
    labels: tuple[str, str, str, str]
    by_protocol: dict[str, RequestMetrics]
    queue: Histogram
    compute: Histogram
    batch: Histogram
    inline: Counter
    queue_depth: Gauge
    load: Histogram
    size: Gauge
    ready: Gauge
    engine_fallback: Gauge
