"""A variant's engines: which targets have one, in what state (``/v1/.../variants/{variant}/engines``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from model_store import EngineRecord, VariantRecord
from service.auth import require_admin
from service.context import AppContext
from service.errors import NotFound, store_call
from service.routes.common import ctx_of, errors

router = APIRouter(prefix="/v1", tags=["engines"], dependencies=[Depends(require_admin)])
PATH = "/models/{name}/versions/{version}/variants/{variant}/engines"


def engine_view(e: EngineRecord) -> dict[str, Any]:
    return {
        "digest": e.digest,
        "target": e.target,
        "builder": e.builder,
        "state": e.state,
        "reason": e.error,
        "precision": e.precision,
        "runtime": e.key.get("runtime"),
        "profile": e.key.get("profile"),
        "size_bytes": e.size_bytes,
        "build_seconds": e.build_seconds,
        "job": e.job_id,
        "details": e.details,
        "created_at": e.created_at.isoformat(),
        "updated_at": e.updated_at.isoformat(),
    }


async def _variant(ctx: AppContext, name: str, version: int, variant: str) -> VariantRecord:
    record = await store_call(ctx.store.catalog.get_version, name, version)
    found = record.variant(variant)
    if found is None:
        names = ", ".join(v.name for v in record.variants)
        raise NotFound(f"{name} version {version} has no variant {variant!r} (variants: {names})")
    return found


@router.get(PATH, responses=errors(401, 404))
async def list_engines(request: Request, name: str, version: int, variant: str) -> list[dict[str, Any]]:
    """The variant's engines, one per target (and runtime) a replica asked for: state, size, build time, reason."""
    ctx = ctx_of(request)
    v = await _variant(ctx, name, version, variant)
    return [engine_view(e) for e in await store_call(ctx.store.engines.for_variant, v.runnable_sha256)]


@router.post(f"{PATH}/retry", status_code=202, responses=errors(401, 404))
async def retry_engines(request: Request, name: str, version: int, variant: str) -> JSONResponse:
    """Queue a new build for each of the variant's failed engines (failures are never retried by themselves)."""
    ctx = ctx_of(request)
    v = await _variant(ctx, name, version, variant)
    retried = await store_call(ctx.store.engines.retry, v.runnable_sha256, name, version)
    return JSONResponse([engine_view(e) for e in retried], status_code=202)
