"""Tensor datatypes: KServe v2 / Open Inference Protocol names <-> numpy <-> ONNX element types."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

# v2 name -> numpy dtype (little-endian, as the binary tensor extension specifies)
V2_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
NUMPY_TO_V2: dict[np.dtype, str] = {v: k for k, v in V2_TO_NUMPY.items()}

ONNX_TO_V2: dict[int, str] = {
    TensorProto.BOOL: "BOOL",
    TensorProto.UINT8: "UINT8",
    TensorProto.UINT16: "UINT16",
    TensorProto.UINT32: "UINT32",
    TensorProto.UINT64: "UINT64",
    TensorProto.INT8: "INT8",
    TensorProto.INT16: "INT16",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.FLOAT16: "FP16",
    TensorProto.FLOAT: "FP32",
    TensorProto.DOUBLE: "FP64",
    TensorProto.STRING: "BYTES",
    TensorProto.BFLOAT16: "BF16",
}


# Triton model configuration spells datatypes TYPE_<name>, with TYPE_STRING for BYTES.
def v2_to_triton_config(dt: str) -> str:
    return "TYPE_STRING" if dt == "BYTES" else f"TYPE_{dt}"


#: BYTES (ONNX string) tensors are numpy object arrays of ``str``: ONNX Runtime takes and returns those
BYTES_DTYPE = np.dtype(object)


def numpy_dtype(v2: str) -> np.dtype:
    if v2 == "BYTES":
        return BYTES_DTYPE
    try:
        return V2_TO_NUMPY[v2]
    except KeyError:
        raise ValueError(f"unsupported datatype {v2!r}") from None


def empty_tensor(v2: str, shape: tuple[int, ...]) -> np.ndarray:
    """A tensor of zeros (empty strings for BYTES) of datatype ``v2``."""
    if v2 == "BYTES":
        return np.full(shape, "", dtype=BYTES_DTYPE)
    return np.zeros(shape, dtype=numpy_dtype(v2))
