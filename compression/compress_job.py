"""The ``compress`` job: run the pipeline a CompressionSpec asks for and publish the measured variants."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from backends import TensorSpec
from compression.calibration import parse_npz
from compression.pipeline import CompressionData, run_pipeline
from compression.spec import CompressionSpec
from model_store import NewVariant

if TYPE_CHECKING:
    from compression.job_context import JobContext


def run_compress_job(ctx: JobContext) -> dict[str, Any]:
    job, store = ctx.job, ctx.store
    spec = CompressionSpec.model_validate({k: v for k, v in job.spec.items() if k != "calibration_sha256"})
    ctx.stages[:] = spec.stages
    version = store.catalog.get_version(job.model, job.version)
    original = version.variant("original")
    if original is None:
        raise ValueError(f"{job.model} version {job.version} has no original variant")
    model_bytes = store.blobs.get_bytes(original.runnable_sha256)
    cal_sha = job.spec.get("calibration_sha256") or version.calibration_sha256
    npz = store.blobs.get_bytes(cal_sha) if cal_sha else None
    inputs = [TensorSpec(t["name"], t["datatype"], tuple(t["shape"])) for t in original.details.get("inputs", [])]
    samples = parse_npz(npz, inputs) if npz is not None else None
    data = CompressionData.split(samples, spec.holdout_fraction)
    t0 = time.perf_counter()
    result = run_pipeline(model_bytes, spec, data, ctx.progress)
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
