"""The KServe v2 codec in-process: JSON and binary decoding, strict JSON values, ranges, response encoding."""

from __future__ import annotations

import gzip
import json
from typing import Any

import numpy as np
import orjson
import pytest

from backends import TensorSpec
from service.errors import BadRequest, InternalError, PayloadTooLarge
from service.tensors import TensorLimits, join_length_prefixed
from service.v2codec import FLOAT_LIMITS, INT_RANGES, decode_request, decompress, encode_response

NP = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
OUTPUTS = frozenset({"y", "z"})


def _spec(datatype: str = "FP32", shape: tuple[int, ...] = (-1, 4), name: str = "x") -> dict[str, TensorSpec]:
    return {name: TensorSpec(name, datatype, shape)}


def _json(data: Any, datatype: str = "FP32", shape: list[int] | None = None, **extra: Any) -> bytes:
    item = {"name": "x", "shape": shape or [1, 4], "datatype": datatype, "data": data}
    return json.dumps({"inputs": [item], **extra}).encode()  # the stdlib writes integers of any size


def _decode(body: bytes, spec: dict[str, TensorSpec] | None = None, header_length: str | None = None, mbs: int = 8):
    return decode_request(body, header_length, spec or _spec(), OUTPUTS, mbs)


def _refused(body: bytes, spec: dict[str, TensorSpec] | None = None, header_length: str | None = None) -> str:
    with pytest.raises(BadRequest) as e:
        _decode(body, spec, header_length)
    return e.value.message


# -- JSON values: strict types ------------------------------------------------------------------------------


def test_json_numbers_decode_to_the_datatype() -> None:
    req = _decode(_json([1, 2.5, -3, 4e-3]))
    x = req.inputs["x"]
    assert x.dtype == np.float32 and x.shape == (1, 4)
    np.testing.assert_array_equal(x, np.array([[1, 2.5, -3, 4e-3]], np.float32))
    assert req.rows == 1 and req.outputs is None


def test_nested_json_data_is_accepted_when_regular() -> None:
    x = _decode(_json([[1, 2], [3, 4]], shape=[2, 2]), _spec(shape=(-1, 2))).inputs["x"]
    np.testing.assert_array_equal(x, np.array([[1, 2], [3, 4]], np.float32))
    x = _decode(_json([[1, 2, 3, 4]])).inputs["x"]
    assert x.shape == (1, 4)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (["1.5", 2, 3, 4], "string"),
        (["NaN", 2, 3, 4], "NaN spelt as a string"),
        (["Infinity", 2, 3, 4], "Infinity spelt as a string"),
        ([True, 2, 3, 4], "a boolean beside numbers"),
        ([1.0, 2.0, 3.0, False], "a boolean at the end"),
        ([True, False, True, True], "all booleans"),
        ([None, 2, 3, 4], "null"),
        ([{"v": 1}, 2, 3, 4], "an object"),
        ([[1, 2, 3, True]], "a boolean in a nested list"),
    ],
)
def test_numeric_data_takes_json_numbers_only(data: list[Any], why: str) -> None:
    msg = _refused(_json(data))
    assert "'x'" in msg and "JSON numbers" in msg, (why, msg)


@pytest.mark.parametrize("datatype", ["INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"])
def test_integer_data_takes_integers_only(datatype: str) -> None:
    spec = _spec(datatype)
    assert _decode(_json([1, 2, 3, 4], datatype), spec).inputs["x"].dtype == NP[datatype]
    for data in ([1.0, 2, 3, 4], [1.5, 2, 3, 4], [1e2, 2, 3, 4]):
        assert "JSON integers" in _refused(_json(data, datatype), spec), data
    assert "JSON numbers" in _refused(_json([True, 2, 3, 4], datatype), spec)


@pytest.mark.parametrize("datatype", sorted(INT_RANGES))
def test_integer_ranges_are_exact(datatype: str) -> None:
    lo, hi = INT_RANGES[datatype]
    info = np.iinfo(NP[datatype])
    assert (lo, hi) == (int(info.min), int(info.max))
    spec = _spec(datatype)
    x = _decode(_json([lo, hi, 0, 1], datatype), spec).inputs["x"]
    assert x.dtype == NP[datatype] and int(x[0, 0]) == lo and int(x[0, 1]) == hi
    for bad in (lo - 1, hi + 1):
        msg = _refused(_json([0, bad, 0, 0], datatype), spec)
        assert f"from {lo} to {hi}" in msg, msg


