"""Tiny ONNX models built in the tests with onnx.helper (no downloads)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]


def _model(graph: onnx.GraphProto) -> bytes:
    m = helper.make_model(graph, opset_imports=OPSET, producer_name="slimserve-tests")
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m.SerializeToString()


def mlp(in_dim: int = 4, hidden: int = 8, out_dim: int = 3, seed: int = 0) -> bytes:
    """x[N,in] -> relu(x W1 + b1) W2 + b2 -> softmax -> probs[N,out]; also logits."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((in_dim, hidden)).astype(np.float32)
    b1 = rng.standard_normal(hidden).astype(np.float32)
    w2 = rng.standard_normal((hidden, out_dim)).astype(np.float32)
    b2 = rng.standard_normal(out_dim).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["l0"]),
        helper.make_node("Add", ["l0", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", in_dim])],
        [
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", out_dim]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", out_dim]),
        ],
        [numpy_helper.from_array(a, n) for a, n in [(w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2")]],
    )
    return _model(graph)


def mlp_reference(x: np.ndarray, in_dim: int = 4, hidden: int = 8, out_dim: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((in_dim, hidden)).astype(np.float32)
    b1 = rng.standard_normal(hidden).astype(np.float32)
    w2 = rng.standard_normal((hidden, out_dim)).astype(np.float32)
    b2 = rng.standard_normal(out_dim).astype(np.float32)
    logits = np.maximum(x @ w1 + b1, 0) @ w2 + b2
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# datatypes the identity model passes through; ONNX element type per v2 name
IDENTITY_TYPES = {
    "FP32": TensorProto.FLOAT,
    "FP16": TensorProto.FLOAT16,
    "FP64": TensorProto.DOUBLE,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "UINT8": TensorProto.UINT8,
    "BOOL": TensorProto.BOOL,
}


def identity_all_types() -> bytes:
    """One input per datatype, each passed to an output `out_<TYPE>`; shapes [N, 3]."""
    nodes, ins, outs = [], [], []
    for name, et in IDENTITY_TYPES.items():
        ins.append(helper.make_tensor_value_info(f"in_{name}", et, ["N", 3]))
        outs.append(helper.make_tensor_value_info(f"out_{name}", et, ["N", 3]))
        nodes.append(helper.make_node("Identity", [f"in_{name}"], [f"out_{name}"]))
    return _model(helper.make_graph(nodes, "identity_all", ins, outs))


def fixed_shape_add() -> bytes:
    """a[2,2] + b[2,2] -> c[2,2]: no batch dimension."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["c"])],
        "fixed_add",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 2]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 2]),
        ],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2, 2])],
    )
    return _model(graph)


def external_data_model(location: str) -> bytes:
    """A model whose weight claims to live in an external file at ``location``."""
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in {"location": location, "offset": "0", "length": "48"}.items():
        e = w.external_data.add()
        e.key, e.value = k, v
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "ext",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [w],
    )
    m = helper.make_model(graph, opset_imports=OPSET)
    m.ir_version = 8
    return m.SerializeToString()


def dynamic_identity() -> bytes:
    """x[N, T] FP32 -> y = x * 2: both dimensions dynamic (different T must never share a batch)."""
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        "dyn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T"])],
        [two],
    )
    return _model(graph)


def batch_collapsing() -> bytes:
    """x[N, 4] -> y = sum over the batch, keepdims: [1, 4], declared [N, 4]. It runs, but does not batch as its
    declared shapes promise: a merged batch of two requests gets one output row back."""
    axes = numpy_helper.from_array(np.array([0], np.int64), "axes")
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)],
        "collapse",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [axes],
    )
    return _model(graph)
