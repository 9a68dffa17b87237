"""Traffic policies in the catalogue: per-version split and shadow settings, live windows, decisions.

The policy is JSON that the service validates (``service.traffic``); here it is stored, and every change bumps
the revision so that every replica applies it at its next sync. Live statistics are counted per replica in a
window numbered by the policy's ``epoch``: each replica rewrites its own row for the current epoch, and the
decider reads the sum. ``decide`` is a compare-and-set on the epoch: of several replicas that read the same
window and reach the same conclusion, one commits and the others find the epoch moved, so a decision is taken
once, not once per replica.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select, update

from model_store.catalog import version_row
from model_store.database import Database
from model_store.records import RecordNotFound
from model_store.schema import (
    ModelRow,
    TrafficDecisionRow,
    TrafficPolicyRow,
    TrafficStatsRow,
    VersionRow,
)


@dataclass(frozen=True)
class TrafficPolicyRecord:
    model: str
    version: int
    policy: dict[str, Any]
    epoch: int
    updated_at: dt.datetime


@dataclass(frozen=True)
class DecisionRecord:
    id: int
    model: str
    version: int
    action: str  # promote, rollback, would_promote, would_rollback
    variant: str
    primary: str
    dry_run: bool
    reason: str
    numbers: dict[str, Any]
    epoch: int
    replica: str
    created_at: dt.datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "action": self.action,
            "variant": self.variant,
            "primary": self.primary,
            "dry_run": self.dry_run,
            "reason": self.reason,
            "numbers": self.numbers,
            "epoch": self.epoch,
            "replica": self.replica,
            "created_at": self.created_at.isoformat(),
        }


@dataclass(frozen=True)
class NewDecision:
    action: str
    variant: str
    primary: str
    dry_run: bool
    reason: str
    numbers: dict[str, Any]
    replica: str


class TrafficCatalog:
    def __init__(self, db: Database) -> None:
        self.db = db

    def set_policy(self, name: str, number: int, policy: dict[str, Any]) -> TrafficPolicyRecord:
        """Create or replace a version's policy; a new window starts (the old counters no longer count)."""
        with self.db.tx() as s:
            v = version_row(s, name, number)
            row = s.get(TrafficPolicyRow, v.id)
            if row is None:
                row = TrafficPolicyRow(version_id=v.id, policy=policy, epoch=0)
                s.add(row)
            else:
                row.policy = policy
                row.epoch += 1
            self.db.bump(s)
            s.flush()
            return _policy_record(name, number, row)

    def get_policy(self, name: str, number: int) -> TrafficPolicyRecord | None:
        """The version's policy, or None; RecordNotFound when the version does not exist."""
        with self.db.tx() as s:
            v = version_row(s, name, number)
            row = s.get(TrafficPolicyRow, v.id)
            return _policy_record(name, number, row) if row is not None else None

    def delete_policy(self, name: str, number: int) -> bool:
        with self.db.tx() as s:
            v = version_row(s, name, number)
            row = s.get(TrafficPolicyRow, v.id)
            if row is None:
                return False
            s.delete(row)
            s.execute(delete(TrafficStatsRow).where(TrafficStatsRow.version_id == v.id))
            self.db.bump(s)
            return True

    def policies(self) -> list[TrafficPolicyRecord]:
        with self.db.tx() as s:
            rows = s.execute(
                select(ModelRow.name, VersionRow.number, TrafficPolicyRow)
                .join(VersionRow, VersionRow.id == TrafficPolicyRow.version_id)
                .join(ModelRow, ModelRow.id == VersionRow.model_id)
            ).all()
            return [_policy_record(name, number, row) for name, number, row in rows]

    def write_stats(self, name: str, number: int, replica: str, epoch: int, stats: dict[str, Any]) -> None:
        """Replace this replica's counters for window ``epoch`` (an idempotent rewrite, not an increment)."""
        with self.db.tx() as s:
            try:
                v = version_row(s, name, number)
            except RecordNotFound:
                return  # deleted meanwhile: nothing to count for
            row = s.scalar(
                select(TrafficStatsRow).where(
                    TrafficStatsRow.version_id == v.id,
                    TrafficStatsRow.replica == replica,
                    TrafficStatsRow.epoch == epoch,
                )
            )
            if row is None:
                s.add(TrafficStatsRow(version_id=v.id, replica=replica, epoch=epoch, stats=stats))
            else:
                row.stats = stats

    def window(self, name: str, number: int, epoch: int) -> list[dict[str, Any]]:
        """Every replica's counters for window ``epoch``."""
        with self.db.tx() as s:
            v = version_row(s, name, number)
            return list(
                s.scalars(
                    select(TrafficStatsRow.stats).where(
                        TrafficStatsRow.version_id == v.id, TrafficStatsRow.epoch == epoch
                    )
                )
            )

    def decide(
        self,
        name: str,
        number: int,
        epoch: int,
        decision: NewDecision,
        policy: dict[str, Any] | None,
        default_variant: str | None,
    ) -> DecisionRecord | None:
        """Record ``decision`` taken on window ``epoch`` and apply it (the new ``policy``, the new default
        variant), in one transaction, only if the window is still ``epoch``; None when another replica (or a
        policy change) moved it first."""
        with self.db.tx() as s:
            v = version_row(s, name, number)
            values: dict[str, Any] = {"epoch": epoch + 1}
            if policy is not None:
                values["policy"] = policy
            moved = s.execute(
                update(TrafficPolicyRow)
                .where(TrafficPolicyRow.version_id == v.id, TrafficPolicyRow.epoch == epoch)
                .values(**values)
            )
            if moved.rowcount != 1:  # type: ignore[attr-defined]
                return None
            if default_variant is not None:
                v.default_variant = default_variant
                v.pinned_default = True  # the policy's decision, as a user's PUT .../default would pin it
            row = TrafficDecisionRow(
                version_id=v.id,
                action=decision.action,
                variant=decision.variant,
                primary_variant=decision.primary,
                dry_run=decision.dry_run,
                reason=decision.reason[:1000],
                numbers=decision.numbers,
                epoch=epoch,
                replica=decision.replica,
            )
            s.add(row)
            s.execute(delete(TrafficStatsRow).where(TrafficStatsRow.version_id == v.id))
            self.db.bump(s)
            s.flush()
            return _decision_record(name, number, row)

    def decisions(self, name: str, number: int, limit: int = 100) -> list[DecisionRecord]:
        """The version's decisions, newest first."""
        with self.db.tx() as s:
            v = version_row(s, name, number)
            rows = s.scalars(
                select(TrafficDecisionRow)
                .where(TrafficDecisionRow.version_id == v.id)
                .order_by(TrafficDecisionRow.id.desc())
                .limit(limit)
            )
            return [_decision_record(name, number, r) for r in rows]


def _policy_record(name: str, number: int, row: TrafficPolicyRow) -> TrafficPolicyRecord:
    return TrafficPolicyRecord(name, number, dict(row.policy), row.epoch, row.updated_at)


def _decision_record(name: str, number: int, r: TrafficDecisionRow) -> DecisionRecord:
    return DecisionRecord(
        r.id,
        name,
        number,
        r.action,
        r.variant,
        r.primary_variant,
        r.dry_run,
        r.reason,
        dict(r.numbers),
        r.epoch,
        r.replica,
        r.created_at,
    )
