"""The job queue: offline work (compression, engine builds, ...) claimed by workers under leases.

Claiming is a compare-and-set UPDATE on the job row that takes a lease; heartbeats extend it; a worker that
dies stops renewing and another claims the job once the lease has expired, up to a number of attempts.
A job may name a target (an engine build: the hardware the engine is for); only a worker that advertises that
target claims it. Jobs without one go to any worker.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import func, select, update

from model_store.catalog import version_row
from model_store.database import Database
from model_store.records import JOB_TERMINAL, JobRecord, RecordNotFound, job_record, matchable, new_job_row
from model_store.schema import JobRow, utcnow

PENDING = ("queued", "running")
#: jobs the system makes for itself (engine builds when a variant loads): they do not count against the users' cap
INTERNAL_KINDS = ("build",)


class QueueFull(RuntimeError):
    """As many jobs as allowed are already queued or running."""

    def __init__(self, pending: int, limit: int) -> None:
        super().__init__(f"{pending} jobs are queued or running (limit {limit})")
        self.pending = pending
        self.limit = limit


class JobQueue:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create(
        self, kind: str, name: str, number: int, spec: dict[str, Any], max_pending: int | None = None
    ) -> JobRecord:
        """Queue a job on an existing version. With ``max_pending``, refuse (``QueueFull``) when that many jobs
        are already queued or running: the count and the insert are one transaction, serialized by the
        revision-row lock, so concurrent requests cannot pass the cap together."""
        with self.db.tx() as s:
            version_row(s, name, number)
            if max_pending is not None:
                self.db.lock_revision(s)
                pending = (
                    s.scalar(
                        select(func.count())
                        .select_from(JobRow)
                        .where(JobRow.state.in_(PENDING), JobRow.kind.not_in(INTERNAL_KINDS))
                    )
                    or 0
                )
                if pending >= max_pending:
                    raise QueueFull(pending, max_pending)
            j = new_job_row(kind, name, number, spec)
            s.add(j)
            s.flush()
            return job_record(j)

    def get(self, job_id: str) -> JobRecord:
        if not matchable(job_id):
            raise RecordNotFound(f"job {job_id!r} not found")
        with self.db.tx() as s:
            j = s.get(JobRow, job_id)
            if j is None:
                raise RecordNotFound(f"job {job_id!r} not found")
            return job_record(j)

    def recent(self, state: str | None = None, limit: int = 100) -> list[JobRecord]:
        if not matchable(state):
            return []
        with self.db.tx() as s:
            q = select(JobRow).order_by(JobRow.created_at.desc()).limit(limit)
            if state:
                q = q.where(JobRow.state == state)
            return [job_record(j) for j in s.scalars(q)]

    def latest(self, kind: str, name: str, number: int, state: str = "succeeded") -> JobRecord | None:
        """The newest job of ``kind`` on a version in ``state``, or None."""
        if not matchable(kind, name, number, state):
            return None
        with self.db.tx() as s:
            j = s.scalars(
                select(JobRow)
                .where(JobRow.kind == kind, JobRow.model_name == name, JobRow.version == number, JobRow.state == state)
                .order_by(JobRow.created_at.desc())
                .limit(1)
            ).one_or_none()
            return None if j is None else job_record(j)

    def count(self, states: tuple[str, ...]) -> int:
        with self.db.tx() as s:
            return s.scalar(select(func.count()).select_from(JobRow).where(JobRow.state.in_(states))) or 0

    def claim(
        self,
        owner: str,
        lease_seconds: float,
        kinds: tuple[str, ...],
        targets: tuple[str, ...] = (),
        exclude: tuple[str, ...] = (),
    ) -> JobRecord | None:
        """Atomically take the oldest queued job (or one whose lease expired) for ``owner``: one of ``kinds``,
        without a target or with one of ``targets`` (what the worker's hardware has), and not in ``exclude``.
        Targeted jobs (engine builds) come first: a variant may be waiting for its engine to serve.

        The claim is a compare-and-set UPDATE on (id, state, lease_expires), so two workers racing for
        the same row cannot both win, on SQLite or PostgreSQL.
        """
        now = utcnow()
        where_target = JobRow.target.is_(None)
        if targets:
            where_target = where_target | JobRow.target.in_(targets)
        with self.db.tx() as s:
            q = (
                select(JobRow)
                .where(JobRow.kind.in_(kinds), where_target)
                .where((JobRow.state == "queued") | ((JobRow.state == "running") & (JobRow.lease_expires < now)))
                .order_by(JobRow.target.is_(None), JobRow.created_at)
                .limit(5)
            )
            if exclude:
                q = q.where(JobRow.id.not_in(exclude))
            candidates = s.scalars(q).all()
            for j in candidates:
                res = s.execute(
                    update(JobRow)
                    .where(JobRow.id == j.id, JobRow.state == j.state, JobRow.updated_at == j.updated_at)
                    .values(
                        state="running",
                        lease_owner=owner,
                        lease_expires=now + dt.timedelta(seconds=lease_seconds),
                        attempts=JobRow.attempts + 1,
                        updated_at=now,
                    )
                    .execution_options(synchronize_session=False)
                )
                if res.rowcount == 1:
                    s.flush()
                    s.expire(j)
                    return job_record(s.get(JobRow, j.id))  # type: ignore[arg-type]
            return None

    def release(self, job_id: str, owner: str) -> bool:
        """Give a claimed job back to the queue untried (the attempt is not counted): this worker found it cannot
        run it (an engine build for a runtime version it does not have)."""
        with self.db.tx() as s:
            res = s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.lease_owner == owner, JobRow.state == "running")
                .values(
                    state="queued",
                    lease_owner=None,
                    lease_expires=None,
                    attempts=JobRow.attempts - 1,
                    updated_at=utcnow(),
                )
                .execution_options(synchronize_session=False)
            )
            return res.rowcount == 1

    def heartbeat(
        self,
        job_id: str,
        owner: str,
        lease_seconds: float,
        stage: str | None = None,
        progress: float | None = None,
    ) -> bool:
        """Extend the lease and record progress. Returns False if the job was cancelled or taken."""
        now = utcnow()
        values: dict[str, Any] = {"lease_expires": now + dt.timedelta(seconds=lease_seconds), "updated_at": now}
        if stage is not None:
            values["stage"] = stage
        if progress is not None:
            values["progress"] = max(0.0, min(1.0, progress))
        with self.db.tx() as s:
            res = s.execute(
                update(JobRow)
                .where(
                    JobRow.id == job_id,
                    JobRow.lease_owner == owner,
                    JobRow.state == "running",
                    JobRow.cancel_requested.is_(False),
                )
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            return res.rowcount == 1

    def finish(
        self,
        job_id: str,
        owner: str | None,
        state: str,
        error: str | None = None,
        result: dict[str, Any] | None = None,
    ) -> bool:
        assert state in JOB_TERMINAL or state == "queued"
        with self.db.tx() as s:
            q = update(JobRow).where(JobRow.id == job_id, JobRow.state.not_in(JOB_TERMINAL))
            if owner is not None:
                q = q.where(JobRow.lease_owner == owner)
            values: dict[str, Any] = {"state": state, "updated_at": utcnow(), "lease_expires": None}
            if error is not None:
                values["error"] = error[:4000]
            if result is not None:
                values["result"] = result
            if state == "succeeded":
                values["progress"] = 1.0
            kind = s.execute(
                q.values(**values).returning(JobRow.kind).execution_options(synchronize_session=False)
            ).scalar_one_or_none()
            if kind in INTERNAL_KINDS and state in ("failed", "cancelled"):
                self.db.bump(s)  # an engine build ended without an engine: replicas waiting for it re-check
            return kind is not None

    def cancel(self, job_id: str) -> JobRecord:
        if not matchable(job_id):
            raise RecordNotFound(f"job {job_id!r} not found")
        with self.db.tx() as s:
            j = s.get(JobRow, job_id)
            if j is None:
                raise RecordNotFound(f"job {job_id!r} not found")
            if j.state == "queued":
                j.state = "cancelled"
                if j.kind in INTERNAL_KINDS:
                    self.db.bump(s)  # replicas waiting for that engine learn it will not come
            elif j.state == "running":
                j.cancel_requested = True
            s.flush()
            return job_record(j)

    def fail_abandoned(self, max_attempts: int) -> list[str]:
        """Fail running jobs whose lease expired after ``max_attempts`` tries; requeue the others."""
        now = utcnow()
        out: list[str] = []
        with self.db.tx() as s:
            stale = s.scalars(select(JobRow).where(JobRow.state == "running", JobRow.lease_expires < now)).all()
            for j in stale:
                if j.cancel_requested:
                    j.state = "cancelled"
                elif j.attempts >= max_attempts:
                    j.state = "failed"
                    j.error = f"interrupted {j.attempts} times (worker died); giving up"
                    out.append(j.id)
                else:
                    j.state = "queued"
                    j.lease_owner = None
                if j.kind in INTERNAL_KINDS and j.state != "queued":
                    self.db.bump(s)  # an engine build ended without an engine: replicas waiting for it re-check
            return out
