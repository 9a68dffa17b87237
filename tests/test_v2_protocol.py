"""KServe v2 / Open Inference Protocol over REST, checked with raw HTTP against the real server."""

from __future__ import annotations

import asyncio
import gzip
import json

import httpx
import numpy as np
import orjson
import pytest

from tests.conftest import upload
from tests.onnx_models import (
    IDENTITY_TYPES,
    batch_collapsing,
    fixed_shape_add,
    identity_all_types,
    mlp,
    mlp_reference,
)

NP = {
    "FP32": np.float32,
    "FP16": np.float16,
    "FP64": np.float64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "BOOL": np.bool_,
}


@pytest.fixture(scope="module")
def models(server) -> None:  # type: ignore[no-untyped-def]
    with server.client() as c:
        for name, data in [("v2-mlp", mlp()), ("v2-types", identity_all_types()), ("v2-fixed", fixed_shape_add())]:
            assert upload(c, name, data).status_code == 201


def _binary_request(
    arrays: dict[str, np.ndarray], outputs: list[str] | None = None, binary_out: bool = True, rid: str | None = None
) -> tuple[bytes, dict[str, str]]:
    header: dict[str, object] = {
        "inputs": [
            {"name": n, "shape": list(a.shape), "datatype": _v2(a), "parameters": {"binary_data_size": a.nbytes}}
            for n, a in arrays.items()
        ]
    }
    if rid:
        header["id"] = rid
    if outputs:
        header["outputs"] = [{"name": o, "parameters": {"binary_data": binary_out}} for o in outputs]
    else:
        header["parameters"] = {"binary_data_output": binary_out}
    js = json.dumps(header).encode()
    body = js + b"".join(a.tobytes() for a in arrays.values())
    return body, {"Inference-Header-Content-Length": str(len(js))}


def _v2(a: np.ndarray) -> str:
    return next(k for k, v in NP.items() if np.dtype(v) == a.dtype)


def _parse_binary_response(r: httpx.Response) -> tuple[dict, dict[str, np.ndarray]]:  # type: ignore[type-arg]
    n = int(r.headers["inference-header-content-length"])
    header = json.loads(r.content[:n])
    out, off = {}, n
    for o in header["outputs"]:
        size = o["parameters"]["binary_data_size"]
        out[o["name"]] = np.frombuffer(r.content[off : off + size], dtype=NP[o["datatype"]]).reshape(o["shape"])
        off += size
    assert off == len(r.content)
    return header, out


def test_health_and_server_metadata(client: httpx.Client) -> None:
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    meta = client.get("/v2").json()
    assert meta["name"] == "slimserve" and "binary_tensor_data" in meta["extensions"]


def test_model_metadata_and_ready(client: httpx.Client, models: None) -> None:
    m = client.get("/v2/models/v2-mlp").json()
    assert m["name"] == "v2-mlp" and m["versions"] == ["1"]
    assert m["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert [o["name"] for o in m["outputs"]] == ["probs", "logits"]
    assert client.get("/v2/models/v2-mlp/versions/1").status_code == 200
    assert client.get("/v2/models/v2-mlp/ready").json()["ready"] is True
    assert client.get("/v2/models/v2-mlp/versions/1/ready").status_code == 200
    assert client.get("/v2/models/v2-mlp:original").json()["parameters"]["variant"] == "original"
    assert client.get("/v2/models/nope").status_code == 404
    assert client.get("/v2/models/v2-mlp/versions/7").status_code == 404
    assert client.get("/v2/models/v2-mlp/versions/x").status_code == 400
    assert client.get("/v2/models/v2-mlp:int8").status_code == 404


def test_infer_json_matches_reference(client: httpx.Client, models: None) -> None:
    x = np.random.default_rng(1).random((3, 4), dtype=np.float32)
    body = {"id": "req-7", "inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32", "data": x.tolist()}]}
    r = client.post("/v2/models/v2-mlp/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"] == "req-7" and out["model_name"] == "v2-mlp" and out["model_version"] == "1"
    probs = next(o for o in out["outputs"] if o["name"] == "probs")
    assert probs["shape"] == [3, 3] and probs["datatype"] == "FP32"
    np.testing.assert_allclose(np.array(probs["data"]).reshape(3, 3), mlp_reference(x), rtol=1e-5, atol=1e-6)