def test_integers_beyond_64_bits_and_mixed_signs_are_out_of_range() -> None:
    # orjson reads 2^64 as a float; 2^63 beside -1 makes numpy fall back to float64: both must be refused
    assert "JSON integers" in _refused(_json([2**64, 0, 0, 0], "UINT64"), _spec("UINT64"))
    assert "JSON integers" in _refused(_json([2**63, -1, 0, 0], "INT64"), _spec("INT64"))
    assert "JSON integers" in _refused(_json([2**63, -1, 0, 0], "UINT64"), _spec("UINT64"))
    x = _decode(_json([2**64 - 1, 0, 1, 2], "UINT64"), _spec("UINT64")).inputs["x"]
    assert int(x[0, 0]) == 2**64 - 1


@pytest.mark.parametrize(
    ("datatype", "ok", "bad"),
    [
        ("FP32", 3.4028235e38, 1e39),  # float32's max as numpy prints it rounds to max: accepted
        ("FP32", -3.4028235e38, -1e39),
        ("FP16", 65519.0, 65520.0),  # 65520 is the tie between 65504 and infinity: rounds to infinity
        ("FP16", 65504, 70000),
        ("FP16", -65504.0, -70000.0),
    ],
)
@pytest.mark.parametrize("size", [4, 64], ids=["small", "large"])  # the two code paths of the range check
def test_float_ranges(datatype: str, ok: float, bad: float, size: int) -> None:
    spec = _spec(datatype, (-1, size))
    data = [0.5] * size
    data[-1] = ok
    x = _decode(_json(data, datatype, [1, size]), spec).inputs["x"]
    assert x.dtype == NP[datatype] and np.isfinite(x).all() and abs(float(x[0, -1])) == float(np.finfo(x.dtype).max)
    data[-1] = bad
    msg = _refused(_json(data, datatype, [1, size]), spec)
    assert f"out of the {datatype} range" in msg and "'x'" in msg, msg


def test_float_limits_are_where_the_cast_overflows() -> None:
    for datatype, limit in FLOAT_LIMITS.items():
        dt = NP[datatype]
        below = np.nextafter(limit, 0)
        with np.errstate(over="ignore"):
            assert np.isinf(np.array([limit], np.float64).astype(dt))[0], datatype
            assert np.isfinite(np.array([below], np.float64).astype(dt))[0], datatype


def test_fp64_takes_the_whole_double_range_and_orjson_refuses_beyond_it() -> None:
    x = _decode(_json([1.7976931348623157e308, -1e308, 5e-324, 0], "FP64"), _spec("FP64")).inputs["x"]
    assert x.dtype == np.float64 and np.isfinite(x).all()
    item = b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"%s","data":[%s,0,0,0]}]}'
    assert "not valid JSON" in _refused(item % (b"FP64", b"1e400"))
    assert "not valid JSON" in _refused(item % (b"FP32", b"NaN"))


def test_bool_takes_true_false_only() -> None:
    spec = _spec("BOOL")
    x = _decode(_json([True, False, True, False], "BOOL"), spec).inputs["x"]
    assert x.dtype == np.bool_ and x.tolist() == [[True, False, True, False]]
    for data in ([1, 0, 1, 0], [True, 0, True, False], ["true", False, True, False], [None, True, True, True]):
        assert "true/false" in _refused(_json(data, "BOOL"), spec), data


def test_ragged_or_mixed_nesting_is_refused() -> None:
    assert "equal lengths" in _refused(_json([[1, 2, 3], [4]], shape=[2, 2]), _spec(shape=(-1, 2)))
    assert "equal lengths" in _refused(_json([1, [2, 3], 4]))


def test_element_count_must_match_the_shape() -> None:
    assert "elements" in _refused(_json([1, 2, 3]))


def test_empty_data_for_an_empty_tensor() -> None:
    req = decode_request(_json([], shape=[2, 0]), None, _spec(shape=(-1, -1)), OUTPUTS, 0)
    assert req.inputs["x"].shape == (2, 0) and req.inputs["x"].dtype == np.float32


# -- binary extension -----------------------------------------------------------------------------------


def _binary(arrays: dict[str, np.ndarray], extra_bytes: bytes = b"") -> tuple[bytes, str]:
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": n,
                    "shape": list(a.shape),
                    "datatype": next(k for k, v in NP.items() if np.dtype(v) == a.dtype),
                    "parameters": {"binary_data_size": a.nbytes},
                }
                for n, a in arrays.items()
            ]
        }
    )
    return header + b"".join(a.tobytes() for a in arrays.values()) + extra_bytes, str(len(header))


@pytest.mark.parametrize("datatype", sorted(NP))
def test_binary_inputs_are_views_of_the_body(datatype: str) -> None:
    a = (np.arange(8) % 2).astype(NP[datatype]).reshape(2, 4)
    body, hlen = _binary({"x": a})
    x = _decode(body, _spec(datatype), hlen).inputs["x"]
    np.testing.assert_array_equal(x, a)
    assert x.dtype == np.dtype(NP[datatype]) and not x.flags.owndata  # no copy
    assert x.base is not None


