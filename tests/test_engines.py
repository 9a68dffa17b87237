"""Engines end to end on the CPU builder: the real server, a real `slimserve worker` process claiming the build for its
target, the artifact blob, the engine row, the replica swapping the engine in, and deletion; on SQLite with a local
store, and on PostgreSQL with blobs on S3 (moto's server) and a second replica that loads the engine it never built.
Also what a GPU-only configuration does on this CPU machine, and the checks on configs and worker targets."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from backends.targets import cpu_target
from tests.compression.digits import digits_model, load_data
from tests.conftest import ROOT, Server, ServerFactory, metric, upload, wait_for
from tests.onnx_models import mlp
from tests.test_scale_out import AWS_ENV, bucket, s3_endpoint  # noqa: F401 - fixtures used by name

DIGITS = digits_model()
IMAGE = load_data().x_test[:2]
BODY = {"inputs": [{"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32", "data": IMAGE.ravel().tolist()}]}


def engine_of(c: httpx.Client, model: str) -> dict[str, Any] | None:
    r = c.get(f"/v1/models/{model}/versions/1")
    return r.json()["variants"][0].get("engine") if r.status_code == 200 else None


def engines(c: httpx.Client, model: str) -> list[dict[str, Any]]:
    r = c.get(f"/v1/models/{model}/versions/1/variants/original/engines")
    assert r.status_code == 200, r.text
    return r.json()


def fallback_metric(c: httpx.Client, model: str) -> float | None:
    return metric(c.get("/metrics").text, "slimserve_variant_engine_fallback", model=model)


def probs(c: httpx.Client, model: str) -> np.ndarray:
    r = c.post(f"/v2/models/{model}/infer", json=BODY)
    assert r.status_code == 200, r.text
    return np.array(r.json()["outputs"][0]["data"])


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
        full = {k: v for k, v in os.environ.items() if not k.startswith("SLIMSERVE_")}
        full.update(env)
        log = open(tmp_path / f"worker{len(procs)}.log", "ab")  # noqa: SIM115 - handed to the child
        p = subprocess.Popen([sys.executable, "-m", "service.cli", "worker", *args], env=full, stdout=log,
                             stderr=subprocess.STDOUT, cwd=ROOT)  # fmt: skip
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.terminate()
            p.wait(timeout=30)


def _flow(server: Server, model: str, start_worker: Callable[..., subprocess.Popen[bytes]], env: dict[str, str]) -> str:
    """Upload, see the build queued while the plain model serves, run a worker, see the engine swapped in.
    Returns the engine digest."""
    with server.client() as c:
        assert upload(c, model, DIGITS).status_code == 201
        plain = probs(c, model)  # serves at once: a CPU variant never waits for its engine
        queued = wait_for("the replica asking for its engine", lambda: engine_of(c, model))
        assert queued["builder"] == "onnxruntime-cpu" and queued["target"] == cpu_target().id
        assert queued["state"] == "queued" and queued["used"] is False and queued["fallback"] == "plain model"
        [row] = engines(c, model)
        assert (row["state"], row["target"], row["builder"], row["size_bytes"]) == ("queued", cpu_target().id,
                                                                                 "onnxruntime-cpu", None)  # fmt: skip
        assert fallback_metric(c, model) == 1
        jobs = c.get("/v1/jobs").json()["jobs"]
        assert [(j["kind"], j["state"]) for j in jobs if j["id"] == row["job"]] == [("build", "queued")]

        start_worker(env, "--targets", "auto")
        ready = wait_for("the build", lambda: [e for e in engines(c, model) if e["state"] == "ready"])[0]
        assert ready["size_bytes"] > 0 and ready["build_seconds"] >= 0 and ready["reason"] is None
        assert ready["details"]["verification"]["compared"] is True and ready["runtime"]["onnxruntime"]
        used = wait_for("the swap", lambda: (e := engine_of(c, model)) and e["used"] and e)
        assert used["state"] == "ready" and used["fallback"] is None and used["digest"] == ready["digest"]
        assert fallback_metric(c, model) == 0
        np.testing.assert_allclose(probs(c, model), plain, rtol=1e-5, atol=1e-6)
        assert c.get(f"/v1/jobs/{ready['job']}").json()["state"] == "succeeded"
        assert (server.data_dir / "engines" / "onnxruntime-cpu" / ready["digest"] / "manifest.json").is_file()
        return str(ready["digest"])


@pytest.mark.slow
def test_cpu_engine_flow_on_sqlite(server_factory: ServerFactory, start_worker: Any, tmp_path: Path) -> None:
    server = server_factory(SLIMSERVE_CPU_ENGINES="1", SLIMSERVE_GC_GRACE_S="0")
    env = {"SLIMSERVE_DATA_DIR": str(server.data_dir), "SLIMSERVE_JOB_LEASE_S": "5"}
    digest = _flow(server, "digits", start_worker, env)
    from model_store import open_store

    store = open_store(f"sqlite:///{server.data_dir / 'catalog.db'}", server.data_dir / "blobs")
    try:
        blob = store.engines.get(digest).blob_sha256
        assert blob and store.blobs.exists(blob)
        with server.client() as c:
            assert c.delete("/v1/models/digits").status_code == 200
            assert c.get("/v1/models/digits/versions/1/variants/original/engines").status_code == 404
        assert store.engines.for_variant(store.blobs.put_bytes(DIGITS)) == []  # deleted with the model
        wait_for("the engine blob's collection", lambda: not store.blobs.exists(blob))
        unpacked = server.data_dir / "engines" / "onnxruntime-cpu" / digest
        wait_for("the replica removing its unpacked copy", lambda: not unpacked.exists())
    finally:
        store.close()


@pytest.mark.slow
def test_cpu_engine_flow_on_postgres_and_s3_with_a_second_replica(
    server_factory: ServerFactory,
    start_worker: Any,
    tmp_path: Path,
    s3_endpoint: str,  # noqa: F811
    bucket: str,  # noqa: F811
    postgres_url: str,
) -> None:
    shared = {
        "SLIMSERVE_DATABASE_URL": postgres_url,
        "SLIMSERVE_S3_BUCKET": bucket,
        "SLIMSERVE_S3_ENDPOINT_URL": s3_endpoint,
        "SLIMSERVE_CPU_ENGINES": "1",
        **AWS_ENV,
    }
    a = server_factory(data_dir=tmp_path / "a", **shared)
    digest = _flow(a, "digits", start_worker, {**shared, "SLIMSERVE_DATA_DIR": str(tmp_path / "w")})
    b = server_factory(data_dir=tmp_path / "b", **shared)  # started after the build: loads the engine at once
    with b.client() as cb, a.client() as ca:
        engine = wait_for("replica B serving", lambda: engine_of(cb, "digits"))
        assert engine["used"] and engine["digest"] == digest and fallback_metric(cb, "digits") == 0
        np.testing.assert_allclose(probs(cb, "digits"), probs(ca, "digits"), rtol=1e-6)
        assert [e["digest"] for e in engines(cb, "digits")] == [digest]  # B asked for the same key: no second build
        assert len([j for j in cb.get("/v1/jobs").json()["jobs"] if j["kind"] == "build"]) == 1
    assert not any((tmp_path / "w").rglob("sha256/*/*")), "the artifact went to the bucket, not the worker's disk"
    assert (tmp_path / "b" / "engines" / "onnxruntime-cpu" / digest / "manifest.json").is_file()


def test_gpu_engine_configs_on_a_machine_without_a_gpu(server: Server) -> None:
    with server.client() as c:
        # the upload checks the model on ONNX Runtime CPU: a request never builds an engine
        r = upload(c, "trt-here", mlp(), config='{"backend": "tensorrt", "precision": "fp16"}')
        assert r.status_code == 201, r.text
        failed = wait_for("the sync's verdict", lambda: (v := c.get("/v1/models/trt-here/versions/1").json()
                          ["variants"][0])["state"] == "failed" and v)  # fmt: skip
        assert "no GPU here" in failed["error"]
        assert c.post("/v2/models/trt-here/infer", json={"inputs": []}).status_code == 503
        assert engines(c, "trt-here") == []  # no target here, so nothing was asked for
        for config, message in [
            ('{"engine_fallback": "onnxruntime-cuda"}', "engine_fallback applies to the engine-built GPU backends"),
            ('{"backend": "tensorrt", "engine_fallback": "onnxruntime-cpu"}', "engine_fallback"),
            ('{"backend": "tensorrt", "precision": "int8", "engine_fallback": "onnxruntime-cuda"}', "int8"),
            ('{"backend": "tensorrt", "cpu_engine": true}', "cpu_engine applies to the onnxruntime-cpu backend"),
            ('{"backend_options": {"engine_dir": "/etc"}}', "engine_dir is a server setting"),
        ]:
            r = upload(c, "bad-engine-config", mlp(), config=config)
            assert r.status_code == 422 and message in r.json()["error"], (config, r.text)
        assert c.get("/v1/models/nope/versions/1/variants/original/engines").status_code == 404
        assert c.get("/v1/models/trt-here/versions/1/variants/nope/engines").status_code == 404
        assert c.post("/v1/models/trt-here/versions/1/variants/original/engines/retry").json() == []
        assert c.get("/v1/gpus").json()["targets"] == [cpu_target().id]  # what this replica would build for


@pytest.mark.slow  # starts processes
def test_a_worker_refuses_targets_its_machine_lacks(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMSERVE_")}
    env["SLIMSERVE_DATA_DIR"] = str(tmp_path)
    for targets, message in [("gpu-nvidia-h100-80gb-hbm3-sm90", "has no target"), ("h100", "not a build target")]:
        out = subprocess.run([sys.executable, "-m", "service.cli", "worker", "--targets", targets], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.returncode == 2 and message in out.stdout, out.stdout + out.stderr
