"""Bring an existing catalogue database up to this release's schema, additively.

A release may add tables and nullable (or defaulted) columns; it never renames or drops. At start every
process runs ``upgrade``: new tables are created and missing columns are added with Alembic's operations,
found by Alembic's own metadata comparison (``compare_metadata``), so no hand-written SQL differs between
SQLite and PostgreSQL. Anything that is not additive (a changed type, a dropped column) is left alone and
logged: the database then belongs to another release and an operator must look.

Replicas starting together serialize on a lock (PostgreSQL advisory lock; SQLite's BEGIN IMMEDIATE), and each
re-reads the schema inside it, so a column is added once.
"""

from __future__ import annotations

import logging
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy import Column, Engine, text

from model_store.schema import Base

log = logging.getLogger(__name__)
_LOCK_KEY = 0x5_1_1_5_E_4_E  # any constant: PostgreSQL advisory lock id for schema upgrades


def upgrade(engine: Engine) -> list[str]:
    """Create missing tables and add missing columns; returns what was done (for the log)."""
    done: list[str] = []
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
        Base.metadata.create_all(conn)
        ctx = MigrationContext.configure(conn)
        ops = Operations(ctx)
        for diff in _flatten(compare_metadata(ctx, Base.metadata)):
            kind = diff[0]
            if kind == "add_column":
                _, _schema, table, column = diff
                ops.add_column(table, _detached(column))
                done.append(f"added column {table}.{column.name}")
            elif kind in ("add_index", "add_table", "modify_nullable"):
                continue  # create_all made them; columns this module added are nullable by design
            else:
                log.warning("catalogue schema differs in a way this release does not migrate: %s", diff[:3])
    for line in done:
        log.info("catalogue schema: %s", line)
    return done


def _flatten(diffs: list[Any]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for d in diffs:
        if isinstance(d, list):  # column modifications come grouped
            out.extend(x for x in d if isinstance(x, tuple))
        else:
            out.append(d)
    return out


def _detached(column: Column[Any]) -> Column[Any]:
    """A copy of the model's column that ALTER TABLE can add: no primary key, nullable unless defaulted."""
    col = column._copy()
    col.primary_key = False
    if col.server_default is None:
        col.nullable = True
    return col
