"""The catalogue's database: one SQLAlchemy engine (SQLite or PostgreSQL), transactions, the revision counter.

Every catalogue class (``Catalog``, ``JobQueue``, ...) shares one ``Database``. Each public method of those
classes runs in its own transaction and returns plain records, so callers never hold database sessions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import create_engine, event, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from model_store.migrate import upgrade
from model_store.schema import RevisionRow


class Database:
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
        upgrade(self.engine)
        try:
            with self.tx() as s:
                if s.get(RevisionRow, 1) is None:
                    s.add(RevisionRow(id=1, value=0))
        except IntegrityError:
            pass  # another process created it first

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def tx(self) -> Iterator[Session]:
        with self._sessions.begin() as s:
            yield s

    @staticmethod
    def bump(s: Session) -> None:
        """Move the revision counter, in the caller's transaction: replicas poll it to notice changes."""
        s.execute(update(RevisionRow).where(RevisionRow.id == 1).values(value=RevisionRow.value + 1))

    @staticmethod
    def lock_revision(s: Session) -> None:
        """Serialize with every other transaction that takes this lock (PostgreSQL row lock; on SQLite the
        whole database is already locked by BEGIN IMMEDIATE)."""
        s.execute(select(RevisionRow.id).where(RevisionRow.id == 1).with_for_update())

    def revision(self) -> int:
        """A counter that grows whenever the desired serving state changes."""
        with self.tx() as s:
            return s.scalar(select(RevisionRow.value).where(RevisionRow.id == 1)) or 0


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
