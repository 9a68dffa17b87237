"""The trials of optimize jobs: claimed by compare-and-set, finished once, shared by the workers of one search.

A search asks ``claim(job, key, chain, owner, lease_s)`` before it builds a trial and gets one of three answers:
``Claim("mine")`` (build it, ``renew`` the lease while building, then ``finish`` it, with ``error`` when it
failed), ``Claim("done", record)`` (a worker finished it before: use its metrics and artifact, build nothing) or
``Claim("busy")`` (another worker holds a live lease on it: ``claim`` it again later). A trial whose holder died
(lease expired) is claimed again.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from model_store.database import Database
from model_store.records import matchable
from model_store.schema import TrialRow, utcnow


@dataclass(frozen=True)
class TrialRecord:
    job_id: str
    key: str
    chain: list[Any]
    state: str  # running | done | failed
    owner: str | None
    metrics: dict[str, Any]
    error: str | None
    artifact_sha256: str | None
    runnable_sha256: str | None
    created_at: dt.datetime
    updated_at: dt.datetime


@dataclass(frozen=True)
class Claim:
    outcome: Literal["mine", "done", "busy"]
    record: TrialRecord | None = None


def _record(r: TrialRow) -> TrialRecord:
    return TrialRecord(
        r.job_id,
        r.key,
        list(r.chain or []),
        r.state,
        r.owner,
        dict(r.metrics or {}),
        r.error,
        r.artifact_sha256,
        r.runnable_sha256,
        r.created_at,
        r.updated_at,
    )


class TrialStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def claim(self, job_id: str, key: str, chain: list[Any], owner: str, lease_s: float) -> Claim:
        now = utcnow()
        expires = now + dt.timedelta(seconds=lease_s)
        try:
            with self.db.tx() as s:
                s.add(
                    TrialRow(job_id=job_id, key=key, chain=chain, state="running", owner=owner, lease_expires=expires)
                )
            return Claim("mine")
        except IntegrityError:
            pass  # the trial exists: finished, held, or abandoned
        with self.db.tx() as s:
            row = s.scalars(select(TrialRow).where(TrialRow.job_id == job_id, TrialRow.key == key)).one()
            if row.state in ("done", "failed"):
                return Claim("done", _record(row))
            lease = row.lease_expires
            if lease is not None and lease.tzinfo is None:
                lease = lease.replace(tzinfo=dt.UTC)  # SQLite hands back naive datetimes
            if row.owner != owner and lease is not None and lease > now:
                return Claim("busy", _record(row))
            res = s.execute(
                update(TrialRow)
                .where(TrialRow.id == row.id, TrialRow.state == "running", TrialRow.updated_at == row.updated_at)
                .values(owner=owner, lease_expires=expires, updated_at=now)
                .execution_options(synchronize_session=False)
            )
            return Claim("mine") if res.rowcount == 1 else Claim("busy", _record(row))

    def renew(self, job_id: str, key: str, owner: str, lease_s: float) -> bool:
        with self.db.tx() as s:
            res = s.execute(
                update(TrialRow)
                .where(TrialRow.job_id == job_id, TrialRow.key == key, TrialRow.owner == owner)
                .where(TrialRow.state == "running")
                .values(lease_expires=utcnow() + dt.timedelta(seconds=lease_s), updated_at=utcnow())
                .execution_options(synchronize_session=False)
            )
            return res.rowcount == 1

    def finish(
        self,
        job_id: str,
        key: str,
        owner: str,
        metrics: dict[str, Any],
        artifact_sha256: str | None = None,
        runnable_sha256: str | None = None,
        error: str | None = None,
    ) -> bool:
        """Record a finished (or, with ``error``, failed) trial; the artifact's blobs must be written first."""
        with self.db.tx() as s:
            res = s.execute(
                update(TrialRow)
                .where(TrialRow.job_id == job_id, TrialRow.key == key, TrialRow.owner == owner)
                .where(TrialRow.state == "running")
                .values(
                    state="failed" if error else "done",
                    metrics=metrics,
                    error=None if error is None else error[:4000],
                    artifact_sha256=artifact_sha256,
                    runnable_sha256=runnable_sha256,
                    lease_expires=None,
                    updated_at=utcnow(),
                )
                .execution_options(synchronize_session=False)
            )
            return res.rowcount == 1

    def get(self, job_id: str, key: str) -> TrialRecord | None:
        if not matchable(job_id, key):
            return None
        with self.db.tx() as s:
            row = s.scalars(select(TrialRow).where(TrialRow.job_id == job_id, TrialRow.key == key)).one_or_none()
            return None if row is None else _record(row)

    def list(self, job_id: str) -> list[TrialRecord]:
        if not matchable(job_id):
            return []
        with self.db.tx() as s:
            rows = s.scalars(select(TrialRow).where(TrialRow.job_id == job_id).order_by(TrialRow.id))
            return [_record(r) for r in rows]

    def referenced_digests(self) -> set[str]:
        with self.db.tx() as s:
            rows = s.execute(select(TrialRow.artifact_sha256, TrialRow.runnable_sha256)).all()
        return {d for row in rows for d in row if d}
