"""The inference data plane: what every front end (REST and gRPC) shares between its wire codecs.

A front end turns its wire format into numpy arrays and back; everything in between lives here once, so
two protocols cannot disagree on what a 404 is or which outcome a failure counts as:

- resolving ``name[:variant]`` and a version to a served variant (404 unknown, 503 known but not servable),
  and, for a plain name whose version has a traffic policy, the variant its split picks (``service.traffic``);
- submitting the decoded request to that variant's scheduler;
- per-variant accounting: in-flight gauge, request duration, outcome counter, Triton statistics;
- error classification: every failure leaves as an ``ApiError`` whose status blames the right side.

A front end drives one request as::

    sv = await plane.resolve(name, version, headers)   # headers: the sticky key's source (or None)
    t0 = plane.begin(sv, protocol)          # protocol: "rest" or "grpc" (metrics.PROTOCOLS), a metrics label
    try:
        ...decode (wire-specific)...
        outputs = await plane.submit(sv, inputs, outputs, rows, timeout_us)
        ...encode (wire-specific)...
    except <the transport's "client went away">:
        plane.abandon(sv, protocol)
        raise
    except BaseException as e:
        raise plane.fail(sv, protocol, t0, e) from None
    plane.succeed(sv, protocol, t0)
    ...tell the client which variant answered: sv.variant (REST: X-Slimserve-Variant and the response
       parameters' "slimserve_variant"; gRPC: the same parameter in ModelInferResponse.parameters)...

The methods are plain calls, not a context manager or a wrapper coroutine: this is the hot path, and an
idle server answers a small model in about 150 us, so each extra frame shows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

import numpy as np

from service.errors import ApiError, InternalError, Unavailable
from service.loaded import LoadedVariants
from service.scheduler import QueueTimeout
from service.variant_build import ServedVariant

log = logging.getLogger("slimserve.inference")


class DataPlane:
    def __init__(self, loaded: LoadedVariants) -> None:
        self.loaded = loaded

    async def resolve(self, name: str, version: str | None, headers: Mapping[str, str] | None = None) -> ServedVariant:
        """``name`` is ``model`` or ``model:variant``; ``version`` a number or None (the latest loaded).
        Raises NotFound (unknown), Unavailable (known, not servable now) or BadRequest (a bad version).

        A plain name of a version with a traffic policy serves the variant its split picks (sticky by a
        header when the policy names one; ``headers`` is any mapping with lower-case keys, or None)."""
        sv = await self.loaded.resolve(name, version)
        tap = sv.tap
        if tap is not None and ":" not in name:
            picked = tap.route.pick(headers)
            if picked != sv.variant:
                sv = self.loaded.served(sv.model, sv.version, picked) or sv  # not loaded here: the default
        return sv

    @staticmethod
    def begin(sv: ServedVariant, protocol: str) -> int:
        sv.metrics.by_protocol[protocol].inflight.inc()
        return time.perf_counter_ns()

    @staticmethod
    def submit(
        sv: ServedVariant,
        inputs: dict[str, np.ndarray],
        outputs: tuple[str, ...] | None,
        rows: int,
        timeout_us: int | None,
    ) -> asyncio.Future[dict[str, np.ndarray]]:
        """Queue a decoded request on the variant's scheduler (QueueFull at once when its queue is full).
        Under a traffic policy the variant's tap counts the outcome and may mirror it (``service.shadow``)."""
        fut = sv.scheduler.submit(inputs, outputs, rows, timeout_us * 1000 if timeout_us else None)
        if sv.tap is not None:
            sv.tap.watch(fut, inputs, outputs, rows)
        return fut

    @staticmethod
    def succeed(sv: ServedVariant, protocol: str, t0: int) -> None:
        elapsed = time.perf_counter_ns() - t0
        m = sv.metrics.by_protocol[protocol]
        m.inflight.dec()
        m.request.observe(elapsed / 1e9)
        m.ok.inc()
        st = sv.stats
        with st.lock:
            st.success.add(elapsed)

    @staticmethod
    def abandon(sv: ServedVariant, protocol: str) -> None:
        """The client went away before its answer: not an outcome of the model (the front end counts aborts)."""
        sv.metrics.by_protocol[protocol].inflight.dec()

    @staticmethod
    def fail(sv: ServedVariant, protocol: str, t0: int, exc: BaseException) -> BaseException:
        """Count a failed request and return what the front end should raise: an ``ApiError`` for every
        ``Exception`` (unexpected ones become a 500 with a one-line message, logged once with the variant);
        cancellation and other ``BaseException`` pass through uncounted."""
        m = sv.metrics.by_protocol[protocol]
        m.inflight.dec()
        if not isinstance(exc, Exception):
            return exc
        if isinstance(exc, ApiError):
            err = exc
        else:
            text = str(exc).strip()
            err = InternalError(f"internal error: {type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}")
        if isinstance(err, QueueTimeout):
            m.timeout.inc()
        elif isinstance(err, Unavailable):
            m.rejected.inc()  # a full queue or a variant being unloaded: load shed, retry later
        elif err.status >= 500:
            m.server_error.inc()
            log.error("%s:%s version %s: %s", sv.model, sv.variant, sv.version, err.message)
        else:
            m.client_error.inc()
        elapsed = time.perf_counter_ns() - t0
        m.request.observe(elapsed / 1e9)
        st = sv.stats
        with st.lock:
            st.fail.add(elapsed)
        return err
