"""The gRPC listener against unmodified Triton clients: tritonclient.grpc (sync, asyncio, streaming) and a raw
grpc channel for malformed input. One token-protected server for the module; answers are compared with the REST
answers of the same server."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from model_store import NewVariant, open_store
from tests.conftest import Server, ServerFactory, metric, upload, wait_for
from tests.onnx_models import identity_every_type, mlp, mlp_reference, string_join

grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")
httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
from tritonclient.utils import InferenceServerException  # noqa: E402

TOKEN = "infer-token"
ADMIN = "admin-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
ADMIN_AUTH = {"authorization": f"Bearer {ADMIN}"}
SMALL_CAP = 64 * 1024
BYTES_LEN_CAP = 1000


@pytest.fixture(scope="module")
def srv(server_factory: ServerFactory) -> Server:
    s = server_factory(
        SLIMSERVE_INFERENCE_TOKEN=TOKEN,
        SLIMSERVE_ADMIN_TOKEN=ADMIN,
        SLIMSERVE_MAX_INFER_BODY_BYTES=str(SMALL_CAP),
        SLIMSERVE_MAX_BYTES_ELEMENT_LEN=str(BYTES_LEN_CAP),
    )
    with s.client(ADMIN) as c:
        for name, data in (("g-mlp", mlp()), ("g-types", identity_every_type()), ("g-str", string_join())):
            r = upload(c, name, data)
            assert r.status_code == 201, r.text
    return s


@pytest.fixture(scope="module")
def gc(srv: Server) -> Iterator[Any]:
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
    yield client
    client.close()


@pytest.fixture(scope="module")
def hc(srv: Server) -> Iterator[Any]:
    client = httpclient.InferenceServerClient(srv.url.removeprefix("http://"))
    yield client
    client.close()


def _every_type_inputs(rows: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    out: dict[str, np.ndarray] = {}
    for dt in ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"):
        info = np.iinfo(np.dtype(dt.lower()))
        out[dt] = rng.integers(info.min, info.max, (rows, 3), dtype=np.dtype(dt.lower()), endpoint=True)
    out["FP16"] = rng.standard_normal((rows, 3)).astype(np.float16)
    out["FP32"] = rng.standard_normal((rows, 3)).astype(np.float32)
    out["FP64"] = rng.standard_normal((rows, 3))
    out["BOOL"] = rng.integers(0, 2, (rows, 3)).astype(bool)
    out["BYTES"] = np.array([["", "héllo", "a b"], ["x" * 300, "\u2603", "z"]][:rows], dtype=object)
    return out


def _infer_inputs(module: Any, arrays: dict[str, np.ndarray], binary: bool = True) -> list[Any]:
    inputs = []
    for dt, arr in arrays.items():
        inp = module.InferInput(f"in_{dt}", list(arr.shape), dt)
        if module is httpclient:
            inp.set_data_from_numpy(arr, binary_data=binary)
        else:
            inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


def _infer_once(gc: Any) -> None:
    """One successful gRPC inference on g-mlp, for the checks that count it."""
    inp = grpcclient.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(np.ones((1, 4), np.float32))
    assert gc.infer("g-mlp", [inp], headers=dict(AUTH)).as_numpy("probs").shape == (1, 3)


def test_infer_equals_rest_and_the_reference(gc: Any, hc: Any) -> None:
    x = np.random.default_rng(1).random((5, 4), dtype=np.float32)
    inp = grpcclient.InferInput("x", [5, 4], "FP32")
    inp.set_data_from_numpy(x)
    res = gc.infer(
        "g-mlp", [inp], outputs=[grpcclient.InferRequestedOutput("probs")], request_id="r7", headers=dict(AUTH)
    )
    np.testing.assert_allclose(res.as_numpy("probs"), mlp_reference(x), rtol=1e-5, atol=1e-6)
    assert res.as_numpy("logits") is None and res.get_response().id == "r7"
    hin = httpclient.InferInput("x", [5, 4], "FP32")
    hin.set_data_from_numpy(x)
    rest = hc.infer("g-mlp", [hin], headers=dict(AUTH))
    assert np.array_equal(rest.as_numpy("probs"), res.as_numpy("probs"))
    variant = gc.infer("g-mlp:original", [inp], model_version="1", headers=dict(AUTH))  # all outputs, a named variant
    assert variant.as_numpy("logits").shape == (5, 3)


@pytest.mark.parametrize("rest_binary", [True, False])
def test_every_datatype_bytes_included_equals_rest(gc: Any, hc: Any, rest_binary: bool) -> None:
    arrays = _every_type_inputs()
    g = gc.infer("g-types", _infer_inputs(grpcclient, arrays), headers=dict(AUTH))
    outs = [httpclient.InferRequestedOutput(f"out_{dt}", binary_data=rest_binary) for dt in arrays]
    h = hc.infer("g-types", _infer_inputs(httpclient, arrays, rest_binary), outputs=outs, headers=dict(AUTH))
    for dt, arr in arrays.items():
        got, rest = g.as_numpy(f"out_{dt}"), h.as_numpy(f"out_{dt}")
        if dt == "BYTES":  # tritonclient gives bytes elements over gRPC and binary REST, str over JSON REST
            want = [[s.encode() for s in row] for row in arr.tolist()]
            assert got.tolist() == want
            assert [[v if isinstance(v, bytes) else v.encode() for v in row] for row in rest.tolist()] == want
        else:
            assert got.dtype == arr.dtype and np.array_equal(got, arr), dt
            assert np.array_equal(rest, got), dt


def test_string_model_over_grpc(gc: Any) -> None:
    a = np.array([[b"left"], ["é".encode()]], dtype=object)
    b = np.array([[b"right"], [b""]], dtype=object)
    ins = [grpcclient.InferInput("a", [2, 1], "BYTES"), grpcclient.InferInput("b", [2, 1], "BYTES")]
    ins[0].set_data_from_numpy(a)
    ins[1].set_data_from_numpy(b)
    res = gc.infer("g-str", ins, headers=dict(AUTH))
    assert res.as_numpy("joined").tolist() == [[b"left", b"right"], ["é".encode(), b""]]
    assert res.as_numpy("first").tolist() == [[b"left"], ["é".encode()]]


def test_a_bytes_element_over_the_cap_is_refused_by_both_protocols(gc: Any, srv: Server) -> None:
    words = np.array([[b"ok"], [b"x" * (BYTES_LEN_CAP + 1)]], dtype=object)
    ins = [grpcclient.InferInput(n, [2, 1], "BYTES") for n in ("a", "b")]
    for i in ins:
        i.set_data_from_numpy(words)
    with pytest.raises(InferenceServerException) as e:
        gc.infer("g-str", ins, headers=dict(AUTH))
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and "SLIMSERVE_MAX_BYTES_ELEMENT_LEN" in e.value.message()
    over = "x" * (BYTES_LEN_CAP + 1)
    body = {"inputs": [{"name": n, "datatype": "BYTES", "shape": [2, 1], "data": ["ok", over]} for n in "ab"]}
    with srv.client(TOKEN) as c:
        r = c.post("/v2/models/g-str/infer", json=body)
    assert r.status_code == 400 and "SLIMSERVE_MAX_BYTES_ELEMENT_LEN" in r.json()["error"]


def test_health_metadata_config_statistics_repository(gc: Any, srv: Server) -> None:
    assert gc.is_server_live() and gc.is_server_ready()  # open, as the REST probes
    assert gc.is_model_ready("g-mlp", headers=dict(AUTH))
    assert not gc.is_model_ready("no-such-model", headers=dict(AUTH))
    meta = gc.get_server_metadata(headers=dict(AUTH))
    assert meta.name == "slimserve" and "model_repository" in meta.extensions
    mm = gc.get_model_metadata("g-mlp", headers=dict(AUTH))
    assert mm.inputs[0].name == "x" and list(mm.inputs[0].shape) == [-1, 4] and mm.platform == "onnxruntime_onnx"
    cfg = gc.get_model_config("g-mlp", headers=dict(AUTH)).config
    assert cfg.max_batch_size == 32 and list(cfg.input[0].dims) == [4]
    with srv.client(TOKEN) as c:
        assert c.get("/v2/models/g-mlp/config").json()["max_batch_size"] == cfg.max_batch_size
    _infer_once(gc)
    stats = gc.get_inference_statistics("g-mlp", headers=dict(AUTH))
    assert stats.model_stats[0].inference_count >= 1
    assert any(m.name == "g-types" for m in gc.get_inference_statistics(headers=dict(AUTH)).model_stats)
    index = gc.get_model_repository_index(headers=dict(ADMIN_AUTH))
    assert {m.name for m in index.models} >= {"g-mlp", "g-types", "g-str"}
    with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
        gc.get_model_repository_index(headers=dict(AUTH))  # the inference token is not enough for management
    gc.unload_model("g-str", headers=dict(ADMIN_AUTH))
    assert not gc.is_model_ready("g-str", headers=dict(AUTH))
    gc.load_model("g-str", headers=dict(ADMIN_AUTH))
    assert gc.is_model_ready("g-str", headers=dict(AUTH))
    with pytest.raises(InferenceServerException, match="NOT_FOUND"):
        gc.load_model("no-such-model", headers=dict(ADMIN_AUTH))


def test_asyncio_client(srv: Server) -> None:
    import tritonclient.grpc.aio as aioclient

    async def body() -> np.ndarray:
        client = aioclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
        try:
            x = np.ones((3, 4), np.float32)
            inp = aioclient.InferInput("x", [3, 4], "FP32")
            inp.set_data_from_numpy(x)
            results = await asyncio.gather(*(client.infer("g-mlp", [inp], headers=dict(AUTH)) for _ in range(8)))
            assert await client.is_model_ready("g-mlp", headers=dict(AUTH))
            return np.stack([r.as_numpy("probs") for r in results])
        finally:
            await client.close()

    out = asyncio.run(body())
    np.testing.assert_allclose(out, np.broadcast_to(mlp_reference(np.ones((3, 4), np.float32)), out.shape), rtol=1e-5)


def test_streaming_answers_each_request_and_goes_on_after_an_error(gc: Any) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    gc.start_stream(callback=lambda result, error: answers.put((result, error)), headers=dict(AUTH))
    try:
        xs = {f"s{i}": np.full((1, 4), i, np.float32) for i in range(4)}
        for rid, x in xs.items():
            inp = grpcclient.InferInput("x", [1, 4], "FP32")
            inp.set_data_from_numpy(x)
            gc.async_stream_infer("g-mlp", [inp], request_id=rid)
            if rid == "s1":
                bad = grpcclient.InferInput("x", [1, 3], "FP32")
                bad.set_data_from_numpy(np.ones((1, 3), np.float32))
                gc.async_stream_infer("g-mlp", [bad], request_id="bad")
        got: dict[str, Any] = {}
        errors = []
        for _ in range(len(xs) + 1):
            result, error = answers.get(timeout=30)
            if error is not None:
                errors.append(str(error))
            else:
                got[result.get_response().id] = result.as_numpy("probs")
    finally:
        gc.stop_stream()
    assert sorted(got) == sorted(xs)
    for rid, x in xs.items():
        np.testing.assert_allclose(got[rid], mlp_reference(x), rtol=1e-5, atol=1e-6)
    assert len(errors) == 1 and "expects" in errors[0]


# -- bad input: the right status and a message, and the server goes on ------------------------------------------


def _raw_call(srv: Server, method: str, payload: bytes, metadata: tuple[tuple[str, str], ...]) -> grpc.RpcError:
    with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as channel:
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
        with pytest.raises(grpc.RpcError) as e:
            call(payload, metadata=metadata, timeout=30)
    return e.value


def _mlp_request(shape: list[int], raw: bytes | None = None, contents: list[float] | None = None) -> bytes:
    from tritonclient.grpc import service_pb2 as pb  # the client's own stubs: what a client sends

    req = pb.ModelInferRequest(model_name="g-mlp")
    t = req.inputs.add(name="x", datatype="FP32", shape=shape)
    if contents is not None:
        t.contents.fp32_contents.extend(contents)
    if raw is not None:
        req.raw_input_contents.append(raw)
    return req.SerializeToString()


@pytest.mark.parametrize(
    ("payload", "code", "match"),
    [
        pytest.param(
            b"\xff\xff\xff\xff", grpc.StatusCode.INVALID_ARGUMENT, "not a valid protobuf", id="malformed protobuf"
        ),
        pytest.param(
            _mlp_request([2, 4], contents=[1.0] * 7),
            grpc.StatusCode.INVALID_ARGUMENT,
            "needs 8",
            id="contents not matching the shape",
        ),
        pytest.param(
            _mlp_request([2, 4], raw=b"\0" * 31),
            grpc.StatusCode.INVALID_ARGUMENT,
            "needs 32",
            id="raw of the wrong size",
        ),
        pytest.param(
            _mlp_request([1, 4], raw=b"\0" * (SMALL_CAP + 1)),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "",
            id="over the message cap",
        ),
    ],
)
def test_bad_requests_get_the_right_status(
    srv: Server, gc: Any, hc: Any, payload: bytes, code: Any, match: str
) -> None:
    err = _raw_call(srv, "ModelInfer", payload, tuple(AUTH.items()))
    assert err.code() == code, err.details()
    assert match in (err.details() or "")
    test_infer_equals_rest_and_the_reference(gc, hc)


def test_unknown_model_or_variant_and_missing_token(gc: Any) -> None:
    inp = grpcclient.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(np.ones((1, 4), np.float32))
    for name in ("no-such-model", "g-mlp:no-such-variant"):
        with pytest.raises(InferenceServerException) as e:
            gc.infer(name, [inp], headers=dict(AUTH))
        assert e.value.status() == "StatusCode.NOT_FOUND" and e.value.message()
    with pytest.raises(InferenceServerException) as e:
        gc.infer("g-mlp", [inp])
    assert e.value.status() == "StatusCode.UNAUTHENTICATED" and "token" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        gc.infer("g-mlp", [inp], headers={"authorization": "Bearer wrong"})
    assert e.value.status() == "StatusCode.UNAUTHENTICATED"
    assert gc.infer("g-mlp", [inp], headers=dict(AUTH)).as_numpy("probs").shape == (1, 3)  # still serving


def test_metrics_count_each_protocol(srv: Server, gc: Any) -> None:
    _infer_once(gc)
    text = httpx.get(f"{srv.url}/metrics").text
    grpc_ok = metric(text, "slimserve_requests_total", model="g-mlp", protocol="grpc", outcome="success")
    assert grpc_ok is not None and grpc_ok >= 1


def test_health_and_reflection_services(srv: Server) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(iter(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))))
        names = {s.name for s in reply.list_services_response.service}
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


def test_the_ready_index_lists_served_versions_only(gc: Any, srv: Server) -> None:
    from tritonclient.grpc import service_pb2 as pb  # the client's own stubs: what a client sends

    def index(ready: bool) -> dict[str, str]:
        with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as channel:
            call = channel.unary_unary(
                "/inference.GRPCInferenceService/RepositoryIndex",
                request_serializer=pb.RepositoryIndexRequest.SerializeToString,
                response_deserializer=pb.RepositoryIndexResponse.FromString,
            )
            answer = call(pb.RepositoryIndexRequest(ready=ready), metadata=tuple(ADMIN_AUTH.items()), timeout=30)
        return {m.name: m.state for m in answer.models}

    gc.unload_model("g-str", headers=dict(ADMIN_AUTH))
    try:
        assert index(ready=False)["g-str"] == "UNAVAILABLE"
        ready = index(ready=True)
        assert "g-str" not in ready and ready["g-mlp"] == "READY"
        assert set(ready.values()) == {"READY"}
    finally:
        gc.load_model("g-str", headers=dict(ADMIN_AUTH))


def test_the_extensions_not_implemented_answer_unimplemented(srv: Server) -> None:
    """Shared memory, trace and logging: the README says they answer UNIMPLEMENTED, and they do."""
    for method in ("SystemSharedMemoryStatus", "CudaSharedMemoryRegister", "TraceSetting", "LogSettings"):
        err = _raw_call(srv, method, b"", tuple(ADMIN_AUTH.items()))
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED, (method, err.code())


def test_a_variant_that_failed_to_load_answers_unavailable(srv: Server, gc: Any) -> None:
    """A variant the catalogue holds that cannot load (its blob is not ONNX) answers UNAVAILABLE with the reason, as
    REST answers 503 (Triton's mapping); the other variants and models keep serving. Last in the module: it adds a
    model."""
    with srv.client(ADMIN) as c:
        assert upload(c, "g-broken", mlp()).status_code == 201
    store = open_store(f"sqlite:///{srv.data_dir / 'catalog.db'}", srv.data_dir / "blobs")
    try:
        store.catalog.add_variant(
            "g-broken", 1, NewVariant("broken", "original", store.blobs.put_bytes(b"not onnx"), 8)
        )
    finally:
        store.close()
    with srv.client(ADMIN) as c:

        def states() -> dict[str, str]:
            return {v["name"]: v["state"] for v in c.get("/v1/models/g-broken").json()["versions"][0]["variants"]}

        wait_for("the broken variant's failure", lambda: states() == {"original": "ready", "broken": "failed"}, 30)
    inp = grpcclient.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(np.ones((1, 4), np.float32))
    with pytest.raises(InferenceServerException) as e:
        gc.infer("g-broken:broken", [inp], headers=dict(AUTH))
    assert e.value.status() == "StatusCode.UNAVAILABLE" and "failed to load" in e.value.message(), e.value
    assert gc.infer("g-broken", [inp], headers=dict(AUTH)).as_numpy("probs").shape == (1, 3)
    _infer_once(gc)
