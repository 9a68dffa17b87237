"""KServe v2 / Open Inference Protocol request and response bodies, with Triton's binary extension.

A request body is a JSON object, optionally followed by raw tensor bytes; the
``Inference-Header-Content-Length`` header then gives the JSON part's length. Binary inputs become
numpy arrays that view the request body (no copy). Outputs go back as JSON ``data`` or, when asked for
(``binary_data`` per output, or ``binary_data_output`` for all), as raw bytes after the JSON header.
Decoding is hand-written, not pydantic: it is the hot path and the checks are specific to the model.

JSON ``data`` is strict: numeric datatypes take JSON numbers only (no strings, booleans or null), integer
datatypes take integers only, BOOL takes true/false only, and a value the datatype cannot hold is refused
(400) rather than wrapped or turned into infinity. Floats are rounded to the nearest value of the datatype
(0.1 is not exact in FP32); a value that would round to infinity is out of range.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Sequence
from itertools import chain
from typing import Any

import numpy as np
import orjson

from backends import TensorSpec
from backends.datatypes import V2_TO_NUMPY
from service.errors import BadRequest, PayloadTooLarge
from service.tensors import (
    FLOAT_LIMITS,
    INT_RANGES,
    DecodedRequest,
    TensorLimits,
    bytes_input,
    check_count,
    check_input,
    check_output,
    fixed_dtype,
    join_length_prefixed,
    output_bytes,
    output_datatype,
    output_strings,
    request_rows,
    split_length_prefixed,
    strings_input,
)

HEADER_LENGTH = "inference-header-content-length"
MAX_JSON_DEPTH = 64

_NUMBERS = frozenset({int, float})


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    if not encoding or encoding == "identity":
        return body
    try:
        if encoding == "gzip":
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            d = zlib.decompressobj()
        else:
            raise BadRequest(f"unsupported Content-Encoding {encoding!r} (gzip, deflate)")
        out = d.decompress(body, limit + 1)
    except (zlib.error, gzip.BadGzipFile) as e:
        raise BadRequest(f"the body is not valid {encoding} data: {e}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise PayloadTooLarge(f"the decompressed body is over the {limit}-byte limit")
    return out


def _depth_ok(obj: Any, depth: int = 0) -> bool:
    if depth > MAX_JSON_DEPTH:
        return False
    if isinstance(obj, dict):
        return all(_depth_ok(v, depth + 1) for v in obj.values())
    if isinstance(obj, list):
        # Tensor data lists are long and flat or regularly nested: checking the first item suffices.
        return not obj or _depth_ok(obj[0], depth + 1)
    return True


def decode_request(
    body: bytes | memoryview,
    header_length: str | None,
    inputs_spec: dict[str, TensorSpec],
    output_names: frozenset[str],
    max_batch_size: int,
    limits: TensorLimits = TensorLimits(),
) -> DecodedRequest:
    if header_length is not None:
        try:
            json_len = int(header_length)
        except ValueError:
            raise BadRequest("Inference-Header-Content-Length must be an integer") from None
        if not 0 < json_len <= len(body):
            raise BadRequest(f"Inference-Header-Content-Length {json_len} is outside the body ({len(body)} bytes)")
    else:
        json_len = len(body)
    view = memoryview(body)
    try:
        req = orjson.loads(view[:json_len])
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"the request header is not valid JSON: {e}") from None
    if not isinstance(req, dict):
        raise BadRequest("the request must be a JSON object")
    if not _depth_ok(req):
        raise BadRequest(f"the request JSON nests deeper than {MAX_JSON_DEPTH} levels")
    binary = view[json_len:]

    rid = req.get("id")
    if rid is not None and not isinstance(rid, str):
        raise BadRequest("'id' must be a string")
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest("'parameters' must be an object")
    timeout = params.get("timeout")
    if timeout is not None and (not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 0):
        raise BadRequest("the 'timeout' parameter must be a non-negative integer (microseconds)")
    binary_default = bool(params.get("binary_data_output", False))

    items = req.get("inputs")
    if not isinstance(items, list) or not items:
        raise BadRequest("'inputs' must be a non-empty list")
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for item in items:
        if not isinstance(item, dict):
            raise BadRequest("each input must be an object")
        name = item.get("name")
        spec = inputs_spec.get(name) if isinstance(name, str) else None
        if spec is not None and name in arrays:
            raise BadRequest(f"input {name!r} is given twice")
        arr, used = _decode_tensor(item, spec, inputs_spec, binary, offset, limits)
        offset += used
        arrays[spec.name] = arr  # type: ignore[union-attr] # _decode_tensor refused a None spec
    if offset != len(binary):
        raise BadRequest(f"the body carries {len(binary)} bytes of binary data but the inputs declare {offset}")
    rows = request_rows(arrays, inputs_spec, max_batch_size)

    outputs, per_output = _decode_outputs(req.get("outputs"), output_names, binary_default)
    return DecodedRequest(rid, arrays, rows, outputs, per_output, binary_default, timeout)


def _decode_tensor(
    item: dict[str, Any],
    spec: TensorSpec | None,
    inputs_spec: dict[str, TensorSpec],
    binary: memoryview,
    offset: int,
    limits: TensorLimits,
) -> tuple[np.ndarray, int]:
    spec, shape, count = check_input(item.get("name"), item.get("datatype"), item.get("shape"), spec, inputs_spec)
    name, datatype = spec.name, spec.datatype
    check_count(name, datatype, count, limits)
    dtype = None if datatype == "BYTES" else fixed_dtype(name, datatype)
    params = item.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest(f"input {name!r}: 'parameters' must be an object")
    size = params.get("binary_data_size")
    if size is not None:
        if "data" in item:
            raise BadRequest(f"input {name!r} has both 'data' and binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadRequest(f"input {name!r}: binary_data_size must be a non-negative integer")
        if dtype is not None and size != count * dtype.itemsize:
            raise BadRequest(
                f"input {name!r}: binary_data_size is {size} bytes, but shape {shape} of {datatype} "
                f"needs {count * dtype.itemsize}"
            )
        if offset + size > len(binary):
            raise BadRequest(f"input {name!r}: the body ends before its {size} bytes of binary data")
        if dtype is None:
            items = split_length_prefixed(name, binary[offset : offset + size], count)
            return bytes_input(name, items, shape, limits), size
        arr = np.frombuffer(binary, dtype=dtype, count=count, offset=offset).reshape(shape)
        return arr, size
    data = item.get("data")
    if data is None:
        raise BadRequest(f"input {name!r} has neither 'data' nor a binary_data_size parameter")
    if not isinstance(data, list):
        data = [data]
    flat = _flatten(name, data)
    if len(flat) != count:
        raise BadRequest(f"input {name!r}: 'data' has {len(flat)} elements but shape {shape} needs {count}")
    if dtype is None:
        return strings_input(name, flat, shape, limits), 0
    return _json_values(name, datatype, dtype, flat).reshape(shape), 0


def _flatten(name: str, data: list[Any]) -> list[Any]:
    """JSON ``data`` (a flat list, or regularly nested lists) as a flat list: one pass per nesting level, in C
    (chain, map), not one Python call per element."""
    flat = data
    types = set(map(type, flat))
    while list in types:
        if len(types) > 1 or len(set(map(len, flat))) > 1:
            raise BadRequest(f"input {name!r}: 'data' must be a flat list, or nested lists of equal lengths")
        flat = list(chain.from_iterable(flat))
        types = set(map(type, flat))
    return flat


def _json_values(name: str, datatype: str, dtype: np.dtype, flat: list[Any]) -> np.ndarray:
    """Flat JSON ``data`` as an array of ``dtype``, strictly (see the module docstring). The JSON values' own
    types are checked before numpy sees them: numpy would turn ``true`` into 1.0 and ``"1.5"`` into 1.5 without
    a word."""
    types = set(map(type, flat))
    if datatype == "BOOL":
        if types - {bool}:
            raise BadRequest(f"input {name!r}: BOOL data must be JSON true/false")
        return np.array(flat, dtype=dtype)
    if types - _NUMBERS:  # type() is exact: bool, a subclass of int, is not a number here
        raise BadRequest(f"input {name!r}: {datatype} data must be JSON numbers (not strings, booleans or null)")
    bounds = INT_RANGES.get(datatype)
    if bounds is not None:
        lo, hi = bounds
        if float in types:
            raise BadRequest(f"input {name!r}: {datatype} data must be JSON integers from {lo} to {hi}")
        try:  # exact 64-bit integers first (numpy raises on a Python int beyond them), then the type's range
            raw = np.asarray(flat, dtype=np.uint64 if lo == 0 else np.int64)
        except OverflowError:
            raw = None
        if raw is None or (raw.size and (raw.min() < lo or raw.max() > hi)):
            raise BadRequest(f"input {name!r}: {datatype} data must be JSON integers from {lo} to {hi}")
        return raw.astype(dtype, copy=False)
    limit = FLOAT_LIMITS.get(datatype)
    if limit is None:
        return np.asarray(flat, dtype=dtype)  # FP64: orjson already refuses numbers beyond it
    if len(flat) <= 32:  # small requests: two Python calls cost less than numpy's per-call overhead
        if flat and (max(flat) >= limit or min(flat) <= -limit):
            raise _out_of_range(name, datatype, flat, limit)
        return np.asarray(flat, dtype=dtype)
    with np.errstate(over="ignore"):  # a value past the range becomes inf: refused just below
        arr = np.asarray(flat, dtype=dtype)
    if np.isinf(arr).any():
        raise _out_of_range(name, datatype, flat, limit)
    return arr


def _out_of_range(name: str, datatype: str, flat: list[Any], limit: float) -> BadRequest:
    bad = next(x for x in flat if abs(x) >= limit)
    biggest = float(np.finfo(V2_TO_NUMPY[datatype]).max)
    return BadRequest(
        f"input {name!r}: {bad:g} is out of the {datatype} range (it would round to infinity; "
        f"the largest finite {datatype} is {biggest:g})"
    )


def _decode_outputs(
    items: Any, output_names: frozenset[str], binary_default: bool
) -> tuple[tuple[str, ...] | None, dict[str, bool]]:
    if items is None:
        return None, {}
    if not isinstance(items, list):
        raise BadRequest("'outputs' must be a list")
    names: list[str] = []
    binary: dict[str, bool] = {}
    for o in items:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise BadRequest("each requested output must be an object with a 'name'")
        name = check_output(o["name"], output_names)
        params = o.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadRequest(f"output {name!r}: 'parameters' must be an object")
        if params.get("classification"):
            raise BadRequest("the classification extension is not supported")
        if name not in binary:
            names.append(name)
        binary[name] = bool(params.get("binary_data", binary_default))
    if not names:
        return None, {}
    return tuple(names), binary


def encode_response(
    model_name: str,
    version: int,
    request_id: str | None,
    outputs: dict[str, np.ndarray],
    order: Sequence[str],
    binary: dict[str, bool],
    binary_default: bool,
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """Returns the body and, when it carries binary tensors, the JSON header's length. ``parameters``: the
    response's own (``slimserve_variant``: the variant that answered)."""
    out_json: list[dict[str, Any]] = []
    chunks: list[bytes | memoryview] = []
    for name in order:
        arr = outputs[name]
        dt = output_datatype(name, arr)
        entry: dict[str, Any] = {"name": name, "datatype": dt, "shape": list(arr.shape)}
        if binary.get(name, binary_default):
            if dt == "BYTES":
                raw: bytes | memoryview = join_length_prefixed(output_bytes(arr))
            else:
                raw = memoryview(np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))).cast("B")
            entry["parameters"] = {"binary_data_size": raw.nbytes if isinstance(raw, memoryview) else len(raw)}
            chunks.append(raw)
        elif dt == "BYTES":
            entry["data"] = output_strings(arr)
        else:
            flat = arr.reshape(-1)
            entry["data"] = flat.astype(np.float32) if dt == "FP16" else np.ascontiguousarray(flat)
        out_json.append(entry)
    resp: dict[str, Any] = {"model_name": model_name, "model_version": str(version), "outputs": out_json}
    if request_id is not None:
        resp["id"] = request_id
    if parameters:
        resp["parameters"] = parameters
    header = orjson.dumps(resp, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)
