"""Protocol-agnostic inference request rules, shared by the REST codec (v2codec.py) and the gRPC codec
(grpc/codec.py): what an input must look like for the model, how many rows a request carries, which outputs
it may ask for, and the BYTES (string) tensor representation.

BYTES tensors are numpy object arrays of ``str`` inside the server: ONNX string tensors are UTF-8 text, and ONNX
Runtime takes and returns ``str`` elements (a ``bytes`` element would be stored as its repr). On the wire:
JSON strings (UTF-8), or the binary form both protocols share, each element as a 4-byte little-endian length
followed by its bytes (Triton's binary extension and gRPC ``raw_input_contents``). Object arrays cost a Python
object per element, so BYTES tensors have their own caps on element count and element length.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from backends import TensorSpec
from backends.datatypes import NUMPY_TO_V2, V2_TO_NUMPY
from service.errors import BadRequest, InternalError

OBJECT = np.dtype(object)
_LEN = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class TensorLimits:
    """The server's caps on one input tensor (settings: max_tensor_elements, max_bytes_elements, ...)."""

    max_elements: int = 1 << 28
    max_bytes_elements: int = 1 << 16
    max_bytes_element_len: int = 1 << 20


#: integer datatypes: the closed range of values each accepts
INT_RANGES: dict[str, tuple[int, int]] = {
    name: (int(np.iinfo(dt).min), int(np.iinfo(dt).max)) for name, dt in V2_TO_NUMPY.items() if dt.kind in "iu"
}
#: FP16 and FP32: the magnitude from which a value rounds to infinity, i.e. the largest finite value plus half a
#: step (a tie rounds to even, which is infinity): 65504 + 16, and 2^128 - 2^104 + 2^103
FLOAT_LIMITS: dict[str, float] = {"FP16": 65520.0, "FP32": 2.0**128 - 2.0**103}


@dataclass(slots=True)
class DecodedRequest:
    """A request as both wire codecs hand it to the data plane (``binary*``: REST's binary-output choices)."""

    id: str | None
    inputs: dict[str, np.ndarray]
    rows: int  # size of the batch dimension (1 for models without one)
    outputs: tuple[str, ...] | None  # None: all outputs
    binary: dict[str, bool]  # per requested output: send as binary
    binary_default: bool
    timeout_us: int | None


