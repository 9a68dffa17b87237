"""Optimize jobs through the real server and its worker processes: goals validated at the door, a search that
publishes an honest choice with a report, a plot and a CLI table, and a killed worker whose search resumes from
its finished trials."""

from __future__ import annotations

import os
import signal
import time

import pytest

from model_store import open_store
from tests.compression.optimize_helpers import npz, search_mlp
from tests.conftest import Server, ServerFactory, upload
from tests.test_compression_jobs import wait_job, wait_ready

MODEL, CALIBRATION = search_mlp()


@pytest.fixture(scope="module")
def opt_server(server_factory: ServerFactory) -> Server:
    return server_factory(SLIMSERVE_JOB_WORKERS="1")


def test_goals_are_checked_at_the_door(opt_server: Server) -> None:
    with opt_server.client() as c:
        assert upload(c, "opt-door", MODEL).status_code == 201  # no calibration data
        url = "/v1/models/opt-door/versions/1/optimize"
        cases = [
            ({"tolerance": 0.01, "objectve": "size"}, 422, "objectve"),
            ({"tolerance": 2}, 422, "tolerance"),
            ({"objective": "speed"}, 422, "objective"),
            ({"concurrency": 4}, 422, "latency_budget_ms"),
            ({"max_minutes": 0}, 422, "max_minutes"),
            ({"tolerance": 0.01}, 422, "needs data"),  # valid goals, but no samples to measure accuracy on
        ]
        for body, status, words in cases:
            r = c.post(url, json=body)
            assert r.status_code == status and words in r.json()["error"], (body, r.text)
        assert c.post(url, content=b"{", headers={"content-type": "application/json"}).status_code == 400
        assert c.post("/v1/models/nobody/versions/1/optimize", json={}).status_code == 404


def test_an_optimize_job_reports_every_trial_and_its_frontier(opt_server: Server) -> None:
    from typer.testing import CliRunner

    from service.cli import app

    with opt_server.client() as c:
        assert upload(c, "opt-mlp", MODEL, calibration=npz(**CALIBRATION)).status_code == 201
        goals = {"objective": "size", "max_trials": 3, "latency_budget_ms": 2000, "concurrency": 4}
        r = c.post("/v1/models/opt-mlp/versions/1/optimize", json=goals)
        assert r.status_code == 202, r.text
        job = wait_job(c, r.json()["id"])
        assert job["state"] == "succeeded", job
        result = job["result"]
        assert result["plot"] == f"/v1/jobs/{job['id']}/plot.svg"
        trials = result["trials"]
        assert trials[0]["ladder"] == "original" and 2 <= len(trials) <= 4
        assert any(t["on_frontier"] for t in trials)
        svg = c.get(result["plot"])
        assert svg.status_code == 200 and svg.headers["content-type"].startswith("image/svg+xml")
        assert b"<svg" in svg.content
        report = c.get("/v1/models/opt-mlp/versions/1/report").json()
        assert report["optimization"]["job"] == job["id"] and len(report["optimization"]["trials"]) == len(trials)
        assert result["variant"] == "optimized" and result["honest"], result["message"]  # smaller beyond 1 %: honest
        row = next(v for v in report["variants"] if v["variant"] == "optimized")
        assert row["honest"] and row["why"] == result["why"] and report["default_variant"] == "optimized"
        # the tuner measured the variant behind the real scheduler, and the server serves it with that config
        tuned = result["serving_config"]["config"]
        assert row["serving_config"]["config"] == tuned and result["serving_config"]["trials"]
        wait_ready(c, "opt-mlp", {"optimized"})
        served = c.get("/v2/models/opt-mlp/config").json()
        assert served["parameters"]["slimserve_variant"]["string_value"] == "optimized"
        assert served["max_batch_size"] == tuned["max_batch_size"]  # tuned: 4 clients can form batches
        assert served["instance_group"][0]["count"] == tuned["instances"]
        assert c.get(f"/v1/jobs/{job['id']}/plot.svg").status_code == 200
    cli = CliRunner().invoke(
        app,
        ["optimize", "opt-mlp", "1", "--objective", "size", "--max-trials", "2", "--server", opt_server.url],
        env={"COLUMNS": "200"},
    )
    assert cli.exit_code == 0, cli.output
    assert "original" in cli.output and "metric for probs: top1" in cli.output and "plot: /v1/jobs/" in cli.output


def test_a_killed_worker_resumes_from_its_finished_trials(server_factory: ServerFactory) -> None:
    # The worker stops after its second built trial (the original and one chain) until it is killed.
    server = server_factory(
        SLIMSERVE_JOB_WORKERS="1", SLIMSERVE_JOB_LEASE_S="2", SLIMSERVE_TEST_CRASH_POINT="optimize-trial-2-done"
    )
    with server.client() as c:
        assert upload(c, "opt-crash", MODEL, calibration=npz(**CALIBRATION)).status_code == 201
        spec = {"objective": "latency", "tolerance": 0.05, "max_trials": 2}
        job_id = c.post("/v1/models/opt-crash/versions/1/optimize", json=spec).json()["id"]
        store = open_store(f"sqlite:///{server.data_dir / 'catalog.db'}", server.data_dir / "blobs")
        deadline = time.monotonic() + 120
        while len([t for t in store.trials.list(job_id) if t.state == "done"]) < 2:
            assert time.monotonic() < deadline, "the worker did not reach the crash point"
            time.sleep(0.2)
        before = {t.key: t for t in store.trials.list(job_id)}
        owner = next(iter(before.values())).owner
        assert owner is not None
        os.kill(int(owner.split(":")[1]), signal.SIGKILL)  # owner = host:pid:nonce
        job = wait_job(c, job_id)
    assert job["state"] == "succeeded" and job["attempts"] == 2, job
    after = {t.key: t for t in store.trials.list(job_id)}
    assert job["result"]["reused_trials"] == 2
    for key, t in before.items():  # finished before the kill: not built again
        assert after[key].owner == owner and after[key].updated_at == t.updated_at
    assert len(after) == 3 and {t.owner for k, t in after.items() if k not in before} != {owner}
    store.close()
