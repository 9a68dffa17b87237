"""Running the app: one uvicorn listener, or one per port when management and metrics are split off.

Signals are handled here rather than by each uvicorn.Server (each would install its own handler and
only the last would stop): SIGTERM or SIGINT marks the service not-ready (so load balancers stop sending
work), stops every listener from accepting, lets in-flight requests finish (bounded by
``shutdown_timeout_s``), then runs the app's shutdown: job workers put their running job back in the
queue and exit, schedulers stop.

The event loop (SLIMSERVE_EVENT_LOOP, default ``auto``) is uvloop's when it is installed (``uvicorn[standard]``
brings it): what uvicorn itself picks with its default ``loop="auto"``, which ``asyncio.run`` here would bypass.
Every request hands its batch's result back from a scheduler thread to the loop and grpc.aio schedules several
callbacks per call, so the loop's own cost is on the hot path of both protocols (docs/benchmarks/grpc-h2load.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Generator
from typing import Any

import orjson
import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from service.settings import Settings
from service.transport import HeaderLimits, protocol_class

log = logging.getLogger("slimserve.server")

MANAGEMENT_PREFIXES = ("/v1/", "/v2/repository", "/docs", "/redoc", "/openapi.json")


class PortGuard:
    """Serve each route class only on its port: inference, management (when split), metrics (when split)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.inference_port = settings.port
        self.management_port = settings.management_port or settings.port
        self.metrics_port = settings.metrics_port or settings.port

    def _allowed(self, path: str) -> int | None:
        if path.startswith("/v2/health/"):
            return None  # probes work on every port
        if path == "/metrics":
            return self.metrics_port
        if path.startswith(MANAGEMENT_PREFIXES):
            return self.management_port
        return self.inference_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            port = (scope.get("server") or (None, None))[1]
            want = self._allowed(scope["path"])
            if want is not None and port is not None and port != want:
                body = orjson.dumps({"error": f"{scope['path']} is not served on this port"})
                await send(
                    {"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"application/json")]}
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # signals are handled once for all listeners, in serve()


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:  # a platform without uvloop: asyncio's default loop
        return None
    return uvloop.new_event_loop


def serve(app: FastAPI, settings: Settings) -> None:
    ports = [settings.port]
    for extra in (settings.management_port, settings.metrics_port):
        if extra and extra not in ports:
            ports.append(extra)
    asgi: Any = PortGuard(app, settings) if len(ports) > 1 else app
    refused = app.state.ctx.metrics.http_refused
    protocol = protocol_class(
        HeaderLimits(settings.max_header_bytes, settings.max_headers, settings.header_timeout_s),
        lambda reason: refused.labels(reason).inc(),
    )
    servers = [
        _Server(
            uvicorn.Config(
                asgi,
                host=settings.host,
                port=port,
                http=protocol,
                timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type] # a float works
                log_level=settings.log_level,
                access_log=False,
                lifespan="on" if i == 0 else "off",
                timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
            )
        )
        for i, port in enumerate(ports)
    ]

    def stop(*_: Any) -> None:
        app.state.ctx.shutting_down = True
        for s in servers:
            if s.should_exit:
                s.force_exit = True
            s.should_exit = True

    async def main() -> None:
        loop = type(asyncio.get_running_loop())
        log.info("event loop: %s.%s (SLIMSERVE_EVENT_LOOP=%s)", loop.__module__, loop.__qualname__, settings.event_loop)
        # The primary listener runs the lifespan (loading models); the others start once it is up.
        primary = asyncio.create_task(servers[0].serve())
        while not servers[0].started and not primary.done():
            await asyncio.sleep(0.05)
        await asyncio.gather(primary, *(s.serve() for s in servers[1:]))

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with asyncio.Runner(loop_factory=_loop_factory(settings.event_loop)) as runner:
            runner.run(main())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