def test_requested_outputs_honoured(client: httpx.Client, models: None) -> None:
    body = {
        "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}],
        "outputs": [{"name": "logits"}],
    }
    out = client.post("/v2/models/v2-mlp/versions/1/infer", json=body).json()
    assert [o["name"] for o in out["outputs"]] == ["logits"]
    body["outputs"] = [{"name": "nope"}]
    r = client.post("/v2/models/v2-mlp/infer", json=body)
    assert r.status_code == 400 and "nope" in r.json()["error"]


def test_binary_tensors_every_datatype(client: httpx.Client, models: None) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for t in IDENTITY_TYPES:
        a = (rng.random((2, 3)) * 100).astype(NP[t]) if t != "BOOL" else rng.random((2, 3)) > 0.5
        arrays[f"in_{t}"] = a
    body, headers = _binary_request(arrays, rid="bin-1")
    r = client.post("/v2/models/v2-types/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    header, outs = _parse_binary_response(r)
    assert header["id"] == "bin-1"
    for t in IDENTITY_TYPES:
        np.testing.assert_array_equal(outs[f"out_{t}"], arrays[f"in_{t}"])
        assert outs[f"out_{t}"].dtype == np.dtype(NP[t])


def test_json_every_datatype(client: httpx.Client, models: None) -> None:
    inputs = []
    for t in IDENTITY_TYPES:
        data = [True, False, True, False, True, True] if t == "BOOL" else [1, 2, 3, 4, 5, 6]
        inputs.append({"name": f"in_{t}", "shape": [2, 3], "datatype": t, "data": data})
    r = client.post("/v2/models/v2-types/infer", json={"inputs": inputs})
    assert r.status_code == 200, r.text
    by_name = {o["name"]: o for o in r.json()["outputs"]}
    assert by_name["out_BOOL"]["data"] == [True, False, True, False, True, True]
    assert by_name["out_FP16"]["data"] == [1, 2, 3, 4, 5, 6] and by_name["out_FP16"]["datatype"] == "FP16"
    assert by_name["out_INT64"]["data"] == [1, 2, 3, 4, 5, 6]


def test_mixed_binary_output_selection(client: httpx.Client, models: None) -> None:
    x = np.ones((1, 4), np.float32)
    body, headers = _binary_request({"x": x}, outputs=["logits"], binary_out=False)
    r = client.post("/v2/models/v2-mlp/infer", content=body, headers=headers)
    assert r.status_code == 200 and "inference-header-content-length" not in r.headers
    assert r.json()["outputs"][0]["name"] == "logits"


def test_gzip_request_body(client: httpx.Client, models: None) -> None:
    raw = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]})
    r = client.post("/v2/models/v2-mlp/infer", content=gzip.compress(raw), headers={"Content-Encoding": "gzip"})
    assert r.status_code == 200, r.text


def test_non_batch_model(client: httpx.Client, models: None) -> None:
    body = {
        "inputs": [
            {"name": "a", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]},
            {"name": "b", "shape": [2, 2], "datatype": "FP32", "data": [1, 1, 1, 1]},
        ]
    }
    out = client.post("/v2/models/v2-fixed/infer", json=body).json()
    assert out["outputs"][0]["data"] == [2, 3, 4, 5]
    cfg = client.get("/v2/models/v2-fixed/config").json()
    assert cfg["max_batch_size"] == 0 and cfg["input"][0]["dims"] == [2, 2] and "dynamic_batching" not in cfg


