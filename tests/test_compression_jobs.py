"""Compression jobs through the real server, checked against direct evaluations: each variant reports its own
evaluation (int8 and int8-cpu never share one), and a model with a fixed batch dimension runs every stage."""

from __future__ import annotations

import re
import time

import httpx
import numpy as np
import pytest

from backends import TensorSpec
from compression.calibration import parse_npz
from compression.evaluate import evaluate_variant
from model_store import LocalBlobStore
from tests.compression.optimize_helpers import npz
from tests.conftest import Server, ServerFactory, upload
from tests.onnx_models import conv_net, mlp


def wait_job(c: httpx.Client, job_id: str, timeout: float = 240) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def wait_ready(c: httpx.Client, model: str, variants: set[str], timeout: float = 60) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        version = c.get(f"/v1/models/{model}/versions/1").json()
        states = {v["name"]: v["state"] for v in version["variants"]}
        if all(states.get(v) == "ready" for v in variants):
            return version
        time.sleep(0.3)
    raise AssertionError(f"variants of {model} not ready: {states}")


def gauge(metrics: str, name: str, model: str, variant: str) -> float:
    pattern = rf'^{name}\{{[^}}]*model="{model}"[^}}]*variant="{variant}"[^}}]*\}} (\S+)$'
    found = re.search(pattern, metrics, re.MULTILINE)
    assert found, f"no {name} for {model}:{variant}"
    return float(found.group(1))


@pytest.fixture(scope="module")
def jobs_server(server_factory: ServerFactory) -> Server:
    return server_factory(SLIMSERVE_JOB_WORKERS="1")


def test_int8_and_int8_cpu_report_their_own_evaluations(jobs_server: Server) -> None:
    rng = np.random.default_rng(0)
    calibration = npz(x=rng.standard_normal((64, 16)).astype(np.float32), labels=rng.integers(0, 5, 64))
    model = mlp(in_dim=16, hidden=64, out_dim=5)
    with jobs_server.client() as c:
        assert upload(c, "forms-mlp", model, calibration=calibration).status_code == 201
        spec = {"quantize": {"cpu_form": "always"}, "holdout_fraction": 0.5, "latency_runs": 5}
        job = wait_job(c, c.post("/v1/models/forms-mlp/versions/1/compress", json=spec).json()["id"])
        assert job["state"] == "succeeded", job
        assert set(job["result"]["variants"]) == {"int8", "int8-cpu"}
        version = wait_ready(c, "forms-mlp", {"int8", "int8-cpu"})
        report = {row["variant"]: row for row in c.get("/v1/models/forms-mlp/versions/1/report").json()["variants"]}
        metrics = c.get("/metrics").text

    variants = {v["name"]: v for v in version["variants"]}
    inputs = [TensorSpec("x", "FP32", (-1, 16))]
    _, held_out = parse_npz(calibration, inputs).split(0.5)  # the job's split: the same seeded function
    blobs = LocalBlobStore(jobs_server.data_dir / "blobs")
    direct = {
        name: evaluate_variant(model, blobs.get_bytes(variants[name]["sha256"]), held_out, held_out.labels)["primary"]
        for name in ("int8", "int8-cpu")
    }
    assert variants["int8"]["sha256"] != variants["int8-cpu"]["sha256"]
    assert direct["int8"]["max_abs_error"] != direct["int8-cpu"]["max_abs_error"]  # the models differ
    for name in ("int8", "int8-cpu"):
        details = variants[name]["details"]
        assert details["form"] == ("qdq" if name == "int8" else "cpu")
        assert details["evaluation"]["size_bytes"] == variants[name]["size_bytes"]
        for reported in (details["evaluation"]["accuracy"], report[name]["accuracy"]):
            assert reported["kind"] == direct[name]["kind"] == "top1"  # [N, 5] class scores
            numbers = {k: v for k, v in direct[name].items() if not isinstance(v, str)}
            assert {k: v for k, v in reported.items() if k in numbers} == pytest.approx(numbers, rel=1e-6, abs=1e-9)
        assert details["accuracy_delta"] == report[name]["accuracy_delta"] == direct[name]["accuracy_delta"]
        assert gauge(metrics, "slimserve_variant_accuracy_delta", "forms-mlp", name) == pytest.approx(
            direct[name]["accuracy_delta"]
        )
    assert report["int8"]["accuracy"] != report["int8-cpu"]["accuracy"]


