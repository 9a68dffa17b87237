"""The ``compress`` job: run the pipeline a CompressionSpec asks for and publish the measured variants.

``job_spec`` and ``job_inputs`` are the start-up it shares with the ``optimize`` job (``compression.optimize.job``):
the job's spec, and the version's original model with its calibration samples split into calibration and held-out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from backends import TensorSpec
from compression.calibration import parse_npz
from compression.pipeline import CompressionData, NeedsData, run_pipeline
from compression.spec import CompressionSpec
from model_store import JobRecord, NewVariant, VersionRecord

if TYPE_CHECKING:
    from compression.job_context import JobContext

SpecT = TypeVar("SpecT", bound=BaseModel)


def job_spec(job: JobRecord, kind: type[SpecT]) -> SpecT:
    """The job's spec (the calibration digest a job may carry is not part of it)."""
    return kind.model_validate({k: v for k, v in job.spec.items() if k != "calibration_sha256"})


@dataclass(frozen=True)
class JobInputs:
    version: VersionRecord
    model_bytes: bytes  # the original's runnable model
    data: CompressionData


def job_inputs(ctx: JobContext, holdout_fraction: float, needs_data: str | None = None) -> JobInputs:
    """The job's version, its original model, and the calibration samples (the job's, else the version's) split
    off ``holdout_fraction`` held out. Without samples: empty data, or, given ``needs_data``, NeedsData with it."""
    job, store = ctx.job, ctx.store
    version = store.catalog.get_version(job.model, job.version)
    original = version.variant("original")
    if original is None:
        raise ValueError(f"{job.model} version {job.version} has no original variant")
    cal_sha = job.spec.get("calibration_sha256") or version.calibration_sha256
    if not cal_sha and needs_data is not None:
        raise NeedsData(needs_data)
    model_bytes = store.blobs.get_bytes(original.runnable_sha256)
    inputs = [TensorSpec.from_dict(t) for t in original.details.get("inputs", [])]
    samples = parse_npz(store.blobs.get_bytes(cal_sha), inputs) if cal_sha else None
    return JobInputs(version, model_bytes, CompressionData.split(samples, holdout_fraction))


def run_compress_job(ctx: JobContext) -> dict[str, Any]:
    job, store = ctx.job, ctx.store
    spec = job_spec(job, CompressionSpec)
    ctx.stages[:] = spec.stages
    inputs = job_inputs(ctx, spec.holdout_fraction)
    t0 = time.perf_counter()
    result = run_pipeline(inputs.model_bytes, spec, inputs.data, ctx.progress)
    ctx.progress("evaluate", 1.0)
    # Blobs first, then the rows that name them.
    for v in result.variants:
        stored = store.blobs.put_bytes(v.stored)
        runnable = store.blobs.put_bytes(v.runnable) if v.runnable is not v.stored else stored
        store.catalog.add_variant(
            job.model,
            job.version,
            NewVariant(v.name, v.kind, stored, len(v.stored), runnable, {**v.details, "job": job.id}),
            replace=True,
        )
    store.catalog.set_default_variant(job.model, job.version, result.default_variant, pinned=False)
    return {
        "variants": [v.name for v in result.variants],
        "default_variant": result.default_variant,
        "table": result.table,
        "notes": result.notes,
        "seconds": round(time.perf_counter() - t0, 3),
    }