def test_binary_and_json_inputs_mix() -> None:
    a = np.ones((1, 4), np.float32)
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "a", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}},
                {"name": "b", "shape": [1, 2], "datatype": "INT64", "data": [7, 8]},
            ]
        }
    )
    spec = {"a": TensorSpec("a", "FP32", (-1, 4)), "b": TensorSpec("b", "INT64", (-1, 2))}
    req = decode_request(header + a.tobytes(), str(len(header)), spec, OUTPUTS, 4)
    assert req.inputs["b"].tolist() == [[7, 8]] and req.inputs["a"].sum() == 4


@pytest.mark.parametrize(
    ("case", "mutate", "message"),
    [
        ("short body", lambda b, h: (b[:-4], h), "ends before"),
        ("trailing bytes", lambda b, h: (b + b"xx", h), "binary data"),
        ("length not int", lambda b, h: (b, "abc"), "integer"),
        ("length past body", lambda b, h: (b, str(len(b) + 1)), "outside the body"),
        ("length zero", lambda b, h: (b, "0"), "outside the body"),
    ],
)
def test_bad_binary_framing(case: str, mutate: Any, message: str) -> None:
    body, hlen = _binary({"x": np.ones((1, 4), np.float32)})
    body, hlen = mutate(body, hlen)
    assert message in _refused(body, None, hlen), case


def test_binary_size_must_match_shape_and_datatype() -> None:
    header = orjson.dumps(
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}
    )
    assert "needs 16" in _refused(header + bytes(8), None, str(len(header)))


# -- request structure ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1]", "JSON object"),
        (b'{"inputs": []}', "non-empty"),
        (b'{"id": 5, "inputs": []}', "'id'"),
        (_json([1, 2, 3, 4], "FP64"), "expects FP32"),
        (_json([1, 2, 3, 4], shape=[4]), "rank"),
        (_json([1, 2, 3, 4, 5], shape=[1, 5]), "expects"),
        (_json([1, 2, 3, 4], shape=[-1, 4]), "non-negative"),
        (_json([1, 2, 3, 4], parameters={"timeout": "soon"}), "timeout"),
        (_json([1, 2, 3, 4], parameters={"timeout": True}), "timeout"),
        (_json([1, 2, 3, 4], outputs=[{"name": "nope"}]), "unknown output"),
        (_json([1, 2, 3, 4], outputs=[{"name": "y", "parameters": {"classification": 2}}]), "classification"),
        (
            b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":' + b"[" * 100 + b"1" + b"]" * 100 + b"}]}",
            "deeper",
        ),
        (b'{"inputs":[{"name":"q","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}', "'q'"),
        (b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32"}]}', "neither"),
    ],
)
def test_malformed_requests_are_400_with_a_reason(body: bytes, message: str) -> None:
    assert message in _refused(body)


def test_batch_rules() -> None:
    spec = {"a": TensorSpec("a", "FP32", (-1, 1)), "b": TensorSpec("b", "FP32", (-1, 1))}
    two = orjson.dumps(
        {
            "inputs": [
                {"name": "a", "shape": [2, 1], "datatype": "FP32", "data": [1, 2]},
                {"name": "b", "shape": [3, 1], "datatype": "FP32", "data": [1, 2, 3]},
            ]
        }
    )
    assert "disagree" in _refused(two, spec)
    big = _json([0.0] * 36, shape=[9, 4])
    assert "max_batch_size" in _refused(big)
    assert "at least 1" in _refused(_json([], shape=[0, 4]))
    missing = orjson.dumps({"inputs": [{"name": "a", "shape": [1, 1], "datatype": "FP32", "data": [1]}]})
    assert "missing inputs ['b']" in _refused(missing, spec)


def test_element_cap() -> None:
    with pytest.raises(BadRequest, match="over the limit"):
        decode_request(_json([0.0] * 8, shape=[2, 4]), None, _spec(), OUTPUTS, 8, TensorLimits(max_elements=4))


def test_requested_outputs_and_binary_flags() -> None:
    req = _decode(
        _json(
            [1, 2, 3, 4],
            outputs=[{"name": "z", "parameters": {"binary_data": True}}, {"name": "y"}],
            parameters={"timeout": 500},
        )
    )
    assert req.outputs == ("z", "y") and req.binary == {"z": True, "y": False} and req.timeout_us == 500