def check_input(
    name: object, datatype: object, shape: object, spec: TensorSpec | None, inputs_spec: dict[str, TensorSpec]
) -> tuple[TensorSpec, list[int], int]:
    """Checks one input's name, datatype and shape against the model; returns its spec, shape and element count
    (the caps on the count are checked by the caller, which knows the datatype's own cap)."""
    if spec is None:
        raise BadRequest(f"unexpected inference input {name!r}; the model's inputs are {sorted(inputs_spec)}")
    if not isinstance(shape, list | tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise BadRequest(f"input {spec.name!r}: 'shape' must be a list of non-negative integers")
    if datatype != spec.datatype:
        raise BadRequest(f"input {spec.name!r} has datatype {datatype!r}, but the model expects {spec.datatype}")
    if len(shape) != len(spec.shape):
        raise BadRequest(
            f"input {spec.name!r} has shape {list(shape)}, but the model expects rank {len(spec.shape)} "
            f"({list(spec.shape)})"
        )
    for got, want in zip(shape, spec.shape, strict=True):
        if want >= 0 and got != want:
            raise BadRequest(f"input {spec.name!r} has shape {list(shape)}, but the model expects {list(spec.shape)}")
    return spec, list(shape), math.prod(shape)


def check_count(name: str, datatype: str, count: int, limits: TensorLimits) -> None:
    if count > limits.max_elements:
        raise BadRequest(f"input {name!r} has {count} elements, over the limit of {limits.max_elements}")
    if datatype == "BYTES" and count > limits.max_bytes_elements:
        raise BadRequest(
            f"input {name!r} has {count} BYTES elements, over the limit of {limits.max_bytes_elements} "
            "(SLIMSERVE_MAX_BYTES_ELEMENTS)"
        )


def fixed_dtype(name: str, datatype: str) -> np.dtype:
    """The numpy dtype of a fixed-size datatype (BYTES has none)."""
    dtype = V2_TO_NUMPY.get(datatype)
    if dtype is None:
        raise BadRequest(f"input {name!r}: datatype {datatype} is not supported")
    return dtype


def request_rows(arrays: dict[str, np.ndarray], inputs_spec: dict[str, TensorSpec], max_batch_size: int) -> int:
    """All inputs given, and their common batch size (1 for a model without a batch dimension)."""
    missing = sorted(set(inputs_spec) - set(arrays))
    if missing:
        raise BadRequest(f"missing inputs {missing}")
    if max_batch_size <= 0:
        return 1
    batch_sizes = {a.shape[0] for a in arrays.values()}
    if len(batch_sizes) != 1:
        raise BadRequest(f"inputs disagree on the batch size: {sorted(batch_sizes)}")
    rows = batch_sizes.pop()
    if rows > max_batch_size:
        raise BadRequest(f"batch size {rows} is over the model's max_batch_size {max_batch_size}")
    if rows < 1:
        raise BadRequest("the batch size must be at least 1")
    return rows


def check_output(name: object, output_names: frozenset[str]) -> str:
    if not isinstance(name, str) or name not in output_names:
        raise BadRequest(f"unknown output {name!r}; the model's outputs are {sorted(output_names)}")
    return name


def output_datatype(name: str, arr: np.ndarray) -> str:
    """The v2 datatype of an output array; an output the protocol cannot carry is the server's fault."""
    if arr.dtype == OBJECT:
        return "BYTES"
    dt = NUMPY_TO_V2.get(arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype)
    if dt is None:  # the model's own output: the server's problem, not the caller's
        raise InternalError(f"output {name!r} has a datatype ({arr.dtype}) the protocol cannot carry")
    return dt


# -- BYTES ---------------------------------------------------------------------------------------------------------


def bytes_input(name: str, items: Sequence[bytes], shape: list[int], limits: TensorLimits) -> np.ndarray:
    """BYTES elements as the object array of ``str`` ONNX Runtime takes for a string input (it would store a
    ``bytes`` element as its repr), with the element-length cap checked. ONNX string tensors are text: elements
    that are not UTF-8 are refused."""
    _check_lengths(name, items, limits)
    try:
        texts = [b.decode() for b in items]
    except UnicodeDecodeError as e:
        raise BadRequest(f"input {name!r}: a BYTES element is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return _objects(texts, shape)


def strings_input(name: str, values: Sequence[object], shape: list[int], limits: TensorLimits) -> np.ndarray:
    """JSON BYTES data: every element a string."""
    if not all(type(v) is str for v in values):
        raise BadRequest(f"input {name!r}: BYTES data must be JSON strings")
    _check_lengths(name, [v.encode() for v in values], limits)  # type: ignore[attr-defined]
    return _objects(values, shape)


def _check_lengths(name: str, items: Sequence[bytes], limits: TensorLimits) -> None:
    longest = max(map(len, items), default=0)
    if longest > limits.max_bytes_element_len:
        raise BadRequest(
            f"input {name!r} has a BYTES element of {longest} bytes, over the limit of "
            f"{limits.max_bytes_element_len} (SLIMSERVE_MAX_BYTES_ELEMENT_LEN)"
        )


def _objects(values: Sequence[object], shape: list[int]) -> np.ndarray:
    arr = np.empty(len(values), dtype=OBJECT)
    arr[:] = values
    return arr.reshape(shape)


def split_length_prefixed(name: str, buf: bytes | memoryview, count: int) -> list[bytes]:
    """The binary BYTES form: ``count`` elements, each a 4-byte little-endian length and that many bytes, filling
    ``buf`` exactly."""
    view = memoryview(buf)
    size = len(view)
    items: list[bytes] = []
    pos = 0
    while pos < size:
        if pos + 4 > size:
            raise BadRequest(f"input {name!r}: the BYTES data ends inside an element's 4-byte length")
        (n,) = _LEN.unpack_from(view, pos)
        pos += 4
        if pos + n > size:
            raise BadRequest(f"input {name!r}: a BYTES element of {n} bytes runs past the end of its data")
        items.append(bytes(view[pos : pos + n]))
        pos += n
        if len(items) > count:
            break
    if len(items) != count:
        raise BadRequest(f"input {name!r}: the BYTES data holds {len(items)}+ elements but the shape needs {count}")
    return items


def output_bytes(arr: np.ndarray) -> list[bytes]:
    """A BYTES output's elements as bytes (ONNX Runtime returns ``str`` for string tensors)."""
    return [v.encode() if isinstance(v, str) else bytes(v) for v in arr.reshape(-1)]


def join_length_prefixed(items: list[bytes]) -> bytes:
    return b"".join(_LEN.pack(len(b)) + b for b in items)


def output_strings(arr: np.ndarray) -> list[str]:
    """A BYTES output as JSON strings (bytes that are not UTF-8 are replaced, as JSON carries text only)."""
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in arr.reshape(-1)]
