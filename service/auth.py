"""Bearer-token checks: constant-time comparison, tokens never logged or echoed."""

from __future__ import annotations

import hmac

from fastapi import Request
from pydantic import SecretStr

from service.errors import Unauthorized


def _check(request: Request, token: SecretStr | None) -> None:
    if token is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    expected = token.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), expected):
        raise Unauthorized()


async def require_admin(request: Request) -> None:
    """Management routes: need SLIMSERVE_ADMIN_TOKEN when it is set."""
    _check(request, request.app.state.ctx.settings.admin_token)


async def require_inference(request: Request) -> None:
    """Inference routes: need SLIMSERVE_INFERENCE_TOKEN when it is set (the admin token also passes)."""
    settings = request.app.state.ctx.settings
    if settings.inference_token is None:
        return
    try:
        _check(request, settings.inference_token)
    except Unauthorized:
        if settings.admin_token is None:
            raise
        _check(request, settings.admin_token)
