"""Graceful shutdown: SIGTERM drains in-flight requests, refuses new connections, exits 0 in bounded time,
and leaves a running compression job queued (resumable), not failed."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerFactory, upload
from tests.hardening.helpers import TOKEN, infer_body, slow_model
from tests.onnx_models import mlp

IN_FLIGHT = 10
#: SIGTERM to exit, with requests in flight (they take about a second to drain)
EXIT_BOUND_S = 10.0
#: SIGTERM to exit with a job running: the worker must reach its next progress step and requeue the job
EXIT_BOUND_JOB_S = 25.0


def test_sigterm_drains_in_flight_requests(server_factory: ServerFactory) -> None:
    s = server_factory(SLIMSERVE_ADMIN_TOKEN=TOKEN)
    config = {"instances": 1, "intra_op_threads": 1, "max_batch_size": 0}
    with s.client(TOKEN) as c:
        # ~8x the overload model's work: about 100 ms a request, one at a time
        r = upload(c, "drain", slow_model(256, tokens=3072), config=json.dumps(config))
        assert r.status_code == 201, r.text
        t0 = time.perf_counter()
        assert c.post("/v2/models/drain/infer", json=infer_body(dim=256)).status_code == 200
        service_s = time.perf_counter() - t0

    async def scenario() -> tuple[list[httpx.Response | str], bool, float]:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(base_url=s.url, timeout=60, headers=headers) as c:
            tasks = [
                asyncio.create_task(c.post("/v2/models/drain/infer", json=infer_body(dim=256)))
                for _ in range(IN_FLIGHT)
            ]
            await asyncio.sleep(min(0.3, service_s * 2))
            assert s.proc is not None
            s.proc.send_signal(signal.SIGTERM)
            t_term = time.monotonic()
            await asyncio.sleep(0.2)
            try:
                async with httpx.AsyncClient(base_url=s.url, timeout=2) as fresh:
                    await fresh.get("/v2/health/live")
                refused = False
            except httpx.ConnectError:
                refused = True
            results: list[httpx.Response | str] = []
            for t in tasks:
                try:
                    results.append(await t)
                except httpx.HTTPError as e:
                    results.append(type(e).__name__)
            return results, refused, t_term

    results, refused, t_term = asyncio.run(scenario())
    assert s.proc is not None
    code = s.proc.wait(timeout=EXIT_BOUND_S + 10)
    exit_s = time.monotonic() - t_term
    print(f"service {service_s * 1000:.0f} ms; {IN_FLIGHT} in flight at SIGTERM; exit {code} after {exit_s:.2f}s")
    statuses = [r.status_code if isinstance(r, httpx.Response) else r for r in results]
    assert statuses == [200] * IN_FLIGHT, statuses
    assert refused, "a new connection was accepted after SIGTERM"
    assert code == 0
    assert exit_s < EXIT_BOUND_S


@pytest.mark.slow
def test_sigterm_leaves_a_running_job_queued(server_factory: ServerFactory, tmp_path: Path) -> None:
    pytest.importorskip("compression.encode", reason="the encode stage is not written yet")
    s = server_factory(
        data_dir=tmp_path / "store", SLIMSERVE_JOB_WORKERS="1", SLIMSERVE_JOB_LEASE_S="3", SLIMSERVE_ADMIN_TOKEN=TOKEN
    )
    with s.client(TOKEN) as c:
        assert upload(c, "term-job", mlp(1024, 2048, 1024, seed=4)).status_code == 201
        r = c.post("/v1/models/term-job/versions/1/compress", json={"encode": {"bits": 5}, "latency_runs": 300})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 30
        while c.get(f"/v1/jobs/{job_id}").json()["state"] != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
    time.sleep(1.5)
    assert s.proc is not None
    s.proc.send_signal(signal.SIGTERM)
    t_term = time.monotonic()
    code = s.proc.wait(timeout=EXIT_BOUND_JOB_S + 20)
    exit_s = time.monotonic() - t_term
    con = sqlite3.connect(f"file:{s.data_dir / 'catalog.db'}?mode=ro", uri=True)
    state, attempts, error, owner = con.execute(
        "select state, attempts, error, lease_owner from jobs where id = ?", (job_id,)
    ).fetchone()
    con.close()
    print(f"job at SIGTERM: exit {code} after {exit_s:.2f}s; job {state}, attempts {attempts}, error {error}")
    assert code == 0
    assert exit_s < EXIT_BOUND_JOB_S
    assert (state, attempts, error) == ("queued", 1, None), (state, attempts, error, owner)

    s.start()
    t0 = time.monotonic()
    with s.client(TOKEN) as c:
        while time.monotonic() - t0 < 90:
            job = c.get(f"/v1/jobs/{job_id}").json()
            if job["state"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.2)
    print(f"resumed job {job['state']} {time.monotonic() - t0:.1f}s after the restart, attempts {job['attempts']}")
    assert job["state"] == "succeeded", job
    assert job["attempts"] == 2, job
