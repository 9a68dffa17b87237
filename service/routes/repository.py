"""Triton's model repository extension: index, load, unload (management: admin token)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Request

from service.auth import require_admin
from service.routes.common import ctx_of, errors, store_call

router = APIRouter(prefix="/v2/repository", tags=["repository"], dependencies=[Depends(require_admin)])


@router.post("/index", responses=errors(401))
async def index(request: Request) -> list[dict[str, Any]]:
    ctx = ctx_of(request)
    models = await asyncio.to_thread(ctx.store.catalog.list_models)
    out = []
    for m in models:
        for v in m.versions:
            loaded = ctx.loaded.is_loaded(m.name, v.number)
            entry: dict[str, Any] = {
                "name": m.name,
                "version": str(v.number),
                "state": "READY" if loaded else ("UNAVAILABLE" if not v.loaded else "LOADING"),
            }
            if not loaded:
                entry["reason"] = "unloaded" if not v.loaded else "loading or failed to load"
            out.append(entry)
    return out


async def _set_loaded(request: Request, model_name: str, loaded: bool) -> dict[str, Any]:
    ctx = ctx_of(request)
    name = model_name.partition(":")[0]
    versions = await store_call(ctx.store.catalog.set_loaded, name, None, loaded)
    await ctx.loaded.sync(force=True)
    return {"name": name, "versions": [str(v) for v in versions], "loaded": loaded}


@router.post("/models/{model_name}/load", responses=errors(401, 404))
async def load(request: Request, model_name: str) -> dict[str, Any]:
    return await _set_loaded(request, model_name, True)


@router.post("/models/{model_name}/unload", responses=errors(401, 404))
async def unload(request: Request, model_name: str) -> dict[str, Any]:
    return await _set_loaded(request, model_name, False)
