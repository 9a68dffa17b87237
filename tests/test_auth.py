"""Bearer tokens: every management route refuses missing and wrong tokens; inference stays open unless set."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.conftest import Server, ServerFactory, upload
from tests.onnx_models import mlp

ADMIN = "s3cret-admin-token"


@pytest.fixture(scope="module")
def secured(server_factory: ServerFactory) -> Server:
    return server_factory(SLIMSERVE_ADMIN_TOKEN=ADMIN)


def _management_routes() -> list[tuple[str, str]]:
    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(data_dir="/tmp/slimserve-route-enum"))
    out = []
    for path, ops in app.openapi()["paths"].items():
        if path.startswith(("/v1/", "/v2/repository")):
            for method in ops:
                out.append((method.upper(), re.sub(r"\{[^}]+\}", "x", path)))
    return out


def test_every_management_route_needs_the_token(secured: Server) -> None:
    routes = _management_routes()
    assert len(routes) >= 8, routes
    with httpx.Client(base_url=secured.url, timeout=30) as c:
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {ADMIN}"}):
                r = c.request(method, path, headers=headers)
                assert r.status_code == 401, (method, path, headers, r.status_code)
                assert r.headers.get("www-authenticate") == "Bearer"
                assert ADMIN not in r.text


def test_token_grants_management_and_inference_stays_open(secured: Server) -> None:
    with secured.client(token=ADMIN) as c:
        assert upload(c, "auth-mlp", mlp()).status_code == 201
        assert c.get("/v1/models").status_code == 200
    with httpx.Client(base_url=secured.url) as anon:
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
        assert anon.post("/v2/models/auth-mlp/infer", json=body).status_code == 200
    assert ADMIN not in (secured.log.read_text() if secured.log else "")


def test_inference_token(server_factory: ServerFactory) -> None:
    s = server_factory(SLIMSERVE_ADMIN_TOKEN=ADMIN, SLIMSERVE_INFERENCE_TOKEN="infer-tok")
    with s.client(token=ADMIN) as c:
        assert upload(c, "tok-mlp", mlp()).status_code == 201
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    with httpx.Client(base_url=s.url) as c:
        assert c.post("/v2/models/tok-mlp/infer", json=body).status_code == 401
        ok = c.post("/v2/models/tok-mlp/infer", json=body, headers={"Authorization": "Bearer infer-tok"})
        assert ok.status_code == 200
        # the inference token does not open management
        assert c.get("/v1/models", headers={"Authorization": "Bearer infer-tok"}).status_code == 401
