"""Triton's ``inference.GRPCInferenceService`` on the one data plane (service/dataplane.py).

Every RPC does what its REST route does, through the same shared code: DataPlane for inference, triton_views for
metadata, configuration and statistics, service/repository.py for the repository extension, service/auth.py for
tokens (read from the ``authorization`` call metadata; the repository RPCs need the admin token). Errors leave as
the ``ApiError`` the shared code raised, mapped to a gRPC status by ``STATUS`` (Triton's mapping). The
shared-memory, trace and log RPCs are not implemented (UNIMPLEMENTED, from the generated base class).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from service import __version__, repository
from service.auth import check_admin, check_inference
from service.context import AppContext
from service.errors import ApiError, BadRequest, NotFound, Unavailable
from service.grpc._generated import grpc_service_pb2 as pb
from service.grpc._generated import grpc_service_pb2_grpc as pb_grpc
from service.grpc._generated import model_config_pb2
from service.grpc.codec import decode_request, encode_response
from service.traffic import VARIANT_PARAM
from service.triton_views import EXTENSIONS, all_statistics, describe, model_metadata, statistics, triton_config

log = logging.getLogger("slimserve.grpc")
PROTOCOL = "grpc"

#: ApiError status -> gRPC status, as Triton maps its errors (the one table; 5xx other than 503 is INTERNAL)
STATUS: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ALREADY_EXISTS,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
}


def grpc_status(err: ApiError) -> grpc.StatusCode:
    return STATUS.get(err.status, grpc.StatusCode.INTERNAL)


class Malformed:
    """What a request that does not parse as its protobuf message becomes (see ``register``): the handler answers
    INVALID_ARGUMENT with the parser's reason. grpcio itself would answer INTERNAL, blaming the server."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as e:
            return Malformed(f"the request is not a valid protobuf message: {e}")

    return deserialize