def test_decompress_gzip_deflate_and_caps() -> None:
    raw = b"x" * 5000
    assert decompress(gzip.compress(raw), "gzip", 10_000) == raw
    import zlib

    assert decompress(zlib.compress(raw), "deflate", 10_000) == raw
    with pytest.raises(PayloadTooLarge):
        decompress(gzip.compress(raw), "gzip", 4000)
    with pytest.raises(BadRequest, match="Content-Encoding"):
        decompress(raw, "br", 10_000)
    with pytest.raises(BadRequest, match="gzip"):
        decompress(b"not gzip", "gzip", 10_000)


# -- responses ------------------------------------------------------------------------------------------


def test_encode_json_and_binary_outputs() -> None:
    y = np.arange(6, dtype=np.float32).reshape(2, 3)
    z = np.array([[True], [False]])
    body, hlen = encode_response("m", 3, "r1", {"y": y, "z": z}, ["y", "z"], {"z": True}, False)
    assert hlen is not None
    head = json.loads(body[:hlen])
    assert head["model_name"] == "m" and head["model_version"] == "3" and head["id"] == "r1"
    assert head["outputs"][0] == {"name": "y", "datatype": "FP32", "shape": [2, 3], "data": [0, 1, 2, 3, 4, 5]}
    assert head["outputs"][1]["parameters"] == {"binary_data_size": 2}
    assert np.frombuffer(body[hlen:], np.bool_).tolist() == [True, False]


def test_encode_fp16_as_json_numbers() -> None:
    y = np.array([[0.5, 65504]], np.float16)
    body, hlen = encode_response("m", 1, None, {"y": y}, ["y"], {}, False)
    assert hlen is None and json.loads(body)["outputs"][0]["data"] == [0.5, 65504.0]


def test_an_output_the_protocol_cannot_carry_is_a_server_error() -> None:
    with pytest.raises(InternalError) as e:
        encode_response("m", 1, None, {"y": np.array([1j], dtype=np.complex64)}, ["y"], {}, False)
    assert e.value.status == 500 and "'y'" in e.value.message


# -- BYTES -------------------------------------------------------------------------------------------------------

_STR = {"s": TensorSpec("s", "BYTES", (-1, 2))}


def _bytes_req(item: dict[str, object], binary: bytes = b"", limits: TensorLimits | None = None):  # type: ignore[no-untyped-def]
    header = json.dumps({"inputs": [{"name": "s", "datatype": "BYTES", "shape": [1, 2], **item}]}).encode()
    hl = str(len(header)) if binary else None
    return decode_request(header + binary, hl, _STR, OUTPUTS, 4, limits or TensorLimits())


def test_bytes_json_strings_and_binary_decode_alike() -> None:
    a = _bytes_req({"data": ["héllo", ""]}).inputs["s"]
    raw = join_length_prefixed(["héllo".encode(), b""])
    b = _bytes_req({"parameters": {"binary_data_size": len(raw)}}, raw).inputs["s"]
    assert a.dtype == object and a.tolist() == b.tolist() == [["héllo", ""]]


@pytest.mark.parametrize(
    ("item", "binary", "limits", "match"),
    [
        ({"data": ["a", 1]}, b"", None, "JSON strings"),
        ({"data": ["a"]}, b"", None, "needs 2"),
        ({"data": ["abcd", "a"]}, b"", TensorLimits(max_bytes_element_len=3), "over the limit of 3"),
        ({"data": ["a", "b"]}, b"", TensorLimits(max_bytes_elements=1), "over the limit of 1"),
        ({"parameters": {"binary_data_size": 6}}, b"\x05\0\0\0ab", None, "runs past the end"),
        ({"parameters": {"binary_data_size": 3}}, b"\x00\0\0", None, "inside an element"),
        ({"parameters": {"binary_data_size": 9}}, b"\x01\0\0\0\xff\0\0\0\0", None, "not UTF-8"),
        ({"parameters": {"binary_data_size": 4}}, b"\x00\0\0\0", None, "shape needs 2"),
    ],
)
def test_bad_bytes_inputs_are_400(item, binary, limits, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BadRequest, match=match):
        _bytes_req(item, binary, limits)


def test_encode_bytes_as_json_strings_or_length_prefixed() -> None:
    y = np.array([["a", "bé"]], dtype=object)
    body, hlen = encode_response("m", 1, None, {"y": y}, ["y"], {}, False)
    out = json.loads(body)["outputs"][0]
    assert hlen is None and out["datatype"] == "BYTES" and out["data"] == ["a", "bé"]
    body, hlen = encode_response("m", 1, None, {"y": y}, ["y"], {"y": True}, False)
    assert hlen is not None and body[hlen:] == join_length_prefixed([b"a", "bé".encode()])
