"""The catalogue of models, versions and variants: the desired serving state that every replica follows.

Version numbers come from ``UPDATE models SET last_version = last_version + 1 ... RETURNING``, so concurrent
uploads never share a number and numbers are never reused. Every change bumps the revision counter in the
same transaction (see ``Database.bump``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from model_store.database import Database
from model_store.engines import prune_engines
from model_store.records import (
    JOB_TERMINAL,
    ModelRecord,
    NewVariant,
    RecordConflict,
    RecordNotFound,
    VariantRecord,
    VersionRecord,
    matchable,
    new_variant_row,
    variant_record,
    version_record,
)
from model_store.schema import JobRow, ModelRow, VariantRow, VersionRow


class Catalog:
    """Models, versions and variants. ``Catalog(url)`` opens its own database; pass a ``Database`` to share one."""

    def __init__(self, db: Database | str) -> None:
        self.db = db if isinstance(db, Database) else Database(db)

    @property
    def url(self) -> str:
        return self.db.url

    def close(self) -> None:
        self.db.close()

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
                with self.db.tx() as s:
                    if s.scalar(select(ModelRow.id).where(ModelRow.name == name)) is None:
                        s.add(ModelRow(name=name, last_version=0))
            except IntegrityError:
                pass  # created concurrently
            with self.db.tx() as s:
                row = s.execute(
                    update(ModelRow)
                    .where(ModelRow.name == name)
                    .values(last_version=ModelRow.last_version + 1)
                    .returning(ModelRow.id, ModelRow.last_version)
                ).first()
                if row is None:
                    continue  # deleted between the two transactions: create it again
                model_id, number = row
                version = VersionRow(
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
                    s.add(new_variant_row(version.id, nv))
                self.db.bump(s)
                s.flush()
                s.refresh(version)
                return version_record(name, version)
        raise RecordConflict(f"could not create a version of {name!r}: the model keeps being deleted")

    def list_models(self) -> list[ModelRecord]:
        with self.db.tx() as s:
            models = s.scalars(select(ModelRow).order_by(ModelRow.name)).all()
            return [self._model_rec(m) for m in models]

    def get_model(self, name: str) -> ModelRecord:
        if not matchable(name):
            raise RecordNotFound(f"model {name!r} not found")
        with self.db.tx() as s:
            m = s.scalar(select(ModelRow).where(ModelRow.name == name))
            if m is None:
                raise RecordNotFound(f"model {name!r} not found")
            return self._model_rec(m)

    @staticmethod
    def _model_rec(m: ModelRow) -> ModelRecord:
        return ModelRecord(m.name, m.created_at, [version_record(m.name, v) for v in m.versions])

    def get_version(self, name: str, number: int) -> VersionRecord:
        with self.db.tx() as s:
            return version_record(name, version_row(s, name, number))

    def delete_model(self, name: str) -> None:
        if not matchable(name):
            raise RecordNotFound(f"model {name!r} not found")
        with self.db.tx() as s:
            m = s.scalar(select(ModelRow).where(ModelRow.name == name))
            if m is None:
                raise RecordNotFound(f"model {name!r} not found")
            s.delete(m)
            s.flush()
            prune_engines(s)
            self.db.bump(s)

    def delete_version(self, name: str, number: int) -> None:
        with self.db.tx() as s:
            v = version_row(s, name, number)
            model = v.model
            s.delete(v)
            s.flush()
            if not s.scalar(select(func.count()).select_from(VersionRow).where(VersionRow.model_id == model.id)):
                s.delete(model)
            s.flush()
            prune_engines(s)
            self.db.bump(s)

    def set_loaded(self, name: str, number: int | None, loaded: bool) -> list[int]:
        """Set the desired load state of one version, or of all versions when ``number`` is None."""
        if not matchable(name):
            raise RecordNotFound(f"model {name!r} not found")
        with self.db.tx() as s:
            m = s.scalar(select(ModelRow).where(ModelRow.name == name))
            if m is None:
                raise RecordNotFound(f"model {name!r} not found")
            targets = [v for v in m.versions if number is None or v.number == number]
            if not targets:
                raise RecordNotFound(f"model {name!r} has no version {number}")
            for v in targets:
                v.loaded = loaded
            self.db.bump(s)
            return [v.number for v in targets]

    def add_variant(self, name: str, number: int, nv: NewVariant, replace: bool = False) -> VariantRecord:
        with self.db.tx() as s:
            v = version_row(s, name, number)
            existing = next((x for x in v.variants if x.name == nv.name), None)
            if existing is not None:
                if not replace:
                    raise RecordConflict(f"{name} version {number} already has a variant {nv.name!r}")
                s.delete(existing)
                s.flush()
            row = new_variant_row(v.id, nv)
            s.add(row)
            s.flush()
            prune_engines(s)  # a replaced variant's old bytes may have had engines
            self.db.bump(s)
            return variant_record(row)

    def set_default_variant(self, name: str, number: int, variant: str, pinned: bool) -> None:
        with self.db.tx() as s:
            v = version_row(s, name, number)
            if not any(x.name == variant for x in v.variants):
                raise RecordNotFound(f"{name} version {number} has no variant {variant!r}")
            if v.pinned_default and not pinned:
                return  # a user's pin wins over the automatic policy
            v.default_variant = variant
            v.pinned_default = pinned
            self.db.bump(s)

    def referenced_digests(self) -> set[str]:
        with self.db.tx() as s:
            out: set[str] = set()
            for sha, run in s.execute(select(VariantRow.sha256, VariantRow.runnable_sha256)):
                out.add(sha)
                if run:
                    out.add(run)
            out.update(x for x in s.scalars(select(VersionRow.calibration_sha256)) if x)
            for spec in s.scalars(select(JobRow.spec).where(JobRow.state.not_in(JOB_TERMINAL))):
                if isinstance(spec, dict) and spec.get("calibration_sha256"):
                    out.add(spec["calibration_sha256"])
            return out

    def revision(self) -> int:
        """A counter that grows whenever versions or variants are added, removed, toggled or re-defaulted."""
        return self.db.revision()


def version_row(s: Session, name: str, number: int) -> VersionRow:
    if not matchable(name, number):
        raise RecordNotFound(f"model {name!r} has no version {number}")
    v = s.scalar(select(VersionRow).join(ModelRow).where(ModelRow.name == name, VersionRow.number == number))
    if v is None:
        raise RecordNotFound(f"model {name!r} has no version {number}")
    return v