BAD_INFER = [
    ("not-json", b"{not json", {}, 400, "not valid JSON"),
    ("not-object", b"[1,2]", {}, 400, "JSON object"),
    ("no-inputs", b'{"inputs": []}', {}, 400, "non-empty"),
    ("unknown-input", b'{"inputs":[{"name":"q","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}', {}, 400, "'q'"),
    (
        "wrong-dtype",
        b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP64","data":[1,2,3,4]}]}',
        {},
        400,
        "expects FP32",
    ),
    ("wrong-rank", b'{"inputs":[{"name":"x","shape":[4],"datatype":"FP32","data":[1,2,3,4]}]}', {}, 400, "rank"),
    ("wrong-dim", b'{"inputs":[{"name":"x","shape":[1,5],"datatype":"FP32","data":[1,2,3,4,5]}]}', {}, 400, "expects"),
    (
        "count-mismatch",
        b'{"inputs":[{"name":"x","shape":[2,4],"datatype":"FP32","data":[1,2,3,4]}]}',
        {},
        400,
        "elements",
    ),
    (
        "string-data",
        b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":["a","b","c","d"]}]}',
        {},
        400,
        "FP32",
    ),
    (
        "negative-shape",
        b'{"inputs":[{"name":"x","shape":[-1,4],"datatype":"FP32","data":[1,2,3,4]}]}',
        {},
        400,
        "non-negative",
    ),
    (
        "binary-short",
        b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","parameters":{"binary_data_size":16}}]}',
        {"Inference-Header-Content-Length": "94"},
        400,
        "binary",
    ),
    ("header-len-bad", b'{"inputs":[]}', {"Inference-Header-Content-Length": "abc"}, 400, "integer"),
    ("header-len-out", b'{"inputs":[]}', {"Inference-Header-Content-Length": "9999"}, 400, "outside"),
    (
        "over-batch",
        orjson.dumps({"inputs": [{"name": "x", "shape": [33, 4], "datatype": "FP32", "data": [0.0] * 132}]}),
        {},
        400,
        "max_batch_size",
    ),
    (
        "bad-timeout",
        b'{"parameters":{"timeout":"soon"},"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}',
        {},
        400,
        "timeout",
    ),
    (
        "deep-json",
        b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":' + b"[" * 100 + b"1" + b"]" * 100 + b"}]}",
        {},
        400,
        "",
    ),
    ("bad-encoding", b"{}", {"Content-Encoding": "br"}, 400, "Content-Encoding"),
    ("bad-gzip", b"not gzip", {"Content-Encoding": "gzip"}, 400, "gzip"),
]


@pytest.mark.parametrize(("case", "body", "headers", "status", "message"), BAD_INFER, ids=[c[0] for c in BAD_INFER])
def test_bad_infer_requests(
    client: httpx.Client, models: None, case: str, body: bytes, headers: dict[str, str], status: int, message: str
) -> None:
    r = client.post("/v2/models/v2-mlp/infer", content=body, headers=headers)
    assert r.status_code == status, (case, r.text)
    assert message in r.json()["error"], r.json()


def _all_types_body(override: str, data: list[object]) -> dict[str, object]:
    valid = {"BOOL": [True, False, True]}
    inputs = [
        {"name": f"in_{t}", "shape": [1, 3], "datatype": t, "data": data if t == override else valid.get(t, [1, 2, 3])}
        for t in IDENTITY_TYPES
    ]
    return {"inputs": inputs}


STRICT_JSON = [
    ("FP32", ["NaN", 1, 2], "JSON numbers"),
    ("FP32", ["1.5", 1, 2], "JSON numbers"),
    ("FP32", [True, 1.0, 2.0], "JSON numbers"),
    ("FP32", [None, 1, 2], "JSON numbers"),
    ("FP32", [1e39, 1, 2], "out of the FP32 range"),
    ("FP16", [70000, 1, 2], "out of the FP16 range"),
    ("FP64", ["Infinity", 1, 2], "JSON numbers"),
    ("UINT8", [300, 1, 2], "JSON integers from 0 to 255"),
    ("UINT8", [-1, 1, 2], "JSON integers from 0 to 255"),
    ("INT8", [1.5, 1, 2], "JSON integers from -128 to 127"),
    ("INT64", [False, 1, 2], "JSON numbers"),
    ("BOOL", [1, 0, 1], "true/false"),
]


@pytest.mark.parametrize(("datatype", "data", "message"), STRICT_JSON, ids=[f"{c[0]}-{c[1][0]}" for c in STRICT_JSON])
def test_json_tensor_values_are_strict(
    client: httpx.Client, models: None, datatype: str, data: list[object], message: str
) -> None:
    assert client.post("/v2/models/v2-types/infer", json=_all_types_body("FP32", [1.5, 2, 3])).status_code == 200
    r = client.post("/v2/models/v2-types/infer", json=_all_types_body(datatype, data))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert f"in_{datatype}" in error and message in error, error


