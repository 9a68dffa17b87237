"""Native TensorRT (10.x / 11.x Python API): build a serialized engine from ONNX, and serve it.

Precision comes from the model, not from builder flags. Networks are created STRONGLY_TYPED: FP16 variants
are converted first (``to_fp16``, FP32 I/O kept) and INT8 variants must carry Q/DQ nodes (explicit
quantization). TensorRT 10 deprecated weak typing and implicit INT8 calibration (10.12) and TensorRT 11
removed BuilderFlag.FP16/INT8 and the calibrators, where every network is strongly typed; so no precision
flag is ever set here. API shapes follow NVIDIA's samples/python/common_runtime.py and Polygraphy.

``tensorrt`` and ``cuda-python`` are imported lazily: this module imports on any machine, and says
exactly what is missing when asked to build or run.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from backends.base import Backend, BackendError, BackendOptions, BackendUnavailable, InvalidInput, TensorSpec
from backends.datatypes import NUMPY_TO_V2
from backends.engines import PRECISIONS, EngineKey, Profile
from backends.gpu_options import GpuSettings
from backends.onnx_model import parse_model
from backends.precision import has_qdq, is_fp16_model, to_fp16

INSTALL_HINT = "pip install tensorrt-cu13 on a machine that reaches NVIDIA's index"
_LOG_KEEP = 2000


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or the PyPI stub's error when the real wheel could not be fetched
        raise BackendUnavailable(f"TensorRT is not installed: {type(e).__name__}: {e} ({INSTALL_HINT})") from None
    if not hasattr(trt, "Builder") or not hasattr(trt, "Runtime"):
        raise BackendUnavailable(f"TensorRT is not installed: 'tensorrt' imports but has no Builder ({INSTALL_HINT})")
    return trt


def import_cudart() -> Any:
    """cuda-python's runtime API: ``cuda.bindings.runtime`` (cuda-python >= 12.6), else the older ``cuda.cudart``."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise BackendUnavailable("cuda-python is not installed (pip install cuda-python)") from None
    return cudart


