"""Helpers shared by the route modules."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from service.context import AppContext
from service.errors import PayloadTooLarge

ERROR_SCHEMA = {
    "content": {
        "application/json": {
            "schema": {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
        }
    }
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the error codes a route can answer."""
    return {c: {"description": _DESCRIPTIONS.get(c, "error"), **ERROR_SCHEMA} for c in codes}


_DESCRIPTIONS = {
    400: "the request is malformed or does not fit the model",
    401: "missing or wrong bearer token",
    404: "no such model, version, variant or job",
    409: "conflicts with the current state",
    413: "the body is over the configured limit",
    415: "unsupported media type",
    422: "the request body does not match the schema",
    429: "too many jobs pending: retry later",
    500: "the server failed (the runtime, or a model that does not batch as configured); not the caller's fault",
    503: "known but not servable now (loading, failed to load, overloaded, unloading): retry later",
}


def ctx_of(request: Request) -> AppContext:
    return request.app.state.ctx  # type: ignore[no-any-return]


async def read_body(request: Request, limit: int) -> bytes:
    """Read the whole body, refusing with 413 as soon as it passes ``limit`` (chunked bodies too)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is {declared} bytes, over the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is over the {limit}-byte limit")
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
