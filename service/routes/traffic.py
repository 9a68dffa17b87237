"""Traffic policies of a version: split, shadow and promotion rules (``/v1/models/{name}/versions/{v}/traffic``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from model_store import TrafficPolicyRecord
from service.auth import require_admin
from service.context import AppContext
from service.errors import NotFound, store_call
from service.routes.common import ctx_of, errors
from service.traffic import TrafficPolicy, check_variants

router = APIRouter(prefix="/v1", tags=["traffic"], dependencies=[Depends(require_admin)])

PATH = "/models/{name}/versions/{version}/traffic"


def _view(ctx: AppContext, rec: TrafficPolicyRecord) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": rec.model,
        "version": rec.version,
        "policy": rec.policy,
        "epoch": rec.epoch,
        "updated_at": rec.updated_at.isoformat() if rec.updated_at else None,
    }
    here = ctx.traffic.describe(rec.model, rec.version)
    if here is not None and here["epoch"] == rec.epoch:
        out["this_replica"] = here["window"]
    return out


@router.put(PATH, responses=errors(400, 401, 404, 422))  # 400: a body that is not JSON
async def set_policy(request: Request, name: str, version: int, body: TrafficPolicy) -> dict[str, Any]:
    """Set the version's traffic policy: the split of plain-name requests over its ready variants, the
    fraction of requests mirrored to each shadow candidate, an optional sticky key and promotion rules."""
    ctx = ctx_of(request)
    record = await store_call(ctx.store.catalog.get_version, name, version)
    known = {v.name for v in record.variants}
    ready = {v for v in known if ctx.loaded.served(name, version, v) is not None}
    check_variants(body, name, version, ready, known)
    rec = await store_call(ctx.store.traffic.set_policy, name, version, body.model_dump())
    await ctx.loaded.sync(force=True)
    await ctx.traffic.refresh(force=True)
    return _view(ctx, rec)


@router.get(PATH, responses=errors(401, 404))
async def get_policy(request: Request, name: str, version: int) -> dict[str, Any]:
    ctx = ctx_of(request)
    rec = await store_call(ctx.store.traffic.get_policy, name, version)
    if rec is None:
        raise NotFound(f"{name} version {version} has no traffic policy (its default variant serves every request)")
    return _view(ctx, rec)


@router.delete(PATH, responses=errors(401, 404))
async def delete_policy(request: Request, name: str, version: int) -> dict[str, Any]:
    ctx = ctx_of(request)
    if not await store_call(ctx.store.traffic.delete_policy, name, version):
        raise NotFound(f"{name} version {version} has no traffic policy")
    await ctx.loaded.sync(force=True)
    await ctx.traffic.refresh(force=True)
    return {"deleted": "traffic policy", "model": name, "version": version}


@router.get(PATH + "/decisions", responses=errors(401, 404))
async def decisions(request: Request, name: str, version: int) -> dict[str, Any]:
    """Promotions and rollbacks taken by the rules (newest first), with the numbers each was taken on."""
    ctx = ctx_of(request)
    records = await store_call(ctx.store.traffic.decisions, name, version)
    return {"model": name, "version": version, "decisions": [r.to_dict() for r in records]}
