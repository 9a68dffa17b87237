"""Compression jobs: start, watch, cancel; and the variants report of a version."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from backends import TensorSpec
from compression.calibration import CalibrationError, fixed_batch, holdout_sizes, parse_npz
from compression.spec import CompressionSpec
from model_store import JobRecord, QueueFull
from service.auth import require_admin
from service.errors import BadRequest, TooManyRequests, Unprocessable
from service.routes.common import ctx_of, errors, store_call
from service.routes.management import read_form
from service.views import version_view

router = APIRouter(prefix="/v1", tags=["jobs"], dependencies=[Depends(require_admin)])

_COMPRESS_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/CompressionSpec"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["spec"],
                    "properties": {
                        "spec": {"type": "string", "description": "the CompressionSpec as JSON"},
                        "calibration": {"type": "string", "format": "binary"},
                    },
                }
            },
        },
    }
}


def job_view(j: JobRecord) -> dict[str, Any]:
    return {
        "id": j.id,
        "kind": j.kind,
        "target": j.target,
        "model": j.model,
        "version": j.version,
        "state": j.state,
        "stage": j.stage,
        "progress": round(j.progress, 4),
        "error": j.error,
        "attempts": j.attempts,
        "cancel_requested": j.cancel_requested,
        "spec": {k: v for k, v in j.spec.items() if k != "calibration_sha256"},
        "result": j.result or None,
        "created_at": j.created_at.isoformat(),
        "updated_at": j.updated_at.isoformat(),
    }


def _spec(raw: Any) -> CompressionSpec:
    try:
        return CompressionSpec.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise Unprocessable(f"spec: {loc + ': ' if loc else ''}{first['msg']}") from None


@router.post(
    "/models/{name}/versions/{version}/compress",
    status_code=202,
    openapi_extra=_COMPRESS_BODY,
    responses=errors(400, 401, 404, 413, 415, 422, 429),
)
async def compress(request: Request, name: str, version: int) -> JSONResponse:
    """Start an offline compression job for one version; answers 202 with the job."""
    ctx = ctx_of(request)
    ctype = request.headers.get("content-type", "")
    calibration: bytes | None = None
    if ctype.startswith("multipart/form-data"):
        form = await read_form(request, ctx.settings.max_upload_bytes)
        try:
            raw_spec = form.get("spec")
            if not isinstance(raw_spec, str):
                raise BadRequest("missing form field 'spec' (JSON)")
            try:
                spec_data = orjson.loads(raw_spec)
            except orjson.JSONDecodeError as e:
                raise BadRequest(f"'spec' is not valid JSON: {e}") from None
            cal = form.get("calibration")
            if isinstance(cal, UploadFile):
                calibration = await cal.read()
        finally:
            await form.close()
    else:
        body = await request.body()
        try:
            spec_data = orjson.loads(body or b"null")
        except orjson.JSONDecodeError as e:
            raise BadRequest(f"the body is not valid JSON: {e}") from None
    spec = _spec(spec_data)
    record = await store_call(ctx.store.catalog.get_version, name, version)
    original = record.variant("original")
    stored = spec.model_dump(exclude_none=True)
    assert original is not None
    # the upload recorded the inputs: no need to read and parse the model on the request path
    inputs = [TensorSpec(t["name"], t["datatype"], tuple(t["shape"])) for t in original.details["inputs"]]
    samples: int | None = original.details.get("calibration_samples") if record.calibration_sha256 else None
    try:
        if calibration is not None:
            samples = (await asyncio.to_thread(parse_npz, calibration, inputs)).count
        if samples is not None:  # the job holds some samples out to measure accuracy: both parts must run
            holdout_sizes(samples, fixed_batch(inputs), spec.holdout_fraction)
    except CalibrationError as e:
        raise BadRequest(str(e)) from None
    if calibration is not None:
        stored["calibration_sha256"] = await asyncio.to_thread(ctx.store.blobs.put_bytes, calibration)
    elif spec.quantize is not None and record.calibration_sha256 is None:
        raise Unprocessable(
            "int8 calibration needs data: this version was uploaded without `calibration`; send the job as "
            "multipart with a `calibration` .npz (arrays named after the inputs, samples on axis 0)"
        )
    try:
        job = await store_call(ctx.store.jobs.create, "compress", name, version, stored, ctx.settings.max_pending_jobs)
    except QueueFull as e:
        raise TooManyRequests(f"{e}; retry when some finish") from None
    return JSONResponse(job_view(job), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})


@router.get("/jobs", responses=errors(401))
async def list_jobs(request: Request, state: str | None = None) -> dict[str, Any]:
    jobs = await asyncio.to_thread(ctx_of(request).store.jobs.recent, state)
    return {"jobs": [job_view(j) for j in jobs]}


@router.get("/jobs/{job_id}", responses=errors(401, 404))
async def get_job(request: Request, job_id: str) -> dict[str, Any]:
    return job_view(await store_call(ctx_of(request).store.jobs.get, job_id))


@router.delete("/jobs/{job_id}", responses=errors(401, 404))
async def cancel_job(request: Request, job_id: str) -> dict[str, Any]:
    """Cancel a job: a queued one at once, a running one at its next progress step."""
    return job_view(await store_call(ctx_of(request).store.jobs.cancel, job_id))


@router.get("/models/{name}/versions/{version}/report", responses=errors(401, 404))
async def report(request: Request, name: str, version: int) -> dict[str, Any]:
    """The variants table: size, compression ratio, sparsity, accuracy against the original, latency."""
    ctx = ctx_of(request)
    record = await store_call(ctx.store.catalog.get_version, name, version)
    view = version_view(record, ctx.loaded)
    original = record.variant("original")
    base_size = original.size_bytes if original else None
    rows = []
    for v in view["variants"]:
        ev = v["details"].get("evaluation") or {}
        rows.append(
            {
                "variant": v["name"],
                "kind": v["kind"],
                "state": v["state"],
                "default": v["name"] == record.default_variant,
                "size_bytes": v["size_bytes"],
                "compression_ratio": round(base_size / v["size_bytes"], 3) if base_size and v["size_bytes"] else None,
                "sparsity": ev.get("sparsity"),
                "bits_per_weight": ev.get("bits_per_weight"),
                "accuracy_delta": v["details"].get("accuracy_delta", 0.0 if v["name"] == "original" else None),
                "accuracy": ev.get("accuracy"),
                "latency": ev.get("latency"),
                "backend": v["backend"],
            }
        )
    return {
        "model": name,
        "version": version,
        "default_variant": record.default_variant,
        "default_pinned": record.pinned_default,
        "policy": "the fastest variant (p50, batch 1) whose accuracy loss is within the job's tolerance",
        "variants": rows,
    }


def add_schemas(openapi: dict[str, Any]) -> None:
    """Register the CompressionSpec schema that the compress route's request body refers to."""
    schema = CompressionSpec.model_json_schema(ref_template="#/components/schemas/{model}")
    components = openapi.setdefault("components", {}).setdefault("schemas", {})
    components.update(schema.pop("$defs", {}))
    components["CompressionSpec"] = schema