def _cuda(cudart: Any, result: Any, what: str) -> Any:
    """cuda-python returns (error, *values): raise on error, return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(getattr(err, "value", err)) != 0:
        try:
            name = cudart.cudaGetErrorName(err)[1]
            name = name.decode() if isinstance(name, bytes) else str(name)
        except Exception:
            name = str(err)
        raise BackendError(f"CUDA error in {what}: {name}")
    return values[0] if len(values) == 1 else (values or None)


class _Log:
    """One process-wide TensorRT logger (TensorRT keeps the first logger it is given), keeping recent lines."""

    _instance: Any = None
    _guard = threading.Lock()

    @classmethod
    def get(cls, trt: Any) -> Any:
        with cls._guard:
            if cls._instance is None:

                class Collecting(trt.ILogger):  # the documented way: subclass and call the base __init__
                    def __init__(self) -> None:
                        trt.ILogger.__init__(self)
                        self.lines: collections.deque[tuple[int, str, str]] = collections.deque(maxlen=_LOG_KEEP)
                        self.seq = 0
                        self.lock = threading.Lock()

                    def log(self, severity: Any, msg: str) -> None:  # must be thread safe
                        if int(severity) > int(trt.ILogger.Severity.INFO):
                            return
                        with self.lock:
                            self.seq += 1
                            self.lines.append((self.seq, getattr(severity, "name", str(severity)), msg))

                    def since(self, seq: int) -> list[str]:
                        with self.lock:
                            return [f"{sev}: {m}" for s, sev, m in self.lines if s > seq]

                cls._instance = Collecting()
            return cls._instance


def build_engine(
    onnx_bytes: bytes,
    precision: str,
    profile: Profile | None,
    sparse: bool = False,
    timing_cache: bytes | None = None,
    workspace_bytes: int = 1 << 30,
    *,
    builder_optimization_level: int | None = None,
) -> tuple[bytes, bytes, dict[str, Any]]:
    """Build a serialized engine. Returns (engine plan, updated timing cache, build log).

    ``profile`` gives min/opt/max shapes per input (``engines.derive_profile``); it is required when the
    network has dynamic inputs. ``timing_cache`` is a previous build's serialized timing cache (same GPU,
    CUDA and TensorRT); a cache the builder refuses is replaced by an empty one and noted in the log.
    """
    if precision not in PRECISIONS:
        raise BackendError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    trt = import_tensorrt()
    model = parse_model(onnx_bytes)
    converted = False
    if precision == "fp16" and not is_fp16_model(model):
        onnx_bytes = to_fp16(model).SerializeToString()
        converted = True
    if precision == "int8" and not has_qdq(model):
        raise BackendError("int8 engines need a Q/DQ (explicitly quantized) model: implicit calibration is gone in 11")
    logger = _Log.get(trt)
    mark = logger.seq
    builder = trt.Builder(logger)
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly is None:
        raise BackendUnavailable(f"TensorRT {trt.__version__} has no strongly typed networks: use 10.x or newer")
    network = builder.create_network(1 << int(strongly))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BackendError(f"TensorRT's ONNX parser rejected the model: {'; '.join(errors[:5]) or 'no error text'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if builder_optimization_level is not None:
        config.builder_optimization_level = int(builder_optimization_level)
    sparse_flag = getattr(trt.BuilderFlag, "SPARSE_WEIGHTS", None) if sparse else None
    if sparse_flag is not None:
        config.set_flag(sparse_flag)  # 2:4 structured-sparse weights may use sparse tensor cores
    net_inputs = [network.get_input(i) for i in range(network.num_inputs)]
    dynamic = [t.name for t in net_inputs if any(d < 0 for d in t.shape)]
    if profile:
        unknown = sorted(set(profile) - {t.name for t in net_inputs})
        if unknown:
            raise BackendError(f"the profile names inputs the network does not have: {unknown}")
        opt_profile = builder.create_optimization_profile()
        for name, b in profile.items():
            opt_profile.set_shape(name, b["min"], b["opt"], b["max"])
        config.add_optimization_profile(opt_profile)
    missing = [n for n in dynamic if n not in (profile or {})]
    if missing:
        raise BackendError(f"inputs {missing} have dynamic shapes: the build needs their min/opt/max (derive_profile)")
    cache = config.create_timing_cache(timing_cache or b"")
    cache_reused = bool(timing_cache)
    if not config.set_timing_cache(cache, False):  # False: refuse a cache from another device or version
        cache_reused = False
        config.set_timing_cache(config.create_timing_cache(b""), False)
    started = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - started
    messages = logger.since(mark)
    if plan is None:
        errors = [m for m in messages if m.startswith(("ERROR", "INTERNAL_ERROR"))]
        raise BackendError(f"TensorRT could not build the engine: {'; '.join(errors[-5:]) or 'see the TensorRT log'}")
    new_cache = bytes(config.get_timing_cache().serialize())
    log = {
        "tensorrt": trt.__version__,
        "precision": precision,
        "converted_to_fp16": converted,
        "strongly_typed": True,
        "sparse": sparse,
        "sparse_weights_flag": sparse_flag is not None,
        "workspace_bytes": int(workspace_bytes),
        "builder_optimization_level": builder_optimization_level,
        "profile": profile,
        "timing_cache_in_bytes": len(timing_cache or b""),
        "timing_cache_reused": cache_reused,
        "timing_cache_out_bytes": len(new_cache),
        "build_seconds": round(seconds, 3),
        "num_layers": network.num_layers,
        "inputs": {t.name: list(t.shape) for t in net_inputs},
        "outputs": {o.name: list(o.shape) for o in (network.get_output(i) for i in range(network.num_outputs))},
        "messages": messages[-200:],
    }
    return bytes(plan), new_cache, log


class TensorRTBackend(Backend):
    """A deserialized engine with one execution context; device buffers grow as needed and are reused."""

    name = "tensorrt"

    def __init__(self, engine: bytes | Path, options: BackendOptions | None = None) -> None:
        self._trt = trt = import_tensorrt()
        self._cudart = cudart = import_cudart()
        self.settings = GpuSettings.from_options(options or BackendOptions())
        _cuda(cudart, cudart.cudaSetDevice(self.settings.device_id), "cudaSetDevice")
        logger = _Log.get(trt)
        mark = logger.seq
        self._runtime = trt.Runtime(logger)
        plan = engine.read_bytes() if isinstance(engine, Path) else engine
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise BackendError(
                "TensorRT could not deserialize the engine (built by another TensorRT version or for another GPU?): "
                + ("; ".join(logger.since(mark)[-3:]) or "no log")
            )
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise BackendError("TensorRT could not create an execution context (out of GPU memory?)")
        self.inputs, self.outputs = [], []
        self._dtypes: dict[str, np.dtype] = {}
        self._ranges: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        for i in range(self._engine.num_io_tensors):
            tname = self._engine.get_tensor_name(i)
            try:
                dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(tname)))
            except TypeError:
                raise BackendError(f"tensor {tname!r} has a type numpy cannot hold (BF16/FP8/INT4)") from None
            if dtype not in NUMPY_TO_V2:
                raise BackendError(f"tensor {tname!r} has type {dtype}, which KServe v2 has no name for")
            spec = TensorSpec(tname, NUMPY_TO_V2[dtype], tuple(int(d) for d in self._engine.get_tensor_shape(tname)))
            self._dtypes[tname] = dtype
            if self._engine.get_tensor_mode(tname) == trt.TensorIOMode.INPUT:
                self.inputs.append(spec)
                if any(d < 0 for d in spec.shape):
                    lo, _opt, hi = self._engine.get_tensor_profile_shape(tname, 0)
                    self._ranges[tname] = (tuple(lo), tuple(hi))
            else:
                self.outputs.append(spec)
        self._output_names = [o.name for o in self.outputs]
        self._stream = _cuda(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, capacity in bytes)
        self._lock = threading.Lock()  # one execution context: one inference at a time
        self.engine_key: EngineKey | None = None
        self.build_log: dict[str, Any] | None = None

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, cap = self._buffers.get(name, (0, 0))
        if nbytes > cap:
            if ptr:
                _cuda(self._cudart, self._cudart.cudaFree(ptr), "cudaFree")
            cap = max(256, 1 << (max(nbytes, 1) - 1).bit_length())  # grow to a power of two: few reallocations
            ptr = int(_cuda(self._cudart, self._cudart.cudaMalloc(cap), "cudaMalloc"))
            self._buffers[name] = (ptr, cap)
        return ptr

    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        cudart, ctx = self._cudart, self._context
        names = outputs or self._output_names
        unknown = [n for n in names if n not in self._output_names]
        if unknown:
            raise InvalidInput(f"unknown outputs {unknown} (the engine has {self._output_names})")
        arrays = {t.name: self._checked(t, inputs) for t in self.inputs}
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        log = _Log.get(self._trt)
        with self._lock:
            mark = log.seq
            # the calling thread's current device (a server thread may never have chosen one)
            _cuda(cudart, cudart.cudaSetDevice(self.settings.device_id), "cudaSetDevice")
            for name, arr in arrays.items():
                if not ctx.set_input_shape(name, arr.shape):
                    raise InvalidInput(f"TensorRT refused shape {list(arr.shape)} for input {name!r}")
                ptr = self._buffer(name, arr.nbytes)
                if arr.nbytes:
                    _cuda(cudart, cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, self._stream), "H2D")
                ctx.set_tensor_address(name, ptr)
            results: dict[str, np.ndarray] = {}
            for o in self.outputs:  # every output needs an address, wanted or not
                shape = tuple(int(d) for d in ctx.get_tensor_shape(o.name))
                if any(d < 0 for d in shape):
                    raise BackendError(f"output {o.name!r} has a data-dependent shape {list(shape)}: not supported")
                host = np.empty(shape, self._dtypes[o.name])
                ctx.set_tensor_address(o.name, self._buffer(o.name, host.nbytes))
                if o.name in names:
                    results[o.name] = host
            if not ctx.execute_async_v3(int(self._stream)):
                raise BackendError("TensorRT execute_async_v3 failed: " + ("; ".join(log.since(mark)[-3:]) or "no log"))
            for name, host in results.items():
                if host.nbytes:
                    ptr = self._buffers[name][0]
                    _cuda(cudart, cudart.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, d2h, self._stream), "D2H")
            _cuda(cudart, cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return {n: results[n] for n in names}

    def _checked(self, spec: TensorSpec, inputs: dict[str, np.ndarray]) -> np.ndarray:
        if spec.name not in inputs:
            raise InvalidInput(f"missing input {spec.name!r}")
        arr = np.ascontiguousarray(inputs[spec.name])
        if arr.dtype != self._dtypes[spec.name]:
            raise InvalidInput(f"input {spec.name!r} must be {spec.datatype}, got {arr.dtype}")
        if arr.ndim != len(spec.shape) or any(d >= 0 and d != a for d, a in zip(spec.shape, arr.shape, strict=True)):
            raise InvalidInput(f"input {spec.name!r} must have shape {list(spec.shape)}, got {list(arr.shape)}")
        if spec.name in self._ranges:
            lo, hi = self._ranges[spec.name]
            if any(not lo_d <= a <= hi_d for lo_d, a, hi_d in zip(lo, arr.shape, hi, strict=True)):
                raise InvalidInput(
                    f"input {spec.name!r} shape {list(arr.shape)} is outside the engine's profile "
                    f"{list(lo)}..{list(hi)}"
                )
        return arr

    def unload(self) -> None:
        cudart = self._cudart
        with self._lock:
            for ptr, _cap in self._buffers.values():
                cudart.cudaFree(ptr)
            self._buffers.clear()
            if self._stream is not None:
                cudart.cudaStreamDestroy(self._stream)
                self._stream = None
            self._context = None
            self._engine = None

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "backend": self.name,
            "tensorrt": self._trt.__version__,
            "device_id": self.settings.device_id,
        }
        if self.engine_key is not None:
            d["engine_key"] = self.engine_key.digest
            d["precision"] = self.engine_key.precision
        return d


def load_tensorrt(model: bytes | Path, options: BackendOptions | None = None) -> TensorRTBackend:
    """``load_backend("tensorrt", onnx)``: serve the variant's prebuilt engine (``engine_dir``: a build job's
    artifact, unpacked). A serving process never builds one: engines are built once per target by the ``build``
    job (``compression.engine_build``), with ``build_engine`` below."""
    opts = options or BackendOptions()
    s = GpuSettings.from_options(opts)
    import_tensorrt()  # first: on a machine without TensorRT, what to install is the useful answer
    if s.engine_dir is None:
        raise BackendError(
            "native TensorRT serves prebuilt engines only: the engine is built by a `build` job on a worker with "
            "this GPU (docs/gpu.md), not when a variant loads"
        )
    manifest = json.loads((s.engine_dir / "manifest.json").read_text())
    backend = TensorRTBackend(s.engine_dir / manifest["load"], opts)
    backend.engine_key = EngineKey.from_dict(manifest["key"])
    backend.build_log = manifest.get("build")
    return backend
