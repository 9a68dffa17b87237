"""Scale-out: blobs on a real S3 server (moto's, on loopback), catalogue on PostgreSQL, replicas sharing them."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import POSTGRES_URL, ServerFactory, free_port, postgres_available, upload
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


@pytest.fixture
def pg_url() -> Iterator[str]:
    if not postgres_available():
        pytest.skip(f"PostgreSQL is not reachable at {POSTGRES_URL}")
    from sqlalchemy import create_engine, text

    db = f"slimserve_scale_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f"CREATE DATABASE {db}"))
    yield POSTGRES_URL.rsplit("/", 1)[0] + f"/{db}"
    with admin.connect() as c:
        c.execute(text(f"DROP DATABASE {db} WITH (FORCE)"))
    admin.dispose()


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


def test_replicas_share_store_and_catalogue(
    server_factory: ServerFactory, s3_endpoint: str, bucket: str, pg_url: str, tmp_path: Path
) -> None:
    env = {
        "SLIMSERVE_DATABASE_URL": pg_url,
        "SLIMSERVE_S3_BUCKET": bucket,
        "SLIMSERVE_S3_ENDPOINT_URL": s3_endpoint,
        **AWS_ENV,
    }
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
