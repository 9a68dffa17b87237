"""Dynamic batching: merged requests get their own outputs back, shapes are grouped, the queue is bounded."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest

from tests.conftest import Server, ServerFactory, metric, upload
from tests.onnx_models import dynamic_identity, expand_by_input, mlp, mlp_reference


def _body(x: np.ndarray, **params: object) -> dict[str, object]:
    body: dict[str, object] = {
        "inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]
    }
    if params:
        body["parameters"] = params
    return body


async def _post_all(url: str, model: str, bodies: list[dict[str, object]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        return await asyncio.gather(*(c.post(f"/v2/models/{model}/infer", json=b) for b in bodies))


def test_concurrent_requests_are_batched_and_split_correctly(server: Server) -> None:
    cfg = {"max_batch_size": 64, "batching": {"max_queue_delay_us": 200_000, "preferred_batch_sizes": [16]}}
    with server.client() as c:
        assert upload(c, "batch-mlp", mlp(), config=json.dumps(cfg)).status_code == 201
    rng = np.random.default_rng(5)
    xs = [rng.random((int(rng.integers(1, 4)), 4), dtype=np.float32) for _ in range(16)]
    responses = asyncio.run(_post_all(server.url, "batch-mlp", [_body(x) for x in xs]))
    for x, r in zip(xs, responses, strict=True):
        assert r.status_code == 200, r.text
        probs = next(o for o in r.json()["outputs"] if o["name"] == "probs")
        assert probs["shape"] == [x.shape[0], 3]
        np.testing.assert_allclose(np.array(probs["data"]).reshape(-1, 3), mlp_reference(x), rtol=1e-5, atol=1e-6)
    with server.client() as c:
        st = c.get("/v2/models/batch-mlp/stats").json()["model_stats"][0]
    assert st["inference_count"] == sum(x.shape[0] for x in xs)
    assert st["execution_count"] < len(xs), st  # requests were merged
    assert max(b["batch_size"] for b in st["batch_stats"]) > 3


def test_different_shapes_never_share_a_batch(server: Server) -> None:
    cfg = {"max_batch_size": 32, "batching": {"max_queue_delay_us": 100_000}}
    with server.client() as c:
        assert upload(c, "batch-dyn", dynamic_identity(), config=json.dumps(cfg)).status_code == 201
    xs = [np.full((1, 3 + (i % 3)), i, np.float32) for i in range(12)]
    responses = asyncio.run(_post_all(server.url, "batch-dyn", [_body(x) for x in xs]))
    for x, r in zip(xs, responses, strict=True):
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        assert out["shape"] == list(x.shape)
        assert out["data"] == (x * 2).ravel().tolist()


def test_full_queue_sheds_load_fast_and_timeouts_apply(server: Server) -> None:
    # One instance; the first request (T=3) holds the worker for up to 1 s waiting for more of its shape,
    # so requests of another shape (T=5) pile up in a queue that holds 2.
    cfg = {"max_batch_size": 8, "instances": 1, "batching": {"max_queue_delay_us": 1_000_000, "max_queue_size": 2}}
    with server.client() as c:
        assert upload(c, "batch-full", dynamic_identity(), config=json.dumps(cfg)).status_code == 201

    async def scenario() -> tuple[list[httpx.Response], httpx.Response, float]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            url = "/v2/models/batch-full/infer"
            first = asyncio.create_task(c.post(url, json=_body(np.ones((1, 3), np.float32))))
            await asyncio.sleep(0.2)
            queued = [
                asyncio.create_task(c.post(url, json=_body(np.ones((1, 5), np.float32), timeout=1000)))
                for _ in range(2)
            ]
            await asyncio.sleep(0.2)
            t0 = asyncio.get_running_loop().time()
            rejected = await c.post(url, json=_body(np.ones((1, 5), np.float32)))
            took = asyncio.get_running_loop().time() - t0
            return [await first, *[await q for q in queued]], rejected, took

    done, rejected, took = asyncio.run(scenario())
    assert rejected.status_code == 503 and "full" in rejected.json()["error"]
    assert rejected.headers["retry-after"] == "1"
    assert took < 0.5  # refused at once, not after the queue drains
    assert done[0].status_code == 200
    for r in done[1:]:  # their 1 ms timeout passed while the first batch held the worker
        assert r.status_code == 503 and "timed out" in r.json()["error"]
    with server.client() as c:
        text = c.get("/metrics").text
    assert any(
        line.startswith("slimserve_requests_total")
        and 'model="batch-full"' in line
        and 'outcome="rejected"' in line
        and line.endswith(" 1.0")
        for line in text.splitlines()
    )


@pytest.mark.parametrize("instances", [2])
def test_instances_serve_in_parallel(server: Server, instances: int) -> None:
    cfg = {"instances": instances, "batching": {"enabled": False}}
    with server.client() as c:
        assert upload(c, f"inst-{instances}", mlp(), config=json.dumps(cfg)).status_code == 201
        got = c.get(f"/v2/models/inst-{instances}/config").json()
    assert got["instance_group"][0]["count"] == instances and "dynamic_batching" not in got
    xs = [np.full((2, 4), i, np.float32) for i in range(8)]
    for x, r in zip(xs, asyncio.run(_post_all(server.url, f"inst-{instances}", [_body(x) for x in xs])), strict=True):
        probs = next(o for o in r.json()["outputs"] if o["name"] == "probs")
        np.testing.assert_allclose(np.array(probs["data"]).reshape(2, 3), mlp_reference(x), rtol=1e-5, atol=1e-6)


def _inline_runs(metrics: str, model: str) -> float:
    found = metric(metrics, "slimserve_inline_executions_total", model=model)
    assert found is not None, f"no inline series for {model}"
    return found


@pytest.mark.parametrize("limit_us", ["1000000", "0"])
def test_a_small_models_lone_requests_run_inline_unless_off(server_factory: ServerFactory, limit_us: str) -> None:
    """Past its learning requests, a small model's lone requests run on the event loop, on both protocols, with the
    same answers and the same accounting; SLIMSERVE_INLINE_MAX_US=0 turns it off. The limit is set far above
    what the MLP costs (1 s), so a slow moment on a shared machine does not decide the outcome."""
    import tritonclient.grpc as tc

    srv = server_factory(SLIMSERVE_INLINE_MAX_US=limit_us)
    xs = [np.full((1, 4), i / 10, np.float32) for i in range(16)]
    with srv.client() as c:
        assert upload(c, "tiny", mlp()).status_code == 201
        for x in xs[:12]:
            r = c.post("/v2/models/tiny/infer", json=_body(x))
            assert r.status_code == 200, r.text
            probs = next(o for o in r.json()["outputs"] if o["name"] == "probs")
            np.testing.assert_allclose(np.array(probs["data"]).reshape(1, 3), mlp_reference(x), rtol=1e-5, atol=1e-6)
        client = tc.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
        try:
            for x in xs[12:]:
                item = tc.InferInput("x", [1, 4], "FP32")
                item.set_data_from_numpy(x)
                got = client.infer("tiny", [item]).as_numpy("probs")
                np.testing.assert_allclose(got, mlp_reference(x), rtol=1e-5, atol=1e-6)
        finally:
            client.close()
        inline = _inline_runs(c.get("/metrics").text, "tiny")
        st = c.get("/v2/models/tiny/stats").json()["model_stats"][0]
    # warm-up runs outside the scheduler; the first 8 requests teach it the model's cost on the instance thread
    assert inline == (8 if limit_us != "0" else 0)
    assert st["execution_count"] == st["inference_count"] == len(xs)
    assert st["inference_stats"]["success"]["count"] == len(xs)


def test_a_model_whose_sizes_come_from_request_values_never_runs_on_the_loop(server_factory: ServerFactory) -> None:
    """Expand to a shape the caller sends: a tiny request could ask for a huge output, so the model's requests stay
    on the instance thread whatever the limit, and the event loop keeps answering everyone else."""
    srv = server_factory(SLIMSERVE_INLINE_MAX_US="1000000")
    cfg = {"warmup": {"inputs": {"shape": {"data": [2, 3]}}}}
    x = np.arange(3, dtype=np.float32).reshape(1, 3)
    body = {
        "inputs": [
            {"name": "x", "shape": [1, 3], "datatype": "FP32", "data": x.ravel().tolist()},
            {"name": "shape", "shape": [2], "datatype": "INT64", "data": [2, 3]},
        ]
    }
    with srv.client() as c:
        assert upload(c, "expand", expand_by_input(), config=json.dumps(cfg)).status_code == 201
        for _ in range(12):
            r = c.post("/v2/models/expand/infer", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["outputs"][0]["data"] == np.broadcast_to(x, (2, 3)).ravel().tolist()
        assert _inline_runs(c.get("/metrics").text, "expand") == 0