def test_a_model_that_does_not_batch_as_declared_is_a_server_error(server, client: httpx.Client) -> None:  # type: ignore[no-untyped-def]
    """Its outputs cannot be split back into the merged requests: the server's (the model's) fault, 500,
    counted as server_error and logged once per request with the variant, never blamed on the client."""
    config = {"max_batch_size": 8, "batching": {"max_queue_delay_us": 10_000_000, "preferred_batch_sizes": [2]}}
    assert upload(client, "v2-collapse", batch_collapsing(), config=json.dumps(config)).status_code == 201
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}

    async def two_at_once() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            return list(await asyncio.gather(*(c.post("/v2/models/v2-collapse/infer", json=body) for _ in range(2))))

    # the first request waits for a second (preferred size 2, delay 10 s): the two form one batch
    responses = asyncio.run(two_at_once())
    for r in responses:
        assert r.status_code == 500, r.text
        assert "one row per input row" in r.json()["error"] and "Traceback" not in r.text
    text = client.get("/metrics").text

    def count(outcome: str) -> float:
        for line in text.splitlines():
            if line.startswith("slimserve_requests_total{") and all(
                f in line for f in ('model="v2-collapse"', f'outcome="{outcome}"')
            ):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    assert count("server_error") == 2 and count("client_error") == 0 and count("success") == 0
    log = server.log.read_text()
    assert sum("v2-collapse:original version 1" in line for line in log.splitlines()) == 2


def test_unknown_model_infer_is_404(client: httpx.Client) -> None:
    r = client.post("/v2/models/missing/infer", json={"inputs": []})
    assert r.status_code == 404 and "missing" in r.json()["error"]


def test_statistics_extension(client: httpx.Client, models: None) -> None:
    body = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [0.5] * 8}]}
    before = client.get("/v2/models/v2-mlp/stats").json()["model_stats"][0]
    for _ in range(3):
        assert client.post("/v2/models/v2-mlp/infer", json=body).status_code == 200
    st = client.get("/v2/models/v2-mlp/stats").json()["model_stats"][0]
    assert st["inference_count"] - before["inference_count"] == 6
    assert st["execution_count"] - before["execution_count"] == 3
    inf = st["inference_stats"]
    assert inf["success"]["count"] - before["inference_stats"]["success"]["count"] == 3
    assert inf["compute_infer"]["ns"] > 0 and inf["queue"]["count"] >= 3
    assert any(b["batch_size"] == 2 for b in st["batch_stats"])
    names = [s["name"] for s in client.get("/v2/models/stats").json()["model_stats"]]
    assert "v2-mlp" in names


def test_repository_extension(client: httpx.Client, models: None) -> None:
    index = client.post("/v2/repository/index").json()
    assert {"name": "v2-mlp", "version": "1", "state": "READY"} in index
    assert client.post("/v2/repository/models/v2-fixed/unload").status_code == 200
    assert client.get("/v2/models/v2-fixed/ready").status_code == 404
    entry = next(e for e in client.post("/v2/repository/index").json() if e["name"] == "v2-fixed")
    assert entry["state"] == "UNAVAILABLE"
    assert client.post("/v2/repository/models/v2-fixed/load").status_code == 200
    assert client.get("/v2/models/v2-fixed/ready").status_code == 200
    assert client.post("/v2/repository/models/nope/load").status_code == 404


def test_metrics_exposed_per_variant(client: httpx.Client, models: None) -> None:
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    client.post("/v2/models/v2-mlp/infer", json=body)
    client.post("/v2/models/v2-mlp/infer", json={"inputs": [{"name": "bad"}]})
    text = client.get("/metrics").text
    labels = 'backend="onnxruntime-cpu",model="v2-mlp",variant="original",version="1"'
    for family in (
        "slimserve_request_duration_seconds_bucket",
        "slimserve_queue_duration_seconds_bucket",
        "slimserve_compute_duration_seconds_bucket",
        "slimserve_batch_size_bucket",
    ):
        assert any(line.startswith(family) and labels in _sorted_labels(line) for line in text.splitlines()), family
    assert "slimserve_model_load_duration_seconds_count" in text
    rest = [line for line in text.splitlines() if line.startswith("slimserve_requests_total") and "v2-mlp" in line]
    assert rest and all('protocol="rest"' in line or 'protocol="grpc"' in line for line in rest)
    assert any('protocol="rest"' in line and 'outcome="success"' in line and not line.endswith(" 0.0") for line in rest)
    assert 'outcome="success"' in text and 'outcome="client_error"' in text
    assert "slimserve_inflight_requests" in text and "slimserve_variant_size_bytes" in text


def _sorted_labels(line: str) -> str:
    if "{" not in line:
        return ""
    inner = line[line.index("{") + 1 : line.index("}")]
    parts = sorted(p for p in inner.split(",") if not p.startswith(("le=", "protocol=")))
    return ",".join(parts)
