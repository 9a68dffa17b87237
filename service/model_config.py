"""Per-version serving configuration, given as the upload's ``config`` JSON field."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


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


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: largest batch the backend runs; None: 32 when the model's first dimension is dynamic, else 0
    max_batch_size: int | None = Field(None, ge=0, le=65_536)
    #: model instances (each its own runtime session and worker thread), like Triton's instance_group
    instances: int | None = Field(None, ge=1, le=64)
    #: ONNX Runtime intra-op threads per instance (None: cores / instances)
    intra_op_threads: int | None = Field(None, ge=1, le=256)
    #: runtime and device: onnxruntime-cpu, onnxruntime-cuda, onnxruntime-tensorrt, tensorrt
    backend: str = Field("onnxruntime-cpu", pattern=r"^(onnxruntime-(cpu|cuda|tensorrt)|tensorrt)$")
    #: precision for GPU backends (fp16 converts the model; int8 needs a QDQ variant)
    precision: str = Field("fp32", pattern=r"^(fp32|fp16|int8)$")
    #: backend-specific options (docs/gpu.md), passed through to the backend
    backend_options: dict[str, Any] = Field(default_factory=dict, max_length=32)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    #: the variant that the plain model name serves; pins it against the automatic policy
    default_variant: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