class _Registrar:
    """Stands in for the server while the generated code registers the service's handlers, and registers them
    with request deserializers that turn a malformed message into ``Malformed`` instead of failing.

    As a generic handler only: grpcio's asyncio server ignores registered methods before 1.84, and from 1.84 waits
    on one future per registered method for every call it accepts (grpc/grpc#43092), a cost per call that grows
    with the service's 20 methods."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self.server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # registered below, from the same handlers

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        lenient = {
            name: h._replace(request_deserializer=_lenient(h.request_deserializer))  # type: ignore[attr-defined]
            for name, h in handlers.items()
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, lenient),))


def register(servicer: InferenceService, server: grpc.aio.Server) -> None:
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, _Registrar(server))


def _parsed(request: Any) -> Any:
    if isinstance(request, Malformed):
        raise BadRequest(request.reason)
    return request


R = TypeVar("R")
#: a call's text metadata, lower-case keys
Metadata = Mapping[str, str]
#: an RPC's body: the parsed request and the call's metadata (read lazily: see ``_LazyMetadata``)
Handler = Callable[[Any, Any, Metadata], Awaitable[R]]
#: what grpc calls: the raw request and the call's context
Method = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]]


def rpc(admin: bool = False) -> Callable[[Handler[R]], Method[R]]:
    """Checks the caller's token, and turns an ``ApiError`` (or an unexpected error: INTERNAL, logged) into the
    call's status with the error's message. The handler gets the call's metadata, read at most once per call."""

    def wrap(fn: Handler[R]) -> Method[R]:
        @functools.wraps(fn)
        async def handler(self: InferenceService, request: Any, context: grpc.aio.ServicerContext) -> R:
            try:
                metadata = _LazyMetadata(context)
                self.authorize(metadata, admin)
                return await fn(self, _parsed(request), metadata)
            except ApiError as e:
                await context.abort(grpc_status(e), e.message)
            except Exception as e:
                if isinstance(e, grpc.aio.AbortError):
                    raise
                log.exception("unhandled error in %s", fn.__name__)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(e).__name__})")
            raise AssertionError("unreachable: abort raises")

        return handler

    return wrap


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx

    def authorize(self, metadata: Metadata, admin: bool) -> None:
        settings = self.ctx.settings
        if admin:
            check_admin(settings, metadata.get("authorization", ""))
        elif settings.inference_token is not None:  # an open server never reads the call's metadata (hot path)
            check_inference(settings, metadata.get("authorization", ""))

    # -- health and metadata (open, as the REST health routes: probes carry no token) -------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.ctx.ready)

    @rpc()
    async def ModelReady(self, request: pb.ModelReadyRequest, metadata: Metadata) -> pb.ModelReadyResponse:
        """Ready or not, as Triton answers: an unknown or unservable model is not ready (not an error)."""
        try:
            await self.ctx.plane.resolve(request.name, request.version or None)
        except (NotFound, Unavailable):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @rpc()
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, metadata: Metadata) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="slimserve", version=__version__, extensions=EXTENSIONS)

    @rpc()
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, metadata: Metadata) -> pb.ModelMetadataResponse:
        sv = await self.ctx.plane.resolve(request.name, request.version or None)
        view = model_metadata(describe(sv), request.name, self.ctx.loaded.versions_of(sv.model))
        return json_format.ParseDict(view, pb.ModelMetadataResponse(), ignore_unknown_fields=True)

    @rpc()
    async def ModelConfig(self, request: pb.ModelConfigRequest, metadata: Metadata) -> pb.ModelConfigResponse:
        sv = await self.ctx.plane.resolve(request.name, request.version or None)
        config = json_format.ParseDict(triton_config(describe(sv), request.name), model_config_pb2.ModelConfig())
        return pb.ModelConfigResponse(config=config)

    @rpc()
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, metadata: Metadata
    ) -> pb.ModelStatisticsResponse:
        if request.name:
            sv = await self.ctx.plane.resolve(request.name, request.version or None)
            entries = [statistics(sv, request.name)]
        else:
            entries = all_statistics(self.ctx.loaded)
        return json_format.ParseDict({"model_stats": entries}, pb.ModelStatisticsResponse())

    # -- repository (admin) -----------------------------------------------------------------------------------

    @rpc(admin=True)
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, metadata: Metadata
    ) -> pb.RepositoryIndexResponse:
        entries = await repository.index(self.ctx, ready_only=request.ready)
        return json_format.ParseDict({"models": entries}, pb.RepositoryIndexResponse())

    @rpc(admin=True)
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, metadata: Metadata
    ) -> pb.RepositoryModelLoadResponse:
        await repository.set_loaded(self.ctx, request.model_name, True)
        return pb.RepositoryModelLoadResponse()

    @rpc(admin=True)
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, metadata: Metadata
    ) -> pb.RepositoryModelUnloadResponse:
        await repository.set_loaded(self.ctx, request.model_name, False)
        return pb.RepositoryModelUnloadResponse()

    # -- inference ----------------------------------------------------------------------------------------------

    async def infer(self, request: pb.ModelInferRequest, metadata: Metadata | None = None) -> pb.ModelInferResponse:
        """The gRPC front end of the data plane: only the protobuf codec is specific to it. ``metadata``: the call's
        (lower-case keys), where a traffic policy's sticky key is read."""
        plane = self.ctx.plane
        sv = await plane.resolve(request.model_name, request.model_version or None, metadata)
        t0 = plane.begin(sv, PROTOCOL)
        try:
            req = decode_request(request, sv.input_index, sv.output_names, sv.max_batch_size, self.ctx.limits)
            outputs = await plane.submit(sv, req.inputs, req.outputs, req.rows, req.timeout_us)
            response = encode_response(request.model_name, sv.version, req.id, outputs, req.outputs or sv.output_order)
        except asyncio.CancelledError:  # the client cancelled the call or went away
            plane.abandon(sv, PROTOCOL)
            raise
        except BaseException as e:
            raise plane.fail(sv, PROTOCOL, t0, e) from None
        plane.succeed(sv, PROTOCOL, t0)
        response.parameters[VARIANT_PARAM].string_param = sv.variant  # the variant that answered (traffic policies)
        return response

    @rpc()
    async def ModelInfer(self, request: pb.ModelInferRequest, metadata: Metadata) -> pb.ModelInferResponse:
        return await self.infer(request, metadata)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Bidirectional: requests are answered as they complete (each response carries its request's id); a failed
        request answers with its ``error_message`` and the stream goes on, as in Triton."""
        metadata = _LazyMetadata(context)
        try:
            self.authorize(metadata, admin=False)
        except ApiError as e:
            await context.abort(grpc_status(e), e.message)
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()

        async def answer(request: pb.ModelInferRequest | Malformed) -> None:
            try:
                response = await self.infer(_parsed(request), metadata)
            except ApiError as e:
                echo = _echo(request) if isinstance(request, pb.ModelInferRequest) else None
                await answers.put(pb.ModelStreamInferResponse(error_message=e.message, infer_response=echo))
            else:
                await answers.put(pb.ModelStreamInferResponse(infer_response=response))

        async def read() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.create_task(answer(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if running:
                    await asyncio.gather(*running, return_exceptions=True)
            finally:
                await answers.put(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await answers.get()) is not None:
                yield item
            await reader
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


def _echo(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    """What a failed stream request's error carries, so the client can match it (Triton sends the id back)."""
    return pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version, id=request.id)


class _LazyMetadata(Mapping[str, str]):
    """The call's metadata, read only when asked: only the token check (when a token is set) and a traffic policy
    with a sticky key read it, and building the dict on every call is measurable on the hot path
    (docs/benchmarks/grpc-h2load.md)."""

    __slots__ = ("_context", "_items")

    def __init__(self, context: Any) -> None:
        self._context = context
        self._items: dict[str, str] | None = None

    def _read(self) -> dict[str, str]:
        if self._items is None:
            self._items = _call_metadata(self._context)
        return self._items

    def __getitem__(self, key: str) -> str:
        return self._read()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._read())

    def __len__(self) -> int:
        return len(self._read())


def _call_metadata(context: Any) -> dict[str, str]:
    """The call's text metadata, keys lower-case (gRPC sends them so): a traffic policy's sticky key is read here."""
    out: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):
            out[key.lower()] = value
    return out
