"""The `build` job on a real worker loop (``JobWorker.run_one``), a real SQLite catalogue and blob directory and real
ONNX Runtime: the CPU builder publishes a verified artifact; a worker whose runtime differs gives the build back
untried; an artifact that computes something else is refused by verification; a vanished variant fails clearly."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from backends import BackendOptions, load_backend
from backends.engine_artifacts import install, read_manifest
from backends.engines import EngineKey, RuntimeVersions, engine_key_for
from backends.gpu import GpuInfo
from backends.onnx_model import model_interface, parse_model
from backends.targets import cpu_target, gpu_target
from compression import engine_build
from compression.worker import JobWorker
from model_store import ModelStore, NewVariant, open_store
from tests.onnx_models import conv_net, mlp


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ModelStore]:
    s = open_store(f"sqlite:///{tmp_path / 'catalog.db'}", tmp_path / "blobs")
    yield s
    s.close()


def ask(store: ModelStore, model: bytes, **changes: Any) -> EngineKey:
    sha = store.blobs.put_bytes(model)
    store.catalog.create_version("m", [NewVariant("original", "original", sha, len(model))])
    inputs, _ = model_interface(parse_model(model))
    key = engine_key_for("onnxruntime-cpu", sha, inputs, BackendOptions(), cpu_target(), RuntimeVersions.detect())
    key = dataclasses.replace(key, **changes) if changes else key
    store.engines.request(key.to_dict(), key.digest, "m", 1)
    return key


def worker(store: ModelStore) -> JobWorker:
    return JobWorker(store, targets=(cpu_target().id,))


@pytest.mark.parametrize("model", [mlp(), conv_net(batch="N")], ids=["mlp", "conv"])
def test_cpu_build_publishes_a_verified_artifact_a_replica_can_load(
    store: ModelStore, tmp_path: Path, model: bytes
) -> None:
    key = ask(store, model)
    assert worker(store).run_one()
    rec = store.engines.get(key.digest)
    assert rec.state == "ready", rec.error
    assert rec.size_bytes and rec.build_seconds is not None and rec.blob_sha256
    assert rec.details["verification"]["compared"] is True
    assert rec.details["verification"]["max_relative_error"] <= rec.details["verification"]["tolerance"]
    job = store.jobs.get(rec.job_id or "")
    assert job.state == "succeeded" and job.result["engine"] == key.digest
    manifest = read_manifest(store.blobs.local_path(rec.blob_sha256))
    assert manifest["key"] == key.to_dict() and manifest["load"] == "model.onnx" and manifest["format"] == "onnx"
    folder = tmp_path / "replica" / key.digest
    install(store.blobs.local_path(rec.blob_sha256), folder)
    served = load_backend("onnxruntime-cpu", model, BackendOptions(extra={"engine_dir": str(folder)}))
    assert served.describe()["engine"] == {"digest": key.digest, "format": "onnx"}
    name = served.inputs[0].name
    x = (
        np.random.default_rng(3)
        .random((3, *[d if d > 0 else 1 for d in served.inputs[0].shape[1:]]))
        .astype(np.float32)
    )
    plain = load_backend("onnxruntime-cpu", model).infer({name: x})
    for out, ref in zip(served.infer({name: x}).values(), plain.values(), strict=True):
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_a_worker_with_another_runtime_gives_the_build_back_untried(store: ModelStore) -> None:
    key = ask(store, mlp(), runtime={"onnxruntime": "1.0.0"})  # what a replica on another ORT release would ask for
    w = worker(store)
    assert w.run_one()  # claimed, found it cannot build it, gave it back
    job = store.jobs.recent()[0]
    assert (job.state, job.attempts, job.lease_owner) == ("queued", 0, None)
    assert store.engines.get(key.digest).state == "queued"  # never marked building
    assert w.run_one() is False  # it leaves that job to other workers for a while
    assert worker(store).run_one()  # another worker with the same runtime gives it back too
    assert store.jobs.recent()[0].state == "queued"


def test_a_gpu_build_claimed_by_a_worker_without_that_gpu_is_given_back(store: ModelStore) -> None:
    l4 = gpu_target(GpuInfo(0, "NVIDIA L4", "GPU-x", "8.9", None, "580.95.05", "13.0"))
    runtime = RuntimeVersions("13.0", "13.0", "10.13.3", "1.32.0", "580.95.05")
    sha = store.blobs.put_bytes(mlp())
    store.catalog.create_version("m", [NewVariant("original", "original", sha, len(mlp()))])
    inputs, _ = model_interface(parse_model(mlp()))
    key = engine_key_for("tensorrt", sha, inputs, BackendOptions(extra={"max_batch_size": 4}), l4, runtime)
    store.engines.request(key.to_dict(), key.digest, "m", 1)
    assert JobWorker(store, targets=(l4.id,)).run_one()  # a misconfigured worker: advertises an L4 it lacks
    assert store.jobs.recent()[0].state == "queued" and store.engines.get(key.digest).state == "queued"


def test_an_artifact_that_computes_something_else_is_not_published(
    store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = engine_build.BUILDERS["onnxruntime-cpu"]

    def wrong_weights(b: engine_build.Build) -> dict[str, Any]:  # a builder bug: optimizes another model
        return real(dataclasses.replace(b, variant=mlp(seed=7)))

    monkeypatch.setitem(engine_build.BUILDERS, "onnxruntime-cpu", wrong_weights)
    key = ask(store, mlp(seed=1))
    assert worker(store).run_one()
    rec = store.engines.get(key.digest)
    assert rec.state == "failed" and rec.blob_sha256 is None
    assert "differs from ONNX Runtime CPU on the plain variant" in (rec.error or "")
    assert store.jobs.get(rec.job_id or "").state == "failed"


def test_a_variant_deleted_from_the_store_fails_the_build_with_the_reason(store: ModelStore) -> None:
    key = ask(store, mlp())
    store.blobs.delete(key.variant_sha256)
    assert worker(store).run_one()
    rec = store.engines.get(key.digest)
    assert rec.state == "failed" and "no longer in the store" in (rec.error or "")


def test_a_job_whose_key_does_not_hash_to_its_engine_is_failed(store: ModelStore) -> None:
    key = ask(store, mlp())
    job = store.jobs.recent()[0]
    with store.catalog.db.tx() as s:
        from model_store.schema import JobRow

        s.get(JobRow, job.id).spec = {"engine": "0" * 64, "key": key.to_dict()}  # type: ignore[union-attr]
    assert worker(store).run_one()
    assert store.jobs.get(job.id).error == "the build job's key does not hash to its engine digest"
