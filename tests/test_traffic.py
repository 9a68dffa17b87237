"""Traffic policies through the real server: the split (sticky, deterministic), the variant named in every
response, policy validation, shadow metrics, rollback of a corrupted candidate, promotion of a faithful faster
one (and dry-run), and one decision across two replicas sharing a catalogue."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from model_store import Catalog, LocalBlobStore, NewVariant
from tests.conftest import Server, ServerFactory, metric, upload
from tests.onnx_models import mlp
from tests.traffic_models import corrupted, slow_twin

FAST = {"SLIMSERVE_TRAFFIC_INTERVAL_S": "0.3"}


def add_variant(db_url: str, blob_dir: Path, model: str, name: str, data: bytes) -> None:
    blobs, catalog = LocalBlobStore(blob_dir), Catalog(db_url)
    try:
        catalog.add_variant(model, 1, NewVariant(name, "pruned", blobs.put_bytes(data), len(data)))
    finally:
        catalog.close()


def add_local_variant(s: Server, model: str, name: str, data: bytes) -> None:
    add_variant(f"sqlite:///{s.data_dir / 'catalog.db'}", s.data_dir / "blobs", model, name, data)


def wait_ready(c: httpx.Client, model: str, variants: set[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        states = {v["name"]: v["state"] for v in c.get(f"/v1/models/{model}").json()["versions"][0]["variants"]}
        if all(states.get(v) == "ready" for v in variants):
            return
        time.sleep(0.1)
    raise AssertionError(f"variants not ready: {states}")


def body(x: np.ndarray) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}]}


def wait_decisions(c: httpx.Client, model: str, timeout: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = c.get(f"/v1/models/{model}/versions/1/traffic/decisions").json()["decisions"]
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError("no decision was taken")


def wait_applied(c: httpx.Client, model: str, timeout: float = 30) -> dict[str, Any]:
    """The policy once this replica applies its current window (after a decision, its refresh follows the commit)."""
    deadline = time.monotonic() + timeout
    while True:
        got = c.get(f"/v1/models/{model}/versions/1/traffic").json()
        if "this_replica" in got:
            return got
        assert time.monotonic() < deadline, f"the policy of {model} was not applied: {got}"
        time.sleep(0.05)


def test_split_is_sticky_and_every_response_names_its_variant(server_factory: ServerFactory) -> None:
    s = server_factory(**FAST)
    with s.client() as c:
        assert upload(c, "canary", mlp()).status_code == 201
        add_local_variant(s, "canary", "alt", mlp(seed=3))
        wait_ready(c, "canary", {"original", "alt"})
        policy = {"split": {"original": 0.7, "alt": 0.3}, "sticky": "x-user"}
        r = c.put("/v1/models/canary/versions/1/traffic", json=policy)
        assert r.status_code == 200, r.text
        assert r.json()["policy"]["split"] == {"original": 0.7, "alt": 0.3}
        x = body(np.ones((1, 4), np.float32))
        served: dict[str, str] = {}
        for i in range(200):
            r = c.post("/v2/models/canary/infer", json=x, headers={"x-user": f"user-{i}"})
            assert r.status_code == 200
            served[f"user-{i}"] = r.headers["x-slimserve-variant"]
            assert r.json()["parameters"] == {"slimserve_variant": served[f"user-{i}"]}

        # The split is a pure function of the key: variants sorted by name, cumulative weights, blake2b of the key.
        def expected(key: str) -> str:
            u = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64
            return "alt" if u < 0.3 else "original"

        assert served == {k: expected(k) for k in served}
        share = sum(v == "alt" for v in served.values()) / len(served)
        assert 0.2 < share < 0.4, share
        # the same key lands on the same variant again; name:variant bypasses the split
        for key in ("user-1", "user-2", "user-3"):
            again = c.post("/v2/models/canary/infer", json=x, headers={"x-user": key})
            assert again.headers["x-slimserve-variant"] == served[key]
            pinned = c.post("/v2/models/canary:original/infer", json=x, headers={"x-user": key})
            assert pinned.headers["x-slimserve-variant"] == "original"
        # binary responses name it too
        bin_body = {**x, "parameters": {"binary_data_output": True}}
        r = c.post("/v2/models/canary/infer", json=bin_body, headers={"x-user": "user-1"})
        assert r.headers["x-slimserve-variant"] == served["user-1"]
        # without the sticky key: a draw per request, over both variants
        seen = {c.post("/v2/models/canary/infer", json=x).headers["x-slimserve-variant"] for _ in range(60)}
        assert seen == {"original", "alt"}
        assert c.delete("/v1/models/canary/versions/1/traffic").status_code == 200
        r = c.post("/v2/models/canary/infer", json=x, headers={"x-user": "user-1"})
        assert r.headers["x-slimserve-variant"] == "original"  # the default again
        assert c.get("/v1/models/canary/versions/1/traffic").status_code == 404


def test_invalid_policies_are_refused_with_the_reason(server_factory: ServerFactory) -> None:
    s = server_factory(**FAST)
    with s.client() as c:
        assert upload(c, "pol", mlp()).status_code == 201
        blobs = LocalBlobStore(s.data_dir / "blobs")
        catalog = Catalog(f"sqlite:///{s.data_dir / 'catalog.db'}")
        catalog.add_variant("pol", 1, NewVariant("broken", "pruned", blobs.put_bytes(b"not onnx"), 8))
        catalog.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            states = {v["name"]: v["state"] for v in c.get("/v1/models/pol").json()["versions"][0]["variants"]}
            if states.get("broken") == "failed":
                break
            time.sleep(0.1)
        url = "/v1/models/pol/versions/1/traffic"
        cases = [
            ({"split": {"original": 0.5, "int8": 0.5}}, "no variant 'int8'"),
            ({"split": {"original": 0.5, "broken": 0.5}}, "'broken' of pol version 1 is not ready"),
            ({"split": {"original": 1.0}, "shadow": {"broken": 0.5}}, "'broken' of pol version 1 is not ready"),
            ({"split": {"original": 1.5, "broken": -0.5}}, "must be finite and >= 0"),
            ({"split": {"original": 0.5}}, "must sum to 1, they sum to 0.5"),
            ({"split": {"original": 1.0}, "shadow": {"original": 1.5}}, "fractions must be in [0, 1]"),
            ({"split": {}}, "split"),
            ({"split": {"original": 1.0}, "rules": {"tolerance": 2}}, "tolerance"),
            ({"split": {"original": 1.0}, "colour": "red"}, "colour"),
            ({"split": {"original": 1.0}, "sticky": "bad header!"}, "sticky"),
        ]
        for policy, reason in cases:
            r = c.put(url, json=policy)
            assert r.status_code == 422, (policy, r.status_code, r.text)
            assert reason in r.json()["error"], (policy, r.json())
        assert c.put("/v1/models/pol/versions/7/traffic", json={"split": {"original": 1.0}}).status_code == 404
        assert c.put("/v1/models/nope/versions/1/traffic", json={"split": {"original": 1.0}}).status_code == 404
        assert c.get(url).status_code == 404
        # a zero weight on a variant that is not ready is allowed: it gets no traffic
        r = c.put(url, json={"split": {"original": 1.0, "broken": 0.0}})
        assert r.status_code == 200, r.text


def test_corrupted_candidate_is_shadowed_measured_and_rolled_back(server_factory: ServerFactory) -> None:
    s = server_factory(**FAST)
    with s.client() as c:
        assert upload(c, "shadowed", mlp()).status_code == 201
        add_local_variant(s, "shadowed", "noisy", corrupted(mlp()))
        wait_ready(c, "shadowed", {"original", "noisy"})
        policy = {
            "split": {"original": 1.0},
            "shadow": {"noisy": 1.0},
            "rules": {"min_samples": 60, "tolerance": 0.05, "p99_margin": 0.0},
        }
        assert c.put("/v1/models/shadowed/versions/1/traffic", json=policy).status_code == 200
        rng = np.random.default_rng(7)
        for _ in range(30):
            r = c.post("/v2/models/shadowed/infer", json=body(rng.standard_normal((4, 4)).astype(np.float32)))
            assert r.status_code == 200 and r.headers["x-slimserve-variant"] == "original"
        decisions = wait_decisions(c, "shadowed")
        assert [d["action"] for d in decisions] == ["rollback"]
        d = decisions[0]
        assert d["variant"] == "noisy" and d["primary"] == "original" and not d["dry_run"]
        assert d["numbers"]["compared_rows"] >= 60 and d["numbers"]["agreement"] < 0.95
        assert "agreement" in d["reason"]
        after = wait_applied(c, "shadowed")["policy"]
        assert after["shadow"] == {} and after["split"] == {"original": 1.0}
        version = c.get("/v1/models/shadowed/versions/1").json()
        assert version["default_variant"] == "original"  # never promoted
        text = c.get("/metrics").text
        labels = {"model": "shadowed", "primary": "original", "candidate": "noisy"}
        assert metric(text, "slimserve_shadow_requests_total", outcome="compared", **labels) >= 15
        rows = metric(text, "slimserve_shadow_top1_rows_total", **labels)
        agree = metric(text, "slimserve_shadow_top1_agree_total", **labels)
        assert rows and rows >= 60 and agree is not None and agree / rows < 0.95
        assert metric(text, "slimserve_shadow_candidate_duration_seconds_count", **labels) >= 15
        compared = metric(text, "slimserve_shadow_requests_total", outcome="compared", **labels) or 0.0
        # one observation per comparison: requests that finish within the mirror's gathering time are compared together
        assert 1 <= (metric(text, "slimserve_shadow_max_abs_error_count", **labels) or 0) <= compared
        assert metric(text, "slimserve_traffic_decisions_total", variant="noisy", action="rollback") == 1.0
        # nothing more is mirrored to it
        before = metric(text, "slimserve_shadow_requests_total", outcome="compared", **labels)
        for _ in range(5):
            c.post("/v2/models/shadowed/infer", json=body(np.ones((1, 4), np.float32)))
        after_text = c.get("/metrics").text
        assert metric(after_text, "slimserve_shadow_requests_total", outcome="compared", **labels) == before


def test_faithful_faster_candidate_is_promoted_after_a_dry_run(server_factory: ServerFactory) -> None:
    s = server_factory(**FAST)
    with s.client() as c:
        # one thread per instance: no runtime thread pool spinning between requests to skew the candidate's latency.
        # The primary costs ~4 GFLOP a row (tens to hundreds of ms) against microseconds for the candidate, so the
        # 0.5 margin holds even when a loaded machine stalls the candidate for tens of milliseconds.
        assert upload(c, "promo", slow_twin(depth=128), config='{"intra_op_threads": 1}').status_code == 201
        add_local_variant(s, "promo", "lean", mlp())
        wait_ready(c, "promo", {"original", "lean"})
        rules = {"min_samples": 20, "tolerance": 0.0, "p99_margin": 0.5, "dry_run": True}
        policy = {"split": {"original": 1.0}, "shadow": {"lean": 1.0}, "rules": rules}
        assert c.put("/v1/models/promo/versions/1/traffic", json=policy).status_code == 200
        rng = np.random.default_rng(3)

        def drive(n: int) -> None:
            for _ in range(n):
                assert (
                    c.post(
                        "/v2/models/promo/infer", json=body(rng.standard_normal((1, 4)).astype(np.float32))
                    ).status_code
                    == 200
                )

        drive(25)
        decisions = wait_decisions(c, "promo")
        assert decisions[0]["action"] == "would_promote" and decisions[0]["dry_run"]
        n = decisions[0]["numbers"]
        assert n["agreement"] == 1.0 and n["max_abs_error"] == 0.0
        assert n["candidate_p99_s"] <= 0.5 * n["primary_p99_s"]
        assert c.get("/v1/models/promo/versions/1").json()["default_variant"] == "original"  # dry run: unchanged
        wait_applied(c, "promo")
        assert (
            c.post("/v2/models/promo/infer", json=body(np.ones((1, 4), np.float32))).headers["x-slimserve-variant"]
            == "original"
        )

        policy["rules"] = {**rules, "dry_run": False}
        assert c.put("/v1/models/promo/versions/1/traffic", json=policy).status_code == 200
        drive(25)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            decisions = c.get("/v1/models/promo/versions/1/traffic/decisions").json()["decisions"]
            if decisions[0]["action"] != "would_promote":
                break
            time.sleep(0.1)
        assert [d["action"] for d in decisions][:1] == ["promote"] and decisions[0]["variant"] == "lean"
        assert c.get("/v1/models/promo/versions/1").json()["default_variant"] == "lean"
        assert wait_applied(c, "promo")["policy"]["split"] == {"lean": 1.0}
        r = c.post("/v2/models/promo/infer", json=body(np.ones((1, 4), np.float32)))
        assert r.headers["x-slimserve-variant"] == "lean"


def test_two_replicas_take_one_decision_on_their_summed_window(server_factory: ServerFactory, tmp_path: Path) -> None:
    shared = {
        "SLIMSERVE_DATABASE_URL": f"sqlite:///{tmp_path / 'catalog.db'}",
        "SLIMSERVE_BLOB_DIR": str(tmp_path / "blobs"),
        **FAST,
    }
    a = server_factory(**shared)
    b = server_factory(**shared)
    with a.client() as ca, b.client() as cb:
        assert upload(ca, "pair", mlp()).status_code == 201
        add_variant(shared["SLIMSERVE_DATABASE_URL"], tmp_path / "blobs", "pair", "noisy", corrupted(mlp()))
        wait_ready(ca, "pair", {"original", "noisy"})
        wait_ready(cb, "pair", {"original", "noisy"})
        # each replica alone compares 30 rows, under min_samples (40): only their sum can decide
        rules = {"min_samples": 40, "tolerance": 0.05}
        policy = {"split": {"original": 1.0}, "shadow": {"noisy": 1.0}, "rules": rules}
        assert ca.put("/v1/models/pair/versions/1/traffic", json=policy).status_code == 200
        deadline = time.monotonic() + 30
        while "this_replica" not in cb.get("/v1/models/pair/versions/1/traffic").json():
            assert time.monotonic() < deadline, "replica b never applied the policy"
            time.sleep(0.1)
        rng = np.random.default_rng(5)
        for c in (ca, cb):
            for _ in range(30):
                r = c.post("/v2/models/pair/infer", json=body(rng.standard_normal((1, 4)).astype(np.float32)))
                assert r.status_code == 200 and r.headers["x-slimserve-variant"] == "original"
        decisions = wait_decisions(ca, "pair")
        numbers = decisions[0]["numbers"]
        assert decisions[0]["action"] == "rollback" and numbers["replicas"] == 2
        assert numbers["compared_rows"] > 30  # more than either replica saw
        time.sleep(10 * 0.3)  # both deciders run several more times: nothing is left to decide twice
        for c in (ca, cb):
            assert len(c.get("/v1/models/pair/versions/1/traffic/decisions").json()["decisions"]) == 1
            assert c.get("/v1/models/pair/versions/1/traffic").json()["policy"]["shadow"] == {}
        counts = [
            metric(c.get("/metrics").text, "slimserve_traffic_decisions_total", model="pair") or 0.0 for c in (ca, cb)
        ]
        assert sorted(counts) == [0.0, 1.0]  # taken by one replica, once


@pytest.mark.parametrize("key", ["request-id"])
def test_sticky_request_id(server_factory: ServerFactory, key: str) -> None:
    s = server_factory(**FAST)
    with s.client() as c:
        assert upload(c, "rid", mlp()).status_code == 201
        add_local_variant(s, "rid", "alt", mlp(seed=3))
        wait_ready(c, "rid", {"original", "alt"})
        r = c.put("/v1/models/rid/versions/1/traffic", json={"split": {"original": 0.5, "alt": 0.5}, "sticky": key})
        assert r.status_code == 200
        x = body(np.ones((1, 4), np.float32))
        for i in range(10):
            first = c.post("/v2/models/rid/infer", json=x, headers={"x-request-id": f"r{i}"}).headers[
                "x-slimserve-variant"
            ]
            for _ in range(3):
                again = c.post("/v2/models/rid/infer", json=x, headers={"x-request-id": f"r{i}"})
                assert again.headers["x-slimserve-variant"] == first


def test_cli_sets_shows_lists_and_clears(server_factory: ServerFactory) -> None:
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    s = server_factory(**FAST)
    with s.client() as c:
        assert upload(c, "clitraffic", mlp()).status_code == 201
        add_local_variant(s, "clitraffic", "alt", mlp(seed=3))
        wait_ready(c, "clitraffic", {"original", "alt"})

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "service.cli", "traffic", *args, "--server", s.url]
        return subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, env={**s.env, "COLUMNS": "200"}
        )

    out = cli("set", "clitraffic", "1", "--split", "original=0.75,alt=0.25", "--shadow", "alt=0.5", "--dry-run")
    assert out.returncode == 0, out.stdout + out.stderr
    shown = cli("show", "clitraffic", "1")
    policy = json.loads(shown.stdout)["policy"]
    assert policy["split"] == {"original": 0.75, "alt": 0.25} and policy["shadow"] == {"alt": 0.5}
    assert policy["rules"]["dry_run"] is True
    bad = cli("set", "clitraffic", "1", "--split", "original=0.5")
    assert bad.returncode == 1 and "422" in bad.stdout and "sum to 1" in bad.stdout
    assert cli("decisions", "clitraffic", "1").returncode == 0
    assert cli("clear", "clitraffic", "1").returncode == 0
    assert cli("show", "clitraffic", "1").returncode == 1


def test_grpc_follows_the_split_and_names_the_variant(server_factory: ServerFactory) -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")
    s = server_factory(**FAST)
    with s.client() as c:
        assert upload(c, "gsplit", mlp()).status_code == 201
        add_local_variant(s, "gsplit", "alt", mlp(seed=3))
        wait_ready(c, "gsplit", {"original", "alt"})
        policy = {"split": {"original": 0.5, "alt": 0.5}, "sticky": "x-user"}
        assert c.put("/v1/models/gsplit/versions/1/traffic", json=policy).status_code == 200
        x = np.ones((1, 4), np.float32)
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{s.grpc_port}")
        try:
            for i in range(20):
                key = f"user-{i}"
                rest = c.post("/v2/models/gsplit/infer", json=body(x), headers={"x-user": key})
                inp = grpcclient.InferInput("x", [1, 4], "FP32")
                inp.set_data_from_numpy(x)
                result = client.infer("gsplit", [inp], headers={"x-user": key})
                served = result.get_response().parameters["slimserve_variant"].string_param
                assert served == rest.headers["x-slimserve-variant"], key  # one key, one variant, either protocol
        finally:
            client.close()