def test_cpu_form_is_published_only_when_measured_faster(jobs_server: Server) -> None:
    rng = np.random.default_rng(1)
    with jobs_server.client() as c:
        calibration = npz(x=rng.standard_normal((32, 16)).astype(np.float32))
        assert upload(c, "auto-mlp", mlp(in_dim=16, hidden=64), calibration=calibration).status_code == 201
        job = wait_job(c, c.post("/v1/models/auto-mlp/versions/1/compress", json={"quantize": {}}).json()["id"])
        assert job["state"] == "succeeded", job
        version = c.get("/v1/models/auto-mlp/versions/1").json()
    decision = next(v for v in version["variants"] if v["name"] == "int8")["details"]["int8_cpu"]
    assert decision["policy"] == "auto" and decision["rounds"] >= 30 and decision["low"] <= decision["high"]
    # the rule, whatever this machine measured: published exactly when the whole interval is below 1 - margin
    assert decision["published"] == (decision["high"] < 1 - decision["margin"])
    assert ("int8-cpu" in job["result"]["variants"]) == decision["published"]
    assert any(n.startswith("int8-cpu ") for n in job["result"]["notes"])


def test_fixed_batch_model_runs_every_stage(jobs_server: Server) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((16, 3, 8, 8)).astype(np.float32)
    with jobs_server.client() as c:
        r = upload(c, "fixed1-cnn", conv_net(batch=1), calibration=npz(x=x, labels=rng.integers(0, 10, 16)))
        assert r.status_code == 201, r.text
        spec = {"prune": {"sparsity": 0.5}, "quantize": {"cpu_form": "always"}, "encode": {}, "latency_runs": 5}
        job = wait_job(c, c.post("/v1/models/fixed1-cnn/versions/1/compress", json=spec).json()["id"])
        assert job["state"] == "succeeded", job
        made = set(job["result"]["variants"])
        assert made == {"pruned", "int8", "int8-cpu", "encoded"}
        rows = {row["variant"]: row for row in job["result"]["table"]}
        for name in made:
            assert rows[name]["accuracy"]["samples"] == 4, name  # a quarter of 16 held out, fed one at a time
            assert rows[name]["latency"]["batch_size"] == 1 and rows[name]["latency"]["p50_ms"] > 0, name
        assert rows["pruned"]["sparsity"] >= 0.45
        pruned = next(v for v in wait_ready(c, "fixed1-cnn", made)["variants"] if v["name"] == "pruned")
        assert any(layer["method"] == "obs" for layer in pruned["details"]["prune"]["layers"])  # data was used
        body = {"inputs": [{"name": "x", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": x[0].ravel().tolist()}]}
        for name in made:
            out = c.post(f"/v2/models/fixed1-cnn:{name}/infer", json=body)
            assert out.status_code == 200 and out.json()["outputs"][0]["shape"] == [1, 10], (name, out.text)


def test_fixed_batch_rules_are_said_at_the_door(server: Server) -> None:
    x = np.zeros((10, 3, 8, 8), np.float32)
    with server.client() as c:
        r = upload(c, "fixed4-cnn", conv_net(batch=4), calibration=npz(x=x))
        assert r.status_code == 400
        assert "batches of exactly 4" in r.json()["error"] and "multiple of 4; got 10" in r.json()["error"]
        assert c.get("/v1/models/fixed4-cnn").status_code == 404  # nothing was written
        # 4 samples are one batch: enough to upload (and warm up on), not to hold some out for a job
        assert upload(c, "fixed4-cnn", conv_net(batch=4), calibration=npz(x=x[:4])).status_code == 201
        r = c.post("/v1/models/fixed4-cnn/versions/1/compress", json={"encode": {}})
        assert r.status_code == 400 and "at least 2 batches of 4" in r.json()["error"]
        files = {"spec": (None, '{"quantize": {}}'), "calibration": ("c.npz", npz(x=x[:6]), "application/octet-stream")}
        r = c.post("/v1/models/fixed4-cnn/versions/1/compress", files=files)
        assert r.status_code == 400 and "multiple of 4; got 6" in r.json()["error"]
        files["calibration"] = ("c.npz", npz(x=x[:8]), "application/octet-stream")
        r = c.post("/v1/models/fixed4-cnn/versions/1/compress", files=files)
        assert r.status_code == 202
        assert c.delete(f"/v1/jobs/{r.json()['id']}").json()["state"] == "cancelled"  # the shared server runs no jobs
