"""Engines in the catalogue, on SQLite and PostgreSQL: one build per key however many replicas ask, build jobs
claimed only by workers with the target, the engine's state following its job, engines deleted with their
variants, their blobs kept by the collector until then, and the additive schema upgrade of older catalogues."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from backends import BackendOptions
from backends.base import TensorSpec
from backends.engines import EngineKey, RuntimeVersions, engine_key_for
from backends.gpu import GpuInfo
from backends.targets import Target, gpu_target
from model_store import Catalog, Database, JobQueue, LocalBlobStore, ModelStore, NewVariant, RecordNotFound

RUNTIME = RuntimeVersions("13.0", "13.0", "10.13.3", "1.32.0", "580.95.05")
CPU = Target("cpu-x86_64-avx2", "cpu")
L4 = gpu_target(GpuInfo(0, "NVIDIA L4", "GPU-x", "8.9", 23034 << 20, "580.95.05", "13.0"))
X = [TensorSpec("x", "FP32", (-1, 4))]


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def store(url: str, tmp_path: Path) -> Iterator[ModelStore]:
    s = ModelStore(LocalBlobStore(tmp_path / "blobs"), Catalog(url))
    yield s
    s.close()


def variant(store: ModelStore, name: str, data: bytes, number: int | None = None) -> str:
    sha = store.blobs.put_bytes(data)
    if number is None:
        store.catalog.create_version(name, [NewVariant("original", "original", sha, len(data))])
    else:
        store.catalog.add_variant(name, number, NewVariant("pruned", "pruned", sha, len(data)), replace=True)
    return sha


def cpu_key(sha: str, target: Target = CPU) -> EngineKey:
    return engine_key_for("onnxruntime-cpu", sha, X, BackendOptions(), target, RUNTIME)


def gpu_key(sha: str) -> EngineKey:
    opts = BackendOptions(precision="fp16", extra={"max_batch_size": 8})
    return engine_key_for("tensorrt", sha, X, opts, L4, RUNTIME)


def ask(store: ModelStore, key: EngineKey, model: str = "m", number: int = 1) -> str:
    return store.engines.request(key.to_dict(), key.digest, model, number).job_id or ""


def test_one_build_per_key_however_many_replicas_ask(url: str, store: ModelStore) -> None:
    key = cpu_key(variant(store, "m", b"model"))
    replicas = [Database(url) for _ in range(6)]  # each replica has its own engine and connections
    barrier = threading.Barrier(len(replicas))
    got: list[str] = []

    def replica(db: Database) -> None:
        from model_store import EngineCatalog

        barrier.wait()
        got.append(EngineCatalog(db).request(key.to_dict(), key.digest, "m", 1).job_id or "")

    threads = [threading.Thread(target=replica, args=(db,)) for db in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for db in replicas:
        db.close()
    assert len(got) == 6 and len(set(got)) == 1
    builds = store.jobs.recent()
    assert [(j.kind, j.target, j.state) for j in builds] == [("build", CPU.id, "queued")]
    assert builds[0].spec == {"engine": key.digest, "key": key.to_dict()}
    other = cpu_key(variant(store, "other", b"other bytes"))
    with pytest.raises(RecordNotFound):  # a build is always for a version that exists
        store.engines.request(other.to_dict(), other.digest, "other", 9)


def test_builds_go_only_to_workers_with_their_target(store: ModelStore) -> None:
    sha = variant(store, "m", b"model")
    compress = store.jobs.create("compress", "m", 1, {"encode": {"bits": 4}})
    cpu_job, gpu_job = ask(store, cpu_key(sha)), ask(store, gpu_key(sha))
    jobs = store.jobs
    assert jobs.claim("plain-worker", 60, ("compress", "build")).id == compress.id  # type: ignore[union-attr]
    assert jobs.claim("plain-worker", 60, ("compress", "build")) is None  # no targets: no builds
    other = jobs.claim("avx512-worker", 60, ("build",), ("cpu-x86_64-avx512vnni",))
    assert other is None  # another instruction set is another target
    got = jobs.claim("l4-worker", 60, ("build",), (L4.id,), exclude=(gpu_job,))
    assert got is None  # a job a worker gave back is left to others
    gpu = jobs.claim("l4-worker", 60, ("build",), (L4.id,))
    assert gpu is not None and gpu.id == gpu_job and gpu.target == L4.id and gpu.attempts == 1
    assert jobs.release(gpu_job, "someone-else") is False
    assert jobs.release(gpu_job, "l4-worker") is True  # given back untried
    again = jobs.get(gpu_job)
    assert (again.state, again.attempts, again.lease_owner) == ("queued", 0, None)
    cpu = jobs.claim("avx2-worker", 60, ("build",), (CPU.id, L4.id))
    assert cpu is not None and cpu.id == cpu_job  # the oldest of the builds this worker's targets allow


def test_targeted_builds_come_before_older_user_jobs(store: ModelStore) -> None:
    sha = variant(store, "m", b"model")
    store.jobs.create("compress", "m", 1, {"encode": {"bits": 4}})
    build = ask(store, cpu_key(sha))
    got = store.jobs.claim("w", 60, ("compress", "build"), (CPU.id,))
    assert got is not None and got.id == build  # a replica may be waiting for it


def test_builds_do_not_count_against_the_users_cap(store: ModelStore) -> None:
    for i in range(4):
        ask(store, cpu_key(variant(store, f"m{i}", f"model {i}".encode())), f"m{i}")
    assert store.jobs.count(("queued", "running")) == 4
    store.jobs.create("compress", "m0", 1, {"encode": {}}, max_pending=2)  # 4 builds pending, 0 user jobs
    store.jobs.create("compress", "m0", 1, {"encode": {}}, max_pending=2)
    from model_store import QueueFull

    with pytest.raises(QueueFull):
        store.jobs.create("compress", "m0", 1, {"encode": {}}, max_pending=2)


def test_the_engine_state_follows_its_build_job(store: ModelStore) -> None:
    sha = variant(store, "m", b"model")
    key = cpu_key(sha)
    job = ask(store, key)
    engines, jobs = store.engines, store.jobs
    assert engines.get(key.digest).state == "queued"
    jobs.claim("w1", 0.05, ("build",), (CPU.id,))
    assert engines.get(key.digest).state == "building"  # claimed: building, before the runner says so
    assert engines.mark_building(key.digest, job)
    deadline = time.monotonic() + 10
    while jobs.get(job).state != "queued" and time.monotonic() < deadline:  # its worker died: the lease runs out
        jobs.fail_abandoned(max_attempts=5)
        time.sleep(0.02)
    assert jobs.get(job).state == "queued"  # requeued
    assert engines.get(key.digest).state == "queued"  # the row still says building; the job has the last word
    revision = store.catalog.revision()
    assert jobs.cancel(job).state == "cancelled"
    rec = engines.get(key.digest)
    assert (rec.state, rec.error) == ("failed", "the build job was cancelled")
    assert store.catalog.revision() > revision  # replicas waiting for it re-check
    # a failure is not retried by itself; retry queues a new job, and the old job's late write is ignored
    [retried] = engines.retry(sha, "m", 1)
    assert retried.state == "queued" and retried.job_id != job and retried.error is None
    assert engines.mark_ready(key.digest, job, "0" * 64, 1, 0.1, {}) is False
    assert engines.mark_failed(key.digest, retried.job_id or "", "TensorRT said no") is True
    assert engines.get(key.digest).error == "TensorRT said no"
    assert engines.retry(sha, "m", 1)[0].state == "queued"


def test_a_running_build_cancelled_by_a_user_reads_as_failed_and_wakes_replicas(store: ModelStore) -> None:
    key = cpu_key(variant(store, "m", b"model"))
    job = ask(store, key)
    store.jobs.claim("w", 60, ("build",), (CPU.id,))
    store.engines.mark_building(key.digest, job)
    assert store.jobs.cancel(job).cancel_requested  # running: its worker stops at the next progress step ...
    revision = store.catalog.revision()
    assert store.jobs.finish(job, "w", "cancelled", error="cancelled by request")  # ... and says so
    assert store.catalog.revision() > revision
    rec = store.engines.get(key.digest)
    assert (rec.state, rec.error) == ("failed", "cancelled by request")
    assert store.jobs.finish(job, "w", "failed") is False  # already final


def test_a_build_given_up_after_its_attempts_reads_as_failed(store: ModelStore) -> None:
    key = cpu_key(variant(store, "m", b"model"))
    job = ask(store, key)
    store.jobs.claim("w", 0.01, ("build",), (CPU.id,))
    deadline = time.monotonic() + 10
    while store.jobs.get(job).state != "failed" and time.monotonic() < deadline:
        store.jobs.fail_abandoned(max_attempts=1)
        time.sleep(0.02)
    rec = store.engines.get(key.digest)
    assert rec.state == "failed" and "interrupted 1 times" in (rec.error or "")


def test_deletes_remove_engines_and_stop_their_builds(store: ModelStore) -> None:
    a = variant(store, "m", b"model a")
    b = variant(store, "m", b"model b", number=1)
    shared = variant(store, "twin", b"model a")  # another model with the same bytes: the engine is shared
    ka, kb = cpu_key(a), cpu_key(b)
    job_a, job_b = ask(store, ka), ask(store, kb)
    assert shared == a and ask(store, cpu_key(shared), "twin") == job_a
    store.jobs.claim("w", 60, ("build",), (CPU.id,))  # job_a (the oldest) is running
    variant(store, "m", b"model b2", number=1)  # the pruned variant is replaced by other bytes
    assert store.engines.for_variant(b) == []
    assert store.jobs.get(job_b).state == "cancelled"
    store.catalog.delete_model("m")
    assert [e.digest for e in store.engines.for_variant(a)] == [ka.digest]  # "twin" still uses those bytes
    store.catalog.delete_model("twin")
    assert store.engines.for_variant(a) == []
    assert store.jobs.get(job_a).cancel_requested  # running: stopped at its next progress step
    with pytest.raises(RecordNotFound):
        store.engines.get(ka.digest)


def test_the_collector_keeps_engine_and_timing_cache_blobs_until_their_engine_goes(store: ModelStore) -> None:
    sha = variant(store, "m", b"model")
    key = cpu_key(sha)
    job = ask(store, key)
    artifact = store.blobs.put_bytes(b"engine artifact")
    timing = store.blobs.put_bytes(b"timing cache v1")
    assert store.engines.mark_ready(key.digest, job, artifact, 15, 0.5, {"format": "onnx"})
    store.engines.save_timing_cache("timing-sm_89-trt10.13.3-abc.cache", L4.id, timing, 15)
    newer = store.blobs.put_bytes(b"timing cache v2")
    store.engines.save_timing_cache("timing-sm_89-trt10.13.3-abc.cache", L4.id, newer, 15)
    assert store.engines.timing_cache("timing-sm_89-trt10.13.3-abc.cache") == newer
    for digest in (artifact, timing, newer):
        old = time.time() - 7200
        os.utime(store.blobs.local_path(digest), (old, old))
    store.collect(grace_seconds=3600)
    assert store.blobs.exists(artifact) and store.blobs.exists(newer)
    assert not store.blobs.exists(timing)  # the superseded timing cache is collected
    store.catalog.delete_model("m")
    report = store.collect(grace_seconds=3600)
    assert not store.blobs.exists(artifact) and report.missing == []
    assert store.blobs.exists(newer)  # timing caches belong to the target, not to a model


def test_an_older_catalogue_gains_the_target_column_and_the_engine_tables(url: str, store: ModelStore) -> None:
    """A catalogue made before engines existed: jobs without `target`, no engines or timing_caches tables."""
    variant(store, "old", b"model")
    old_job = store.jobs.create("compress", "old", 1, {"encode": {"bits": 4}})
    with store.catalog.db.engine.begin() as c:
        c.execute(sa.text("DROP TABLE engines"))
        c.execute(sa.text("DROP TABLE timing_caches"))
        c.execute(sa.text("ALTER TABLE jobs DROP COLUMN target"))
    store.catalog.close()
    upgraded = ModelStore(store.blobs, Catalog(url))
    try:
        columns = {c["name"] for c in sa.inspect(upgraded.catalog.db.engine).get_columns("jobs")}
        assert "target" in columns
        [job] = upgraded.jobs.recent()
        assert job.id == old_job.id and job.target is None
        claimed = JobQueue(upgraded.catalog.db).claim("w", 60, ("compress",))  # untargeted: any worker
        assert claimed is not None and claimed.id == old_job.id
        key = cpu_key(upgraded.catalog.get_version("old", 1).variants[0].sha256)
        assert upgraded.engines.request(key.to_dict(), key.digest, "old", 1).state == "queued"
    finally:
        upgraded.close()
