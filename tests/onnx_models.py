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


def _identity(types: dict[str, int], graph: str) -> bytes:
    """One input per datatype in ``types`` (v2 name -> ONNX element type), each passed to an output `out_<TYPE>`;
    shapes [N, 3]."""
    nodes, ins, outs = [], [], []
    for name, et in types.items():
        ins.append(helper.make_tensor_value_info(f"in_{name}", et, ["N", 3]))
        outs.append(helper.make_tensor_value_info(f"out_{name}", et, ["N", 3]))
        nodes.append(helper.make_node("Identity", [f"in_{name}"], [f"out_{name}"]))
    return _model(helper.make_graph(nodes, graph, ins, outs))


def identity_all_types() -> bytes:
    """One input per datatype of IDENTITY_TYPES, each passed to an output `out_<TYPE>`; shapes [N, 3]."""
    return _identity(IDENTITY_TYPES, "identity_all")


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


# -- models whose inputs are shapes or sizes: they run on real values and refuse zeros ----------------------


def expand_by_input() -> bytes:
    """y = Expand(x[N, 3], shape): the target shape is an input (``shape=[2, 3]`` broadcasts one row twice)."""
    graph = helper.make_graph(
        [helper.make_node("Expand", ["x", "shape"], ["y"])],
        "expand_by_input",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["A", "B"])],
    )
    return _model(graph)


def reshape_by_input() -> bytes:
    """y = Reshape(x[N, 6], shape[3]): the target shape is an input (zeros ask for a dimension x lacks)."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "reshape_by_input",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["A", "B", "C"])],
    )
    return _model(graph)


def split_by_sizes() -> bytes:
    """y = SplitToSequence(x[N, 6], split[2], axis=1)[0]: the split sizes are an input and must sum to 6."""
    graph = helper.make_graph(
        [
            helper.make_node("SplitToSequence", ["x", "split"], ["parts"], axis=1),
            helper.make_node("SequenceAt", ["parts", "zero"], ["y"]),
        ],
        "split_by_sizes",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6]),
            helper.make_tensor_value_info("split", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "K"])],
        [numpy_helper.from_array(np.array(0, np.int64), "zero")],
    )
    return _model(graph)


def conv_net(batch: int | str = 1, seed: int = 0) -> bytes:
    """x[batch, 3, 8, 8] -> Conv 3->16 -> Relu -> Conv 16->32 -> Relu -> GlobalAveragePool -> Flatten -> Gemm
    -> logits[batch, 10]. An int ``batch`` fixes the batch dimension, as many exported vision models do."""
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)

    inits = {"c1.w": w(16, 3, 3, 3), "c1.b": w(16), "c2.w": w(32, 16, 3, 3), "fc.w": w(10, 32), "fc.b": w(10)}
    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Conv", ["b", "c2.w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["d"]),
        helper.make_node("GlobalAveragePool", ["d"], ["e"]),
        helper.make_node("Flatten", ["e"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return _model(graph)


def computed_weights_mlp(in_dim: int = 32, hidden: int = 64, out_dim: int = 10, seed: int = 0) -> bytes:
    """x[N, in] -> MatMul(Reshape(Constant)) -> Relu -> MatMul(Transpose(W)) -> Relu -> MatMul(ConstantOfShape)
    -> y[N, out]: every weight is computed by a constant subgraph, as exporters often write them."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal(in_dim * hidden) / np.sqrt(in_dim)).astype(np.float32)  # flat: Reshape makes it 2-D
    w2t = (rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)  # stored transposed
    nodes = [
        helper.make_node("Constant", [], ["w1_flat"], value=numpy_helper.from_array(w1, "w1_flat")),
        helper.make_node(
            "Constant", [], ["w1_shape"], value=numpy_helper.from_array(np.array([in_dim, hidden], np.int64))
        ),
        helper.make_node("Reshape", ["w1_flat", "w1_shape"], ["w1"]),
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
        helper.make_node("Relu", ["h0"], ["h1"]),
        helper.make_node("Transpose", ["w2t"], ["w2"], perm=[1, 0]),
        helper.make_node("MatMul", ["h1", "w2"], ["h2"], name="fc2"),
        helper.make_node("Relu", ["h2"], ["h3"]),
        helper.make_node(
            "ConstantOfShape", ["w3_shape"], ["w3"], value=numpy_helper.from_array(np.array([0.05], np.float32))
        ),
        helper.make_node("MatMul", ["h3", "w3"], ["y"], name="fc3"),
    ]
    graph = helper.make_graph(
        nodes,
        "computed_weights",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", in_dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_dim])],
        [
            numpy_helper.from_array(w2t, "w2t"),
            numpy_helper.from_array(np.array([hidden, out_dim], np.int64), "w3_shape"),
        ],
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


#: every datatype of the protocol, as ONNX element types (BYTES: ONNX string)
EVERY_TYPE = {
    **IDENTITY_TYPES,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "BYTES": TensorProto.STRING,
}


def identity_every_type() -> bytes:
    """identity_all_types with every protocol datatype, BYTES (ONNX string) included."""
    return _identity(EVERY_TYPE, "identity_every")


def string_join() -> bytes:
    """Strings in and out: a[N,1], b[N,1] (BYTES) -> joined[N,2] = Concat(a, b) and first[N,1] = Identity(a)."""
    s = TensorProto.STRING
    nodes = [helper.make_node("Concat", ["a", "b"], ["joined"], axis=1), helper.make_node("Identity", ["a"], ["first"])]
    graph = helper.make_graph(
        nodes,
        "string_join",
        [helper.make_tensor_value_info("a", s, ["N", 1]), helper.make_tensor_value_info("b", s, ["N", 1])],
        [helper.make_tensor_value_info("joined", s, ["N", 2]), helper.make_tensor_value_info("first", s, ["N", 1])],
    )
    return _model(graph)
