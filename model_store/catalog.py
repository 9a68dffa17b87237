"""The catalogue: models, versions, variants and jobs, through SQLAlchemy (SQLite or PostgreSQL).

Every public method runs in its own transaction and returns plain dataclasses, so callers never hold
database sessions. Version numbers are allocated with ``max + 1`` under a unique constraint and retried
on conflict, which is correct on both SQLite and PostgreSQL without database-specific locking.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class _Base(DeclarativeBase):
    pass


class _Model(_Base):
    __tablename__ = "models"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    #: highest version number ever allocated; numbers are never reused, even after a delete
    last_version: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    versions: Mapped[list[_Version]] = relationship(
        back_populates="model", cascade="all, delete-orphan", order_by="_Version.number"
    )


class _Version(_Base):
    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("model_id", "number", name="uq_version_number"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), nullable=False)
    number: Mapped[int] = mapped_column(Integer, nullable=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Desired state, set by the repository API: replicas load versions whose `loaded` is true.
    loaded: Mapped[bool] = mapped_column(Boolean, default=True)
    default_variant: Mapped[str | None] = mapped_column(String(64), nullable=True)
    pinned_default: Mapped[bool] = mapped_column(Boolean, default=False)
    calibration_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model: Mapped[_Model] = relationship(back_populates="versions")
    variants: Mapped[list[_Variant]] = relationship(
        back_populates="version", cascade="all, delete-orphan", order_by="_Variant.id"
    )


class _Variant(_Base):
    __tablename__ = "variants"
    __table_args__ = (UniqueConstraint("version_id", "name", name="uq_variant_name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"), nullable=False)
    name: Mapped[str] = mapped_column(String(64), nullable=False)
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    # The artifact that runs (an ONNX file); for encoded variants `sha256` is the compact stored form
    # and `runnable_sha256` the decoded ONNX model.
    runnable_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    version: Mapped[_Version] = relationship(back_populates="variants")


class _Revision(_Base):
    """One row whose counter every catalogue change bumps, in the same transaction: replicas poll it."""

    __tablename__ = "revision"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)


class _Job(_Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    model_name: Mapped[str] = mapped_column(String(64), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(16), nullable=False, default="queued", index=True)
    stage: Mapped[str | None] = mapped_column(String(64), nullable=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(String(4000), nullable=True)
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now, onupdate=_now)


# ---------------------------------------------------------------------------------------------------
# Plain records handed to callers


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


@dataclass(frozen=True)
class NewVariant:
    name: str
    kind: str
    sha256: str
    size_bytes: int
    runnable_sha256: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


class NotFound(LookupError):
    """The named model, version, variant or job does not exist."""


class Conflict(RuntimeError):
    """The change conflicts with the catalogue's current state."""


JOB_TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
_INT32_MAX = 2**31 - 1  # the INTEGER columns (version numbers) are 32-bit on PostgreSQL


def _matchable(*keys: str | int | None) -> bool:
    """False for lookup keys no row can hold and that the database would refuse with an error rather
    than match nothing: text with NUL characters (PostgreSQL) and integers outside INTEGER's range
    (PostgreSQL: out of range; SQLite: OverflowError past 64 bits)."""
    for k in keys:
        if isinstance(k, str) and "\x00" in k:
            return False
        if isinstance(k, int) and not -_INT32_MAX - 1 <= k <= _INT32_MAX:
            return False
    return True


def _variant_rec(v: _Variant) -> VariantRecord:
    return VariantRecord(
        name=v.name,
        kind=v.kind,
        sha256=v.sha256,
        size_bytes=v.size_bytes,
        runnable_sha256=v.runnable_sha256 or v.sha256,
        details=dict(v.details or {}),
        created_at=v.created_at,
    )


def _version_rec(model_name: str, v: _Version) -> VersionRecord:
    return VersionRecord(
        model=model_name,
        number=v.number,
        created_at=v.created_at,
        config=dict(v.config or {}),
        loaded=v.loaded,
        default_variant=v.default_variant,
        pinned_default=v.pinned_default,
        calibration_sha256=v.calibration_sha256,
        variants=[_variant_rec(x) for x in v.variants],
    )


