"""The gRPC listener: a grpc.aio server in the event loop of the HTTP server, started once the models are loaded
and drained with it.

It serves ``inference.GRPCInferenceService`` (services.py), the standard ``grpc.health.v1`` service (SERVING
while the server is ready; the overall status ``""`` and the inference service by name) and server reflection.
The largest message it accepts is the inference body cap (SLIMSERVE_MAX_INFER_BODY_BYTES): gRPC answers
RESOURCE_EXHAUSTED past it. On shutdown the health status turns NOT_SERVING, new calls are refused and
calls in flight get ``shutdown_timeout_s`` to finish, as the HTTP listeners do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.context import AppContext
from service.errors import SetupError
from service.grpc._generated import POOL
from service.grpc._generated import grpc_service_pb2 as pb
from service.grpc.services import InferenceService, register

log = logging.getLogger("slimserve.grpc")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


class GrpcListener:
    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        settings = ctx.settings
        cap = settings.max_infer_body_bytes
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", cap),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),  # a second server on a taken port fails instead of sharing it
            ]
        )
        register(InferenceService(ctx), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        # The stubs live in their own descriptor pool (_generated/__init__.py): reflection answers from it, so the
        # health service's file goes there too.
        POOL.AddSerializedFile(health_pb2.DESCRIPTOR.serialized_pb)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
            pool=POOL,
        )
        address = f"{settings.host}:{settings.grpc_port}"
        try:
            self.port = self.server.add_insecure_port(address)
        except RuntimeError as e:
            raise SetupError(f"the gRPC listener cannot bind {address}: {e}") from None
        self._stopping: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._watch = asyncio.create_task(self._drain_on_shutdown())
        log.info("gRPC on %s:%d", self.ctx.settings.host, self.port)

    async def _drain_on_shutdown(self) -> None:
        # The signal handler (service/server.py) marks the context shutting down: drain gRPC alongside HTTP.
        while not self.ctx.shutting_down:
            await asyncio.sleep(0.1)
        await self.stop()

    def stop(self) -> asyncio.Task[None]:
        """Start draining (once); the task ends when the server has stopped."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop())
        return self._stopping

    async def _stop(self) -> None:
        await self.health.enter_graceful_shutdown()  # every status NOT_SERVING
        await self.server.stop(self.ctx.settings.shutdown_timeout_s)

    async def close(self) -> None:
        await self.stop()
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
