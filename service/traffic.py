"""Traffic policies: which variant serves a plain-name request (a weighted split), and what is mirrored.

A policy belongs to one model version and lives in the catalogue (``model_store.traffic``), so every replica
applies the same one. ``TrafficRouter.refresh`` reads the policies after each catalogue sync and hangs a
``Tap`` on every served variant of a version that has one. The data plane then needs no lookup for versions
without a policy (``sv.tap is None``), and for the others:

- ``DataPlane.resolve`` asks ``Route.pick`` for the variant of a plain-name request (``name:variant`` requests
  bypass the split): by weight, with a uniform draw, or, when the policy names a sticky key, with the hash of
  that request header, so the same key always lands on the same variant on every replica;
- ``DataPlane.submit`` lets the tap watch the request's future: its latency and outcome are counted in the
  version's live window, and a sampled fraction is offered to the shadow mirror (``service.shadow``).
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import logging
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from model_store import TrafficPolicyRecord
from service.errors import ApiError, Unprocessable
from service.traffic_window import VariantWindow, VersionWindow

if TYPE_CHECKING:
    from service.loaded import LoadedVariants
    from service.shadow import ShadowMirror
    from service.variant_build import ServedVariant

log = logging.getLogger("slimserve.traffic")

#: how a response names the variant that answered it (every front end): a header, and a response parameter
VARIANT_HEADER = "X-Slimserve-Variant"
VARIANT_PARAM = "slimserve_variant"
VARIANT = r"^[A-Za-z0-9_-]{1,64}$"
REQUEST_ID = "request-id"
REQUEST_ID_HEADER = "x-request-id"
_SUM_TOLERANCE = 1e-6


class Rules(BaseModel):
    """When the decider promotes a shadowed candidate, or takes a candidate out of the split."""

    model_config = ConfigDict(extra="forbid")
    #: samples (compared rows for agreement; requests for error rate and p99) a decision needs
    min_samples: int = Field(100, ge=1, le=1_000_000)
    #: promote only when agreement >= 1 - tolerance; below it the candidate is rolled back
    tolerance: float = Field(0.01, ge=0, le=1)
    #: optional bound on the largest absolute output difference seen (rolled back beyond it)
    max_abs_error: float | None = Field(None, ge=0)
    #: promote only when the candidate's p99 <= (1 - p99_margin) x the primary's p99
    p99_margin: float = Field(0.1, ge=0, lt=1)
    #: roll back when the candidate's error rate (its live and shadow requests) exceeds this
    rollback_error_rate: float = Field(0.05, ge=0, le=1)
    #: roll back when the candidate's p99 (seconds) exceeds this
    rollback_p99_s: float | None = Field(None, gt=0)
    #: record what would be done ("would_promote", "would_rollback") and change nothing
    dry_run: bool = False


class TrafficPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: variant -> weight for plain-name requests; weights >= 0 summing to 1
    split: dict[str, float] = Field(min_length=1, max_length=32)
    #: candidate variant -> fraction of requests mirrored to it, in [0, 1]
    shadow: dict[str, float] = Field(default_factory=dict, max_length=8)
    #: "request-id" (the X-Request-ID header) or a request header's name: the split hashes it, so a key
    #: always lands on the same variant; None or an absent header: a uniform draw per request
    sticky: str | None = Field(None, pattern=r"^[A-Za-z0-9-]{1,64}$")
    rules: Rules | None = None

    @model_validator(mode="after")
    def _check(self) -> TrafficPolicy:
        for what, table in (("split", self.split), ("shadow", self.shadow)):
            for name in table:
                if not re.match(VARIANT, name):
                    raise ValueError(f"{what}: {name!r} is not a variant name")
        bad = {k: w for k, w in self.split.items() if not (w >= 0 and np.isfinite(w))}
        if bad:
            raise ValueError(f"split: weights must be finite and >= 0, got {bad}")
        total = sum(self.split.values())
        if abs(total - 1.0) > _SUM_TOLERANCE:
            raise ValueError(f"split: weights must sum to 1, they sum to {total:g}")
        bad = {k: f for k, f in self.shadow.items() if not 0.0 <= f <= 1.0}
        if bad:
            raise ValueError(f"shadow: fractions must be in [0, 1], got {bad}")
        return self

    @property
    def sticky_header(self) -> str | None:
        if self.sticky is None:
            return None
        return REQUEST_ID_HEADER if self.sticky.lower() == REQUEST_ID else self.sticky.lower()


def check_variants(policy: TrafficPolicy, model: str, number: int, ready: set[str], known: set[str]) -> None:
    """422 for a policy over variants the version lacks, or that are not ready to serve here."""
    for what, names in (("split", policy.split), ("shadow", policy.shadow)):
        for name in names:
            if name not in known:
                raise Unprocessable(
                    f"{what}: {model} version {number} has no variant {name!r} (variants: {', '.join(sorted(known))})"
                )
            if name not in ready and (what == "shadow" or policy.split[name] > 0):
                raise Unprocessable(f"{what}: variant {name!r} of {model} version {number} is not ready")


class Route:
    """The split of one version: cumulative weights over the variants that get traffic."""

    def __init__(self, policy: TrafficPolicy, seed: int | None = None) -> None:
        items = sorted((k, w) for k, w in policy.split.items() if w > 0)
        self.names = [k for k, _ in items]
        self.cumulative = list(np.cumsum([w for _, w in items]) / sum(w for _, w in items))
        self.header = policy.sticky_header
        self._rng = random.Random(seed)

    def pick(self, headers: Mapping[str, str] | None) -> str:
        key = headers.get(self.header) if self.header is not None and headers is not None else None
        if key:
            # a stable hash (Python's hash() is salted per process): every replica sends a key to one variant
            u = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64
        else:
            u = self._rng.random()
        return self.names[min(bisect.bisect_right(self.cumulative, u), len(self.names) - 1)]


@dataclass(slots=True)  # not frozen: one is built per mirrored request, and frozen init costs more
class ShadowSample:
    model: str
    version: int
    primary: str
    candidate: str
    inputs: dict[str, np.ndarray]
    requested: tuple[str, ...] | None
    rows: int
    outputs: dict[str, np.ndarray]
    window: VersionWindow


class Tap:
    """Hung on a served variant of a version with a policy (``ServedVariant.tap``)."""

    __slots__ = ("_rng", "live", "mirror", "route", "shadows", "sv", "window")

    def __init__(
        self,
        sv: ServedVariant,
        route: Route,
        window: VersionWindow,
        shadows: list[tuple[str, float]],
        mirror: ShadowMirror | None,
    ) -> None:
        self.sv = sv
        self.route = route
        self.window = window
        self.live: VariantWindow = window.variant(sv.variant)
        self.shadows = [(c, f) for c, f in shadows if c != sv.variant and f > 0]
        self.mirror = mirror
        self._rng = random.Random()

    def watch(
        self,
        fut: asyncio.Future[dict[str, np.ndarray]],
        inputs: dict[str, np.ndarray],
        requested: tuple[str, ...] | None,
        rows: int,
    ) -> None:
        fut.add_done_callback(partial(self._done, time.perf_counter_ns(), inputs, requested, rows))

    def _done(
        self,
        t0: int,
        inputs: dict[str, np.ndarray],
        requested: tuple[str, ...] | None,
        rows: int,
        fut: asyncio.Future[dict[str, np.ndarray]],
    ) -> None:
        if fut.cancelled():
            return
        seconds = (time.perf_counter_ns() - t0) / 1e9
        live = self.live
        live.requests += 1
        live.latencies.append(seconds)
        self.window.dirty = True
        exc = fut.exception()
        if exc is not None:
            if is_server_error(exc):
                live.errors += 1
            return
        if self.mirror is None:
            return
        outputs = fut.result()
        sv = self.sv
        mirror = self.mirror
        for candidate, fraction in self.shadows:
            if fraction < 1.0 and self._rng.random() >= fraction:
                continue
            if mirror.full():
                mirror.drop(sv.model, sv.version, sv.variant, candidate)
            else:
                mirror.offer(
                    ShadowSample(
                        sv.model, sv.version, sv.variant, candidate, inputs, requested, rows, outputs, self.window
                    )
                )


def is_server_error(exc: BaseException) -> bool:
    """A failure that counts against the variant: a 5xx other than load shedding (503), not the client's."""
    if isinstance(exc, ApiError):
        return exc.status >= 500 and exc.status != 503
    return True


