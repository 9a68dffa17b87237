"""Per-version serving configuration, given as the upload's ``config`` JSON field.

A model's config tunes how its own variants are served; it never moves a server limit. The backend options a
model may set are typed (``BackendTuning``); the ones the server owns (``SERVER_OWNED``) are refused with the
setting that owns them, and ``LoadedVariants.backend_options`` applies the server's values last.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

#: backend option -> who sets it instead of the model's config
SERVER_OWNED = {
    "warmup_timeout_s": "the server setting SLIMSERVE_WARMUP_TIMEOUT_S (the warm-up deadline that stops endless loops)",
    "engine_cache_dir": "the server (engines are cached under SLIMSERVE_DATA_DIR/engines)",
    "max_batch_size": "the top-level config field max_batch_size",
    "device_id": "the deployment (CUDA_VISIBLE_DEVICES or the GPU pool; each process serves on its device 0)",
    "engine_dir": "the server (a variant's prebuilt engine, fetched from the store and unpacked under engines/)",
}
#: elements of one made-up warm-up tensor (`fill` with a `shape`): 64 MiB of FP32
MAX_WARMUP_ELEMENTS = 1 << 24
#: elements of explicit warm-up `data`, all inputs together (shapes, sizes, token ids: small by nature)
MAX_WARMUP_DATA_ELEMENTS = 1 << 16


class BatchingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: merge concurrent requests into one backend call (needs max_batch_size > 1)
    enabled: bool = True
    #: how long the first request of a batch may wait for more (0: take what is queued, never wait)
    max_queue_delay_us: int = Field(0, ge=0, le=10_000_000)
    #: batch sizes worth waiting for, within max_queue_delay_us
    preferred_batch_sizes: list[int] = Field(default_factory=list, max_length=16)
    #: queued requests beyond this are refused with 503 and Retry-After
    max_queue_size: int | None = Field(None, ge=1, le=1_000_000)
    #: per-request queue timeout when the request does not give Triton's `timeout` parameter
    default_timeout_us: int | None = Field(None, ge=1)

    @field_validator("preferred_batch_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(x < 1 for x in v):
            raise ValueError("preferred batch sizes must be >= 1")
        return sorted(set(v))


class ShapeRange(BaseModel):
    """One input's TensorRT optimization profile (``engines.derive_profile`` checks it against the model)."""

    model_config = ConfigDict(extra="forbid")

    min: list[int] = Field(max_length=16)
    opt: list[int] = Field(max_length=16)
    max: list[int] = Field(max_length=16)


