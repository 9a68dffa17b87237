"""The pending-jobs cap under concurrency, on SQLite and PostgreSQL: the count and the insert are one transaction
(model_store/jobs.py), so jobs created at once -- by threads with connections of their own, or by requests to
two server processes sharing one catalogue -- never pass SLIMSERVE_MAX_PENDING_JOBS."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import httpx
import pytest

from model_store import Catalog, Database, JobQueue, NewVariant, QueueFull
from tests.conftest import ServerFactory, upload
from tests.onnx_models import mlp

CAP = 5


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog.db'}"
    return str(request.getfixturevalue("postgres_url"))


def burst(queues: list[JobQueue], per_thread: int) -> Counter[str]:
    """Every queue (its own engine and connection) creates ``per_thread`` jobs, all threads released at once."""
    barrier = threading.Barrier(len(queues))
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def create(queue: JobQueue) -> None:
        barrier.wait()
        for _ in range(per_thread):
            try:
                queue.create("compress", "m", 1, {"encode": {}}, max_pending=CAP)
                result = "created"
            except QueueFull:
                result = "full"
            with lock:
                outcomes[result] += 1

    threads = [threading.Thread(target=create, args=(q,)) for q in queues]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    return outcomes


@pytest.mark.slow  # threads racing on a real database
def test_concurrent_creates_never_pass_the_cap(database_url: str) -> None:
    catalog = Catalog(database_url)
    catalog.create_version("m", [NewVariant("original", "original", "0" * 64, 10)])
    queues = [JobQueue(Database(database_url)) for _ in range(12)]
    try:
        assert burst(queues, per_thread=3) == {"created": CAP, "full": 36 - CAP}
        jobs = JobQueue(catalog.db)
        assert jobs.count(("queued", "running")) == CAP
        # two finish: exactly two more fit, however many ask at once
        for j in jobs.recent("queued")[:2]:
            jobs.cancel(j.id)
        assert burst(queues, per_thread=2) == {"created": 2, "full": 24 - 2}
        assert jobs.count(("queued", "running")) == CAP
    finally:
        for q in queues:
            q.db.close()
        catalog.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_two_servers_answer_429_beyond_the_cap(
    backend: str, server_factory: ServerFactory, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    env = {"SLIMSERVE_MAX_PENDING_JOBS": str(CAP)}
    if backend == "postgres":
        env["SLIMSERVE_DATABASE_URL"] = str(request.getfixturevalue("postgres_url"))
    data_dir = tmp_path / "shared"  # one store: SQLite's catalog.db lives in it
    servers = [server_factory(data_dir=data_dir, **env) for _ in range(2)]
    with servers[0].client() as c:
        assert upload(c, "cap-burst", mlp(in_dim=16, hidden=32)).status_code == 201

    def post_all(n: int) -> list[httpx.Response]:
        barrier = threading.Barrier(n)
        answers: list[httpx.Response] = []
        lock = threading.Lock()

        def post(i: int) -> None:
            with servers[i % 2].client() as c:
                barrier.wait()
                r = c.post("/v1/models/cap-burst/versions/1/compress", json={"encode": {}})
            with lock:
                answers.append(r)

        threads = [threading.Thread(target=post, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        return answers

    answers = post_all(16)
    assert Counter(r.status_code for r in answers) == {202: CAP, 429: 16 - CAP}
    for r in answers:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1 and f"limit {CAP}" in r.json()["error"]
    with servers[1].client() as c:
        queued = c.get("/v1/jobs", params={"state": "queued"}).json()["jobs"]
        assert len(queued) == CAP
        for job in queued[:3]:
            assert c.delete(f"/v1/jobs/{job['id']}").status_code == 200
    answers = post_all(12)
    assert Counter(r.status_code for r in answers) == {202: 3, 429: 9}
    for s in servers:
        s.stop()
