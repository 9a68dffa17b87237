"""Catalogue changes made outside this process reach the loaded-variant index: new variants load, broken ones are
reported (state, 503 with the reason, slimserve_variant_ready 0), unmeasured accuracy is not exported."""

from __future__ import annotations

import time

from model_store import Catalog, LocalBlobStore, NewVariant
from tests.conftest import Server, ServerFactory, upload
from tests.hardening.helpers import infer_body, slow_model
from tests.onnx_models import mlp


def _store(server: Server) -> tuple[LocalBlobStore, Catalog]:
    return LocalBlobStore(server.data_dir / "blobs"), Catalog(f"sqlite:///{server.data_dir / 'catalog.db'}")


def test_variants_added_elsewhere_are_synced_and_failures_reported(server_factory: ServerFactory) -> None:
    s = server_factory()
    with s.client() as c:
        assert upload(c, "sync-mlp", mlp()).status_code == 201
    blobs, catalog = _store(s)
    good = mlp(seed=3)
    catalog.add_variant(
        "sync-mlp",
        1,
        NewVariant("alt", "original", blobs.put_bytes(good), len(good), details={"accuracy_delta": -0.02}),
    )
    unmeasured = mlp(seed=4)
    catalog.add_variant("sync-mlp", 1, NewVariant("unmeasured", "pruned", blobs.put_bytes(unmeasured), len(unmeasured)))
    broken = blobs.put_bytes(b"definitely not onnx")
    catalog.add_variant("sync-mlp", 1, NewVariant("broken", "original", broken, 19))
    catalog.close()
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    with s.client() as c:
        deadline = time.monotonic() + 15
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = {v["name"]: v["state"] for v in c.get("/v1/models/sync-mlp").json()["versions"][0]["variants"]}
            if states.get("unmeasured") == "ready" and states.get("broken") == "failed":
                break
            time.sleep(0.2)
        assert states == {"original": "ready", "alt": "ready", "unmeasured": "ready", "broken": "failed"}, states
        assert c.post("/v2/models/sync-mlp:alt/infer", json=body).status_code == 200
        r = c.post("/v2/models/sync-mlp:broken/infer", json=body)
        assert r.status_code == 503 and "failed to load" in r.json()["error"]
        metrics = c.get("/metrics").text.splitlines()

    def value(name: str, variant: str) -> str | None:
        for line in metrics:
            if line.startswith(name + "{") and f'variant="{variant}"' in line and 'model="sync-mlp"' in line:
                return line.rsplit(" ", 1)[1]
        return None

    assert value("slimserve_variant_ready", "broken") == "0.0"
    assert value("slimserve_variant_ready", "alt") == "1.0"
    assert value("slimserve_variant_accuracy_delta", "alt") == "-0.02"
    assert value("slimserve_variant_accuracy_delta", "original") == "0.0"  # the reference itself
    assert value("slimserve_variant_accuracy_delta", "unmeasured") is None  # never measured: no series


def test_a_variant_that_is_loading_answers_503_never_404(server_factory: ServerFactory) -> None:
    """The window after a job succeeds: its variant is in the catalogue, this replica has not loaded it yet.
    Requests in that window get 503 with Retry-After ("loading"), never 404; then 200. A name the catalogue
    does not know stays 404. The variant here warms up for about 0.2 s, so the window is never empty."""
    s = server_factory(SLIMSERVE_SYNC_INTERVAL_S="30")  # only a request's catalogue check wakes the sync early
    with s.client() as c:
        assert upload(c, "win", mlp()).status_code == 201
    blobs, catalog = _store(s)
    slow = slow_model(tokens=4096, depth=64)  # x[N, 256] -> y[N, 256], about 0.2 s per inference
    catalog.add_variant("win", 1, NewVariant("slow", "pruned", blobs.put_bytes(slow), len(slow)))
    catalog.close()
    body = infer_body(dim=256)
    seen: list[int] = []
    with s.client() as c:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = c.post("/v2/models/win:slow/infer", json=body)
            seen.append(r.status_code)
            if r.status_code == 200:
                break
            assert r.status_code == 503, r.text
            assert "is loading" in r.json()["error"] and r.headers["Retry-After"] == "30", r.headers
            ready = c.get("/v2/models/win:slow/ready")
            assert ready.status_code in (200, 503), ready.text
            time.sleep(0.02)
        assert seen[0] == 503 and seen[-1] == 200, seen
        assert c.get("/v2/models/win:slow/ready").status_code == 200
        assert c.get("/v2/models/win:slow/versions/1/ready").status_code == 200
        r = c.post("/v2/models/win:nope/infer", json=body)
        assert r.status_code == 404 and "has no variant 'nope'" in r.json()["error"], r.text
        assert c.post("/v2/models/never-uploaded/infer", json=body).status_code == 404
