"""Bearer-token checks: constant-time comparison, tokens never logged or echoed. The same rules for the REST
routes (``Authorization`` header) and the gRPC service (``authorization`` call metadata)."""

from __future__ import annotations

import hmac

from fastapi import Request
from pydantic import SecretStr

from service.errors import Unauthorized
from service.settings import Settings


def _check(header: str, token: SecretStr | None) -> None:
    if token is None:
        return
    scheme, _, value = header.partition(" ")
    expected = token.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), expected):
        raise Unauthorized()


def check_admin(settings: Settings, header: str) -> None:
    """Management: needs SLIMSERVE_ADMIN_TOKEN when it is set."""
    _check(header, settings.admin_token)


def check_inference(settings: Settings, header: str) -> None:
    """Inference: needs SLIMSERVE_INFERENCE_TOKEN when it is set (the admin token also passes)."""
    if settings.inference_token is None:
        return
    try:
        _check(header, settings.inference_token)
    except Unauthorized:
        if settings.admin_token is None:
            raise
        _check(header, settings.admin_token)


async def require_admin(request: Request) -> None:
    """Management routes."""
    check_admin(request.app.state.ctx.settings, request.headers.get("authorization", ""))


async def require_inference(request: Request) -> None:
    """Inference routes."""
    check_inference(request.app.state.ctx.settings, request.headers.get("authorization", ""))
