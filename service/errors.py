"""One error type carrying its HTTP status, rendered as {"error": "..."} by one handler.

Domain errors from the lower layers (store, backends) are mapped here, so those layers stay free of
HTTP. Status codes follow Triton's HTTP mapping: invalid argument 400, not found 404, internal 500,
unavailable 503. A 4xx blames the caller, a 5xx the server: a runtime failure is never a 400.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from model_store import RecordConflict, RecordNotFound

P = ParamSpec("P")
T = TypeVar("T")


class ApiError(Exception):
    status = 500

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ApiError):
    status = 400


class Unauthorized(ApiError):
    status = 401

    def __init__(self, message: str = "missing or invalid bearer token") -> None:
        super().__init__(message, {"WWW-Authenticate": "Bearer"})


class Forbidden(ApiError):
    status = 403


class NotFound(ApiError):
    status = 404


class Conflict(ApiError):
    status = 409


class PayloadTooLarge(ApiError):
    status = 413


class UnsupportedMediaType(ApiError):
    status = 415


class Unprocessable(ApiError):
    status = 422


class TooManyRequests(ApiError):
    status = 429

    def __init__(self, message: str, retry_after: float = 5) -> None:
        super().__init__(message, {"Retry-After": str(max(1, round(retry_after)))})


class InternalError(ApiError):
    """The server failed (the runtime, a model that does not fit its own config, our code): never the caller's
    fault. The message says what failed, without a traceback."""

    status = 500


class Unavailable(ApiError):
    status = 503

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
        super().__init__(message, headers)


class SetupError(RuntimeError):
    """The server cannot run as installed or configured (raised at start, never for a request)."""


async def store_call(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run a blocking store operation off the event loop, mapping its lookup errors to 404 / 409."""
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except RecordNotFound as e:
        raise NotFound(str(e)) from None
    except RecordConflict as e:
        raise Conflict(str(e)) from None
