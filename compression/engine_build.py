"""The ``build`` job: make one engine (an ``EngineKey``) on a worker that has its target, check it, publish it.

One builder per ``EngineKey.builder`` (``BUILDERS``), each filling a folder that becomes the artifact
(``backends.engine_artifacts``):

* ``onnxruntime-cpu``: ONNX Runtime's offline optimization. A session at ORT_ENABLE_ALL writes its optimized
  graph (``SessionOptions.optimized_model_filepath``) as ONNX, or in ORT format (``session.save_model_format``)
  when the key says so; ONNX loaded faster in docs/benchmarks.md. ONNX Runtime warns that such a graph may hold
  hardware-specific optimizations (NCHWc layouts sized for the instruction set): that is what the key's target
  captures.
* ``onnxruntime-tensorrt``: a session on the TensorRT execution provider with its engine and timing caches
  enabled into the folder, built with the key's profile and warmed at the profile's min, opt and max shapes; the
  folder (``.engine``, ``.profile``, ``.timing``) is the artifact. The target's timing cache is seeded from the
  store and kept there afterwards.
* ``tensorrt``: ``backends.tensorrt_backend.build_engine`` (strongly typed from Q/DQ, the key's optimization
  profile), reusing and then keeping the target's timing cache in the store.

Every artifact is then verified the way a replica will use it: installed into a folder, loaded through
``load_backend`` with ``engine_dir`` (the serving code path), and run on made-up inputs next to ONNX Runtime's CPU
result on the plain variant. A build that loads but gives other outputs is failed, not published.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from backends import BackendError, BackendOptions, load_backend
from backends.base import TensorSpec
from backends.engine_artifacts import MANIFEST, install, pack
from backends.engines import EngineKey, RuntimeVersions, timing_cache_name
from backends.onnx_model import model_interface, parse_model
from backends.targets import Target, detect_targets
from compression.job_context import JobAborted, JobContext, NotForThisWorker
from model_store import BlobNotFound, ModelStore

log = logging.getLogger(__name__)

#: output agreement an engine must reach against ONNX Runtime CPU on the plain variant (relative to the output's
#: scale): fusions reorder float sums (fp32), fp16 keeps ~3 digits, int8 engines quantize differently per runtime
TOLERANCE = {None: 1e-4, "fp32": 1e-3, "fp16": 2e-2, "int8": 1e-1}


@dataclass
class Build:
    """One build: the key, the variant's bytes, where this worker runs it, and the folder to fill."""

    key: EngineKey
    variant: bytes
    target: Target
    runtime: RuntimeVersions
    out: Path
    store: ModelStore
    progress: Callable[[str, float], None]


#: a builder fills ``build.out`` and returns the manifest's ``load`` (the file or folder a loader opens), the
#: ``format``, and what it measured
Builder = Callable[[Build], dict[str, Any]]


