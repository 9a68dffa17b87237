"""SLIMSERVE_EVENT_LOOP: both loops serve REST and gRPC with the same answers and drain on SIGTERM; ``auto`` picks
uvloop (installed with uvicorn[standard]) and ``asyncio`` the standard library's loop; another value is refused."""

from __future__ import annotations

import signal

import numpy as np
import pytest
from pydantic import ValidationError

from service.server import _loop_factory
from service.settings import Settings
from tests.conftest import ServerFactory, upload
from tests.onnx_models import mlp, mlp_reference

grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")
uvloop = pytest.importorskip("uvloop", reason="uvloop (uvicorn[standard]) is not installed")


def test_the_setting_picks_the_loop() -> None:
    assert _loop_factory("auto") is uvloop.new_event_loop
    assert _loop_factory("asyncio") is None  # asyncio.Runner's default: the standard library's loop
    with pytest.raises(ValidationError):
        Settings(event_loop="trio")


@pytest.mark.parametrize("loop", ["auto", "asyncio"])
def test_each_loop_serves_both_protocols_and_drains(server_factory: ServerFactory, loop: str) -> None:
    srv = server_factory(SLIMSERVE_EVENT_LOOP=loop)
    x = np.random.default_rng(3).standard_normal((2, 4)).astype(np.float32)
    with srv.client() as c:
        assert upload(c, "m", mlp()).status_code == 201
        body = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": x.ravel().tolist()}]}
        r = c.post("/v2/models/m/infer", json=body)
        assert r.status_code == 200, r.text
        probs = next(o for o in r.json()["outputs"] if o["name"] == "probs")
        np.testing.assert_allclose(np.array(probs["data"]).reshape(2, 3), mlp_reference(x), rtol=1e-5, atol=1e-6)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
    try:
        inp = grpcclient.InferInput("x", [2, 4], "FP32")
        inp.set_data_from_numpy(x)
        res = client.infer("m", [inp])
        np.testing.assert_allclose(res.as_numpy("probs"), mlp_reference(x), rtol=1e-5, atol=1e-6)
    finally:
        client.close()
    srv.stop(signal.SIGTERM)
    assert srv.proc is not None and srv.proc.returncode == 0
    assert srv.log is not None
    ran = "uvloop.Loop" if loop == "auto" else "asyncio.unix_events."
    assert f"event loop: {ran}" in srv.log.read_text()  # the loop the server really ran, as it logged it