def _job_rec(j: _Job) -> JobRecord:
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
    )


class Catalog:
    """Transactional access to the catalogue tables."""

    def __init__(self, url: str) -> None:
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        self.url = url
        self.engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self.engine, "begin", _sqlite_begin)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        _Base.metadata.create_all(self.engine)
        try:
            with self._tx() as s:
                if s.get(_Revision, 1) is None:
                    s.add(_Revision(id=1, value=0))
        except IntegrityError:
            pass  # another process created it first

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._sessions.begin() as s:
            yield s

    @staticmethod
    def _bump(s: Session) -> None:
        s.execute(update(_Revision).where(_Revision.id == 1).values(value=_Revision.value + 1))

    # -- models and versions ------------------------------------------------------------------------

    def create_version(
        self,
        name: str,
        variants: list[NewVariant],
        config: dict[str, Any] | None = None,
        default_variant: str | None = None,
        calibration_sha256: str | None = None,
        pinned_default: bool = False,
    ) -> VersionRecord:
        """Create the model if needed and add a new version with the next number.

        The number comes from ``UPDATE models SET last_version = last_version + 1 ... RETURNING``: a row
        lock on PostgreSQL and the database write lock on SQLite, so concurrent uploads serialize on
        the model's row and never share a number, with no retry loop.
        """
        for _attempt in range(10):
            try:
                with self._tx() as s:
                    if s.scalar(select(_Model.id).where(_Model.name == name)) is None:
                        s.add(_Model(name=name, last_version=0))
            except IntegrityError:
                pass  # created concurrently
            with self._tx() as s:
                row = s.execute(
                    update(_Model)
                    .where(_Model.name == name)
                    .values(last_version=_Model.last_version + 1)
                    .returning(_Model.id, _Model.last_version)
                ).first()
                if row is None:
                    continue  # deleted between the two transactions: create it again
                model_id, number = row
                version = _Version(
                    model_id=model_id,
                    number=number,
                    config=config or {},
                    default_variant=default_variant or (variants[0].name if variants else None),
                    calibration_sha256=calibration_sha256,
                    pinned_default=pinned_default,
                )
                s.add(version)
                s.flush()
                for nv in variants:
                    s.add(_new_variant_row(version.id, nv))
                self._bump(s)
                s.flush()
                s.refresh(version)
                return _version_rec(name, version)
        raise Conflict(f"could not create a version of {name!r}: the model keeps being deleted")

    def list_models(self) -> list[ModelRecord]:
        with self._tx() as s:
            models = s.scalars(select(_Model).order_by(_Model.name)).all()
            return [self._model_rec(m) for m in models]

    def get_model(self, name: str) -> ModelRecord:
        if not _matchable(name):
            raise NotFound(f"model {name!r} not found")
        with self._tx() as s:
            m = s.scalar(select(_Model).where(_Model.name == name))
            if m is None:
                raise NotFound(f"model {name!r} not found")
            return self._model_rec(m)

    @staticmethod
    def _model_rec(m: _Model) -> ModelRecord:
        return ModelRecord(m.name, m.created_at, [_version_rec(m.name, v) for v in m.versions])

    def get_version(self, name: str, number: int) -> VersionRecord:
        with self._tx() as s:
            return _version_rec(name, self._version_row(s, name, number))

    @staticmethod
    def _version_row(s: Session, name: str, number: int) -> _Version:
        if not _matchable(name, number):
            raise NotFound(f"model {name!r} has no version {number}")
        v = s.scalar(select(_Version).join(_Model).where(_Model.name == name, _Version.number == number))
        if v is None:
            raise NotFound(f"model {name!r} has no version {number}")
        return v

    def delete_model(self, name: str) -> None:
        if not _matchable(name):
            raise NotFound(f"model {name!r} not found")
        with self._tx() as s:
            m = s.scalar(select(_Model).where(_Model.name == name))
            if m is None:
                raise NotFound(f"model {name!r} not found")
            s.delete(m)
            self._bump(s)

    def delete_version(self, name: str, number: int) -> None:
        with self._tx() as s:
            v = self._version_row(s, name, number)
            model = v.model
            s.delete(v)
            s.flush()
            if not s.scalar(select(func.count()).select_from(_Version).where(_Version.model_id == model.id)):
                s.delete(model)
            self._bump(s)

    def set_loaded(self, name: str, number: int | None, loaded: bool) -> list[int]:
        """Set the desired load state of one version, or of all versions when ``number`` is None."""
        if not _matchable(name):
            raise NotFound(f"model {name!r} not found")
        with self._tx() as s:
            m = s.scalar(select(_Model).where(_Model.name == name))
            if m is None:
                raise NotFound(f"model {name!r} not found")
            targets = [v for v in m.versions if number is None or v.number == number]
            if not targets:
                raise NotFound(f"model {name!r} has no version {number}")
            for v in targets:
                v.loaded = loaded
            self._bump(s)
            return [v.number for v in targets]

    def add_variant(self, name: str, number: int, nv: NewVariant, replace: bool = False) -> VariantRecord:
        with self._tx() as s:
            v = self._version_row(s, name, number)
            existing = next((x for x in v.variants if x.name == nv.name), None)
            if existing is not None:
                if not replace:
                    raise Conflict(f"{name} version {number} already has a variant {nv.name!r}")
                s.delete(existing)
                s.flush()
            row = _new_variant_row(v.id, nv)
            s.add(row)
            self._bump(s)
            s.flush()
            return _variant_rec(row)

    def set_default_variant(self, name: str, number: int, variant: str, pinned: bool) -> None:
        with self._tx() as s:
            v = self._version_row(s, name, number)
            if not any(x.name == variant for x in v.variants):
                raise NotFound(f"{name} version {number} has no variant {variant!r}")
            if v.pinned_default and not pinned:
                return  # a user's pin wins over the automatic policy
            v.default_variant = variant
            v.pinned_default = pinned
            self._bump(s)

    def referenced_digests(self) -> set[str]:
        with self._tx() as s:
            out: set[str] = set()
            for sha, run in s.execute(select(_Variant.sha256, _Variant.runnable_sha256)):
                out.add(sha)
                if run:
                    out.add(run)
            out.update(x for x in s.scalars(select(_Version.calibration_sha256)) if x)
            for spec in s.scalars(select(_Job.spec).where(_Job.state.not_in(JOB_TERMINAL))):
                if isinstance(spec, dict) and spec.get("calibration_sha256"):
                    out.add(spec["calibration_sha256"])
            return out

    def revision(self) -> int:
        """A counter that grows whenever versions or variants are added, removed, toggled or re-defaulted."""
        with self._tx() as s:
            return s.scalar(select(_Revision.value).where(_Revision.id == 1)) or 0

    # -- jobs -----------------------------------------------------------------------------------------

    def create_job(self, kind: str, name: str, number: int, spec: dict[str, Any]) -> JobRecord:
        with self._tx() as s:
            self._version_row(s, name, number)
            j = _Job(id=str(uuid.uuid4()), kind=kind, model_name=name, version=number, spec=spec)
            s.add(j)
            s.flush()
            return _job_rec(j)

    def get_job(self, job_id: str) -> JobRecord:
        if not _matchable(job_id):
            raise NotFound(f"job {job_id!r} not found")
        with self._tx() as s:
            j = s.get(_Job, job_id)
            if j is None:
                raise NotFound(f"job {job_id!r} not found")
            return _job_rec(j)

    def list_jobs(self, state: str | None = None, limit: int = 100) -> list[JobRecord]:
        if not _matchable(state):
            return []
        with self._tx() as s:
            q = select(_Job).order_by(_Job.created_at.desc()).limit(limit)
            if state:
                q = q.where(_Job.state == state)
            return [_job_rec(j) for j in s.scalars(q)]

    def count_jobs(self, states: tuple[str, ...]) -> int:
        with self._tx() as s:
            return s.scalar(select(func.count()).select_from(_Job).where(_Job.state.in_(states))) or 0

    def claim_job(self, owner: str, lease_seconds: float, kinds: tuple[str, ...]) -> JobRecord | None:
        """Atomically take the oldest queued job (or one whose lease expired) for ``owner``.

        The claim is a compare-and-set UPDATE on (id, state, lease_expires), so two workers racing for
        the same row cannot both win, on SQLite or PostgreSQL.
        """
        now = _now()
        with self._tx() as s:
            candidates = s.scalars(
                select(_Job)
                .where(_Job.kind.in_(kinds))
                .where((_Job.state == "queued") | ((_Job.state == "running") & (_Job.lease_expires < now)))
                .order_by(_Job.created_at)
                .limit(5)
            ).all()
            for j in candidates:
                res = s.execute(
                    update(_Job)
                    .where(_Job.id == j.id, _Job.state == j.state, _Job.updated_at == j.updated_at)
                    .values(
                        state="running",
                        lease_owner=owner,
                        lease_expires=now + dt.timedelta(seconds=lease_seconds),
                        attempts=_Job.attempts + 1,
                        updated_at=now,
                    )
                    .execution_options(synchronize_session=False)
                )
                if res.rowcount == 1:
                    s.flush()
                    s.expire(j)
                    return _job_rec(s.get(_Job, j.id))  # type: ignore[arg-type]
            return None

    def heartbeat_job(
        self,
        job_id: str,
        owner: str,
        lease_seconds: float,
        stage: str | None = None,
        progress: float | None = None,
    ) -> bool:
        """Extend the lease and record progress. Returns False if the job was cancelled or taken."""
        now = _now()
        values: dict[str, Any] = {"lease_expires": now + dt.timedelta(seconds=lease_seconds), "updated_at": now}
        if stage is not None:
            values["stage"] = stage
        if progress is not None:
            values["progress"] = max(0.0, min(1.0, progress))
        with self._tx() as s:
            res = s.execute(
                update(_Job)
                .where(
                    _Job.id == job_id,
                    _Job.lease_owner == owner,
                    _Job.state == "running",
                    _Job.cancel_requested.is_(False),
                )
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            return res.rowcount == 1

    def finish_job(
        self,
        job_id: str,
        owner: str | None,
        state: str,
        error: str | None = None,
        result: dict[str, Any] | None = None,
    ) -> bool:
        assert state in JOB_TERMINAL or state == "queued"
        with self._tx() as s:
            q = update(_Job).where(_Job.id == job_id, _Job.state.not_in(JOB_TERMINAL))
            if owner is not None:
                q = q.where(_Job.lease_owner == owner)
            values: dict[str, Any] = {"state": state, "updated_at": _now(), "lease_expires": None}
            if error is not None:
                values["error"] = error[:4000]
            if result is not None:
                values["result"] = result
            if state == "succeeded":
                values["progress"] = 1.0
            res = s.execute(q.values(**values).execution_options(synchronize_session=False))
            return res.rowcount == 1

    def cancel_job(self, job_id: str) -> JobRecord:
        if not _matchable(job_id):
            raise NotFound(f"job {job_id!r} not found")
        with self._tx() as s:
            j = s.get(_Job, job_id)
            if j is None:
                raise NotFound(f"job {job_id!r} not found")
            if j.state == "queued":
                j.state = "cancelled"
            elif j.state == "running":
                j.cancel_requested = True
            s.flush()
            return _job_rec(j)

    def fail_abandoned_jobs(self, max_attempts: int) -> list[str]:
        """Fail running jobs whose lease expired after ``max_attempts`` tries; requeue the others."""
        now = _now()
        out: list[str] = []
        with self._tx() as s:
            stale = s.scalars(select(_Job).where(_Job.state == "running", _Job.lease_expires < now)).all()
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
            return out


def _new_variant_row(version_id: int, nv: NewVariant) -> _Variant:
    return _Variant(
        version_id=version_id,
        name=nv.name,
        kind=nv.kind,
        sha256=nv.sha256,
        size_bytes=nv.size_bytes,
        runnable_sha256=nv.runnable_sha256,
        details=nv.details,
    )


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # Let SQLAlchemy, not pysqlite, issue BEGIN (see _sqlite_begin).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _sqlite_begin(conn: Any) -> None:
    # BEGIN IMMEDIATE takes the write lock up front: a transaction that reads and then writes can never
    # fail on a stale WAL snapshot ("database is locked"); concurrent writers wait (busy_timeout).
    conn.exec_driver_sql("BEGIN IMMEDIATE")
