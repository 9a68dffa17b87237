"""The catalogue's tables (SQLAlchemy ORM). One metadata for every part of the catalogue.

Callers outside ``model_store`` never see these rows: the catalogue classes return plain records.
New parts of the catalogue add their tables here; ``model_store.migrate.upgrade`` creates missing tables and adds
missing columns at start. A column added to an existing table must be nullable or have a ``server_default``
(old rows get NULL or that default), and nothing is ever renamed or dropped.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    pass


class ModelRow(Base):
    __tablename__ = "models"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: highest version number ever allocated; numbers are never reused, even after a delete
    last_version: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    versions: Mapped[list[VersionRow]] = relationship(
        back_populates="model", cascade="all, delete-orphan", order_by="VersionRow.number"
    )


class VersionRow(Base):
    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("model_id", "number", name="uq_version_number"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), nullable=False)
    number: Mapped[int] = mapped_column(Integer, nullable=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Desired state, set by the repository API: replicas load versions whose `loaded` is true.
    loaded: Mapped[bool] = mapped_column(Boolean, default=True)
    default_variant: Mapped[str | None] = mapped_column(String(64), nullable=True)
    pinned_default: Mapped[bool] = mapped_column(Boolean, default=False)
    calibration_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model: Mapped[ModelRow] = relationship(back_populates="versions")
    variants: Mapped[list[VariantRow]] = relationship(
        back_populates="version", cascade="all, delete-orphan", order_by="VariantRow.id"
    )


class VariantRow(Base):
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
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    version: Mapped[VersionRow] = relationship(back_populates="variants")


class RevisionRow(Base):
    """One row whose counter every catalogue change bumps, in the same transaction: replicas poll it."""

    __tablename__ = "revision"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)


class JobRow(Base):
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
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    #: the hardware a job must run on (build jobs: "cpu-x86_64-avx2", "gpu-nvidia-l4-sm89"); NULL: any worker
    target: Mapped[str | None] = mapped_column(String(128), nullable=True)


class EngineRow(Base):
    """One engine: what a builder made (or is making) from a variant's runnable artifact for one target.

    ``state`` is what the build job last wrote (queued, building, ready, failed); readers reconcile it with the
    job's own state (``model_store.engines``), so a job that died or was cancelled reads as failed."""

    __tablename__ = "engines"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)  # EngineKey.digest
    variant_sha256: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    builder: Mapped[str] = mapped_column(String(32), nullable=False)
    target: Mapped[str] = mapped_column(String(128), nullable=False)
    precision: Mapped[str | None] = mapped_column(String(8), nullable=True)
    engine_key: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)  # EngineKey.to_dict()
    state: Mapped[str] = mapped_column(String(16), nullable=False, default="queued")
    error: Mapped[str | None] = mapped_column(String(4000), nullable=True)
    blob_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    build_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    job_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class TimingCacheRow(Base):
    """TensorRT's timing cache for one GPU target and runtime (``backends.engines.timing_cache_name``), kept as a
    blob and reused by every build on that target so later builds skip the kernel timing already done."""

    __tablename__ = "timing_caches"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    target: Mapped[str] = mapped_column(String(128), nullable=False)
    blob_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    size_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class TrafficPolicyRow(Base):
    """A version's traffic policy (split, shadow, promotion rules), as JSON the service validates.

    ``epoch`` numbers the window that live statistics are counted in: every policy change and every decision
    moves it, with a compare-and-set (``TrafficCatalog.decide``), so a decision is taken once across replicas."""

    __tablename__ = "traffic_policies"
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"), primary_key=True)
    policy: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    epoch: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class TrafficStatsRow(Base):
    """One replica's live counters for one version's current window (it rewrites the row; readers sum them)."""

    __tablename__ = "traffic_stats"
    __table_args__ = (UniqueConstraint("version_id", "replica", "epoch", name="uq_traffic_stats"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"), nullable=False)
    replica: Mapped[str] = mapped_column(String(64), nullable=False)
    epoch: Mapped[int] = mapped_column(Integer, nullable=False)
    stats: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class TrafficDecisionRow(Base):
    """A promotion or rollback (or, in dry-run, what would have been done), with the numbers it was taken on."""

    __tablename__ = "traffic_decisions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"), nullable=False, index=True)
    action: Mapped[str] = mapped_column(String(32), nullable=False)
    variant: Mapped[str] = mapped_column(String(64), nullable=False)
    primary_variant: Mapped[str] = mapped_column(String(64), nullable=False)
    dry_run: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    reason: Mapped[str] = mapped_column(String(1000), nullable=False)
    numbers: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    epoch: Mapped[int] = mapped_column(Integer, nullable=False)
    replica: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class TrialRow(Base):
    """One trial of an optimize job: a chain of passes with its knobs, the artifact it made and what it measured.

    ``key`` is a hash of the chain and its knobs, unique per job: a resumed job (or a second worker sharing the
    search) finds a finished trial by its key and skips it, and a trial is claimed by compare-and-set on
    (state, owner, lease_expires) so two workers never build the same one at once."""

    __tablename__ = "trials"
    __table_args__ = (UniqueConstraint("job_id", "key", name="uq_trial_key"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(String(36), nullable=False, index=True)
    key: Mapped[str] = mapped_column(String(64), nullable=False)
    chain: Mapped[list[Any]] = mapped_column(JSON, nullable=False)  # [[pass, {knob: value}], ...]
    state: Mapped[str] = mapped_column(String(16), nullable=False, default="running")  # running | done | failed
    owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(String(4000), nullable=True)
    artifact_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the stored form
    runnable_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the ONNX model that runs
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
