"""Scale-out: blobs on a real S3 server (moto's, on loopback), catalogue on PostgreSQL, replicas sharing them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerFactory, free_port, upload
from tests.onnx_models import mlp

AWS_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    import boto3

    for k, v in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(k, v)
    name = f"slimserve-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


def test_s3_blob_store_roundtrip(s3_endpoint: str, bucket: str, tmp_path: Path) -> None:
    from model_store.blobs import BlobNotFound, sha256_bytes
    from model_store.s3 import S3BlobStore

    store = S3BlobStore(bucket, tmp_path / "cache", prefix="team-a", endpoint_url=s3_endpoint)
    d = store.put_bytes(b"weights")
    assert d == sha256_bytes(b"weights") and store.exists(d)
    assert store.get_bytes(d) == b"weights"
    assert [x for x, _ in store.list_digests()] == [d]
    other = S3BlobStore(bucket, tmp_path / "cache2", prefix="team-b", endpoint_url=s3_endpoint)
    assert list(other.list_digests()) == []  # prefixes keep tenants apart
    store.delete(d)
    assert not store.exists(d)
    with pytest.raises(BlobNotFound):
        store.local_path(d)
    with pytest.raises(ValueError):
        store.local_path("../../etc/passwd")


@pytest.fixture
def shared_env(s3_endpoint: str, bucket: str, postgres_url: str) -> dict[str, str]:
    """What every replica and worker of one deployment shares: the PostgreSQL catalogue and the bucket."""
    return {
        "SLIMSERVE_DATABASE_URL": postgres_url,
        "SLIMSERVE_S3_BUCKET": bucket,
        "SLIMSERVE_S3_ENDPOINT_URL": s3_endpoint,
        **AWS_ENV,
    }


def test_replicas_share_store_and_catalogue(
    server_factory: ServerFactory, shared_env: dict[str, str], tmp_path: Path
) -> None:
    env = shared_env
    a = server_factory(data_dir=tmp_path / "a", **env)
    b = server_factory(data_dir=tmp_path / "b", **env)
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    with a.client() as ca, b.client() as cb:
        assert upload(ca, "shared", mlp()).status_code == 201
        t0 = time.monotonic()
        while time.monotonic() - t0 < 15:
            r = cb.post("/v2/models/shared/infer", json=body)
            if r.status_code == 200:
                break
            time.sleep(0.1)
        assert r.status_code == 200, r.text
        assert r.json()["outputs"] == ca.post("/v2/models/shared/infer", json=body).json()["outputs"]
        # the blob lives in the bucket, not on A's disk
        assert not any((tmp_path / "a" / "blobs").rglob("sha256/*/*"))
        # a delete on B unloads on A
        assert cb.delete("/v1/models/shared").status_code == 200
        t0 = time.monotonic()
        while time.monotonic() - t0 < 15 and ca.post("/v2/models/shared/infer", json=body).status_code == 200:
            time.sleep(0.1)
        assert ca.post("/v2/models/shared/infer", json=body).status_code == 404
        assert httpx.get(f"{a.url}/v2/health/ready").status_code == 200


def _start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("SLIMSERVE_")}
    full.update(env)
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "worker"], env=full, stdout=open(log, "ab"), stderr=subprocess.STDOUT
    )


@pytest.mark.slow
def test_two_servers_two_workers_one_killed_mid_job(
    server_factory: ServerFactory, shared_env: dict[str, str], postgres_url: str, tmp_path: Path
) -> None:
    env = {**shared_env, "SLIMSERVE_JOB_LEASE_S": "3"}
    a = server_factory(data_dir=tmp_path / "a", **env)
    b = server_factory(data_dir=tmp_path / "b", **env)
    workers = [
        _start_worker({**env, "SLIMSERVE_DATA_DIR": str(tmp_path / f"w{i}")}, tmp_path / f"worker{i}.log")
        for i in range(2)
    ]
    try:
        with a.client() as ca, b.client() as cb:
            assert upload(ca, "big", mlp(in_dim=1024, hidden=4096, out_dim=10)).status_code == 201
            r = cb.post("/v1/models/big/versions/1/compress", json={"encode": {"bits": 5}, "latency_runs": 1000})
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            owner = _wait_for_owner(postgres_url, job_id)
            victim = next(w for w in workers if f":{w.pid}:" in owner)
            victim.kill()
            victim.wait()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                job = ca.get(f"/v1/jobs/{job_id}").json()
                if job["state"] in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(0.3)
            assert job["state"] == "succeeded", job
            assert job["attempts"] >= 2  # resumed by the surviving worker after the victim's lease expired
            body = {"inputs": [{"name": "x", "shape": [1, 1024], "datatype": "FP32", "data": [0.1] * 1024}]}
            for c in (ca, cb):  # both replicas serve the new variant
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    out = c.post("/v2/models/big:encoded/infer", json=body)
                    if out.status_code == 200:
                        break
                    time.sleep(0.2)
                assert out.status_code == 200, out.text
    finally:
        for w in workers:
            if w.poll() is None:
                w.terminate()
                w.wait(timeout=30)


def _wait_for_owner(pg_url: str, job_id: str, timeout: float = 60) -> str:
    from model_store import Database, JobQueue

    db = Database(pg_url)
    jobs = JobQueue(db)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = jobs.get(job_id)
            if job.state == "running" and job.lease_owner and job.stage not in (None, "load"):
                return job.lease_owner
            time.sleep(0.05)
        raise AssertionError(f"no worker took job {job_id}")
    finally:
        db.close()
