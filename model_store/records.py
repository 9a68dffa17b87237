"""Plain records handed to callers of the catalogue, and the catalogue's errors.

Records are frozen dataclasses detached from any database session.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field
from typing import Any

from model_store.schema import JobRow, VariantRow, VersionRow


@dataclass(frozen=True)
class VariantRecord:
    name: str
    kind: str
    sha256: str
    size_bytes: int
    runnable_sha256: str
    details: dict[str, Any]
    created_at: dt.datetime


@dataclass(frozen=True)
class VersionRecord:
    model: str
    number: int
    created_at: dt.datetime
    config: dict[str, Any]
    loaded: bool
    default_variant: str | None
    pinned_default: bool
    calibration_sha256: str | None
    variants: list[VariantRecord] = field(default_factory=list)

    def variant(self, name: str) -> VariantRecord | None:
        return next((v for v in self.variants if v.name == name), None)


@dataclass(frozen=True)
class ModelRecord:
    name: str
    created_at: dt.datetime
    versions: list[VersionRecord]


@dataclass(frozen=True)
class JobRecord:
    id: str
    kind: str
    model: str
    version: int
    spec: dict[str, Any]
    state: str
    stage: str | None
    progress: float
    error: str | None
    result: dict[str, Any]
    attempts: int
    cancel_requested: bool
    lease_owner: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    target: str | None = None  # the hardware the job must run on (build jobs); None: any worker


@dataclass(frozen=True)
class NewVariant:
    name: str
    kind: str
    sha256: str
    size_bytes: int
    runnable_sha256: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


class RecordNotFound(LookupError):
    """The named model, version, variant or job does not exist."""


class RecordConflict(RuntimeError):
    """The change conflicts with the catalogue's current state."""


JOB_TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
_INT32_MAX = 2**31 - 1  # the INTEGER columns (version numbers) are 32-bit on PostgreSQL


def matchable(*keys: str | int | None) -> bool:
    """False for lookup keys no row can hold and that the database would refuse with an error rather
    than match nothing: text with NUL characters (PostgreSQL) and integers outside INTEGER's range
    (PostgreSQL: out of range; SQLite: OverflowError past 64 bits)."""
    for k in keys:
        if isinstance(k, str) and "\x00" in k:
            return False
        if isinstance(k, int) and not -_INT32_MAX - 1 <= k <= _INT32_MAX:
            return False
    return True


def variant_record(v: VariantRow) -> VariantRecord:
    return VariantRecord(
        name=v.name,
        kind=v.kind,
        sha256=v.sha256,
        size_bytes=v.size_bytes,
        runnable_sha256=v.runnable_sha256 or v.sha256,
        details=dict(v.details or {}),
        created_at=v.created_at,
    )


def version_record(model_name: str, v: VersionRow) -> VersionRecord:
    return VersionRecord(
        model=model_name,
        number=v.number,
        created_at=v.created_at,
        config=dict(v.config or {}),
        loaded=v.loaded,
        default_variant=v.default_variant,
        pinned_default=v.pinned_default,
        calibration_sha256=v.calibration_sha256,
        variants=[variant_record(x) for x in v.variants],
    )


def job_record(j: JobRow) -> JobRecord:
    return JobRecord(
        id=j.id,
        kind=j.kind,
        model=j.model_name,
        version=j.version,
        spec=dict(j.spec or {}),
        state=j.state,
        stage=j.stage,
        progress=j.progress,
        error=j.error,
        result=dict(j.result or {}),
        attempts=j.attempts,
        cancel_requested=j.cancel_requested,
        lease_owner=j.lease_owner,
        created_at=j.created_at,
        updated_at=j.updated_at,
        target=j.target,
    )


def new_variant_row(version_id: int, nv: NewVariant) -> VariantRow:
    return VariantRow(
        version_id=version_id,
        name=nv.name,
        kind=nv.kind,
        sha256=nv.sha256,
        size_bytes=nv.size_bytes,
        runnable_sha256=nv.runnable_sha256,
        details=nv.details,
    )


def new_job_row(kind: str, name: str, number: int, spec: dict[str, Any], target: str | None = None) -> JobRow:
    """A queued job row, for the caller's transaction (``JobQueue.create``, and engine requests that insert
    the engine and its build job together)."""
    return JobRow(id=str(uuid.uuid4()), kind=kind, model_name=name, version=number, spec=spec, target=target)
