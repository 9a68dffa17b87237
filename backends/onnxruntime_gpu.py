"""ONNX Runtime on NVIDIA GPUs: the CUDA and TensorRT execution providers, with no silent CPU fallback.

ONNX Runtime quietly runs a session on the CPU when the CUDA provider library cannot load (missing CUDA or
cuDNN, a CPU-only wheel, no driver): ``InferenceSession`` succeeds and ``get_providers()`` lists only
``CPUExecutionProvider``. Every session made here is checked against what was requested
(``ort_providers.check_providers``), and a fallback is a ``BackendUnavailable`` naming the reason, never a slow
"GPU" backend.

Options come from ``BackendOptions.extra`` (``gpu_options.GpuSettings``); precision from
``BackendOptions.precision`` (``precision.to_fp16`` / ``has_qdq``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
from onnx import ModelProto

from backends.base import Backend, BackendError, BackendOptions, BackendUnavailable, InvalidInput, TensorSpec
from backends.datatypes import numpy_dtype
from backends.engines import EngineKey, RuntimeVersions, engine_key_for
from backends.gpu_options import GpuSettings, cuda_provider_options, tensorrt_provider_options
from backends.onnx_model import model_interface, parse_model
from backends.onnxruntime_backend import _first_line, session_options
from backends.ort_providers import CUDA_EP, TRT_EP, available_providers, check_providers, preload_cuda_libraries
from backends.precision import has_qdq, is_fp16_model, to_fp16
from backends.targets import gpu_target

try:
    import onnxruntime as ort
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as _OrtInvalidArgument
except ImportError:  # pragma: no cover - the install always carries one ONNX Runtime flavour
    ort = None  # type: ignore[assignment]
    _OrtInvalidArgument = Exception  # type: ignore[assignment,misc]

GPU_KINDS: dict[str, tuple[str, ...]] = {
    "onnxruntime-cuda": (CUDA_EP,),
    # TensorRT first; CUDA takes the nodes TensorRT cannot run (the order ONNX Runtime's docs prescribe)
    "onnxruntime-tensorrt": (TRT_EP, CUDA_EP),
}
CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan"})


class OnnxRuntimeGpuBackend(Backend):
    """A model on ONNX Runtime's CUDA or TensorRT execution provider, IO-bound, outputs copied back once."""

    #: kind -> the execution providers a session of that kind must end up with, in priority order
    KINDS: dict[str, tuple[str, ...]] = GPU_KINDS
    #: where IO-bound outputs (and CUDA-graph inputs) live; "cuda" in production
    DEVICE_TYPE = "cuda"

    def __init__(self, model: bytes | Path, options: BackendOptions | None = None, kind: str = "onnxruntime-cuda"):
        if ort is None:
            raise BackendUnavailable("onnxruntime is not installed (pip install 'slimserve[gpu]')")
        if kind not in self.KINDS:
            raise BackendUnavailable(f"unknown ONNX Runtime GPU backend {kind!r} (known: {sorted(self.KINDS)})")
        requested = list(self.KINDS[kind])
        available = available_providers()
        absent = [p for p in requested if p not in available]
        if absent:
            raise BackendUnavailable(
                f"{kind} needs {absent[0]}, which this onnxruntime {ort.__version__} build does not have "
                f"(it has {available}): install onnxruntime-gpu instead of onnxruntime (the two must not be "
                f"installed together){' and TensorRT 10/11' if TRT_EP in absent else ''}"
            )
        opts = options or BackendOptions()
        self._extra = dict(opts.extra)
        self.settings = settings = GpuSettings.from_options(opts)
        self.precision = opts.precision
        if self.precision not in ("fp32", "fp16", "int8"):
            raise BackendError(f"precision must be fp32, fp16 or int8, got {self.precision!r}")
        data = model.read_bytes() if isinstance(model, Path) else model
        proto = parse_model(data)
        self.name = kind
        self.inputs, self.outputs = model_interface(proto)
        self._output_names = [o.name for o in self.outputs]
        run_proto = self._prepare_precision(kind, proto)
        run_bytes = run_proto.SerializeToString() if run_proto is not proto else data
        preload_cuda_libraries()

        self._notes: dict[str, Any] = {}
        self._engine_key: EngineKey | None = None
        self._engine_dir: Path | None = None
        self._cuda_graph = kind != "onnxruntime-tensorrt" and self._want_cuda_graph(proto)
        providers = self._providers(kind, data, self._cuda_graph)
        before = _files(self._engine_dir)
        try:
            self._session = self._create(run_bytes, providers, opts)
        except BackendError as e:
            if not (self._cuda_graph and settings.cuda_graph is None and "CUDA Graph" in str(e)):
                raise
            self._notes["cuda_graph_note"] = f"off: {e}"
            self._cuda_graph = False
            self._session = self._create(run_bytes, self._providers(kind, data, False), opts)
        check_providers(kind, requested, self._session.get_providers())
        if self._engine_dir is not None:
            # ONNX Runtime builds when its cache does not match (a changed model hash or profile): say so, since a
            # served engine should have been built by its job, not here
            after = _files(self._engine_dir)
            built = [f for f in after if f.endswith(".engine") and before.get(f) != after[f]]
            self._notes["engine_built_at_load"] = bool(built)
        self._run_options = ort.RunOptions()
        self._lock = threading.Lock()
        if self._cuda_graph:
            self._bind_static()

    # -- construction helpers

    def _providers(self, kind: str, variant: bytes, cuda_graph: bool) -> list[tuple[str, dict[str, Any]]]:
        cuda = (CUDA_EP, cuda_provider_options(self.settings.device_id, cuda_graph))
        if kind == "onnxruntime-tensorrt":
            return [(TRT_EP, self._tensorrt_options(variant)), cuda]
        return [cuda]

    def _prepare_precision(self, kind: str, proto: ModelProto) -> ModelProto:
        if self.precision == "fp16":
            return proto if is_fp16_model(proto) else to_fp16(proto)
        if self.precision == "int8":
            if kind == "onnxruntime-cuda":
                raise BackendError(
                    "int8 on onnxruntime-cuda: the CUDA EP has no int8 kernels for Q/DQ models (they would run "
                    "dequantized or on the CPU); serve int8 variants with onnxruntime-tensorrt or tensorrt"
                )
            if not has_qdq(proto):
                raise BackendError(
                    "int8 needs an explicitly quantized (QuantizeLinear/DequantizeLinear) model; implicit "
                    "calibration is deprecated in TensorRT 10 and removed in 11"
                )
        return proto

    def _want_cuda_graph(self, proto: ModelProto) -> bool:
        wanted = self.settings.cuda_graph
        if wanted is False:
            return False
        blockers = []
        dynamic = [t.name for t in [*self.inputs, *self.outputs] if any(d < 0 for d in t.shape)]
        if dynamic:
            blockers.append(f"dynamic shapes on {dynamic}")
        flow = sorted({n.op_type for n in proto.graph.node} & CONTROL_FLOW_OPS)
        if flow:
            blockers.append(f"control-flow ops {flow}")
        if blockers:
            if wanted:
                raise BackendError(f"cuda_graph was requested but cannot be used: {'; '.join(blockers)}")
            self._notes["cuda_graph_note"] = "off: " + "; ".join(blockers)
            return False
        return True

    def _tensorrt_options(self, variant_bytes: bytes) -> dict[str, Any]:
        """The TRT EP's options. A prebuilt engine (``engine_dir``: a build job's artifact, unpacked) carries its
        key, whose profile and precision give exactly the options it was built with, so ONNX Runtime finds its
        ``.engine`` files instead of building. Without one (standalone use) the engine is cached under
        ``engine_cache_dir`` by this device's key, and ONNX Runtime builds it on the first session."""
        s = self.settings
        if s.engine_dir is not None:
            manifest = json.loads((s.engine_dir / "manifest.json").read_text())
            key = EngineKey.from_dict(manifest["key"])
            engine_dir = timing_dir = s.engine_dir / manifest["load"]
            # the build options it was built with are the key's (one source, whatever the caller passed)
            s = dataclasses.replace(
                s,
                workspace_bytes=int(key.build_options.get("workspace_bytes") or s.workspace_bytes),
                builder_optimization_level=key.build_options.get("optimization_level"),
                sparse=key.sparse,
            )
        else:
            key = self._device_key(variant_bytes)
            engine_dir = key.cache_dir(s.cache_root())
            timing_dir = s.cache_root() / "timing" / key.target / str(key.runtime["tensorrt"])
            for d in (engine_dir, timing_dir):
                d.mkdir(parents=True, exist_ok=True)
            (engine_dir / "key.json").write_text(json.dumps(key.to_dict(), indent=2, sort_keys=True))
        assert key.profile is not None and key.precision is not None
        self._engine_key = key
        self._engine_dir = engine_dir
        self._notes["engine_cache"] = str(engine_dir)
        static = all(p["min"] == p["max"] for p in key.profile.values())
        return tensorrt_provider_options(s, key.precision, None if static else key.profile, engine_dir, timing_dir)

    def _device_key(self, variant_bytes: bytes) -> EngineKey:
        from backends import gpu

        s = self.settings
        gpus = {g.index: g for g in gpu.list_gpus()}
        if s.device_id not in gpus:
            raise BackendUnavailable(
                f"onnxruntime-tensorrt: nvidia-smi shows no GPU {s.device_id} (GPUs: {sorted(gpus)}); the engine "
                "key needs its name and compute capability"
            )
        device = gpus[s.device_id]
        try:
            return engine_key_for(
                "onnxruntime-tensorrt",
                hashlib.sha256(variant_bytes).hexdigest(),
                self.inputs,
                BackendOptions(precision=self.precision, extra=self._extra),
                gpu_target(device),
                RuntimeVersions.detect(device),
            )
        except ValueError as e:
            if "TensorRT" in str(e):
                raise BackendUnavailable(f"onnxruntime-tensorrt: {e} (pip install tensorrt-cu13)") from None
            raise BackendError(f"cannot derive the TensorRT engine key: {e}") from None

    def _create(self, data: bytes, providers: list[tuple[str, dict[str, Any]]], opts: BackendOptions) -> Any:
        so = session_options(opts)
        if self.settings.disallow_cpu_nodes:
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        try:
            return ort.InferenceSession(data, sess_options=so, providers=providers)
        except Exception as e:
            raise BackendError(f"ONNX Runtime could not create the {self.name} session: {_first_line(e)}") from None

    def _bind_static(self) -> None:
        """CUDA graphs replay fixed device addresses: inputs and outputs live in OrtValues bound once."""
        dev = self.settings.device_id
        self._io = self._session.io_binding()
        self._in_values: dict[str, Any] = {}
        self._out_values: dict[str, Any] = {}
        for t in self.inputs:
            v = ort.OrtValue.ortvalue_from_numpy(np.zeros(t.shape, numpy_dtype(t.datatype)), self.DEVICE_TYPE, dev)
            self._in_values[t.name] = v
            self._io.bind_ortvalue_input(t.name, v)
        for t in self.outputs:
            v = ort.OrtValue.ortvalue_from_shape_and_type(list(t.shape), numpy_dtype(t.datatype), self.DEVICE_TYPE, dev)
            self._out_values[t.name] = v
            self._io.bind_ortvalue_output(t.name, v)

    # -- inference

    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        names = outputs or self._output_names
        unknown = [n for n in names if n not in self._output_names]
        if unknown:
            raise InvalidInput(f"unknown outputs {unknown} (the model has {self._output_names})")
        try:
            if self._cuda_graph:
                return self._infer_graph(inputs, names)
            io = self._session.io_binding()
            for t in self.inputs:
                if t.name not in inputs:
                    raise InvalidInput(f"missing input {t.name!r}")
                io.bind_cpu_input(t.name, np.ascontiguousarray(inputs[t.name]))
            for n in names:
                io.bind_output(n, self.DEVICE_TYPE, self.settings.device_id)
            self._session.run_with_iobinding(io, self._run_options)
            return dict(zip(names, io.copy_outputs_to_cpu(), strict=True))
        except InvalidInput:
            raise
        except _OrtInvalidArgument as e:
            raise InvalidInput(_first_line(e)) from None
        except Exception as e:
            raise BackendError(f"inference failed: {_first_line(e)}") from None

    def _infer_graph(self, inputs: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        arrays = {t.name: _exact(t, inputs) for t in self.inputs}
        with self._lock:  # ONNX Runtime: no concurrent Run() on one session while CUDA graphs are on
            for name, arr in arrays.items():
                self._in_values[name].update_inplace(arr)
            self._session.run_with_iobinding(self._io, self._run_options)
            return {n: self._out_values[n].numpy() for n in names}

    def unload(self) -> None:
        self._io = None
        self._in_values = {}
        self._out_values = {}
        self._session = None

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "backend": self.name,
            "providers": self._session.get_providers() if self._session is not None else [],
            "onnxruntime": ort.__version__,
            "precision": self.precision,
            "device_id": self.settings.device_id,
            "cuda_graph": self._cuda_graph,
            **self._notes,
        }
        if self._engine_key is not None:
            d["engine_key"] = self._engine_key.digest
        return d


def _files(folder: Path | None) -> dict[str, int]:
    if folder is None or not folder.is_dir():
        return {}
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()}


def _exact(spec: TensorSpec, inputs: dict[str, np.ndarray]) -> np.ndarray:
    if spec.name not in inputs:
        raise InvalidInput(f"missing input {spec.name!r}")
    arr = np.ascontiguousarray(inputs[spec.name])
    want = numpy_dtype(spec.datatype)
    if arr.dtype != want or tuple(arr.shape) != tuple(spec.shape):
        raise InvalidInput(
            f"input {spec.name!r} must be {spec.datatype} {list(spec.shape)} (static shapes, CUDA graph), "
            f"got {arr.dtype} {list(arr.shape)}"
        )
    return arr