class BackendTuning(BaseModel):
    """The per-model GPU knobs (docs/gpu.md) that ``backends.gpu_options.GpuSettings`` and native TensorRT read.

    Unset fields take the backend's default. Everything else a backend reads is the server's.
    """

    model_config = ConfigDict(extra="forbid")

    #: the TensorRT profile's opt batch (what TensorRT tunes for); default: max_batch_size
    opt_batch_size: int | None = Field(None, ge=1, le=65_536)
    #: min/opt/max shapes per input, required for dynamic dimensions other than the batch
    shape_overrides: dict[str, ShapeRange] | None = Field(None, max_length=64)
    #: the variant is 2:4 structured-sparse: let TensorRT use sparse tensor cores
    sparse: bool | None = None
    #: TensorRT builder optimization level (its default is 3)
    builder_optimization_level: int | None = Field(None, ge=0, le=5)
    #: CUDA graphs on the CUDA EP: true forces them (refused if impossible), false disables, unset: when possible
    cuda_graph: bool | None = None
    #: refuse sessions where single nodes were placed on the CPU
    disallow_cpu_nodes: bool | None = None
    #: TensorRT builder workspace; at most SLIMSERVE_MAX_WORKSPACE_BYTES (checked at upload, capped at load)
    workspace_bytes: int | None = Field(None, ge=1 << 20)

    @model_validator(mode="before")
    @classmethod
    def _refuse_server_owned(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if key in SERVER_OWNED:
                    raise PydanticCustomError(
                        "server_owned",
                        "{key} is a server setting, not a model's: it is set by {owner}",
                        {"key": key, "owner": SERVER_OWNED[key]},
                    )
        return data

    @field_validator("workspace_bytes")
    @classmethod
    def _within_server_cap(cls, v: int | None, info: ValidationInfo) -> int | None:
        cap = (info.context or {}).get("max_workspace_bytes")
        if v is not None and cap is not None and v > cap:
            raise PydanticCustomError(
                "server_limit",
                "workspace_bytes {value} is over the server's cap SLIMSERVE_MAX_WORKSPACE_BYTES = {cap}",
                {"value": v, "cap": cap},
            )
        return v


class WarmupInput(BaseModel):
    """What one input gets at warm-up: explicit ``data`` (a real sample), or made-up values (``fill``)."""

    model_config = ConfigDict(extra="forbid")

    #: the tensor exactly as one request would send it, as nested lists (the nesting gives the shape), or flat
    #: with ``shape``
    data: list[Any] | bool | int | float | None = None
    #: a concrete shape: for flat ``data``, or for ``fill`` where the input has dynamic dimensions (default: 1)
    shape: list[int] | None = Field(None, max_length=16)
    #: made-up values when no data are given: zeros, or random (floats in [0, 1), integers in [0, 16))
    fill: Literal["zero", "random"] = "zero"

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            if any(d < 0 for d in v):
                raise ValueError("warm-up shapes must be concrete (every dimension >= 0)")
            if math.prod(v) > MAX_WARMUP_ELEMENTS:
                raise ValueError(f"a warm-up tensor may hold at most {MAX_WARMUP_ELEMENTS} elements")
        return v


class WarmupConfig(BaseModel):
    """Warm-up samples, the way Triton's ``model_warmup`` gives them. Inputs not named here take the first
    calibration sample when the version has calibration data, else zeros."""

    model_config = ConfigDict(extra="forbid")

    inputs: dict[str, WarmupInput] = Field(default_factory=dict, max_length=64)

    @field_validator("inputs")
    @classmethod
    def _small(cls, v: dict[str, WarmupInput]) -> dict[str, WarmupInput]:
        total = sum(_count(i.data) for i in v.values() if i.data is not None)
        if total > MAX_WARMUP_DATA_ELEMENTS:
            raise ValueError(f"explicit warm-up data may hold at most {MAX_WARMUP_DATA_ELEMENTS} values in all")
        return v


def _count(data: Any) -> int:
    return sum(_count(x) for x in data) if isinstance(data, list) else 1


#: the fields an optimize job's serving-config tuner sets per variant (``for_variant``)
TUNED_FIELDS = ("max_batch_size", "instances", "intra_op_threads", "allow_spinning")


def for_variant(config: ModelConfig, details: dict[str, Any]) -> ModelConfig:
    """The version's config with a variant's tuned serving config (``details["serving_config"]["config"]``, written
    by an optimize job) filling what the version's config leaves unset: what a user wrote always wins."""
    tuned = (details.get("serving_config") or {}).get("config") or {}
    if not tuned:
        return config
    merged = config.model_dump(exclude_unset=True)
    for k in TUNED_FIELDS:
        if k in tuned and k not in config.model_fields_set:
            merged[k] = tuned[k]
    delay = tuned.get("max_queue_delay_us")
    if delay is not None and "max_queue_delay_us" not in config.batching.model_fields_set:
        merged["batching"] = {**merged.get("batching", {}), "max_queue_delay_us": int(delay)}
    return ModelConfig.model_validate(merged)


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: largest batch the backend runs; None: 32 when the model's first dimension is dynamic, else 0
    max_batch_size: int | None = Field(None, ge=0, le=65_536)
    #: model instances (each its own runtime session and worker thread), like Triton's instance_group
    instances: int | None = Field(None, ge=1, le=64)
    #: ONNX Runtime intra-op threads per instance (None: cores / instances)
    intra_op_threads: int | None = Field(None, ge=1, le=256)
    #: ONNX Runtime intra-op threads spin while idle (faster hand-offs, burns CPU); None: the runtime's default
    allow_spinning: bool | None = None
    #: runtime and device: onnxruntime-cpu, onnxruntime-cuda, onnxruntime-tensorrt, tensorrt
    backend: str = Field("onnxruntime-cpu", pattern=r"^(onnxruntime-(cpu|cuda|tensorrt)|tensorrt)$")
    #: precision for GPU backends (fp16 converts the model; int8 needs a QDQ variant)
    precision: str = Field("fp32", pattern=r"^(fp32|fp16|int8)$")
    #: per-model GPU knobs (docs/gpu.md); server-owned options are refused
    backend_options: BackendTuning = Field(default_factory=BackendTuning)
    #: warm-up samples per input (README: warm-up)
    warmup: WarmupConfig = Field(default_factory=WarmupConfig)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    #: the variant that the plain model name serves; pins it against the automatic policy
    default_variant: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    #: onnxruntime-cpu: build the offline-optimized CPU engine of each variant (unset: SLIMSERVE_CPU_ENGINES)
    cpu_engine: bool | None = None
    #: onnxruntime-tensorrt / tensorrt: serve on this backend while the engine is built (or if its build failed)
    #: instead of staying not ready; visible in the variant's engine state and slimserve_variant_engine_fallback
    engine_fallback: Literal["onnxruntime-cuda"] | None = None

    @model_validator(mode="after")
    def _engine_fields_fit_the_backend(self) -> ModelConfig:
        if self.cpu_engine and self.backend != "onnxruntime-cpu":
            raise ValueError(f"cpu_engine applies to the onnxruntime-cpu backend, not {self.backend}")
        if self.engine_fallback is not None:
            if self.backend not in ("onnxruntime-tensorrt", "tensorrt"):
                raise ValueError(
                    f"engine_fallback applies to the engine-built GPU backends (onnxruntime-tensorrt, tensorrt), "
                    f"not {self.backend}"
                )
            if self.precision == "int8":
                raise ValueError("engine_fallback onnxruntime-cuda cannot serve int8: the CUDA EP has no int8 kernels")
        return self
