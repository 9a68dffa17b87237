"""Engines in the catalogue: one row per engine key digest, with its build job, state and artifact blob.

A serving replica that loads a variant asks for the engine of its key (``request``): the row and its ``build``
job are inserted in one transaction, so there is one build per key however many replicas ask at once (the
digest is unique). The build job moves the row to building, then to ready with the artifact's blob, or to
failed with the reason. A job can also end without its runner saying so (its worker died too often, a user
cancelled it), so readers reconcile the row with its job (``_effective``): such an engine reads as failed, with
the job's reason.

Ready and failed changes bump the revision counter, so replicas waiting for an engine (or serving without it)
notice at their next sync. Engines whose variant no variant row references any more are deleted in the same
transaction as the delete that orphaned them (``prune_engines``); their blobs go with the next collection.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from model_store.database import Database
from model_store.records import RecordNotFound, matchable, new_job_row
from model_store.schema import EngineRow, JobRow, ModelRow, TimingCacheRow, VariantRow, VersionRow, utcnow

ENGINE_STATES = ("queued", "building", "ready", "failed")


@dataclass(frozen=True)
class EngineRecord:
    digest: str
    variant_sha256: str
    builder: str
    target: str
    precision: str | None
    key: dict[str, Any]
    state: str  # queued | building | ready | failed (reconciled with the build job)
    error: str | None  # why it failed
    blob_sha256: str | None
    size_bytes: int | None
    build_seconds: float | None
    details: dict[str, Any]
    job_id: str | None
    created_at: dt.datetime
    updated_at: dt.datetime


def _effective(row: EngineRow, job: JobRow | None) -> tuple[str, str | None]:
    """The engine's state as readers should see it: the row's, unless its build job ended without a word."""
    if row.state in ("ready", "failed"):
        return row.state, row.error
    if job is None:
        return "failed", "its build job is gone"
    if job.state == "queued":
        return "queued", None
    if job.state == "running":
        return "building", None
    if job.state == "succeeded":
        return "failed", "the build job ended without publishing an engine"
    return "failed", job.error or f"the build job was {job.state}"


def _record(row: EngineRow, job: JobRow | None) -> EngineRecord:
    state, error = _effective(row, job)
    return EngineRecord(
        digest=row.digest,
        variant_sha256=row.variant_sha256,
        builder=row.builder,
        target=row.target,
        precision=row.precision,
        key=dict(row.engine_key or {}),
        state=state,
        error=error,
        blob_sha256=row.blob_sha256,
        size_bytes=row.size_bytes,
        build_seconds=row.build_seconds,
        details=dict(row.details or {}),
        job_id=row.job_id,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _with_jobs(s: Session, where: Any) -> list[EngineRecord]:
    q = select(EngineRow, JobRow).outerjoin(JobRow, JobRow.id == EngineRow.job_id).where(where)
    return [_record(e, j) for e, j in s.execute(q.order_by(EngineRow.created_at, EngineRow.id))]


class EngineCatalog:
    def __init__(self, db: Database) -> None:
        self.db = db

    def request(self, key: dict[str, Any], digest: str, model: str, number: int) -> EngineRecord:
        """The engine of ``key`` (``EngineKey.to_dict()`` and its digest): the existing one in whatever state, or a
        new one queued with its build job, made for ``model`` version ``number`` (which must exist)."""
        for _attempt in range(3):
            with self.db.tx() as s:
                found = _with_jobs(s, EngineRow.digest == digest)
                if found:
                    return found[0]
            try:
                with self.db.tx() as s:
                    if not _version_exists(s, model, number):
                        raise RecordNotFound(f"model {model!r} has no version {number}")
                    job = new_job_row("build", model, number, {"engine": digest, "key": key}, key["target"])
                    s.add(job)
                    s.add(
                        EngineRow(
                            digest=digest,
                            variant_sha256=key["variant_sha256"],
                            builder=key["builder"],
                            target=key["target"],
                            precision=key.get("precision"),
                            engine_key=key,
                            state="queued",
                            details={},
                            job_id=job.id,
                        )
                    )
            except IntegrityError:
                continue  # another replica asked for the same key at the same moment: read theirs
        return self.get(digest)

    def get(self, digest: str) -> EngineRecord:
        with self.db.tx() as s:
            found = _with_jobs(s, EngineRow.digest == digest) if matchable(digest) else []
            if not found:
                raise RecordNotFound(f"engine {digest!r} not found")
            return found[0]

    def states(self, digests: list[str]) -> dict[str, EngineRecord]:
        """The engines among ``digests`` that exist, by digest (one query for a replica's whole sync)."""
        if not digests:
            return {}
        with self.db.tx() as s:
            return {r.digest: r for r in _with_jobs(s, EngineRow.digest.in_(sorted(set(digests))))}

    def for_variant(self, variant_sha256: str) -> list[EngineRecord]:
        with self.db.tx() as s:
            return _with_jobs(s, EngineRow.variant_sha256 == variant_sha256) if matchable(variant_sha256) else []

    # -- written by the build job (each checks that the row still belongs to that job) -------------------------

    def mark_building(self, digest: str, job_id: str) -> bool:
        return self._set(digest, job_id, state="building", error=None)

    def mark_ready(
        self, digest: str, job_id: str, blob_sha256: str, size_bytes: int, build_seconds: float, details: dict[str, Any]
    ) -> bool:
        """Publish the artifact (its blob is already stored). False: the engine was deleted or rebuilt meanwhile,
        and the blob is left to the collector."""
        return self._set(
            digest,
            job_id,
            bump=True,
            state="ready",
            error=None,
            blob_sha256=blob_sha256,
            size_bytes=size_bytes,
            build_seconds=round(build_seconds, 3),
            details=details,
        )

    def mark_failed(self, digest: str, job_id: str, error: str, details: dict[str, Any] | None = None) -> bool:
        values: dict[str, Any] = {"state": "failed", "error": error[:4000]}
        if details is not None:
            values["details"] = details
        return self._set(digest, job_id, bump=True, **values)

    def _set(self, digest: str, job_id: str, bump: bool = False, **values: Any) -> bool:
        with self.db.tx() as s:
            res = s.execute(
                update(EngineRow)
                .where(EngineRow.digest == digest, EngineRow.job_id == job_id)
                .values(updated_at=utcnow(), **values)
                .execution_options(synchronize_session=False)
            )
            if res.rowcount == 1 and bump:
                self.db.bump(s)
            return res.rowcount == 1

    def retry(self, variant_sha256: str, model: str, number: int) -> list[EngineRecord]:
        """Queue a new build for each failed engine of a variant (a failure is never retried by itself: that would
        loop on a model TensorRT cannot build). Returns the engines retried."""
        with self.db.tx() as s:
            failed = [r for r in _with_jobs(s, EngineRow.variant_sha256 == variant_sha256) if r.state == "failed"]
            for r in failed:
                job = new_job_row("build", model, number, {"engine": r.digest, "key": r.key}, r.target)
                s.add(job)
                s.execute(
                    update(EngineRow)
                    .where(EngineRow.digest == r.digest)
                    .values(state="queued", error=None, job_id=job.id, updated_at=utcnow())
                    .execution_options(synchronize_session=False)
                )
            if failed:
                self.db.bump(s)
        return [self.get(r.digest) for r in failed]

    # -- timing caches ------------------------------------------------------------------------------------------

    def timing_cache(self, name: str) -> str | None:
        """The blob of the timing cache called ``name`` (``backends.engines.timing_cache_name``), if any."""
        with self.db.tx() as s:
            return s.scalar(select(TimingCacheRow.blob_sha256).where(TimingCacheRow.name == name))

    def save_timing_cache(self, name: str, target: str, blob_sha256: str, size_bytes: int) -> None:
        """Keep the newest timing cache for ``name`` (concurrent builds on one target: the last one wins, and each
        one's cache already holds what the previous one gave it)."""
        for _attempt in range(3):
            try:
                with self.db.tx() as s:
                    row = s.get(TimingCacheRow, name)
                    if row is None:
                        s.add(TimingCacheRow(name=name, target=target, blob_sha256=blob_sha256, size_bytes=size_bytes))
                    else:
                        row.blob_sha256, row.size_bytes, row.updated_at = blob_sha256, size_bytes, utcnow()
                return
            except IntegrityError:
                continue

    # -- collection ---------------------------------------------------------------------------------------------

    def referenced_digests(self) -> set[str]:
        """Blobs the engines and timing caches need (the collector keeps them)."""
        with self.db.tx() as s:
            out = {x for x in s.scalars(select(EngineRow.blob_sha256)) if x}
            out.update(s.scalars(select(TimingCacheRow.blob_sha256)))
            return out

    def prune(self) -> int:
        with self.db.tx() as s:
            return prune_engines(s)


def _version_exists(s: Session, model: str, number: int) -> bool:
    if not matchable(model, number):
        return False
    q = select(VersionRow.id).join(ModelRow).where(ModelRow.name == model, VersionRow.number == number)
    return s.scalar(q) is not None


def prune_engines(s: Session) -> int:
    """In the caller's transaction: delete the engines of variants that no variant row references any more
    (their model, version or variant was deleted, or replaced by other bytes), and stop their builds."""
    stored = select(VariantRow.sha256)
    runnable = select(VariantRow.runnable_sha256).where(VariantRow.runnable_sha256.is_not(None))
    orphans = s.execute(
        select(EngineRow.id, EngineRow.job_id).where(
            EngineRow.variant_sha256.not_in(stored), EngineRow.variant_sha256.not_in(runnable)
        )
    ).all()
    if not orphans:
        return 0
    jobs = [j for _, j in orphans if j]
    if jobs:
        s.execute(
            update(JobRow)
            .where(JobRow.id.in_(jobs), JobRow.state == "queued")
            .values(state="cancelled", error="its engine's variant was deleted", updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        s.execute(
            update(JobRow)
            .where(JobRow.id.in_(jobs), JobRow.state == "running")
            .values(cancel_requested=True)
            .execution_options(synchronize_session=False)
        )
    s.execute(delete(EngineRow).where(EngineRow.id.in_([i for i, _ in orphans])))
    return len(orphans)
