"""Model management: upload, list, inspect, delete (``/v1``)."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.types import Message

from model_store import NewVariant
from service.auth import require_admin
from service.context import AppContext
from service.errors import BadRequest, PayloadTooLarge, Unprocessable, UnsupportedMediaType, store_call
from service.model_config import ModelConfig
from service.routes.common import ctx_of, errors
from service.uploads import prepare_upload
from service.views import model_view, version_view

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Depends(require_admin)])

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_FIELD_BYTES = 64 * 1024

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["name", "model"],
                    "properties": {
                        "name": {"type": "string", "pattern": NAME.pattern},
                        "model": {"type": "string", "format": "binary", "description": "an .onnx file"},
                        "calibration": {
                            "type": "string",
                            "format": "binary",
                            "description": ".npz, arrays named after the inputs, samples on axis 0",
                        },
                        "config": {"type": "string", "description": "JSON serving config"},
                    },
                }
            }
        },
    }
}


def check_name(name: str, what: str = "model name") -> str:
    if not NAME.match(name):
        raise BadRequest(f"{what} must match [A-Za-z0-9_-]{{1,64}}, got {name[:80]!r}")
    return name


@router.post("/models", status_code=201, openapi_extra=_UPLOAD_BODY, responses=errors(400, 401, 413, 415, 422))
async def upload_model(request: Request) -> dict[str, Any]:
    """Upload an ONNX model as a new version of ``name`` (created if new)."""
    ctx = ctx_of(request)
    form_data = await read_form(request, ctx.settings.max_upload_bytes)
    try:
        name = form_data.get("name")
        if not isinstance(name, str):
            raise BadRequest("missing form field 'name'")
        check_name(name)
        model_file = form_data.get("model")
        if not isinstance(model_file, UploadFile):
            raise BadRequest("missing file field 'model' (the .onnx file)")
        config = _parse_config(form_data.get("config"), ctx.settings.max_workspace_bytes)
        model_bytes = await model_file.read()
        calibration = form_data.get("calibration")
        if calibration is not None and not isinstance(calibration, UploadFile):
            raise BadRequest("'calibration' must be a file field (.npz)")
        calibration_bytes = await calibration.read() if calibration is not None else None
    finally:
        await form_data.close()
    return await _create_version(ctx, name, model_bytes, config, calibration_bytes)


async def read_form(request: Request, limit: int) -> Any:
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise UnsupportedMediaType("send multipart/form-data with fields name, model[, calibration, config]")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the upload is {declared} bytes, over the {limit}-byte limit")
    received = 0
    receive = request.receive

    async def limited_receive() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise PayloadTooLarge(f"the upload is over the {limit}-byte limit")
        return message

    limited = Request(request.scope, limited_receive)
    return await limited.form(max_files=2, max_fields=4, max_part_size=MAX_FIELD_BYTES)


def _parse_config(raw: Any, max_workspace_bytes: int) -> ModelConfig:
    if raw is None or raw == "":
        return ModelConfig()
    if not isinstance(raw, str):
        raise BadRequest("'config' must be a JSON text field, not a file")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"'config' is not valid JSON: {e}") from None
    try:
        config = ModelConfig.model_validate(data, context={"max_workspace_bytes": max_workspace_bytes})
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise Unprocessable(f"config: {loc + ': ' if loc else ''}{first['msg']}") from None
    if config.default_variant not in (None, "original"):
        raise Unprocessable(
            "config: default_variant: an upload has only the 'original' variant; pin another one later "
            "with PUT /v1/models/{name}/versions/{version}/default"
        )
    return config


async def _create_version(
    ctx: AppContext, name: str, model_bytes: bytes, config: ModelConfig, calibration: bytes | None
) -> dict[str, Any]:
    prepared = await asyncio.to_thread(prepare_upload, ctx.loaded, model_bytes, config, calibration)
    try:
        blobs = ctx.store.blobs
        sha = await asyncio.to_thread(blobs.put_bytes, model_bytes)
        cal_sha = await asyncio.to_thread(blobs.put_bytes, calibration) if calibration is not None else None
        info = prepared.info
        details = {
            "inputs": [t.to_dict() for t in info.inputs],
            "outputs": [t.to_dict() for t in info.outputs],
            "opsets": info.opsets,
            "parameters": info.num_parameters,
            "nodes": info.num_nodes,
            "producer": info.producer,
            "calibration_samples": prepared.calibration_samples,
        }
        original = NewVariant("original", "original", sha, len(model_bytes), details=details)
        # From the commit to the install, the periodic sync leaves this model's new version to us.
        async with ctx.loaded.installing(name):
            record = await asyncio.to_thread(
                ctx.store.catalog.create_version,
                name,
                [original],
                config.model_dump(exclude_none=True, exclude_defaults=True),
                "original",
                cal_sha,
                pinned_default=config.default_variant is not None,
            )
            await ctx.loaded.install(record, {"original": prepared.loaded})
    except BaseException:  # install takes the instances over atomically; anything before it leaves them here
        prepared.loaded.unload()
        raise
    model = await asyncio.to_thread(ctx.store.catalog.get_model, name)
    view = model_view(model, ctx.loaded)
    view["version"] = record.number
    return view


@router.get("/models", responses=errors(401))
async def list_models(request: Request) -> dict[str, Any]:
    ctx = ctx_of(request)
    models = await asyncio.to_thread(ctx.store.catalog.list_models)
    return {"models": [model_view(m, ctx.loaded) for m in models]}


@router.get("/models/{name}", responses=errors(401, 404))
async def get_model(request: Request, name: str) -> dict[str, Any]:
    ctx = ctx_of(request)
    return model_view(await _get(ctx, name), ctx.loaded)


@router.get("/models/{name}/versions/{version}", responses=errors(401, 404))
async def get_version(request: Request, name: str, version: int) -> dict[str, Any]:
    ctx = ctx_of(request)
    record = await store_call(ctx.store.catalog.get_version, name, version)
    return version_view(record, ctx.loaded)


async def _get(ctx: AppContext, name: str) -> Any:
    return await store_call(ctx.store.catalog.get_model, name)


@router.delete("/models/{name}", responses=errors(401, 404))
async def delete_model(request: Request, name: str) -> dict[str, Any]:
    ctx = ctx_of(request)
    await store_call(ctx.store.catalog.delete_model, name)
    await _after_delete(ctx)
    return {"deleted": name}


@router.delete("/models/{name}/versions/{version}", responses=errors(401, 404))
async def delete_version(request: Request, name: str, version: int) -> dict[str, Any]:
    ctx = ctx_of(request)
    await store_call(ctx.store.catalog.delete_version, name, version)
    await _after_delete(ctx)
    return {"deleted": name, "version": version}


async def _after_delete(ctx: AppContext) -> None:
    await ctx.loaded.sync(force=True)
    # Blobs go after the rows that named them; the grace period protects a concurrent upload of the
    # same bytes whose catalogue row is not committed yet.
    task = asyncio.create_task(asyncio.to_thread(ctx.store.collect, ctx.settings.gc_grace_s))
    ctx.background.add(task)
    task.add_done_callback(ctx.background.discard)


class DefaultVariant(BaseModel):
    model_config = ConfigDict(extra="forbid")
    variant: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")


@router.put("/models/{name}/versions/{version}/default", responses=errors(400, 401, 404, 409, 422))
async def pin_default(request: Request, name: str, version: int, body: DefaultVariant) -> dict[str, Any]:
    """Pin the variant that the plain model name serves (the automatic policy no longer changes it)."""
    ctx = ctx_of(request)
    await store_call(ctx.store.catalog.set_default_variant, name, version, body.variant, True)
    await ctx.loaded.sync(force=True)
    record = await asyncio.to_thread(ctx.store.catalog.get_version, name, version)
    return version_view(record, ctx.loaded)


@router.get("/gpus", responses=errors(401))
async def gpus() -> dict[str, Any]:
    """The GPUs, drivers and runtimes this process sees, and its engine build targets."""
    from backends.gpu import environment_report
    from backends.targets import detect_targets

    def report() -> dict[str, Any]:
        return {**environment_report(), "targets": [t.id for t in detect_targets()]}

    return await asyncio.to_thread(report)
