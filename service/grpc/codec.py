"""gRPC ``ModelInferRequest`` -> numpy inputs, and outputs -> ``ModelInferResponse``: the gRPC wire codec.

The request rules (names, datatypes, shapes, caps, batch size, outputs, BYTES) are the REST codec's, from
service/tensors.py. Inputs come as typed ``contents`` (the field for the datatype, as Triton defines it; FP16 has
none) or as ``raw_input_contents``, one entry per input in order (then no input may carry ``contents``). Raw
fixed-size inputs are numpy views of the request's bytes, with no copy; raw BYTES are 4-byte little-endian
length-prefixed elements. Outputs always go back as ``raw_output_contents`` (what Triton answers and what
tritonclient reads fastest).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from backends import TensorSpec
from service.errors import BadRequest
from service.grpc._generated import grpc_service_pb2 as pb
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
    request_rows,
    split_length_prefixed,
)

#: the typed ``InferTensorContents`` field of each datatype (Triton's mapping; FP16 travels raw only)
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_UNSUPPORTED_PARAMS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


def decode_request(
    req: pb.ModelInferRequest,
    inputs_spec: dict[str, TensorSpec],
    output_names: frozenset[str],
    max_batch_size: int,
    limits: TensorLimits,
) -> DecodedRequest:
    if not req.inputs:
        raise BadRequest("the request has no inputs")
    raw = req.raw_input_contents
    if raw and len(raw) != len(req.inputs):
        raise BadRequest(f"raw_input_contents has {len(raw)} entries for {len(req.inputs)} inputs")
    arrays: dict[str, np.ndarray] = {}
    for i, item in enumerate(req.inputs):
        name = item.name
        if name in arrays:
            raise BadRequest(f"input {name!r} is given twice")
        _refuse_shared_memory(f"input {name!r}", item.parameters)
        spec, shape, count = check_input(name, item.datatype, list(item.shape), inputs_spec.get(name), inputs_spec)
        check_count(name, spec.datatype, count, limits)
        if raw:
            if item.HasField("contents"):
                raise BadRequest(f"input {name!r} has contents, but the request also carries raw_input_contents")
            arrays[name] = _from_raw(name, spec.datatype, shape, count, raw[i], limits)
        else:
            arrays[name] = _from_contents(name, spec.datatype, shape, count, item.contents, limits)
    rows = request_rows(arrays, inputs_spec, max_batch_size)
    outputs: list[str] = []
    for o in req.outputs:
        name = check_output(o.name, output_names)
        _refuse_shared_memory(f"output {name!r}", o.parameters)
        if "classification" in o.parameters:
            raise BadRequest("the classification extension is not supported")
        if name not in outputs:
            outputs.append(name)
    _refuse_shared_memory("the request", req.parameters)
    timeout = None
    if len(req.parameters) and "timeout" in req.parameters:
        p = req.parameters["timeout"]
        if p.WhichOneof("parameter_choice") not in ("int64_param", "uint64_param") or p.int64_param < 0:
            raise BadRequest("the 'timeout' parameter must be a non-negative integer (microseconds)")
        timeout = p.int64_param or p.uint64_param or None
    return DecodedRequest(req.id or None, arrays, rows, tuple(outputs) or None, {}, True, timeout)


def _refuse_shared_memory(what: str, params: Any) -> None:
    if len(params) and any(k in params for k in _UNSUPPORTED_PARAMS):
        raise BadRequest(f"{what}: the shared-memory extensions are not supported")


def _from_raw(name: str, datatype: str, shape: list[int], count: int, buf: bytes, limits: TensorLimits) -> np.ndarray:
    if datatype == "BYTES":
        return bytes_input(name, split_length_prefixed(name, buf, count), shape, limits)
    dtype = fixed_dtype(name, datatype)
    if len(buf) != count * dtype.itemsize:
        raise BadRequest(
            f"input {name!r}: raw_input_contents has {len(buf)} bytes, but shape {shape} of {datatype} "
            f"needs {count * dtype.itemsize}"
        )
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)


def _from_contents(
    name: str, datatype: str, shape: list[int], count: int, contents: pb.InferTensorContents, limits: TensorLimits
) -> np.ndarray:
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise BadRequest(f"input {name!r}: {datatype} travels in raw_input_contents only (it has no typed contents)")
    others = [f.name for f, _ in contents.ListFields() if f.name != field]
    if others:
        raise BadRequest(f"input {name!r} is {datatype}: its values go in contents.{field}, not {others}")
    values = getattr(contents, field)
    if len(values) != count:
        raise BadRequest(f"input {name!r}: contents.{field} has {len(values)} values but shape {shape} needs {count}")
    if datatype == "BYTES":
        return bytes_input(name, list(values), shape, limits)
    dtype = fixed_dtype(name, datatype)
    bounds = INT_RANGES.get(datatype)
    if bounds is not None:
        wide = np.asarray(values, dtype=np.uint64 if bounds[0] == 0 else np.int64)
        if wide.size and (wide.min() < bounds[0] or wide.max() > bounds[1]):
            raise BadRequest(f"input {name!r}: {datatype} values must be from {bounds[0]} to {bounds[1]}")
        return wide.astype(dtype).reshape(shape)
    limit = FLOAT_LIMITS.get(datatype)
    arr = np.asarray(values, dtype=np.float64 if limit else dtype)
    if limit and arr.size and np.abs(arr).max() >= limit:
        raise BadRequest(f"input {name!r}: a value is out of the {datatype} range (it would round to infinity)")
    return arr.astype(dtype, copy=False).reshape(shape)


def encode_response(
    model_name: str, version: int, request_id: str | None, outputs: dict[str, np.ndarray], order: Sequence[str]
) -> pb.ModelInferResponse:
    resp = pb.ModelInferResponse(model_name=model_name, model_version=str(version), id=request_id or "")
    raw = resp.raw_output_contents
    for name in order:
        arr = outputs[name]
        dt = output_datatype(name, arr)
        resp.outputs.add(name=name, datatype=dt, shape=arr.shape)
        if dt == "BYTES":
            raw.append(join_length_prefixed(output_bytes(arr)))
        else:
            raw.append(np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes())
    return resp