@dataclass
class VersionTraffic:
    """A version's policy as this replica applies it."""

    record: TrafficPolicyRecord
    policy: TrafficPolicy
    route: Route
    window: VersionWindow


class TrafficRouter:
    def __init__(self, loaded: LoadedVariants, mirror: ShadowMirror, seed: int | None = None) -> None:
        self.loaded = loaded
        self.mirror = mirror
        self.seed = seed
        self.versions: dict[tuple[str, int], VersionTraffic] = {}
        self._applied: tuple[int, int] | None = None  # (catalogue revision, served-set identity) last applied
        self._lock = asyncio.Lock()

    async def refresh(self, force: bool = False) -> None:
        """Read the policies and hang taps on the served variants, when the catalogue or the served set moved."""
        async with self._lock:
            served = self.loaded.served_versions()
            stamp = (self.loaded.revision, hash(tuple(id(sv) for v in served for sv in v.variants.values())))
            if stamp == self._applied and not force:
                return
            records = await asyncio.to_thread(self.loaded.store.traffic.policies)
            self._apply(records)
            self._applied = stamp

    def _apply(self, records: list[TrafficPolicyRecord]) -> None:
        current: dict[tuple[str, int], VersionTraffic] = {}
        for rec in records:
            key = (rec.model, rec.version)
            old = self.versions.get(key)
            if old is not None and old.record.epoch == rec.epoch and old.record.policy == rec.policy:
                current[key] = old
                continue
            try:
                policy = TrafficPolicy.model_validate(rec.policy)
            except ValueError as e:  # written by another release: serve the default rather than guess
                log.error("traffic policy of %s version %s is invalid here, ignored: %s", rec.model, rec.version, e)
                continue
            current[key] = VersionTraffic(rec, policy, Route(policy, self.seed), VersionWindow(rec.epoch))
        self.versions = current
        for ver in self.loaded.served_versions():
            vt = current.get((ver.model, ver.number))
            for sv in ver.variants.values():
                if vt is None:
                    sv.tap = None
                    continue
                sv.tap = Tap(sv, vt.route, vt.window, list(vt.policy.shadow.items()), self.mirror)
                for candidate, _ in sv.tap.shadows:  # bound now: the pair's counters read 0, not "no data"
                    self.mirror.pair_metrics(sv.model, sv.version, sv.variant, candidate)

    def describe(self, model: str, number: int) -> dict[str, Any] | None:
        vt = self.versions.get((model, number))
        if vt is None:
            return None
        return {"epoch": vt.record.epoch, "window": vt.window.to_dict()}
