"""KServe v2 / Open Inference Protocol (REST), with Triton's binary-data, statistics and config extensions.

Model names address variants: ``digits`` serves the latest version's default variant, ``digits:int8``
that version's int8 variant; ``/versions/{v}`` picks a version as in the protocol.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from starlette.requests import ClientDisconnect
from starlette.routing import Match, Route
from starlette.types import Scope

from service import __version__
from service.auth import require_inference
from service.errors import Unavailable
from service.routes.common import ctx_of, errors, read_body
from service.traffic import VARIANT_HEADER, VARIANT_PARAM
from service.triton_views import EXTENSIONS, all_statistics, describe, statistics, triton_config
from service.triton_views import model_metadata as metadata_view
from service.v2codec import HEADER_LENGTH, decode_request, decompress, encode_response

router = APIRouter(tags=["inference (KServe v2)"], dependencies=[Depends(require_inference)])
#: health stays open: Kubernetes probes and load balancers carry no token
health_router = APIRouter(tags=["health"])


# The infer routes come first: routes are matched in order and this is the hot path.
_INFER_BODY = {
    "requestBody": {
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        }
    }
}


@router.post(
    "/v2/models/{model_name}/infer",
    response_class=Response,
    openapi_extra=_INFER_BODY,
    responses={
        200: {"content": {"application/json": {}, "application/octet-stream": {}}},
        **errors(400, 401, 404, 413, 500, 503),
    },
)
@router.post(
    "/v2/models/{model_name}/versions/{model_version}/infer",
    response_class=Response,
    openapi_extra=_INFER_BODY,
    responses={
        200: {"content": {"application/json": {}, "application/octet-stream": {}}},
        **errors(400, 401, 404, 413, 500, 503),
    },
)
async def infer(request: Request, model_name: str, model_version: str | None = None) -> Response:
    """The REST front end of the data plane: only the v2 JSON/binary codec is specific to it."""
    ctx = ctx_of(request)
    plane = ctx.plane
    sv = await plane.resolve(model_name, model_version, request.headers)
    t0 = plane.begin(sv, "rest")
    try:
        limit = ctx.settings.max_infer_body_bytes
        body = await read_body(request, limit)
        headers = request.headers
        body = decompress(body, headers.get("content-encoding"), limit)
        req = decode_request(
            body,
            headers.get(HEADER_LENGTH),
            sv.input_index,
            sv.output_names,
            sv.max_batch_size,
            ctx.limits,
        )
        outputs = await plane.submit(sv, req.inputs, req.outputs, req.rows, req.timeout_us)
        order = req.outputs or sv.output_order
        payload, header_len = encode_response(
            model_name, sv.version, req.id, outputs, order, req.binary, req.binary_default, {VARIANT_PARAM: sv.variant}
        )
    except ClientDisconnect:
        plane.abandon(sv, "rest")
        raise  # counted and logged once as a client abort by the app's handler
    except BaseException as e:
        raise plane.fail(sv, "rest", t0, e) from None
    plane.succeed(sv, "rest", t0)
    if header_len is None:
        return Response(payload, media_type="application/json", headers={VARIANT_HEADER: sv.variant})
    return Response(
        payload,
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(header_len), VARIANT_HEADER: sv.variant},
    )


@health_router.get("/v2/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@health_router.get("/v2/health/ready", responses=errors(503))
async def ready(request: Request) -> dict[str, bool]:
    ctx = ctx_of(request)
    if not ctx.ready:
        raise Unavailable("not ready: models are still loading" if not ctx.shutting_down else "shutting down")
    return {"ready": True}


@router.get("/v2", responses=errors(401))
async def server_metadata() -> dict[str, Any]:
    return {"name": "slimserve", "version": __version__, "extensions": EXTENSIONS}


@router.get("/v2/models/stats", responses=errors(401))
async def all_stats(request: Request) -> dict[str, Any]:
    return {"model_stats": all_statistics(ctx_of(request).loaded)}


@router.get("/v2/models/{model_name}/stats", responses=errors(400, 401, 404, 503))
@router.get("/v2/models/{model_name}/versions/{model_version}/stats", responses=errors(400, 401, 404, 503))
async def model_stats(request: Request, model_name: str, model_version: str | None = None) -> dict[str, Any]:
    sv = await ctx_of(request).plane.resolve(model_name, model_version)
    return {"model_stats": [statistics(sv, model_name)]}


@router.get("/v2/models/{model_name}/ready", responses=errors(400, 401, 404, 503))
@router.get("/v2/models/{model_name}/versions/{model_version}/ready", responses=errors(400, 401, 404, 503))
async def model_ready(request: Request, model_name: str, model_version: str | None = None) -> dict[str, Any]:
    sv = await ctx_of(request).plane.resolve(model_name, model_version)
    return {"name": model_name, "version": str(sv.version), "ready": True}


@router.get("/v2/models/{model_name}/config", responses=errors(400, 401, 404, 503))
@router.get("/v2/models/{model_name}/versions/{model_version}/config", responses=errors(400, 401, 404, 503))
async def model_config(request: Request, model_name: str, model_version: str | None = None) -> dict[str, Any]:
    sv = await ctx_of(request).plane.resolve(model_name, model_version)
    return triton_config(describe(sv), model_name)


@router.get("/v2/models/{model_name}", responses=errors(400, 401, 404, 503))
@router.get("/v2/models/{model_name}/versions/{model_version}", responses=errors(400, 401, 404, 503))
async def model_metadata(request: Request, model_name: str, model_version: str | None = None) -> dict[str, Any]:
    ctx = ctx_of(request)
    sv = await ctx.plane.resolve(model_name, model_version)
    return metadata_view(describe(sv), model_name, ctx.loaded.versions_of(sv.model))


def raw_infer_routes() -> list[Route]:
    """The infer endpoints as plain Starlette routes (same handler, auth checked inline)."""

    async def endpoint(request: Request) -> Response:
        await require_inference(request)
        params = request.path_params
        return await infer(request, params["model_name"], params.get("model_version"))

    return [
        _NamedRoute("/v2/models/{model_name}/infer", endpoint, methods=["POST"]),
        _NamedRoute("/v2/models/{model_name}/versions/{model_version}/infer", endpoint, methods=["POST"]),
    ]


class _NamedRoute(Route):
    """A Starlette route that records itself in the scope as FastAPI's do (``scope["route"]``), so error
    handlers can name the route (the client-abort counter's label)."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match is not Match.NONE:
            child["route"] = self
        return match, child
