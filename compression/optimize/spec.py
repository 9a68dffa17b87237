"""The typed goals of an ``optimize`` job. Unknown keys and goals that make no sense are refused (422)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from compression.passes import PASSES

Target = Literal["cpu", "tensorrt", "cuda"]


class OptimizeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: the most accuracy loss a variant may have: top-1 points / 100 for class scores, 1 - cosine for embeddings,
    #: relative error for regression (the judge picks which, ``metric`` overrides)
    tolerance: float = Field(0.01, ge=0.0, le=1.0)
    objective: Literal["latency", "throughput", "size"] = "latency"
    #: p99 latency budget in ms at ``concurrency`` concurrent requests (the serving config tuner's constraint)
    latency_budget_ms: float | None = Field(None, gt=0.0, le=600_000.0)
    concurrency: int = Field(1, ge=1, le=1024)
    #: runtimes the variant is for; only passes that make artifacts for all of them are tried
    targets: list[Target] = Field(default_factory=lambda: ["cpu"], min_length=1, max_length=3)
    max_trials: int = Field(12, ge=1, le=200)
    max_minutes: float = Field(15.0, gt=0.0, le=24 * 60.0)
    metric: Literal["auto", "top1", "cosine", "relative_error", "exact"] = "auto"
    holdout_fraction: float = Field(0.25, gt=0.0, lt=1.0)
    #: tune the chosen variant's serving config (batch size, instances, threads, queue delay, spinning)
    tune_serving: bool = True

    @model_validator(mode="after")
    def _sensible(self) -> OptimizeSpec:
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets repeat: {self.targets}")
        if self.concurrency != 1 and self.latency_budget_ms is None:
            raise ValueError("concurrency is the load a latency_budget_ms holds at: give latency_budget_ms too")
        if not any(set(self.targets) <= set(p.targets) for p in PASSES.values()):
            raise ValueError(f"no pass makes artifacts for all of {self.targets}: optimize for fewer targets")
        return self
