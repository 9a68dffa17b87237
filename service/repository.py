"""Triton's model repository extension (index, load, unload), shared by the REST routes and the gRPC service."""

from __future__ import annotations

import asyncio
from typing import Any

from service.context import AppContext
from service.errors import store_call


async def index(ctx: AppContext, ready_only: bool = False) -> list[dict[str, Any]]:
    """Every stored version with its state: READY (served here), LOADING or UNAVAILABLE (unloaded); only the READY
    ones with ``ready_only`` (the index request's ``ready`` flag)."""
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
            if loaded or not ready_only:
                out.append(entry)
    return out


async def set_loaded(ctx: AppContext, model_name: str, loaded: bool) -> dict[str, Any]:
    """Load or unload every version of a model (``name:variant`` names the model); NotFound for an unknown one."""
    name = model_name.partition(":")[0]
    versions = await store_call(ctx.store.catalog.set_loaded, name, None, loaded)
    await ctx.loaded.sync(force=True)
    return {"name": name, "versions": [str(v) for v in versions], "loaded": loaded}
