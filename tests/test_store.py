"""Model store: atomic content-addressed blobs and the catalogue on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from model_store import Catalog, JobQueue, LocalBlobStore, ModelStore, NewVariant, RecordNotFound, sha256_bytes


def test_blob_roundtrip_and_content_address(tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path)
    d = blobs.put_bytes(b"hello")
    assert d == sha256_bytes(b"hello")
    assert blobs.get_bytes(d) == b"hello"
    assert blobs.put_bytes(b"hello") == d  # idempotent
    assert [x for x, _ in blobs.list_digests()] == [d]
    blobs.delete(d)
    assert not blobs.exists(d)


def test_blob_paths_are_checked(tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path)
    for bad in ["../../etc/passwd", "a" * 63, "A" * 64, "/" + "a" * 63]:
        with pytest.raises(ValueError):
            blobs.local_path(bad)


def test_interrupted_write_leaves_no_visible_blob(tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path)
    # Simulate a crash mid-write: a temp file left in the spool directory.
    (blobs.spool_dir() / "put-crashed").write_bytes(b"half")
    assert list(blobs.list_digests()) == []
    store = ModelStore(blobs, Catalog(f"sqlite:///{tmp_path / 'c.db'}"))
    report = store.startup_check()
    assert report.temporaries == 1
    assert not any(blobs.spool_dir().iterdir())


def test_collect_removes_only_old_orphans(tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path / "b")
    store = ModelStore(blobs, Catalog(f"sqlite:///{tmp_path / 'c.db'}"))
    kept = blobs.put_bytes(b"model")
    store.catalog.create_version("m", [NewVariant("original", "original", kept, 5)])
    orphan = blobs.put_bytes(b"orphan")
    assert store.collect(grace_seconds=3600).orphans == 0  # too young
    old = os.stat(blobs.local_path(orphan)).st_mtime - 7200
    os.utime(blobs.local_path(orphan), (old, old))
    assert store.collect(grace_seconds=3600).orphans == 1
    assert blobs.exists(kept) and not blobs.exists(orphan)


@pytest.fixture(params=["sqlite", "postgres"])
def catalog(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Catalog]:
    url = (
        f"sqlite:///{tmp_path / 'catalog.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    )
    c = Catalog(url)
    yield c
    c.close()


def _variant(i: int = 0) -> NewVariant:
    return NewVariant("original", "original", f"{i:064x}", 10)


def test_versions_are_numbered_per_model(catalog: Catalog) -> None:
    assert catalog.create_version("a", [_variant()]).number == 1
    assert catalog.create_version("a", [_variant()]).number == 2
    assert catalog.create_version("b", [_variant()]).number == 1
    assert [v.number for v in catalog.get_model("a").versions] == [1, 2]
    rev = catalog.revision()
    catalog.delete_version("a", 1)
    assert catalog.revision() > rev
    assert [v.number for v in catalog.get_model("a").versions] == [2]
    catalog.delete_version("a", 2)
    with pytest.raises(RecordNotFound):
        catalog.get_model("a")  # the last version took the model with it


def test_concurrent_uploads_never_share_a_number(catalog: Catalog) -> None:
    numbers: list[int] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(5):
                numbers.append(catalog.create_version("race", [_variant()]).number)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(numbers) == list(range(1, 31))


def test_jobs_are_claimed_once(catalog: Catalog) -> None:
    catalog.create_version("j", [_variant()])
    jobs = JobQueue(catalog.db)
    job = jobs.create("compress", "j", 1, {"prune": {"sparsity": 0.5}})
    claims: list[object] = []

    def claim(owner: str) -> None:
        claims.append(jobs.claim(owner, 60, ("compress",)))

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [c for c in claims if c is not None]
    assert len(won) == 1 and won[0].id == job.id and won[0].state == "running"
    assert jobs.finish(job.id, "someone-else", "succeeded") is False
    assert jobs.finish(job.id, won[0].lease_owner, "succeeded")
    assert jobs.get(job.id).state == "succeeded"


def test_default_variant_pin_wins_over_policy(catalog: Catalog) -> None:
    catalog.create_version("p", [_variant()])
    catalog.add_variant("p", 1, NewVariant("int8", "int8", f"{1:064x}", 5))
    catalog.set_default_variant("p", 1, "original", pinned=True)
    catalog.set_default_variant("p", 1, "int8", pinned=False)
    assert catalog.get_version("p", 1).default_variant == "original"
    with pytest.raises(RecordNotFound):
        catalog.set_default_variant("p", 1, "nope", pinned=True)


def test_cleanup_spares_live_writers_temporaries(tmp_path: Path) -> None:
    import subprocess
    import sys

    from model_store.blobs import temp_prefix

    blobs = LocalBlobStore(tmp_path)
    mine = blobs.spool_dir() / f"{temp_prefix()}inflight"  # this process is alive: an upload in progress
    mine.write_bytes(b"partial")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host_part = temp_prefix().split("-")[1]
    gone = blobs.spool_dir() / f"put-{host_part}-{dead.stdout.strip()}-crashed"  # its writer exited
    gone.write_bytes(b"partial")
    assert blobs.cleanup_temporaries() == 1
    assert mine.exists() and not gone.exists()


def test_an_older_catalogue_is_upgraded_in_place(tmp_path: Path) -> None:
    """A database made by an earlier release (here: the jobs table without a later column) gains the column
    at start, keeps its rows, and works."""
    import sqlalchemy as sa

    url = f"sqlite:///{tmp_path / 'old.db'}"
    catalog = Catalog(url)
    catalog.create_version("old", [_variant()])
    JobQueue(catalog.db).create("compress", "old", 1, {"encode": {"bits": 4}})
    with catalog.db.engine.begin() as c:
        c.execute(sa.text("ALTER TABLE jobs DROP COLUMN cancel_requested"))
    catalog.close()

    upgraded = Catalog(url)
    jobs = JobQueue(upgraded.db)
    [job] = jobs.recent()
    assert job.model == "old" and job.cancel_requested in (None, False)
    assert jobs.cancel(job.id).state == "cancelled"
    assert upgraded.get_version("old", 1).variants[0].name == "original"
    upgraded.close()