def run_build_job(ctx: JobContext) -> dict[str, Any]:
    job, store = ctx.job, ctx.store
    try:
        key = EngineKey.from_dict(job.spec["key"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"the build job carries no valid engine key: {e}") from None
    if key.digest != job.spec.get("engine"):
        raise ValueError("the build job's key does not hash to its engine digest")
    target = next((t for t in detect_targets() if t.id == key.target), None)
    if target is None:
        raise NotForThisWorker(f"this worker has no target {key.target}")
    runtime = RuntimeVersions.detect(target.gpu)
    why = key.mismatches(target.id, runtime)
    if why:
        raise NotForThisWorker(f"this worker's runtime differs from the engine key's: {'; '.join(why)}")
    ctx.stages[:] = ["fetch", "build", "verify", "publish"]
    store.engines.mark_building(key.digest, job.id)
    try:
        return _build_and_publish(ctx, key, target, runtime)
    except JobAborted:
        raise  # cancelled, lease lost or stopping: the job says so (the engine reads as its job does)
    except Exception as e:
        store.engines.mark_failed(key.digest, job.id, str(e) or type(e).__name__)
        raise


def _build_and_publish(ctx: JobContext, key: EngineKey, target: Target, runtime: RuntimeVersions) -> dict[str, Any]:
    store = ctx.store
    ctx.progress("fetch", 0.0)
    try:
        variant = store.blobs.get_bytes(key.variant_sha256)
    except BlobNotFound:
        raise ValueError(f"the variant {key.variant_sha256} is no longer in the store (deleted?)") from None
    with tempfile.TemporaryDirectory(prefix="slimserve-build-") as tmp:
        out = Path(tmp) / "engine"
        out.mkdir()
        ctx.progress("build", 0.0)
        started = time.perf_counter()
        facts = BUILDERS[key.builder](Build(key, variant, target, runtime, out, store, ctx.progress))
        seconds = time.perf_counter() - started
        manifest = {
            "digest": key.digest,
            "key": key.to_dict(),
            "load": facts.pop("load"),
            "format": facts.pop("format"),
            "build": facts,
            "build_seconds": round(seconds, 3),
        }
        archive = Path(tmp) / "engine.tar"
        pack(out, manifest, archive)
        ctx.progress("verify", 0.0)
        facts["verification"] = verify(key, variant, target, archive, Path(tmp) / "verify")
        ctx.progress("publish", 0.0)
        blob = store.blobs.put_file(archive)
        size = archive.stat().st_size
    facts["format"] = manifest["format"]
    if not store.engines.mark_ready(key.digest, ctx.job.id, blob, size, seconds, facts):
        log.warning("engine %s was deleted or rebuilt while job %s built it; its blob is left to the collector",
                    key.digest, ctx.job.id)  # fmt: skip
    return {
        "engine": key.digest,
        "builder": key.builder,
        "target": key.target,
        "size_bytes": size,
        "build_seconds": round(seconds, 3),
        "verification": facts["verification"],
    }


# -- verification ------------------------------------------------------------------------------------------------


def verify(key: EngineKey, variant: bytes, target: Target, archive: Path, folder: Path) -> dict[str, Any]:
    """Install the artifact, load it as a replica would, and compare it with ONNX Runtime CPU on the plain variant.

    Raises BackendError when the engine does not load, does not run, or disagrees beyond ``TOLERANCE``. When the
    plain variant itself cannot run on made-up inputs (inputs that are shapes or sizes), the engine is published
    after loading and the report says it was not compared."""
    install(archive, folder)
    extra: dict[str, Any] = {"engine_dir": str(folder)}
    if target.gpu is not None:
        extra["device_id"] = target.gpu.index
    engine = load_backend(key.builder, variant, BackendOptions(precision=key.precision or "fp32", extra=extra))
    try:
        inputs, _ = model_interface(parse_model(variant))
        feeds = made_up_feeds(inputs, key.profile)
        try:
            reference = load_backend("onnxruntime-cpu", variant).infer(feeds)
        except BackendError as e:
            return {"compared": False, "reason": f"the plain variant does not run on made-up inputs: {e}"}
        got = engine.infer(feeds)
        if engine.describe().get("engine_built_at_load"):
            raise BackendError("ONNX Runtime rebuilt the engine when it was loaded: a replica would not find it")
    finally:
        engine.unload()
    tol = TOLERANCE[key.precision]
    worst = 0.0
    for name, ref in reference.items():
        out = got[name]
        if out.shape != ref.shape:
            raise BackendError(f"engine output {name!r} has shape {list(out.shape)}, the model gives {list(ref.shape)}")
        if ref.dtype.kind in "fc":
            a, b = out.astype(np.float64), ref.astype(np.float64)
            finite = np.isfinite(b)
            if not np.array_equal(np.isfinite(a), finite):
                raise BackendError(f"engine output {name!r} is not finite where the model's is (or the reverse)")
            scale = max(1.0, float(np.abs(b[finite]).max(initial=0.0)))
            err = float(np.abs(a[finite] - b[finite]).max(initial=0.0)) / scale
        else:
            err = 0.0 if np.array_equal(out, ref) else float("inf")
        worst = max(worst, err)
        if err > tol:
            raise BackendError(
                f"the engine's output {name!r} differs from ONNX Runtime CPU on the plain variant by {err:.3g} "
                f"(relative to its scale), over the {tol:g} allowed for {key.precision or 'the variant as stored'}"
            )
    return {"compared": True, "max_relative_error": worst, "tolerance": tol, "feeds": _shapes(feeds)}


def made_up_feeds(inputs: list[TensorSpec], profile: dict[str, dict[str, list[int]]] | None) -> dict[str, np.ndarray]:
    """Random inputs (floats in [0, 1), integers in [0, 16), as the warm-up's "random" fill) at the profile's opt
    shape, or with dynamic dimensions 1 (batch 2, to exercise batching)."""
    from backends.datatypes import numpy_dtype

    rng = np.random.default_rng(0)
    feeds = {}
    for t in inputs:
        if profile and t.name in profile:
            shape = tuple(profile[t.name]["opt"])
        else:
            shape = tuple((2 if i == 0 else 1) if d < 0 else d for i, d in enumerate(t.shape))
        dtype = numpy_dtype(t.datatype)
        if dtype.kind == "f":
            feeds[t.name] = rng.random(shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[t.name] = rng.integers(0, 2, shape).astype(dtype)
        else:
            feeds[t.name] = rng.integers(0, 16, shape).astype(dtype)
    return feeds


def _shapes(feeds: dict[str, np.ndarray]) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in feeds.items()}


# -- builders ----------------------------------------------------------------------------------------------------


def build_onnxruntime_cpu(b: Build) -> dict[str, Any]:
    import onnxruntime as ort

    fmt = b.key.build_options.get("format", "onnx")
    if fmt not in ("onnx", "ort"):
        raise ValueError(f"unknown CPU engine format {fmt!r} (onnx or ort)")
    name = f"model.{fmt}"
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(b.out / name)
    so.log_severity_level = 3  # the "hardware specific optimizations" warning is the point here: the key has the target
    if fmt == "ort":
        so.add_session_config_entry("session.save_model_format", "ORT")
    try:
        ort.InferenceSession(b.variant, sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:500]
        raise BackendError(f"ONNX Runtime could not optimize the variant: {first}") from None
    b.progress("build", 1.0)
    return {"load": name, "format": fmt, "optimized_bytes": (b.out / name).stat().st_size}


def _timing_cache(b: Build) -> tuple[str, bytes | None]:
    assert b.target.gpu is not None
    name = timing_cache_name(b.target.gpu, b.runtime)
    sha = b.store.engines.timing_cache(name)
    return name, (b.store.blobs.get_bytes(sha) if sha else None)


def _keep_timing_cache(b: Build, name: str, data: bytes) -> None:
    if data:
        sha = b.store.blobs.put_bytes(data)
        b.store.engines.save_timing_cache(name, b.key.target, sha, len(data))


def build_onnxruntime_tensorrt(b: Build) -> dict[str, Any]:
    from backends.onnxruntime_gpu import OnnxRuntimeGpuBackend

    gpu = b.target.gpu
    assert gpu is not None and b.key.profile is not None
    cache = b.out / "trt"
    cache.mkdir()
    # ONNX Runtime's own name for the timing cache in trt_timing_cache_path (tensorrt_execution_provider_utils.h)
    timing_file = cache / f"TensorrtExecutionProvider_cache_sm{gpu.compute_capability.replace('.', '')}.timing"
    name, seed = _timing_cache(b)
    if seed:
        timing_file.write_bytes(seed)
    # The backend reads the key (profile, precision, build options) from the folder's manifest, exactly as a
    # replica will when it loads the artifact: the same options make ONNX Runtime find the same engine files.
    (b.out / MANIFEST).write_text(json.dumps({"key": b.key.to_dict(), "load": "trt"}))
    try:
        extra = {"engine_dir": str(b.out), "device_id": gpu.index}
        opts = BackendOptions(precision=b.key.precision or "fp32", extra=extra)
        backend = OnnxRuntimeGpuBackend(b.variant, opts, kind="onnxruntime-tensorrt")
        try:
            inputs, _ = model_interface(parse_model(b.variant))
            for i, bound in enumerate(("min", "opt", "max")):  # warm over the whole profile
                shapes = {n: {"opt": p[bound]} for n, p in b.key.profile.items()}
                backend.infer(made_up_feeds(inputs, shapes))
                b.progress("build", (i + 1) / 3)
        finally:
            backend.unload()
    finally:
        (b.out / MANIFEST).unlink(missing_ok=True)
    engines = sorted(p.name for p in cache.glob("*.engine"))
    if not engines:
        raise BackendError("the TensorRT execution provider wrote no engine: TensorRT took no part of this model")
    _keep_timing_cache(b, name, timing_file.read_bytes() if timing_file.exists() else b"")
    reused = bool(seed)
    return {"load": "trt", "format": "onnxruntime-tensorrt-cache", "engines": engines, "timing_cache_reused": reused}


def build_tensorrt(b: Build) -> dict[str, Any]:
    from backends.tensorrt_backend import build_engine, import_cudart

    gpu = b.target.gpu
    assert gpu is not None and b.key.profile is not None
    if gpu.index != 0:  # the builder works on the current device
        cudart = import_cudart()
        with contextlib.suppress(Exception):
            cudart.cudaSetDevice(gpu.index)
    name, seed = _timing_cache(b)
    plan, cache, report = build_engine(
        b.variant,
        b.key.precision or "fp32",
        b.key.profile,
        b.key.sparse,
        seed,
        int(b.key.build_options.get("workspace_bytes") or 1 << 30),
        builder_optimization_level=b.key.build_options.get("optimization_level"),
    )
    (b.out / "engine.plan").write_bytes(plan)
    _keep_timing_cache(b, name, cache)
    b.progress("build", 1.0)
    report["messages"] = report.get("messages", [])[-50:]
    return {"load": "engine.plan", "format": "tensorrt-plan", **report}


BUILDERS: dict[str, Builder] = {
    "onnxruntime-cpu": build_onnxruntime_cpu,
    "onnxruntime-tensorrt": build_onnxruntime_tensorrt,
    "tensorrt": build_tensorrt,
}
