"""The FastAPI application factory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from backends import BackendUnavailable, require_onnxruntime
from service import __version__
from service.context import AppContext
from service.errors import ApiError, SetupError
from service.job_processes import JobProcessPool
from service.loaded import settle_heap
from service.settings import Settings

log = logging.getLogger("slimserve")


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app for ``settings``. Raises ``SetupError`` when no ONNX Runtime is installed."""
    try:
        require_onnxruntime()
    except BackendUnavailable as e:
        raise SetupError(str(e)) from None
    settings = settings or Settings()
    ctx = AppContext.build(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        report = await asyncio.to_thread(ctx.store.startup_check, settings.gc_grace_s)
        if report.temporaries or report.orphans or report.missing:
            log.warning(
                "store check: %d temporaries and %d orphan blobs removed, %d missing",
                report.temporaries,
                report.orphans,
                len(report.missing),
            )
        await ctx.loaded.sync(force=True)
        settle_heap()  # the imports and whatever the first sync loaded (loaded.py settles after later loads)
        await ctx.traffic.refresh()
        ctx.traffic.mirror.start()
        decider = asyncio.create_task(ctx.decider.run())
        syncer = asyncio.create_task(_sync_loop(ctx))
        grpc_listener = None
        if settings.grpc_port:  # imported here: a server with gRPC off never loads grpcio
            from service.grpc.server import GrpcListener

            grpc_listener = GrpcListener(ctx)
            await grpc_listener.start()
        workers = JobProcessPool(settings)
        workers.start()
        try:
            yield
        finally:
            ctx.shutting_down = True
            if grpc_listener is not None:
                await grpc_listener.close()
            await workers.stop()
            for task in (syncer, decider):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await ctx.traffic.mirror.stop()
            await ctx.loaded.close()
            ctx.store.close()

    app = FastAPI(
        title="slimserve",
        version=__version__,
        summary="Compress ONNX models and serve them over the KServe v2 / Open Inference Protocol.",
        lifespan=lifespan,
    )
    app.state.ctx = ctx

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            {"error": str(exc.detail)}, status_code=exc.status_code, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors()[:5]:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
        return JSONResponse({"error": "; ".join(parts) or "invalid request"}, status_code=422)

    @app.exception_handler(ClientDisconnect)
    async def _client_abort(request: Request, _: ClientDisconnect) -> Response:
        """The client went away mid-request: its fault and nobody's error. One line, one count; the answer
        below reaches no one (the server drops writes to a closed connection)."""
        route = getattr(request.scope.get("route"), "path", None) or "unmatched"
        ctx.metrics.client_aborts.labels(route).inc()
        client = request.client
        log.info(
            "client %s disconnected before sending its whole request: %s %s",
            f"{client.host}:{client.port}" if client else "?",
            request.method,
            route,
        )
        return Response(status_code=499)  # nginx's "client closed request", for anything that does see it

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)

    from service.routes import engines, jobs, management, metrics, repository, traffic, v2

    app.include_router(v2.router)  # first: the infer routes are matched before anything else
    app.include_router(v2.health_router)
    app.include_router(repository.router)
    app.include_router(management.router)
    app.include_router(traffic.router)
    app.include_router(jobs.router)
    app.include_router(engines.router)
    app.include_router(metrics.router)
    # The hot path also answers through plain Starlette routes, matched before everything else: FastAPI's
    # per-request route machinery (dependency solving, parameter validation) measured about 60 us of a
    # 200 us request (bench: .bench A/B, docs/benchmarks.md). The FastAPI routes stay for the OpenAPI schema.
    for route in reversed(v2.raw_infer_routes()):
        app.router.routes.insert(0, route)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            jobs.add_schemas(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


async def _sync_loop(ctx: AppContext) -> None:
    wake = ctx.loaded.wake  # set by a request that found the catalogue ahead of this process
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), ctx.settings.sync_interval_s)
        wake.clear()
        try:
            await ctx.loaded.sync()
            await ctx.traffic.refresh()  # policies ride on the same revision: hang the taps on what is served
        except Exception:
            log.exception("catalogue sync failed; retrying")
