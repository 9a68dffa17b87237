"""Compression jobs over HTTP: spec validation, the full pipeline, servable variants, cancel, resume."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import Server, ServerFactory, upload
from tests.onnx_models import mlp


def _calibration(n: int = 64, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    x = np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)
    np.savez(buf, x=x)
    return buf.getvalue()


def _wait(c: httpx.Client, job_id: str, timeout: float = 240) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not finish: {job}")


@pytest.fixture(scope="module")
def jobs_server(server_factory: ServerFactory) -> Server:
    return server_factory(SLIMSERVE_JOB_WORKERS="1")


SPEC_ERRORS = [
    ({"prune": {"sparsity": 0.99}}, "sparsity"),
    ({"prune": {"sparsity": 0.5, "colour": "red"}}, "colour"),
    ({"prune": {"pattern": "3:7"}}, "pattern"),
    ({"prune": {"pattern": "2:4", "sparsity": 0.7}}, "2:4"),
    ({"encode": {"bits": 1}}, "bits"),
    ({"quantize": {"calibration": "vibes"}}, "calibration"),
    ({}, "at least one"),
    ({"tolerance": 2}, "tolerance"),
]


@pytest.mark.parametrize(("spec", "message"), SPEC_ERRORS)
def test_bad_specs_are_422(server: Server, spec: dict, message: str) -> None:  # type: ignore[type-arg]
    with server.client() as c:
        if c.get("/v1/models/spec-mlp").status_code == 404:
            assert upload(c, "spec-mlp", mlp(in_dim=16, hidden=32)).status_code == 201
        before = len(c.get("/v1/jobs").json()["jobs"])
        r = c.post("/v1/models/spec-mlp/versions/1/compress", json=spec)
        assert r.status_code == 422, r.text
        assert message in r.json()["error"]
        assert len(c.get("/v1/jobs").json()["jobs"]) == before  # nothing was queued


def test_quantize_without_data_is_refused_clearly(server: Server) -> None:
    with server.client() as c:
        if c.get("/v1/models/spec-mlp").status_code == 404:
            assert upload(c, "spec-mlp", mlp(in_dim=16, hidden=32)).status_code == 201
        r = c.post("/v1/models/spec-mlp/versions/1/compress", json={"quantize": {}})
        assert r.status_code == 422 and "calibration" in r.json()["error"]
        assert c.post("/v1/models/spec-mlp/versions/9/compress", json={"encode": {}}).status_code == 404
        assert c.post("/v1/models/nope/versions/1/compress", json={"encode": {}}).status_code == 404
        assert c.post("/v1/models/spec-mlp/versions/1/compress", content=b"{bad").status_code == 400


def test_queued_job_can_be_cancelled(server: Server) -> None:
    # The shared server runs no workers, so the job stays queued until cancelled.
    with server.client() as c:
        if c.get("/v1/models/spec-mlp").status_code == 404:
            assert upload(c, "spec-mlp", mlp(in_dim=16, hidden=32)).status_code == 201
        r = c.post("/v1/models/spec-mlp/versions/1/compress", json={"encode": {"bits": 4}})
        assert r.status_code == 202 and r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
        job = r.json()
        assert job["state"] == "queued"
        assert c.delete(f"/v1/jobs/{job['id']}").json()["state"] == "cancelled"
        assert c.get(f"/v1/jobs/{job['id']}").json()["state"] == "cancelled"
        assert c.get("/v1/jobs/not-a-job").status_code == 404


def test_compression_job_makes_servable_measured_variants(jobs_server: Server) -> None:
    with jobs_server.client() as c:
        r = upload(c, "cmp-mlp", mlp(in_dim=16, hidden=64, out_dim=5), calibration=_calibration())
        assert r.status_code == 201, r.text
        spec = {
            "prune": {"sparsity": 0.5},
            "quantize": {"calibration": "minmax"},
            "encode": {"bits": 6},
            "tolerance": 0.05,
        }
        r = c.post("/v1/models/cmp-mlp/versions/1/compress", json=spec)
        assert r.status_code == 202, r.text
        job = _wait(c, r.json()["id"])
        assert job["state"] == "succeeded", job
        assert job["progress"] == 1.0
        made = set(job["result"]["variants"])
        assert {"pruned", "int8", "encoded"} <= made

        # the registry picks the new variants up, and each is servable by name
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            states = {v["name"]: v["state"] for v in c.get("/v1/models/cmp-mlp").json()["versions"][0]["variants"]}
            if all(states.get(v) == "ready" for v in made):
                break
            time.sleep(0.3)
        assert all(states.get(v) == "ready" for v in made), states
        x = np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)
        body = {"inputs": [{"name": "x", "shape": [2, 16], "datatype": "FP32", "data": x.ravel().tolist()}]}
        ref = np.array(c.post("/v2/models/cmp-mlp:original/infer", json=body).json()["outputs"][0]["data"])
        for v in made:
            out = c.post(f"/v2/models/cmp-mlp:{v}/infer", json=body)
            assert out.status_code == 200, (v, out.text)
            got = np.array(out.json()["outputs"][0]["data"])
            assert got.shape == ref.shape

        report = c.get("/v1/models/cmp-mlp/versions/1/report").json()
        rows = {row["variant"]: row for row in report["variants"]}
        assert set(rows) == {"original", *made}
        assert rows["encoded"]["size_bytes"] < rows["original"]["size_bytes"]
        assert rows["pruned"]["sparsity"] >= 0.45
        for name in made:
            assert rows[name]["latency"]["p50_ms"] > 0
            assert rows[name]["accuracy_delta"] is not None
        assert report["default_variant"] in rows
        assert sum(1 for row in rows.values() if row["default"]) == 1
        metrics = c.get("/metrics").text
        assert 'slimserve_variant_accuracy_delta{backend="onnxruntime-cpu",model="cmp-mlp"' in metrics


def test_pinned_default_survives_a_job(jobs_server: Server) -> None:
    with jobs_server.client() as c:
        assert (
            upload(
                c,
                "pin-mlp",
                mlp(in_dim=16, hidden=32),
                calibration=_calibration(),
                config='{"default_variant": "original"}',
            ).status_code
            == 201
        )
        r = c.post("/v1/models/pin-mlp/versions/1/compress", json={"encode": {"bits": 8}, "tolerance": 1.0})
        job = _wait(c, r.json()["id"])
        assert job["state"] == "succeeded", job
        report = c.get("/v1/models/pin-mlp/versions/1/report").json()
        assert report["default_variant"] == "original" and report["default_pinned"] is True
        assert c.put("/v1/models/pin-mlp/versions/1/default", json={"variant": "nope"}).status_code == 404
        assert c.put("/v1/models/pin-mlp/versions/1/default", json={"variant": "encoded"}).status_code == 200
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            meta = c.get("/v2/models/pin-mlp").json()
            if meta["parameters"]["variant"] == "encoded":
                break
            time.sleep(0.2)
        assert meta["parameters"]["variant"] == "encoded"


def test_interrupted_job_is_resumed_by_another_worker(tmp_path: Path) -> None:
    from compression.worker import JobWorker
    from model_store import Catalog, LocalBlobStore, ModelStore, NewVariant

    store = ModelStore(LocalBlobStore(tmp_path / "b"), Catalog(f"sqlite:///{tmp_path / 'c.db'}"))
    model = mlp(in_dim=16, hidden=32)
    sha = store.blobs.put_bytes(model)
    details = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]}
    store.catalog.create_version("r", [NewVariant("original", "original", sha, len(model), details=details)])
    job = store.jobs.create("compress", "r", 1, {"encode": {"bits": 5}, "latency_runs": 3})
    # A worker claims it and dies: its lease (0.2 s) is never renewed.
    assert store.jobs.claim("dead-worker", 0.2, ("compress",)) is not None
    time.sleep(0.4)
    survivor = JobWorker(store, owner="survivor", lease_s=10)
    assert survivor.run_one(threading.Event())
    done = store.jobs.get(job.id)
    assert done.state == "succeeded" and done.attempts == 2
    assert store.catalog.get_version("r", 1).variant("encoded") is not None

    # A job interrupted too often is failed with a reason, never silently lost.
    job2 = store.jobs.create("compress", "r", 1, {"encode": {"bits": 5}})
    for i in range(3):
        assert store.jobs.claim(f"dead-{i}", 0.05, ("compress",)) is not None
        time.sleep(0.1)
    # the sweep fails it; nothing is left to claim
    assert JobWorker(store, owner="late", max_attempts=3).run_one(threading.Event()) is False
    failed = store.jobs.get(job2.id)
    assert failed.state == "failed" and "interrupted" in (failed.error or "")


def test_pending_jobs_are_capped(server_factory: ServerFactory) -> None:
    s = server_factory(SLIMSERVE_MAX_PENDING_JOBS="2")
    with s.client() as c:
        assert upload(c, "cap-mlp", mlp(in_dim=16, hidden=32)).status_code == 201
        for _ in range(2):
            assert c.post("/v1/models/cap-mlp/versions/1/compress", json={"encode": {}}).status_code == 202
        r = c.post("/v1/models/cap-mlp/versions/1/compress", json={"encode": {}})
        assert r.status_code == 429 and r.headers["retry-after"] and "limit 2" in r.json()["error"]


def test_tensor_element_cap(server_factory: ServerFactory) -> None:
    s = server_factory(SLIMSERVE_MAX_TENSOR_ELEMENTS="16")
    with s.client() as c:
        assert upload(c, "elem-mlp", mlp()).status_code == 201
        ok = {"inputs": [{"name": "x", "shape": [4, 4], "datatype": "FP32", "data": [0.0] * 16}]}
        assert c.post("/v2/models/elem-mlp/infer", json=ok).status_code == 200
        big = {"inputs": [{"name": "x", "shape": [5, 4], "datatype": "FP32", "data": [0.0] * 20}]}
        r = c.post("/v2/models/elem-mlp/infer", json=big)
        assert r.status_code == 400 and "over the limit" in r.json()["error"]
