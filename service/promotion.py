"""Promotion and rollback: a periodic decider applying a policy's rules to the live window of every replica.

Every ``traffic_interval_s`` each replica writes its own counters for each policy's current window to the
catalogue (``TrafficCatalog.write_stats``), reads every replica's back, sums them (``traffic_window.merge``)
and evaluates the rules (``evaluate``). A decision is committed with a compare-and-set on the window's epoch
(``TrafficCatalog.decide``): when two replicas reach it on the same window, one commits and the other finds
the epoch moved, so it is taken once. The decision, its numbers and the replica that took it are recorded
(``GET .../traffic/decisions``) and logged; the policy change it makes reaches every replica through the
catalogue revision, like any other change.

The rules, for each shadowed candidate against the version's default variant (the primary):

- roll back (out of the split and the shadow) when, over at least ``min_samples``, its error rate (live and
  shadow requests) exceeds ``rollback_error_rate``, its p99 exceeds ``rollback_p99_s``, its agreement is below
  ``1 - tolerance`` or its max abs error exceeds ``max_abs_error``;
- promote (the default variant and the whole split) when, over at least ``min_samples`` compared rows, its
  agreement is within tolerance and its p99 is at most ``(1 - p99_margin)`` times the primary's;
- in ``dry_run`` the same decisions are recorded as ``would_rollback`` / ``would_promote`` and nothing changes
  (the window restarts, so the next one rests on new samples).

Both p99s are of the time from submit to answer at the variant's scheduler (the same clock for both). The
candidate's shadow requests run one at a time, so under load its p99 does not include the queueing the
primary's does: a margin is the guard, and the latencies are in the decision's numbers to be read.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any

from model_store import NewDecision, RecordNotFound, TrafficCatalog
from service.loaded import LoadedVariants
from service.shadow import TrafficMetrics
from service.traffic import TrafficPolicy, TrafficRouter, VersionTraffic
from service.traffic_window import Merged, Totals, merge

log = logging.getLogger("slimserve.promotion")


@dataclass(frozen=True)
class Verdict:
    action: str  # promote or rollback
    candidate: str
    reason: str
    numbers: dict[str, Any]


def _numbers(pair: Totals, cand: Totals, primary: Totals) -> dict[str, Any]:
    return {
        "compared_rows": pair.rows,
        "shadow_requests": pair.requests,
        "agreement": pair.agreement,
        "top1_rows": pair.top1_rows,
        "mean_cosine": pair.cosine_sum / pair.rows if pair.rows else None,
        "max_abs_error": pair.max_abs_error,
        "candidate_requests": cand.requests,
        "candidate_errors": cand.errors,
        "candidate_error_rate": cand.error_rate,
        "candidate_p99_s": cand.p99(),
        "primary_requests": primary.requests,
        "primary_p99_s": primary.p99(),
    }


def evaluate(policy: TrafficPolicy, primary: str, merged: Merged) -> Verdict | None:
    """The first decision the rules call for on this window, or None (not enough samples, or nothing to do)."""
    rules = policy.rules
    if rules is None:
        return None
    p_live = merged.live.get(primary, Totals())
    for candidate in sorted(set(policy.shadow) | {k for k, w in policy.split.items() if w > 0}):
        if candidate == primary:
            continue
        pair = merged.pairs.get((primary, candidate), Totals())
        cand = Totals()  # the candidate's own requests: live (a canary in the split) and shadow
        cand.add({"requests": pair.requests, "errors": pair.errors, "latencies": pair.latencies})
        live = merged.live.get(candidate)
        if live is not None:
            cand.add({"requests": live.requests, "errors": live.errors, "latencies": live.latencies})
        numbers = _numbers(pair, cand, p_live)
        n = rules.min_samples
        if cand.requests >= n and (cand.error_rate or 0.0) > rules.rollback_error_rate:
            return Verdict(
                "rollback", candidate, f"error rate {cand.error_rate:.4f} > {rules.rollback_error_rate}", numbers
            )
        p99 = cand.p99()
        if rules.rollback_p99_s is not None and cand.requests >= n and p99 is not None and p99 > rules.rollback_p99_s:
            return Verdict("rollback", candidate, f"p99 {p99:.6f} s > {rules.rollback_p99_s} s", numbers)
        agreement = pair.agreement
        if pair.rows < n or agreement is None:
            continue
        if agreement < 1.0 - rules.tolerance:
            return Verdict(
                "rollback",
                candidate,
                f"agreement {agreement:.4f} < {1.0 - rules.tolerance:.4f} over {pair.rows}",
                numbers,
            )
        if rules.max_abs_error is not None and pair.max_abs_error > rules.max_abs_error:
            return Verdict(
                "rollback", candidate, f"max abs error {pair.max_abs_error:g} > {rules.max_abs_error:g}", numbers
            )
        if candidate not in policy.shadow:
            continue  # a canary without a shadow comparison is never promoted on latency alone
        p_p99 = p_live.p99()
        if p99 is None or p_p99 is None or p_live.requests < n:
            continue
        if p99 <= (1.0 - rules.p99_margin) * p_p99:
            return Verdict(
                "promote",
                candidate,
                f"agreement {agreement:.4f} over {pair.rows} rows; p99 {p99:.6f} s <= "
                f"{1.0 - rules.p99_margin:g} x primary's {p_p99:.6f} s",
                numbers,
            )
    return None


def applied(policy: TrafficPolicy, verdict: Verdict, primary: str) -> tuple[dict[str, Any], str | None]:
    """The policy (as stored) and default variant after ``verdict``."""
    c = verdict.candidate
    shadow = {k: f for k, f in policy.shadow.items() if k != c}
    if verdict.action == "promote":
        return policy.model_copy(update={"split": {c: 1.0}, "shadow": shadow}).model_dump(), c
    rest = {k: w for k, w in policy.split.items() if k != c and w > 0}
    total = sum(rest.values())
    split = {k: w / total for k, w in rest.items()} if total > 0 else {primary: 1.0}
    return policy.model_copy(update={"split": split, "shadow": shadow}).model_dump(), None


def replica_id() -> str:
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Decider:
    def __init__(
        self,
        catalog: TrafficCatalog,
        loaded: LoadedVariants,
        router: TrafficRouter,
        metrics: TrafficMetrics,
        interval_s: float,
    ) -> None:
        self.catalog = catalog
        self.loaded = loaded
        self.router = router
        self.metrics = metrics
        self.interval_s = interval_s
        self.replica = replica_id()
        self.ticks = 0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.tick()
            except Exception:
                log.exception("traffic decider failed; retrying")

    async def tick(self) -> None:
        await self.router.refresh()
        for (model, number), vt in list(self.router.versions.items()):
            try:
                await self._one(model, number, vt)
            except RecordNotFound:
                continue  # the version went away meanwhile
        self.ticks += 1

    async def _one(self, model: str, number: int, vt: VersionTraffic) -> None:
        window = vt.window
        if window.dirty:
            window.dirty = False
            stats = window.to_dict()
            await asyncio.to_thread(self.catalog.write_stats, model, number, self.replica, window.epoch, stats)
        rules = vt.policy.rules
        if rules is None:
            return
        served = [v for v in self.loaded.served_versions() if (v.model, v.number) == (model, number)]
        if not served:
            return  # not loaded here: the replicas that serve it decide
        primary = served[0].default_variant
        rows = await asyncio.to_thread(self.catalog.window, model, number, window.epoch)
        verdict = evaluate(vt.policy, primary, merge(rows))
        if verdict is None:
            return
        numbers = {**verdict.numbers, "replicas": len(rows)}
        if rules.dry_run:
            action, policy, default = f"would_{verdict.action}", None, None
        else:
            action = verdict.action
            policy, default = applied(vt.policy, verdict, primary)
        decision = NewDecision(action, verdict.candidate, primary, rules.dry_run, verdict.reason, numbers, self.replica)
        record = await asyncio.to_thread(self.catalog.decide, model, number, window.epoch, decision, policy, default)
        if record is None:
            log.info("%s version %s: another replica decided on window %s first", model, number, window.epoch)
            return
        self.metrics.decisions.labels(model, str(number), verdict.candidate, action).inc()
        log.warning(
            "traffic decision for %s version %s: %s %s (primary %s): %s; numbers %s",
            model,
            number,
            action,
            verdict.candidate,
            primary,
            verdict.reason,
            numbers,
        )
        await self.loaded.sync(force=True)
        await self.router.refresh(force=True)
