"""The GPU knobs of one variant (``GpuSettings``, read from ``BackendOptions.extra``) and the execution
provider options ONNX Runtime's CUDA and TensorRT providers are given for them.

The service builds ``extra`` from a model's typed ``backend_options`` plus the server-owned keys
(``engine_cache_dir``, ``engine_dir``, ``device_id``, ``max_batch_size``, a capped ``workspace_bytes``): see
``service/model_config.py``.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backends.base import BackendError, BackendOptions

if TYPE_CHECKING:
    from backends.engines import Profile

#: TensorRT's builder workspace when a model's config does not ask for another (the server caps it)
DEFAULT_WORKSPACE_BYTES = 1 << 30


@dataclass
class GpuSettings:
    """The GPU knobs, read from ``BackendOptions.extra``."""

    device_id: int = 0
    max_batch_size: int = 8  # the profile's max batch for dynamic-batch models (TensorRT paths)
    opt_batch_size: int | None = None
    shape_overrides: dict[str, dict[str, list[int]]] | None = None  # see engines.derive_profile
    engine_cache_dir: Path | None = None  # root of the engine cache (default: <tmp>/slimserve-engines)
    engine_dir: Path | None = None  # a prebuilt engine, unpacked (served variants): load it, never build
    sparse: bool = False  # the variant is 2:4 structured-sparse: let TensorRT use sparse tensor cores
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES
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
        for name in ("engine_cache_dir", "engine_dir"):
            if x.get(name) is not None:
                setattr(s, name, Path(x[name]))
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
