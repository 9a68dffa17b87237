"""Catalogue changes made outside this process reach the loaded-variant index: new variants load, broken ones are
reported (state, 503 with the reason, slimserve_variant_ready 0), unmeasured accuracy is not exported."""

from __future__ import annotations

import time

from model_store import Catalog, LocalBlobStore, NewVariant
from tests.conftest import Server, ServerFactory, upload
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
