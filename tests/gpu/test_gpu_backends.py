"""The GPU backends on a real NVIDIA GPU. Every test here skips, saying exactly why, where that is missing:
no GPU at all, no onnxruntime-gpu (CUDA / TensorRT execution providers), no TensorRT or cuda-python.

Run on a GPU machine with ``pytest -m "gpu or tensorrt" tests/gpu -rs`` (docs/gpu.md has the recipe).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from backends import BackendOptions, load_backend
from backends import gpu as gpuinfo
from backends.base import InvalidInput
from backends.onnxruntime_backend import OnnxRuntimeBackend
from tests.gpu import qdq_linear, static_mlp
from tests.onnx_models import mlp, mlp_reference

ROOT = Path(__file__).resolve().parents[2]
GPUS = gpuinfo.list_gpus()
_ORT = gpuinfo.onnxruntime_version_and_providers() or ("?", [])
ORT_VERSION, ORT_PROVIDERS = _ORT
TRT_LIB = gpuinfo.tensorrt_version()


def _tensorrt_problem() -> str | None:
    try:
        import tensorrt as trt
    except Exception as e:
        return f"tensorrt is not importable ({type(e).__name__}: {e})"
    if not hasattr(trt, "Builder"):
        return "tensorrt imports but has no Builder (the PyPI stub, not the real wheel)"
    try:
        from cuda.bindings import runtime  # noqa: F401
    except ImportError:
        try:
            from cuda import cudart  # noqa: F401
        except ImportError:
            return "cuda-python is not installed (the native TensorRT backend uses its runtime API)"
    return None


TRT_PROBLEM = _tensorrt_problem()
GPU_PROBLEM = None if GPUS else "no NVIDIA GPU (nvidia-smi is absent or lists none)"
CUDA_EP_PROBLEM = (
    None
    if "CUDAExecutionProvider" in ORT_PROVIDERS
    else f"onnxruntime-gpu is not installed (onnxruntime {ORT_VERSION} has only {ORT_PROVIDERS})"
)
TRT_EP_PROBLEM = (
    None
    if "TensorrtExecutionProvider" in ORT_PROVIDERS and TRT_LIB
    else f"the TensorRT execution provider cannot run (onnxruntime {ORT_VERSION} providers {ORT_PROVIDERS}, "
    f"TensorRT library {TRT_LIB or 'libnvinfer not found'})"
)


def skip_unless(*problems: str | None) -> pytest.MarkDecorator:
    """Skip with every missing piece named, the GPU first: the reason says exactly what to install or find."""
    found = [p for p in (GPU_PROBLEM, *problems) if p]
    return pytest.mark.skipif(bool(found), reason="; ".join(found))


pytestmark = [pytest.mark.gpu, skip_unless()]  # nothing in this module runs without a GPU
needs_cuda_ep = skip_unless(CUDA_EP_PROBLEM)
needs_trt_ep = skip_unless(CUDA_EP_PROBLEM, TRT_EP_PROBLEM)
needs_trt = skip_unless(TRT_PROBLEM)


def cpu_reference(model: bytes, x: np.ndarray) -> dict[str, np.ndarray]:
    return OnnxRuntimeBackend(model).infer({"x": x})


def batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


# -- onnxruntime-cuda ------------------------------------------------------------------------------------------


@needs_cuda_ep
@pytest.mark.parametrize(("precision", "atol"), [("fp32", 2e-3), ("fp16", 1e-2)])  # fp32 allows TF32 matmuls
def test_cuda_matches_cpu(precision: str, atol: float) -> None:
    b = load_backend("onnxruntime-cuda", mlp(), BackendOptions(precision=precision))
    d = b.describe()
    assert d["providers"][0] == "CUDAExecutionProvider", d
    for n in (1, 7, 64):
        x = batch(n, n)
        out = b.infer({"x": x})
        ref = cpu_reference(mlp(), x)
        np.testing.assert_allclose(out["probs"], ref["probs"], atol=atol)
        np.testing.assert_allclose(out["logits"], ref["logits"], rtol=atol, atol=atol * 4)
    assert list(b.infer({"x": batch(3)}, ["logits"])) == ["logits"]
    b.unload()


@needs_cuda_ep
def test_cuda_graph_on_a_static_model() -> None:
    b = load_backend("onnxruntime-cuda", static_mlp(2), BackendOptions())
    assert b.describe()["cuda_graph"] is True, b.describe()
    for seed in range(4):  # the first run captures, the rest replay with new input data
        x = batch(2, seed)
        np.testing.assert_allclose(b.infer({"x": x})["probs"], mlp_reference(x), atol=2e-3)
    with pytest.raises(InvalidInput):
        b.infer({"x": batch(3)})


@needs_cuda_ep
def test_cuda_from_many_threads() -> None:
    b = load_backend("onnxruntime-cuda", mlp(), BackendOptions())
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for i in range(20):
                x = batch(1 + (seed + i) % 9, seed * 100 + i)
                np.testing.assert_allclose(b.infer({"x": x})["probs"], mlp_reference(x), atol=2e-3)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


@needs_cuda_ep
def test_no_silent_cpu_fallback_without_a_visible_gpu(tmp_path: Path) -> None:
    """Hide the GPU from a child process: the CUDA provider cannot initialise there. Whatever ONNX Runtime
    does about it (error, or a quiet CPU session), the backend must refuse rather than serve on the CPU."""
    script = textwrap.dedent(
        """
        from backends import BackendError, load_backend
        from tests.onnx_models import mlp
        try:
            b = load_backend("onnxruntime-cuda", mlp())
        except BackendError as e:
            print("REFUSED", type(e).__name__, e)
        else:
            print("SERVED", b.describe())
        """
    )
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert "REFUSED" in out.stdout, out.stdout + out.stderr


# -- onnxruntime-tensorrt --------------------------------------------------------------------------------------


def _engine_files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@needs_trt_ep
def test_trt_ep_engine_cache_is_reused(tmp_path: Path) -> None:
    opts = BackendOptions(extra={"engine_cache_dir": str(tmp_path), "max_batch_size": 16})
    first = load_backend("onnxruntime-tensorrt", mlp(), opts)
    assert first.describe()["providers"][:2] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    x = batch(5)
    ref = first.infer({"x": x})
    np.testing.assert_allclose(ref["probs"], mlp_reference(x), atol=2e-3)
    built = _engine_files(tmp_path)
    engines = [f for f in built if f.endswith(".engine")]
    assert engines, f"no .engine file was written: {sorted(built)}"
    first.unload()

    second = load_backend("onnxruntime-tensorrt", mlp(), opts)
    np.testing.assert_allclose(second.infer({"x": x})["probs"], ref["probs"], atol=1e-5)
    after = _engine_files(tmp_path)
    assert {f: after[f] for f in engines} == {f: built[f] for f in engines}, "the engine was rebuilt"
    assert second.describe()["engine_key"] == first.describe()["engine_key"]

    fp16 = load_backend("onnxruntime-tensorrt", mlp(), BackendOptions(precision="fp16", extra=opts.extra))
    assert fp16.describe()["engine_key"] != first.describe()["engine_key"]  # another precision: another entry
    np.testing.assert_allclose(fp16.infer({"x": x})["probs"], ref["probs"], atol=1e-2)


# -- native TensorRT -------------------------------------------------------------------------------------------


@pytest.mark.tensorrt
@needs_trt
@pytest.mark.parametrize(("precision", "atol"), [("fp32", 2e-3), ("fp16", 1e-2)])
def test_native_build_infer_and_timing_cache(precision: str, atol: float) -> None:
    from backends.engines import derive_profile
    from backends.onnx_model import load_and_inspect
    from backends.tensorrt_backend import TensorRTBackend, build_engine

    info = load_and_inspect(mlp())[1]
    profile = derive_profile(info.inputs, 32, opt_batch_size=8)
    plan, cache, log = build_engine(mlp(), precision, profile, timing_cache=None, workspace_bytes=1 << 28)
    assert plan and cache and log["strongly_typed"] and log["converted_to_fp16"] == (precision == "fp16")
    b = TensorRTBackend(plan)
    assert [t.name for t in b.inputs] == ["x"] and {t.datatype for t in b.outputs} == {"FP32"}
    for n in (1, 8, 32, 3):  # buffers grow, then are reused
        x = batch(n, n)
        out = b.infer({"x": x})
        ref = cpu_reference(mlp(), x)
        np.testing.assert_allclose(out["probs"], ref["probs"], atol=atol)
    with pytest.raises(InvalidInput, match="outside the engine's profile"):
        b.infer({"x": batch(33)})
    _plan2, _cache2, log2 = build_engine(mlp(), precision, profile, timing_cache=cache, workspace_bytes=1 << 28)
    assert log2["timing_cache_reused"] is True
    b.unload()


@pytest.mark.tensorrt
@needs_trt
def test_native_int8_from_qdq() -> None:
    from backends.engines import derive_profile
    from backends.onnx_model import load_and_inspect
    from backends.tensorrt_backend import TensorRTBackend, build_engine

    data, w, bias = qdq_linear()
    profile = derive_profile(load_and_inspect(data)[1].inputs, 8)
    plan, _cache, _log = build_engine(data, "int8", profile)
    x = np.random.default_rng(5).uniform(-1, 1, (4, 4)).astype(np.float32)
    np.testing.assert_allclose(TensorRTBackend(plan).infer({"x": x})["y"], x @ w + bias, atol=0.1)


@pytest.mark.tensorrt
@needs_trt
def test_native_tensorrt_serves_prebuilt_engines_only() -> None:
    """A serving process never builds: without an unpacked engine (a build job's artifact) loading is refused."""
    from backends import BackendError

    with pytest.raises(BackendError, match="prebuilt engines only"):
        load_backend("tensorrt", mlp(), BackendOptions(precision="fp16", extra={"max_batch_size": 8}))


def test_gpu_fields_are_what_the_engine_key_needs() -> None:
    for g in GPUS:
        assert g.compute_capability.count(".") == 1 and g.driver_version and g.name
        assert g.sm.startswith("sm_")
