"""Uploads over REST: the happy path, and every kind of bad input answered 4xx with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.compression.optimize_helpers import npz
from tests.conftest import Server, ServerFactory, upload
from tests.onnx_models import external_data_model, fixed_shape_add, mlp


def _blob_count(server: Server) -> int:
    return sum(1 for p in (server.data_dir / "blobs" / "sha256").rglob("*") if p.is_file())


def _model_names(client: httpx.Client) -> list[str]:
    return [m["name"] for m in client.get("/v1/models").json()["models"]]


def test_upload_creates_versions_and_variants(client: httpx.Client) -> None:
    r = upload(client, "up-mlp", mlp())
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["name"] == "up-mlp" and body["version"] == 1
    v = body["versions"][0]
    assert v["state"] == "ready" and v["default_variant"] == "original"
    variant = v["variants"][0]
    assert variant["name"] == "original" and variant["backend"] == "onnxruntime-cpu"
    assert variant["details"]["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert len(variant["sha256"]) == 64

    r2 = upload(client, "up-mlp", mlp(seed=1), config=json.dumps({"max_batch_size": 4}))
    assert r2.status_code == 201 and r2.json()["version"] == 2
    got = client.get("/v1/models/up-mlp").json()
    assert [x["version"] for x in got["versions"]] == [1, 2]
    assert got["versions"][1]["config"] == {"max_batch_size": 4}
    assert client.get("/v1/models/up-mlp/versions/2").json()["version"] == 2
    assert "up-mlp" in _model_names(client)


def test_upload_with_calibration(client: httpx.Client) -> None:
    r = upload(client, "up-calib", mlp(), calibration=npz(x=np.random.rand(16, 4).astype(np.float32)))
    assert r.status_code == 201, r.text
    v = r.json()["versions"][0]
    assert v["has_calibration"] is True
    assert v["variants"][0]["details"]["calibration_samples"] == 16


BAD_UPLOADS = [
    ("not-onnx", {"model": b"this is not a model"}, 400, "not an ONNX model"),
    ("empty", {"model": b""}, 400, "empty"),
    ("truncated", {"model": mlp()[:-40]}, 400, ""),
    ("external-data-escape", {"model": external_data_model("../../../../etc/passwd")}, 400, "external data"),
    ("external-data-abs", {"model": external_data_model("/etc/passwd")}, 400, "external data"),
    ("bad-config-json", {"model": mlp(), "config": "{nope"}, 400, "not valid JSON"),
    ("unknown-config-key", {"model": mlp(), "config": '{"max_batchsize": 3}'}, 422, "max_batchsize"),
    ("bad-config-value", {"model": mlp(), "config": '{"max_batch_size": -1}'}, 422, "max_batch_size"),
    ("calib-wrong-name", {"model": mlp(), "calibration": npz(y=np.zeros((4, 4), np.float32))}, 400, "named after"),
    ("calib-wrong-shape", {"model": mlp(), "calibration": npz(x=np.zeros((4, 5), np.float32))}, 400, "shape"),
    ("calib-not-npz", {"model": mlp(), "calibration": b"garbage"}, 400, "npz"),
    ("calib-nan", {"model": mlp(), "calibration": npz(x=np.full((4, 4), np.nan, np.float32))}, 400, "NaN"),
]


@pytest.mark.parametrize(("case", "fields", "status", "message"), BAD_UPLOADS, ids=[c[0] for c in BAD_UPLOADS])
def test_bad_uploads_write_nothing(
    server: Server, client: httpx.Client, case: str, fields: dict[str, bytes | str], status: int, message: str
) -> None:
    before = _blob_count(server)
    name = f"bad-{case}"
    r = upload(client, name, fields["model"], config=fields.get("config"), calibration=fields.get("calibration"))
    assert r.status_code == status, r.text
    assert message.lower() in r.json()["error"].lower()
    assert _blob_count(server) == before
    assert name not in _model_names(client)


def test_checker_failure_is_400(client: httpx.Client) -> None:
    import onnx

    m = onnx.load_from_string(mlp())
    m.graph.node[0].input[1] = "does_not_exist"
    r = upload(client, "bad-checker", m.SerializeToString())
    assert r.status_code == 400
    assert "onnx.checker" in r.json()["error"]


def test_unknown_domain_is_400(client: httpx.Client) -> None:
    import onnx
    from onnx import helper

    m = onnx.load_from_string(fixed_shape_add())
    m.graph.node[0].domain = "evil.custom"
    m.opset_import.append(helper.make_opsetid("evil.custom", 1))
    r = upload(client, "bad-domain", m.SerializeToString())
    assert r.status_code == 400 and "evil.custom" in r.json()["error"]


@pytest.mark.parametrize("name", ["has space", "a/b", "x" * 65, "dots.are.bad", "", "ü"])
def test_bad_names(client: httpx.Client, name: str) -> None:
    r = client.post("/v1/models", data={"name": name}, files={"model": ("m.onnx", mlp())})
    assert r.status_code == 400, r.text
    assert "name" in r.json()["error"]


def test_missing_fields(client: httpx.Client) -> None:
    r = client.post("/v1/models", data={"name": "nofile"}, files={"other": ("m.onnx", b"x")})
    assert r.status_code == 400 and "'model'" in r.json()["error"]
    r = client.post("/v1/models", files={"model": ("m.onnx", mlp())})
    assert r.status_code == 400 and "'name'" in r.json()["error"]
    r = client.post("/v1/models", content=b"{}", headers={"content-type": "application/json"})
    assert r.status_code == 415


def test_upload_size_cap(server_factory: ServerFactory) -> None:
    s = server_factory(SLIMSERVE_MAX_UPLOAD_BYTES="4096")
    big = mlp(in_dim=64, hidden=64)  # > 16 KiB
    with s.client() as c:
        r = upload(c, "too-big", big)
        assert r.status_code == 413, r.text
        assert "limit" in r.json()["error"]

        # A chunked body (no Content-Length) is cut off while streaming too.
        def chunks():  # type: ignore[no-untyped-def]
            boundary = b"XyZ"
            yield b'--XyZ\r\nContent-Disposition: form-data; name="name"\r\n\r\nchunked\r\n'
            yield b'--XyZ\r\nContent-Disposition: form-data; name="model"; filename="m.onnx"\r\n\r\n'
            for _ in range(10):
                yield b"\0" * 1024
            yield b"\r\n--" + boundary + b"--\r\n"

        r = c.post("/v1/models", content=chunks(), headers={"content-type": "multipart/form-data; boundary=XyZ"})
        assert r.status_code == 413, r.text
        assert c.get("/v1/models").json()["models"] == []
    assert not any(p.is_file() for p in (s.data_dir / "blobs" / "sha256").rglob("*"))


def test_delete_version_and_model(server: Server, client: httpx.Client) -> None:
    assert upload(client, "del-me", mlp(seed=7)).status_code == 201
    assert upload(client, "del-me", mlp(seed=8)).status_code == 201
    r = client.delete("/v1/models/del-me/versions/1")
    assert r.status_code == 200
    assert client.post("/v2/models/del-me/versions/1/infer", json=_infer_body()).status_code == 404
    assert client.post("/v2/models/del-me/infer", json=_infer_body()).status_code == 200
    assert client.delete("/v1/models/del-me").status_code == 200
    assert client.get("/v1/models/del-me").status_code == 404
    assert client.delete("/v1/models/del-me").status_code == 404
    assert client.delete("/v1/models/del-me/versions/9").status_code == 404
    assert client.post("/v2/models/del-me/infer", json=_infer_body()).status_code == 404


def _infer_body() -> dict[str, object]:
    return {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.1, 0.2, 0.3, 0.4]}]}


def test_store_survives_restart(server_factory: ServerFactory, tmp_path: Path) -> None:
    s = server_factory(data_dir=tmp_path / "d")
    with s.client() as c:
        assert upload(c, "persist", mlp()).status_code == 201
        before = c.post("/v2/models/persist/infer", json=_infer_body()).json()
    s.stop()
    s.start()
    with s.client() as c:
        after = c.post("/v2/models/persist/infer", json=_infer_body()).json()
    assert after["outputs"] == before["outputs"]
