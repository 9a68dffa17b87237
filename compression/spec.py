"""The typed compression job spec. Unknown keys are refused (a misspelt option must not pass silently)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PruneSpec(_Strict):
    sparsity: float = Field(0.5, ge=0.0, le=0.95, description="fraction of prunable weights set to zero")
    pattern: Literal["unstructured", "2:4"] = "unstructured"
    scope: Literal["per_layer", "global"] = "per_layer"

    @model_validator(mode="after")
    def _two_four(self) -> PruneSpec:
        if self.pattern == "2:4" and "sparsity" not in self.model_fields_set:
            self.sparsity = 0.5
        if self.pattern == "2:4" and abs(self.sparsity - 0.5) > 1e-9:
            raise ValueError("2:4 pruning has a fixed sparsity of 0.5")
        return self


class QuantizeSpec(_Strict):
    calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
    tolerance: float | None = Field(
        None, ge=0.0, le=1.0, description="max accuracy loss; nodes fall back to float until within it"
    )
    #: the CPU-tuned int8 form (`int8-cpu`): published when timed faster than `int8` beyond the noise
    #: ("auto"), always, or never
    cpu_form: Literal["auto", "always", "never"] = Field(
        "auto",
        description="publish int8-cpu: when measured faster than int8 beyond noise (auto), always, or never",
    )


class EncodeSpec(_Strict):
    bits: int = Field(5, ge=2, le=8, description="bits per shared weight (2^bits centroids per layer)")


class CompressionSpec(_Strict):
    prune: PruneSpec | None = None
    quantize: QuantizeSpec | None = None
    encode: EncodeSpec | None = None
    #: accuracy loss allowed for a variant to become the default (fastest within tolerance wins)
    tolerance: float = Field(0.01, ge=0.0, le=1.0)
    #: how accuracy is measured against the original: top-1 agreement (classifiers), cosine of the first
    #: output (embeddings, regression), or auto (top-1 for a 2-D [N, C] output, else cosine)
    metric: Literal["auto", "top1", "cosine"] = "auto"
    #: share of the calibration samples held out for evaluation
    holdout_fraction: float = Field(0.25, gt=0.0, lt=1.0)
    #: latency measurement: repetitions per variant
    latency_runs: int = Field(30, ge=3, le=1000)

    @model_validator(mode="after")
    def _something(self) -> CompressionSpec:
        if self.prune is None and self.quantize is None and self.encode is None:
            raise ValueError("give at least one of prune, quantize, encode")
        return self

    @property
    def stages(self) -> list[str]:
        out = [s for s in ("prune", "quantize", "encode") if getattr(self, s) is not None]
        return [*out, "evaluate"]
