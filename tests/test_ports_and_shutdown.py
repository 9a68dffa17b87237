"""Separate ports for inference, management and metrics; graceful shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import ServerFactory, free_port, metric, upload
from tests.onnx_models import mlp


def test_split_ports(server_factory: ServerFactory) -> None:
    mport, xport = free_port(), free_port()
    s = server_factory(SLIMSERVE_MANAGEMENT_PORT=str(mport), SLIMSERVE_METRICS_PORT=str(xport))
    mgmt = f"http://127.0.0.1:{mport}"
    metrics = f"http://127.0.0.1:{xport}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{mgmt}/v2/health/live").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    with httpx.Client(base_url=mgmt, timeout=30) as m:
        assert upload(m, "ports", mlp()).status_code == 201
        assert m.get("/openapi.json").status_code == 200
        assert m.post("/v2/models/ports/infer", json={}).status_code == 404  # inference lives elsewhere
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    with s.client() as c:
        assert c.post("/v2/models/ports/infer", json=body).status_code == 200
        for path in ("/v1/models", "/metrics", "/openapi.json"):
            r = c.get(path)
            assert r.status_code == 404 and "not served on this port" in r.json()["error"], path
        assert c.get("/v2/health/ready").status_code == 200
    text = httpx.get(f"{metrics}/metrics").text
    assert 'slimserve_requests_total{backend="onnxruntime-cpu",model="ports"' in text
    assert httpx.get(f"{metrics}/v1/models").status_code == 404


def test_sigterm_drains_requests_waiting_in_the_batcher(server_factory: ServerFactory) -> None:
    # Requests wait up to 1.5 s in the batcher queue, not yet computing, when SIGTERM arrives
    # (tests/hardening/test_shutdown.py covers requests that are computing).
    s = server_factory()
    cfg = {"max_batch_size": 64, "batching": {"max_queue_delay_us": 1_500_000, "preferred_batch_sizes": [64]}}
    with s.client() as c:
        assert upload(c, "drain", mlp(), config=json.dumps(cfg)).status_code == 201
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}

    async def scenario() -> tuple[list[httpx.Response], bool]:
        async with httpx.AsyncClient(base_url=s.url, timeout=30) as c:
            tasks = [asyncio.create_task(c.post("/v2/models/drain/infer", json=body)) for _ in range(8)]
            await asyncio.sleep(0.5)
            assert s.proc is not None
            s.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            try:
                async with httpx.AsyncClient(base_url=s.url, timeout=2) as fresh:
                    await fresh.get("/v2/health/live")
                refused = False
            except httpx.HTTPError:
                refused = True
            return list(await asyncio.gather(*tasks)), refused

    responses, refused_new = asyncio.run(scenario())
    assert all(r.status_code == 200 for r in responses), [r.status_code for r in responses]
    assert refused_new  # the listener closed at once: new connections are refused
    assert s.proc is not None
    assert s.proc.wait(timeout=30) == 0


def test_sigterm_drains_grpc_requests_waiting_in_the_batcher(server_factory: ServerFactory) -> None:
    """The gRPC listener drains with the HTTP one: queued calls are answered, new ones are not taken."""
    grpcaio = pytest.importorskip("tritonclient.grpc.aio", reason="tritonclient[grpc] is not installed")
    s = server_factory()
    cfg = {"max_batch_size": 64, "batching": {"max_queue_delay_us": 1_500_000, "preferred_batch_sizes": [64]}}
    with s.client() as c:
        assert upload(c, "gdrain", mlp(), config=json.dumps(cfg)).status_code == 201

    def queued() -> float:
        return metric(httpx.get(f"{s.url}/metrics").text, "slimserve_queue_depth", model="gdrain") or 0.0

    async def scenario() -> tuple[list[Any], bool]:
        client = grpcaio.InferenceServerClient(f"127.0.0.1:{s.grpc_port}")
        try:
            x = grpcaio.InferInput("x", [1, 4], "FP32")
            x.set_data_from_numpy(np.ones((1, 4), np.float32))
            tasks = [asyncio.create_task(client.infer("gdrain", [x])) for _ in range(8)]
            deadline = time.monotonic() + 10
            while await asyncio.to_thread(queued) < 8:  # all eight wait in the batcher
                assert time.monotonic() < deadline, "the requests never queued"
                await asyncio.sleep(0.02)
            assert s.proc is not None
            s.proc.send_signal(signal.SIGTERM)
            results = await asyncio.gather(*tasks)
        finally:
            await client.close()
        fresh = grpcaio.InferenceServerClient(f"127.0.0.1:{s.grpc_port}")
        try:
            await fresh.is_server_live(client_timeout=2)
            refused = False
        except Exception:
            refused = True
        finally:
            await fresh.close()
        return results, refused

    results, refused_new = asyncio.run(scenario())
    assert all(r.as_numpy("probs").shape == (1, 3) for r in results)
    assert refused_new
    assert s.proc is not None
    assert s.proc.wait(timeout=30) == 0
