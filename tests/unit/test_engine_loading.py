"""Readiness gated on engines, in process: a real SQLite catalogue and blob directory, the real loaded-variant index
and sync, real Prometheus metrics.

The CPU tests are real end to end: a real build job (``JobWorker.run_one``) makes the engine that the sync swaps in.
The GPU tests need what cannot exist here -- an NVIDIA GPU and TensorRT -- so exactly those are stood in for: GPU
discovery returns an L4, the runtime probe reports a TensorRT version, ``load_backend`` serves the GPU kinds with ONNX
Runtime CPU (recording the kind and the engine folder it was given), and the build job's publication is done by
hand with a packed artifact. Everything else -- the key, the catalogue row and build job, waiting, fallback,
failure, retry, the swap -- is the production code.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import generate_latest

from backends import Backend, BackendOptions
from backends.engine_artifacts import pack
from backends.engines import RuntimeVersions
from backends.gpu import GpuInfo
from backends.onnxruntime_backend import OnnxRuntimeBackend
from backends.targets import cpu_target, gpu_target
from compression.worker import JobWorker
from model_store import ModelStore, NewVariant
from service import engine_loader, loaded, variant_build
from service.errors import Unavailable
from service.loaded import LoadedVariants
from service.metrics import Metrics
from service.settings import Settings
from service.views import variant_view
from tests.onnx_models import mlp

L4 = gpu_target(GpuInfo(0, "NVIDIA L4", "GPU-x", "8.9", 23034 << 20, "580.95.05", "13.0"))
X = np.ones((2, 4), np.float32)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, intra_op_threads=1)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def lv(settings: Settings, store: ModelStore, metrics: Metrics) -> LoadedVariants:
    return LoadedVariants(settings, store, metrics)


@pytest.fixture
def gpu_here(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str | None]]:
    """Stand-ins for the GPU, TensorRT and the GPU runtimes (see the module docstring). Returns the loads made."""
    loads: list[tuple[str, str | None]] = []

    class Runtime(RuntimeVersions):
        @classmethod
        def detect(cls, gpu: GpuInfo | None = None) -> RuntimeVersions:
            return RuntimeVersions("13.0", "13.0", "10.13.3", "1.32.0", gpu.driver_version if gpu else None)

    def load_backend(kind: str, model: bytes, options: BackendOptions | None = None) -> Backend:
        engine_dir = (options.extra if options else {}).get("engine_dir")
        loads.append((kind, engine_dir))
        if kind == "tensorrt":  # a native engine is served from its plan: the stand-in needs it to be there
            assert engine_dir is not None and (Path(engine_dir) / "engine.plan").read_bytes() == b"plan for an L4"
        backend = OnnxRuntimeBackend(model, BackendOptions(intra_op_threads=1))
        backend.name = kind
        return backend

    monkeypatch.setattr(engine_loader, "gpu_targets", lambda: [L4])
    monkeypatch.setattr(engine_loader, "RuntimeVersions", Runtime)
    monkeypatch.setattr(variant_build, "load_backend", load_backend)
    return loads


def add(store: ModelStore, config: dict[str, Any]) -> None:
    sha = store.blobs.put_bytes(mlp())
    store.catalog.create_version("m", [NewVariant("original", "original", sha, len(mlp()))], config, "original")


def publish(store: ModelStore, tmp_path: Path, ok: bool = True) -> None:
    """What the build job on an L4 worker would publish (it needs TensorRT, so it is done by hand here)."""
    [job] = [j for j in store.jobs.recent() if j.kind == "build" and j.state == "queued"]
    assert job.target == L4.id
    digest = job.spec["engine"]
    if not ok:
        assert store.engines.mark_failed(digest, job.id, "TensorRT could not build the engine: no tactic")
        return
    folder = tmp_path / "built"
    folder.mkdir(exist_ok=True)
    (folder / "engine.plan").write_bytes(b"plan for an L4")
    pack(folder, {"digest": digest, "key": job.spec["key"], "load": "engine.plan", "format": "tensorrt-plan"},
         tmp_path / "engine.tar")  # fmt: skip
    blob = store.blobs.put_file(tmp_path / "engine.tar")
    assert store.engines.mark_ready(digest, job.id, blob, 1, 1.0, {})


def sample(metrics: Metrics, name: str, backend: str) -> float | None:
    return metrics.registry.get_sample_value(
        name, {"model": "m", "version": "1", "variant": "original", "backend": backend}
    )


def view(lv: LoadedVariants, store: ModelStore) -> dict[str, Any]:
    record = store.catalog.get_version("m", 1)
    return variant_view(record.variants[0], record, lv)


def test_a_gpu_variant_waits_for_its_engine_then_serves_it(
    lv: LoadedVariants, store: ModelStore, metrics: Metrics, gpu_here: list, tmp_path: Path
) -> None:
    async def body() -> None:
        add(store, {"backend": "tensorrt", "precision": "fp16", "max_batch_size": 8})
        await lv.sync()
        assert lv.served("m", 1, "original") is None  # never built on a replica: it waits
        with pytest.raises(Unavailable, match="waiting for its tensorrt engine for gpu-nvidia-l4-sm89") as e:
            await lv.resolve("m")
        assert e.value.headers["Retry-After"]
        v = view(lv, store)
        assert v["state"] == "waiting" and v["engine"]["state"] == "queued" and v["engine"]["target"] == L4.id
        assert sample(metrics, "slimserve_variant_engine_waiting", "tensorrt") == 1
        assert sample(metrics, "slimserve_variant_ready", "tensorrt") == 0
        assert gpu_here == []  # nothing was loaded, nothing was built
        await lv.sync()  # nothing changed: no new build is asked for
        assert len([j for j in store.jobs.recent() if j.kind == "build"]) == 1

        publish(store, tmp_path)
        await lv.sync()
        sv = await lv.resolve("m")
        assert sv.backend == "tensorrt" and sv.engine is not None and sv.engine.used
        assert gpu_here[-1][0] == "tensorrt" and gpu_here[-1][1] is not None
        assert Path(gpu_here[-1][1]).is_relative_to(lv.settings.data_dir.resolve() / "engines" / "tensorrt")
        out = await sv.scheduler.submit({"x": X}, None, 2)
        assert out["probs"].shape == (2, 3)
        assert view(lv, store)["state"] == "ready"
        assert sample(metrics, "slimserve_variant_engine_waiting", "tensorrt") is None
        assert sample(metrics, "slimserve_variant_engine_fallback", "tensorrt") == 0
        await lv.close()

    asyncio.run(body())


def test_a_gpu_variant_with_a_fallback_serves_on_it_visibly_then_swaps(
    lv: LoadedVariants, store: ModelStore, metrics: Metrics, gpu_here: list, tmp_path: Path
) -> None:
    async def body() -> None:
        add(store, {"backend": "tensorrt", "engine_fallback": "onnxruntime-cuda", "max_batch_size": 8})
        await lv.sync()
        sv = await lv.resolve("m")
        assert sv.backend == "onnxruntime-cuda" and gpu_here == [("onnxruntime-cuda", None)]
        assert sv.engine is not None and (sv.engine.state, sv.engine.fallback) == ("queued", "onnxruntime-cuda")
        assert view(lv, store)["engine"]["fallback"] == "onnxruntime-cuda"
        assert sample(metrics, "slimserve_variant_engine_fallback", "onnxruntime-cuda") == 1

        publish(store, tmp_path)
        await lv.sync()
        swapped = await lv.resolve("m")
        assert swapped.backend == "tensorrt" and swapped.engine is not None and swapped.engine.used
        assert sample(metrics, "slimserve_variant_engine_fallback", "tensorrt") == 0
        assert b'backend="onnxruntime-cuda"' not in generate_latest(metrics.registry)  # the fallback's series went
        await lv.close()

    asyncio.run(body())


def test_a_failed_build_is_reported_and_retried_only_on_request(
    lv: LoadedVariants, store: ModelStore, gpu_here: list, tmp_path: Path
) -> None:
    async def body() -> None:
        add(store, {"backend": "onnxruntime-tensorrt", "max_batch_size": 8})
        await lv.sync()
        publish(store, tmp_path, ok=False)
        await lv.sync()
        v = view(lv, store)
        assert v["state"] == "failed" and v["engine"]["state"] == "failed"
        with pytest.raises(Unavailable, match="unusable: TensorRT could not build the engine: no tactic"):
            await lv.resolve("m")
        await lv.sync(force=True)
        assert [j.kind for j in store.jobs.recent()].count("build") == 1  # never rebuilt by itself
        sha = store.catalog.get_version("m", 1).variants[0].runnable_sha256
        [retried] = store.engines.retry(sha, "m", 1)
        await lv.sync()
        assert view(lv, store)["state"] == "waiting" and retried.state == "queued"
        await lv.close()

    asyncio.run(body())


def test_a_cpu_variant_serves_its_plain_model_until_its_engine_is_built(
    lv: LoadedVariants, store: ModelStore, metrics: Metrics
) -> None:
    async def body() -> None:
        add(store, {"cpu_engine": True})
        await lv.sync()
        plain = await lv.resolve("m")  # serves at once: no readiness wait on the CPU
        assert plain.engine is not None and (plain.engine.used, plain.engine.fallback) == (False, "plain model")
        assert "engine" not in plain.backend_info
        assert sample(metrics, "slimserve_variant_engine_fallback", "onnxruntime-cpu") == 1
        before = await plain.scheduler.submit({"x": X}, None, 2)

        assert await asyncio.to_thread(JobWorker(store, targets=(cpu_target().id,)).run_one)  # the real build job
        await lv.sync()
        swapped = await lv.resolve("m")
        assert swapped is not plain and swapped.engine is not None and swapped.engine.used
        assert swapped.backend_info["engine"]["digest"] == swapped.engine.digest
        assert sample(metrics, "slimserve_variant_engine_fallback", "onnxruntime-cpu") == 0
        after = await swapped.scheduler.submit({"x": X}, None, 2)
        np.testing.assert_allclose(after["probs"], before["probs"], rtol=1e-6)
        unpacked = lv.engines.root / "onnxruntime-cpu" / swapped.engine.digest
        assert (unpacked / "manifest.json").is_file()
        store.catalog.delete_model("m")
        await lv.sync()
        assert not unpacked.exists()  # its engine went with the model: so does the replica's unpacked copy
        await lv.close()

    asyncio.run(body())


def test_cpu_engines_are_off_unless_asked_for(lv: LoadedVariants, store: ModelStore, settings: Settings) -> None:
    async def body() -> None:
        add(store, {})
        await lv.sync()
        assert (await lv.resolve("m")).engine is None and store.jobs.recent() == []
        await lv.close()

    asyncio.run(body())
    assert (
        engine_loader.EngineLoader(Settings(data_dir=settings.data_dir, cpu_engines=True), store).builder_for(
            loaded.ModelConfig()
        )
        == "onnxruntime-cpu"
    )
