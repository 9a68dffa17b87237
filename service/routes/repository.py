"""Triton's model repository extension: index, load, unload (management: admin token)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from service import repository
from service.auth import require_admin
from service.routes.common import ctx_of, errors

router = APIRouter(prefix="/v2/repository", tags=["repository"], dependencies=[Depends(require_admin)])


@router.post("/index", responses=errors(401))
async def index(request: Request) -> list[dict[str, Any]]:
    return await repository.index(ctx_of(request))


@router.post("/models/{model_name}/load", responses=errors(401, 404))
async def load(request: Request, model_name: str) -> dict[str, Any]:
    return await repository.set_loaded(ctx_of(request), model_name, True)


@router.post("/models/{model_name}/unload", responses=errors(401, 404))
async def unload(request: Request, model_name: str) -> dict[str, Any]:
    return await repository.set_loaded(ctx_of(request), model_name, False)
