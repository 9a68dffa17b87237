"""The gRPC codec: typed contents and raw contents for every datatype, and its refusals (400 with a message)."""

from __future__ import annotations

import numpy as np
import pytest

from backends import TensorSpec
from service.errors import BadRequest
from service.grpc._generated import grpc_service_pb2 as pb
from service.grpc.codec import CONTENTS_FIELD, decode_request, encode_response
from service.tensors import TensorLimits, join_length_prefixed

OUTPUTS = frozenset({"y"})
VALUES = {
    "BOOL": [True, False, True],
    "INT8": [-128, 0, 127],
    "INT16": [-32768, 1, 32767],
    "INT32": [-(2**31), 2, 2**31 - 1],
    "INT64": [-(2**63), 3, 2**63 - 1],
    "UINT8": [0, 1, 255],
    "UINT16": [0, 1, 65535],
    "UINT32": [0, 1, 2**32 - 1],
    "UINT64": [0, 1, 2**64 - 1],
    "FP32": [0.5, -1.25, 3.0],
    "FP64": [0.1, -1e300, 2.0],
    "BYTES": [b"a", "é".encode(), b""],
}


def _req(dt: str, values: list[object] | None = None, raw: bytes | None = None, shape=(1, 3)) -> pb.ModelInferRequest:  # type: ignore[no-untyped-def]
    req = pb.ModelInferRequest(model_name="m", id="r1")
    t = req.inputs.add(name="x", datatype=dt, shape=list(shape))
    if values is not None:
        getattr(t.contents, CONTENTS_FIELD[dt]).extend(values)
    if raw is not None:
        req.raw_input_contents.append(raw)
    return req


def _decode(req: pb.ModelInferRequest, dt: str, limits: TensorLimits | None = None):  # type: ignore[no-untyped-def]
    spec = {"x": TensorSpec("x", dt, (-1, 3))}
    return decode_request(req, spec, OUTPUTS, 8, limits or TensorLimits())


@pytest.mark.parametrize("dt", list(VALUES))
def test_typed_and_raw_contents_decode_alike(dt: str) -> None:
    typed = _decode(_req(dt, VALUES[dt]), dt).inputs["x"]
    if dt == "BYTES":
        raw_bytes = join_length_prefixed(VALUES[dt])  # type: ignore[arg-type]
        want = [[b.decode() for b in VALUES[dt]]]  # type: ignore[union-attr]
    else:
        arr = np.array([VALUES[dt]], dtype=typed.dtype)
        raw_bytes, want = arr.tobytes(), arr.tolist()
    raw = _decode(_req(dt, raw=raw_bytes), dt).inputs["x"]
    assert typed.tolist() == raw.tolist() == want


@pytest.mark.parametrize(
    ("req", "dt", "match"),
    [
        (_req("INT8", [128, 0, 0]), "INT8", "from -128 to 127"),
        (_req("UINT16", [65536, 0, 0]), "UINT16", "from 0 to 65535"),
        (_req("FP32", [1.0, 2.0]), "FP32", "needs 3"),
        (_req("FP32", raw=b"\0" * 11), "FP32", "needs 12"),
        (_req("FP32", [1.0, 2.0, 3.0], raw=b"\0" * 12), "FP32", "also carries raw_input_contents"),
        (_req("FP32", [1.0, 2.0, 3.0], shape=(1, 4)), "FP32", "expects"),
        (_req("INT32", [1, 2, 3]), "FP32", "datatype"),
        (_req("BYTES", raw=b"\x05\0\0\0ab"), "BYTES", "runs past the end"),
        (_req("BYTES", [b"\xff", b"", b""]), "BYTES", "not UTF-8"),
        (_req("BYTES", [b"abcd", b"", b""]), "BYTES", "SLIMSERVE_MAX_BYTES_ELEMENT_LEN"),
    ],
)
def test_refusals_are_400_with_a_message(req: pb.ModelInferRequest, dt: str, match: str) -> None:
    with pytest.raises(BadRequest, match=match):
        _decode(req, dt, TensorLimits(max_bytes_element_len=3))


def test_fp16_raw_contents_decode() -> None:  # FP16 has no typed contents but travels raw
    assert _decode(_req("FP16", raw=b"\0" * 6), "FP16").inputs["x"].dtype == np.float16


def test_fp16_typed_contents_are_refused() -> None:
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="x", datatype="FP16", shape=[1, 3]).contents.fp32_contents.extend([1, 2, 3])
    with pytest.raises(BadRequest, match="raw_input_contents only"):
        _decode(req, "FP16")


def test_outputs_timeout_and_shared_memory() -> None:
    req = _req("FP32", [1.0, 2.0, 3.0])
    req.outputs.add(name="y")
    req.parameters["timeout"].int64_param = 5000
    d = _decode(req, "FP32")
    assert d.outputs == ("y",) and d.timeout_us == 5000 and d.id == "r1" and d.rows == 1
    req.outputs.add(name="nope")
    with pytest.raises(BadRequest, match="unknown output"):
        _decode(req, "FP32")
    shm = _req("FP32", [1.0, 2.0, 3.0])
    shm.inputs[0].parameters["shared_memory_region"].string_param = "r"
    with pytest.raises(BadRequest, match="shared-memory"):
        _decode(shm, "FP32")


def test_encode_raw_outputs() -> None:
    y = np.arange(6, dtype=np.float32).reshape(2, 3)
    s = np.array([["a", "é"]], dtype=object)
    resp = encode_response("m", 2, "r1", {"y": y, "s": s}, ["y", "s"])
    assert [(o.name, o.datatype, list(o.shape)) for o in resp.outputs] == [
        ("y", "FP32", [2, 3]),
        ("s", "BYTES", [1, 2]),
    ]
    assert resp.model_version == "2" and resp.id == "r1"
    assert np.frombuffer(resp.raw_output_contents[0], np.float32).tolist() == y.ravel().tolist()
    assert resp.raw_output_contents[1] == join_length_prefixed([b"a", "é".encode()])
