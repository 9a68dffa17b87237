"""ONNX Runtime on NVIDIA GPUs: the CUDA and TensorRT execution providers, with no silent CPU fallback.

ONNX Runtime quietly runs a session on the CPU when the CUDA provider library cannot load (missing CUDA or
cuDNN, a CPU-only wheel, no driver): ``InferenceSession`` succeeds and ``get_providers()`` lists only
``CPUExecutionProvider``. Every session made here is checked against what was requested, and a fallback is a
``BackendUnavailable`` naming the reason, never a slow "GPU" backend.

Options come from ``BackendOptions.extra`` (see :class:`GpuSettings`); precision from ``BackendOptions.precision``.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from onnx import ModelProto, TensorProto

from backends.base import Backend, BackendError, BackendOptions, BackendUnavailable, InvalidInput, TensorSpec
from backends.datatypes import numpy_dtype
from backends.engines import EngineKey, Profile, RuntimeVersions, derive_profile
from backends.onnx_model import model_interface, parse_model
from backends.onnxruntime_backend import _first_line, session_options

try:
    import onnxruntime as ort
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as _OrtInvalidArgument
except ImportError:  # pragma: no cover - the install always carries one ONNX Runtime flavour
    ort = None  # type: ignore[assignment]
    _OrtInvalidArgument = Exception  # type: ignore[assignment,misc]

CUDA_EP = "CUDAExecutionProvider"
TRT_EP = "TensorrtExecutionProvider"
GPU_KINDS: dict[str, tuple[str, ...]] = {
    "onnxruntime-cuda": (CUDA_EP,),
    # TensorRT first; CUDA takes the nodes TensorRT cannot run (the order ONNX Runtime's docs prescribe)
    "onnxruntime-tensorrt": (TRT_EP, CUDA_EP),
}
CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan"})
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
_preload_note: str | None = None
_preload_lock = threading.Lock()
_preloaded = False


# -- model transforms ------------------------------------------------------------------------------------------


def to_fp16(model: ModelProto, op_block_list: list[str] | None = None) -> ModelProto:
    """An FP16 copy of ``model`` whose inputs and outputs stay FP32 (what clients send and expect).

    Uses ``onnxruntime.transformers.float16.convert_float_to_float16``: it ships inside every onnxruntime and
    onnxruntime-gpu wheel (no extra dependency), is maintained by the ONNX Runtime team as a fork of
    onnxconverter-common's converter with fixes (mixed-type Resize/GroupNorm inputs, fp32-only initializers
    kept where a blocked op needs them), and with ``keep_io_types=True`` inserts Cast nodes at the graph
    boundary. Ops in its default block list (TopK, NonMaxSuppression, Range, CumSum, ...) stay FP32. Values
    outside FP16's range are clamped to +-65504. Note: importing it appends the onnxruntime/transformers
    folder to sys.path (a side effect of that package's __init__).
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    copy = ModelProto()
    copy.CopyFrom(model)
    out = convert_float_to_float16(copy, keep_io_types=True, op_block_list=op_block_list)
    _toposort(out)  # the converter appends its input Casts last; onnx.checker requires topological order
    return out


def _toposort(model: ModelProto) -> None:
    """Reorder the main graph's nodes topologically (stable: keeps the given order where it is free)."""
    g = model.graph
    produced = {o: i for i, n in enumerate(g.node) for o in n.output if o}
    deps = [{produced[x] for x in n.input if x in produced and produced[x] != i} for i, n in enumerate(g.node)]
    users: dict[int, list[int]] = {i: [] for i in range(len(g.node))}
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    waiting = [len(d) for d in deps]
    ready = sorted(i for i, w in enumerate(waiting) if w == 0)
    order: list[int] = []
    while ready:
        i = ready.pop(0)
        order.append(i)
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                ready.append(u)
                ready.sort()
    if len(order) != len(g.node):
        raise BackendError("the fp16 graph has a cycle and cannot be ordered")
    nodes = [g.node[i] for i in order]
    copies = [type(n)() for n in nodes]
    for c, n in zip(copies, nodes, strict=True):
        c.CopyFrom(n)
    del g.node[:]
    g.node.extend(copies)


def is_fp16_model(model: ModelProto) -> bool:
    """True when the weights are already FP16 (no FP32 initializers, at least one FP16 one)."""
    types = {init.data_type for init in model.graph.initializer}
    return TensorProto.FLOAT16 in types and TensorProto.FLOAT not in types


def has_qdq(model: ModelProto) -> bool:
    """True for explicitly quantized (QuantizeLinear/DequantizeLinear) models: what TensorRT's int8 needs."""
    return any(n.op_type in QDQ_OPS for n in model.graph.node)


# -- settings and provider options ----------------------------------------------------------------------------


@dataclass
class GpuSettings:
    """The GPU knobs, read from ``BackendOptions.extra``."""

    device_id: int = 0
    max_batch_size: int = 8  # the profile's max batch for dynamic-batch models (TensorRT paths)
    opt_batch_size: int | None = None
    shape_overrides: dict[str, dict[str, list[int]]] | None = None  # see engines.derive_profile
    engine_cache_dir: Path | None = None  # root of the engine cache (default: <tmp>/slimserve-engines)
    sparse: bool = False  # the variant is 2:4 structured-sparse: let TensorRT use sparse tensor cores
    workspace_bytes: int = 1 << 30
    builder_optimization_level: int | None = None  # TensorRT default (3) when None
    cuda_graph: bool | None = None  # None: on when possible (CUDA EP, all shapes static, no control flow)
    disallow_cpu_nodes: bool = False  # also refuse sessions where single nodes were placed on the CPU

    @classmethod
    def from_options(cls, options: BackendOptions) -> GpuSettings:
        x = options.extra or {}
        s = cls()
        for name in ("device_id", "max_batch_size", "workspace_bytes"):
            if name in x:
                setattr(s, name, _int(x[name], name, minimum=0))
        if x.get("opt_batch_size") is not None:
            s.opt_batch_size = _int(x["opt_batch_size"], "opt_batch_size", minimum=1)
        if x.get("builder_optimization_level") is not None:
            s.builder_optimization_level = _int(x["builder_optimization_level"], "builder_optimization_level", 0)
        if x.get("shape_overrides") is not None:
            s.shape_overrides = dict(x["shape_overrides"])
        if x.get("engine_cache_dir") is not None:
            s.engine_cache_dir = Path(x["engine_cache_dir"])
        for name in ("sparse", "disallow_cpu_nodes"):
            if name in x:
                setattr(s, name, bool(x[name]))
        if x.get("cuda_graph") is not None:
            s.cuda_graph = bool(x["cuda_graph"])
        return s

    def cache_root(self) -> Path:
        return self.engine_cache_dir or Path(tempfile.gettempdir()) / "slimserve-engines"


def _int(v: Any, name: str, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise BackendError(f"option {name} must be an integer >= {minimum}, got {v!r}")
    return v


def profile_option_strings(profile: Profile) -> tuple[str, str, str]:
    """trt_profile_min_shapes / opt / max in the TRT EP's format: ``in1:1x3x224x224,in2:1x8``."""
    parts: dict[str, list[str]] = {"min": [], "opt": [], "max": []}
    for name in sorted(profile):
        if any(c in name for c in ":,"):
            raise BackendError(f"input name {name!r} contains ':' or ',' and cannot be written as a TRT EP profile")
        for b in parts:
            parts[b].append(f"{name}:{'x'.join(str(d) for d in profile[name][b])}")
    return ",".join(parts["min"]), ",".join(parts["opt"]), ",".join(parts["max"])


def cuda_provider_options(device_id: int, cuda_graph: bool) -> dict[str, str]:
    opts = {"device_id": str(device_id), "cudnn_conv_algo_search": "EXHAUSTIVE"}
    if cuda_graph:
        opts["enable_cuda_graph"] = "1"
    return opts


def tensorrt_provider_options(
    settings: GpuSettings,
    precision: str,
    profile: Profile | None,
    engine_dir: Path,
    timing_dir: Path,
) -> dict[str, Any]:
    """Options for TensorrtExecutionProvider (names as in onnxruntime's tensorrt_execution_provider_info.cc)."""
    opts: dict[str, Any] = {
        "device_id": settings.device_id,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(engine_dir),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(timing_dir),
        "trt_max_workspace_size": settings.workspace_bytes,
        # FP16: the model handed over is already converted (strongly typed under TensorRT 11, where the flag is
        # gone); on TensorRT 10 the flag also lets TensorRT pick FP16 kernels for what stayed FP32.
        "trt_fp16_enable": precision == "fp16",
        # INT8 from the model's Q/DQ nodes (explicit quantization): no calibration table is given.
        "trt_int8_enable": precision == "int8",
        "trt_sparsity_enable": settings.sparse,
    }
    if settings.builder_optimization_level is not None:
        opts["trt_builder_optimization_level"] = settings.builder_optimization_level
    if profile is not None:
        lo, opt, hi = profile_option_strings(profile)
        opts.update(trt_profile_min_shapes=lo, trt_profile_opt_shapes=opt, trt_profile_max_shapes=hi)
    return opts


# -- provider availability and the fallback check ---------------------------------------------------------------


def _available_providers() -> list[str]:
    return list(ort.get_available_providers()) if ort is not None else []


def preload_cuda_libraries() -> str | None:
    """``onnxruntime.preload_dlls()`` once per process (CUDA and cuDNN from the nvidia-* wheels), where this
    onnxruntime has it (1.32 does). Returns a note when it failed; the session check still has the last word."""
    global _preloaded, _preload_note
    with _preload_lock:
        if not _preloaded:
            _preloaded = True
            fn = getattr(ort, "preload_dlls", None)
            if fn is not None:
                try:
                    fn()
                except Exception as e:
                    _preload_note = f"onnxruntime.preload_dlls() failed: {_first_line(e)}"
        return _preload_note


def explain_provider_failure(provider: str) -> str:
    """Best guess at why ``provider`` did not load, found the way ONNX Runtime fails: by loading its library."""
    from backends.gpu import list_gpus

    reasons = []
    if not list_gpus():
        reasons.append("nvidia-smi reports no NVIDIA GPU (no GPU, no driver, or the container was started without one)")
    lib = {CUDA_EP: "cuda", TRT_EP: "tensorrt"}.get(provider)
    if lib and ort is not None:
        path = Path(ort.__file__).parent / "capi" / f"libonnxruntime_providers_{lib}.so"
        if not path.exists():
            reasons.append(f"{path.name} is not in this onnxruntime wheel (a CPU build: install onnxruntime-gpu)")
        else:
            try:
                ctypes.CDLL(str(path))
            except OSError as e:
                reasons.append(f"loading {path.name} failed: {_first_line(e)}")
    if _preload_note:
        reasons.append(_preload_note)
    return (
        "; ".join(reasons) or "no cause found here: rerun with SessionOptions.log_severity_level = 0 to see ORT's log"
    )


def check_providers(kind: str, requested: list[str], actual: list[str], reason: str | None = None) -> None:
    """Raise BackendUnavailable unless every requested provider is in the session's providers."""
    missing = [p for p in requested if p not in actual]
    if not missing:
        return
    gpu_left = [p for p in actual if p in (CUDA_EP, TRT_EP)]
    target = gpu_left[0] if gpu_left else "CPU"
    why = reason if reason is not None else explain_provider_failure(missing[0])
    raise BackendUnavailable(
        f"{kind}: ONNX Runtime was asked for {requested} but the session has {actual}: {missing[0]} did not load "
        f"and it fell back to {target}: {why}"
    )


# -- the backend ----------------------------------------------------------------------------------------------


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
        available = _available_providers()
        absent = [p for p in requested if p not in available]
        if absent:
            raise BackendUnavailable(
                f"{kind} needs {absent[0]}, which this onnxruntime {ort.__version__} build does not have "
                f"(it has {available}): install onnxruntime-gpu instead of onnxruntime (the two must not be "
                f"installed together){' and TensorRT 10/11' if TRT_EP in absent else ''}"
            )
        opts = options or BackendOptions()
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
        self._cuda_graph = kind != "onnxruntime-tensorrt" and self._want_cuda_graph(proto)
        try:
            self._session = self._create(run_bytes, self._providers(kind, data, self._cuda_graph), opts)
        except BackendError as e:
            if not (self._cuda_graph and settings.cuda_graph is None and "CUDA Graph" in str(e)):
                raise
            self._notes["cuda_graph_note"] = f"off: {e}"
            self._cuda_graph = False
            self._session = self._create(run_bytes, self._providers(kind, data, False), opts)
        check_providers(kind, requested, self._session.get_providers())
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
        from backends import gpu

        s = self.settings
        gpus = {g.index: g for g in gpu.list_gpus()}
        if s.device_id not in gpus:
            raise BackendUnavailable(
                f"onnxruntime-tensorrt: nvidia-smi shows no GPU {s.device_id} (GPUs: {sorted(gpus)}); the engine "
                "cache key needs its name and compute capability"
            )
        runtime = RuntimeVersions.detect()
        if runtime.tensorrt is None:
            raise BackendUnavailable(
                "onnxruntime-tensorrt: TensorRT (libnvinfer) is not installed: pip install tensorrt-cu13 on a machine "
                "that reaches NVIDIA's index"
            )
        try:
            profile = derive_profile(self.inputs, s.max_batch_size, s.shape_overrides, opt_batch_size=s.opt_batch_size)
        except ValueError as e:
            raise BackendError(f"cannot derive the TensorRT shape profile: {e}") from None
        key = EngineKey.create(
            variant_sha256=hashlib.sha256(variant_bytes).hexdigest(),
            backend="onnxruntime-tensorrt",
            precision=self.precision,
            gpu=gpus[s.device_id],
            runtime=runtime,
            profile=profile,
            sparse=s.sparse,
            build_options={"workspace_bytes": s.workspace_bytes, "optimization_level": s.builder_optimization_level},
        )
        engine_dir = key.cache_dir(s.cache_root())
        timing_dir = s.cache_root() / "timing" / f"{gpus[s.device_id].sm}-trt{runtime.tensorrt}"
        for d in (engine_dir, timing_dir):
            d.mkdir(parents=True, exist_ok=True)
        (engine_dir / "key.json").write_text(json.dumps(key.to_dict(), indent=2, sort_keys=True))
        self._engine_key = key
        self._notes["engine_cache"] = str(engine_dir)
        static = all(p["min"] == p["max"] for p in profile.values())
        return tensorrt_provider_options(s, self.precision, None if static else profile, engine_dir, timing_dir)

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
