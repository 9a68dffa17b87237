"""Compression jobs: start, watch, cancel; and the variants report of a version."""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from backends import TensorSpec
from compression.calibration import CalibrationError, fixed_batch, holdout_sizes, parse_npz
from compression.optimize.spec import OptimizeSpec
from compression.spec import CompressionSpec
from model_store import JobRecord, QueueFull
from service.auth import require_admin
from service.errors import BadRequest, Conflict, NotFound, TooManyRequests, Unprocessable, store_call
from service.routes.common import ctx_of, errors
from service.routes.management import read_form
from service.views import version_view

router = APIRouter(prefix="/v1", tags=["jobs"], dependencies=[Depends(require_admin)])

SpecT = TypeVar("SpecT", CompressionSpec, OptimizeSpec)


def _body_schema(schema: str) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["spec"],
                        "properties": {
                            "spec": {"type": "string", "description": f"the {schema} as JSON"},
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
        "result": _result_view(j),
        "created_at": j.created_at.isoformat(),
        "updated_at": j.updated_at.isoformat(),
    }


def _result_view(j: JobRecord) -> dict[str, Any] | None:
    if not j.result:
        return None
    if j.kind == "optimize":
        return {**j.result, "plot": f"/v1/jobs/{j.id}/plot.svg"}
    return j.result


def _spec(raw: Any, kind: type[SpecT]) -> SpecT:
    try:
        return kind.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise Unprocessable(f"spec: {loc + ': ' if loc else ''}{first['msg']}") from None


@router.post(
    "/models/{name}/versions/{version}/compress",
    status_code=202,
    openapi_extra=_body_schema("CompressionSpec"),
    responses=errors(400, 401, 404, 413, 415, 422, 429),
)
async def compress(request: Request, name: str, version: int) -> JSONResponse:
    """Start an offline compression job for one version; answers 202 with the job."""
    spec_data, calibration = await _read_body(request)
    spec = _spec(spec_data, CompressionSpec)
    return await _start(request, "compress", name, version, spec, calibration, needs_data=spec.quantize is not None)


@router.post(
    "/models/{name}/versions/{version}/optimize",
    status_code=202,
    openapi_extra=_body_schema("OptimizeSpec"),
    responses=errors(400, 401, 404, 413, 415, 422, 429),
)
async def optimize(request: Request, name: str, version: int) -> JSONResponse:
    """Start an optimize job: state goals (tolerance, objective, budget), get the best variant within them, its
    serving config and the Pareto frontier of every trial; answers 202 with the job."""
    spec_data, calibration = await _read_body(request)
    spec = _spec(spec_data, OptimizeSpec)
    return await _start(request, "optimize", name, version, spec, calibration, needs_data=True)


async def _read_body(request: Request) -> tuple[Any, bytes | None]:
    """(spec as parsed JSON, calibration .npz or None): a JSON body, or multipart with `spec` and `calibration`."""
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
    return spec_data, calibration


async def _start(
    request: Request,
    kind: str,
    name: str,
    version: int,
    spec: CompressionSpec | OptimizeSpec,
    calibration: bytes | None,
    needs_data: bool,
) -> JSONResponse:
    """Check the calibration data against the version's inputs and queue the job."""
    ctx = ctx_of(request)
    record = await store_call(ctx.store.catalog.get_version, name, version)
    original = record.variant("original")
    stored = spec.model_dump(exclude_none=True)
    assert original is not None
    # the upload recorded the inputs: no need to read and parse the model on the request path
    inputs = [TensorSpec.from_dict(t) for t in original.details["inputs"]]
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
    elif needs_data and record.calibration_sha256 is None:
        what = "int8 calibration" if kind == "compress" else "measuring accuracy"
        raise Unprocessable(
            f"{what} needs data: this version was uploaded without `calibration`; send the job as "
            "multipart with a `calibration` .npz (arrays named after the inputs, samples on axis 0)"
        )
    try:
        job = await store_call(ctx.store.jobs.create, kind, name, version, stored, ctx.settings.max_pending_jobs)
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
                **(
                    {"honest": v["details"]["honest"], "why": v["details"].get("why")}
                    if "honest" in v["details"]
                    else {}
                ),
                **({"serving_config": v["details"]["serving_config"]} if "serving_config" in v["details"] else {}),
            }
        )
    latest = await asyncio.to_thread(ctx.store.jobs.latest, "optimize", name, version)
    return {
        "model": name,
        "version": version,
        "default_variant": record.default_variant,
        "default_pinned": record.pinned_default,
        "policy": "the fastest variant (p50, batch 1) whose accuracy loss is within the job's tolerance; an "
        "optimize job's choice only when it is honest (faster beyond noise, or smaller, and int8 in fact)",
        "variants": rows,
        "optimization": None if latest is None else _result_view(latest) | {"job": latest.id},
    }


@router.get(
    "/jobs/{job_id}/plot.svg",
    responses={**errors(401, 404, 409), 200: {"content": {"image/svg+xml": {}}}},
    response_class=Response,
)
async def plot(request: Request, job_id: str) -> Response:
    """An optimize job's trials: accuracy loss against latency, stored size as marker area, the frontier drawn."""
    job = await store_call(ctx_of(request).store.jobs.get, job_id)
    if job.kind != "optimize":
        raise NotFound(f"job {job_id} is a {job.kind} job: only optimize jobs have a plot")
    if job.state != "succeeded" or not job.result.get("trials"):
        raise Conflict(f"job {job_id} is {job.state}: the plot comes with its result")
    try:
        from compression.optimize.plot import frontier_svg
    except ImportError:  # pragma: no cover - matplotlib is in the compression extra
        raise NotFound("this server has no plotting (pip install slimserve[compression])") from None
    svg = await asyncio.to_thread(frontier_svg, job.result)
    return Response(svg, media_type="image/svg+xml")


def add_schemas(openapi: dict[str, Any]) -> None:
    """Register the spec schemas that the compress and optimize routes' request bodies refer to."""
    components = openapi.setdefault("components", {}).setdefault("schemas", {})
    for kind in (CompressionSpec, OptimizeSpec):
        schema = kind.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[kind.__name__] = schema
