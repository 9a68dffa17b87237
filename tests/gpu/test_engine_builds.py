"""The GPU engine builders as build jobs, on a real NVIDIA GPU: the job a worker with the GPU target runs, the
artifact it publishes, and a replica's load of it (``load_backend`` with ``engine_dir``). Every test skips, saying
what is missing, without a GPU, onnxruntime-gpu with TensorRT, or the tensorrt wheel and cuda-python.

Run on a GPU machine with ``pytest -m "gpu or tensorrt" tests/gpu -rs`` (docs/gpu.md; bench/gpu_check.sh runs it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from backends import BackendOptions, load_backend
from backends.engine_artifacts import install
from backends.engines import RuntimeVersions, engine_key_for
from backends.onnx_model import model_interface, parse_model
from backends.targets import gpu_targets
from compression.worker import JobWorker
from model_store import ModelStore, NewVariant, open_store
from tests.gpu.test_gpu_backends import CUDA_EP_PROBLEM, GPU_PROBLEM, TRT_EP_PROBLEM, TRT_PROBLEM, skip_unless
from tests.onnx_models import mlp

pytestmark = [pytest.mark.gpu, skip_unless()]


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    s = open_store(f"sqlite:///{tmp_path / 'catalog.db'}", tmp_path / "blobs")
    sha = s.blobs.put_bytes(mlp())
    s.catalog.create_version("mlp", [NewVariant("original", "original", sha, len(mlp()))])
    return s


def build(store: ModelStore, builder: str, precision: str, opt_batch: int = 8) -> tuple[str, Path]:
    """Ask for the engine as a replica does, run the build job as a worker with the GPU does, install the artifact."""
    assert GPU_PROBLEM is None
    target = gpu_targets()[0]
    variant = mlp()
    inputs, _ = model_interface(parse_model(variant))
    opts = BackendOptions(precision=precision, extra={"max_batch_size": 16, "opt_batch_size": opt_batch})
    key = engine_key_for(builder, store.catalog.get_version("mlp", 1).variants[0].sha256, inputs, opts, target,
                         RuntimeVersions.detect(target.gpu))  # fmt: skip
    store.engines.request(key.to_dict(), key.digest, "mlp", 1)
    assert JobWorker(store, targets=(target.id,)).run_one()
    rec = store.engines.get(key.digest)
    assert rec.state == "ready", rec.error
    assert rec.details["verification"]["compared"] is True
    folder = store.blobs.root.parent / "engines" / key.digest  # type: ignore[attr-defined]
    install(store.blobs.local_path(rec.blob_sha256 or ""), folder)
    return key.digest, folder


def reference(x: np.ndarray) -> np.ndarray:
    return load_backend("onnxruntime-cpu", mlp()).infer({"x": x})["probs"]


@pytest.mark.tensorrt
@skip_unless(CUDA_EP_PROBLEM, TRT_EP_PROBLEM)
@pytest.mark.parametrize(("precision", "atol"), [("fp32", 2e-3), ("fp16", 1e-2)])
def test_trt_ep_build_job_and_a_replica_loading_its_artifact(store: ModelStore, precision: str, atol: float) -> None:
    _digest, folder = build(store, "onnxruntime-tensorrt", precision)
    assert list((folder / "trt").glob("*.engine")), "the artifact carries no engine"
    opts = BackendOptions(precision=precision, extra={"engine_dir": str(folder)})
    served = load_backend("onnxruntime-tensorrt", mlp(), opts)
    assert served.describe()["engine_built_at_load"] is False  # found the job's engine, built nothing
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    np.testing.assert_allclose(served.infer({"x": x})["probs"], reference(x), atol=atol)


@pytest.mark.tensorrt
@skip_unless(TRT_PROBLEM)
def test_native_build_job_keeps_and_reuses_the_targets_timing_cache(store: ModelStore) -> None:
    _digest, folder = build(store, "tensorrt", "fp16")
    served = load_backend("tensorrt", mlp(), BackendOptions(precision="fp16", extra={"engine_dir": str(folder)}))
    x = np.random.default_rng(2).standard_normal((8, 4)).astype(np.float32)
    np.testing.assert_allclose(served.infer({"x": x})["probs"], reference(x), atol=1e-2)
    served.unload()
    digest2, _ = build(store, "tensorrt", "fp16", opt_batch=4)  # another profile: another engine, same target
    assert store.engines.get(digest2).details["timing_cache_reused"] is True
