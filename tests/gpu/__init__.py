"""GPU backend tests, and the small ONNX models they share (built with onnx.helper, no downloads)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import ModelProto, TensorProto, helper, numpy_helper

from tests.onnx_models import mlp


def static_mlp(batch: int = 2) -> bytes:
    """tests.onnx_models.mlp with a fixed batch dimension: every shape static (what CUDA graphs need)."""
    m = onnx.load_from_string(mlp())
    for vi in [*m.graph.input, *m.graph.output]:
        vi.type.tensor_type.shape.dim[0].dim_value = batch  # replaces the symbolic "N"
    onnx.checker.check_model(m)
    return m.SerializeToString()


def dynamic_seq_model() -> bytes:
    """x[N, S, 4] -> ReduceSum over S -> y[N, 4]: a dynamic non-batch dimension a profile cannot guess."""
    node = helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=0)
    g = helper.make_graph(
        [node],
        "seq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m.SerializeToString()


def qdq_linear(in_dim: int = 4, out_dim: int = 3, seed: int = 0) -> tuple[bytes, np.ndarray, np.ndarray]:
    """An explicitly quantized (Q/DQ, symmetric int8) linear layer, as TensorRT's int8 path needs.

    x[N,in] -> Q/DQ(x) -> MatMul(DQ(W_int8)) -> + b -> y[N,out]. Returns (model, W as float, b).
    """
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((in_dim, out_dim)).astype(np.float32)
    b = rng.standard_normal(out_dim).astype(np.float32)
    w_scale = np.float32(np.abs(w).max() / 127.0)
    w_q = np.clip(np.round(w / w_scale), -127, 127).astype(np.int8)
    inits = [
        numpy_helper.from_array(np.array(4.0 / 127.0, dtype=np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, dtype=np.int8), "zp"),
        numpy_helper.from_array(w_q, "w_q"),
        numpy_helper.from_array(np.array(w_scale, dtype=np.float32), "w_scale"),
        numpy_helper.from_array(b, "b"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "zp"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "zp"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "zp"], ["w_dq"]),
        helper.make_node("MatMul", ["x_dq", "w_dq"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "qdq_linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", in_dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_dim])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m.SerializeToString(), w_q.astype(np.float32) * w_scale, b


def elem_types(values: list[onnx.ValueInfoProto]) -> list[int]:
    return [v.type.tensor_type.elem_type for v in values]


def load(data: bytes) -> ModelProto:
    return onnx.load_from_string(data)
