"""Fixtures for the compression tests: the trained digits CNN, its data split, its pruned variants and a
synthetic model with every linear-layer layout (Conv with stride, Gemm transB=0/1, MatMul)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compression.prune import PruneReport, prune_model
from tests.compression import digits as D


@pytest.fixture(scope="session")
def digits_data() -> D.Digits:
    return D.load_data()


@pytest.fixture(scope="session")
def digits_bytes() -> bytes:
    return D.digits_model()


@pytest.fixture(scope="session")
def digits(digits_bytes: bytes) -> onnx.ModelProto:
    return onnx.load_from_string(digits_bytes)


@pytest.fixture(scope="session")
def accuracy(digits_data: D.Digits) -> Callable[[onnx.ModelProto | bytes], float]:
    """Top-1 accuracy of a digits model on the held-out test samples (ONNX Runtime)."""
    import onnxruntime as ort

    def acc(model: onnx.ModelProto | bytes) -> float:
        data = model if isinstance(model, bytes) else model.SerializeToString()
        sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        logits = sess.run(["logits"], {"input": digits_data.x_test})[0]
        return float((logits.argmax(1) == digits_data.y_test).mean())

    return acc


Pruned = tuple[onnx.ModelProto, PruneReport]


@pytest.fixture(scope="session")
def pruned(digits: onnx.ModelProto, digits_data: D.Digits) -> Callable[..., Pruned]:
    """prune_model on the digits CNN, memoised per (sparsity, pattern, calibrated)."""
    memo: dict[tuple, Pruned] = {}

    def get(sparsity: float, pattern: str = "unstructured", calibrated: bool = True) -> Pruned:
        key = (sparsity, pattern, calibrated)
        if key not in memo:
            calib = {"input": digits_data.x_calib} if calibrated else None
            memo[key] = prune_model(digits, sparsity, pattern, calibration=calib)  # type: ignore[arg-type]
        return memo[key]

    return get


def synthetic_model(seed: int = 0) -> onnx.ModelProto:
    """x[N,3,6,6] -> Conv 3->128 -> Relu -> Conv 128->32 stride 2 -> Relu -> Flatten -> Gemm(transB=1) 288->64
    -> Relu -> Gemm(transB=0) 64->64 -> Relu -> MatMul 64->16 -> y[N,16]."""
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        fan_in = int(np.prod(shape[1:])) if len(shape) == 4 else shape[0]
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

    inits = {
        "c0.w": w(128, 3, 3, 3),
        "c0.b": w(128) * 0.1,
        "c1.w": w(32, 128, 3, 3),
        "g1.w": w(288, 64).T.copy(),  # [64, 288], used with transB=1
        "g1.b": w(64) * 0.1,
        "g2.w": w(64, 64),  # [K, N], transB=0
        "m.w": w(64, 16),
    }
    nodes = [
        helper.make_node("Conv", ["x", "c0.w", "c0.b"], ["h0"], "c0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h0"], ["h1"]),
        helper.make_node("Conv", ["h1", "c1.w"], ["h2"], "c1", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["h2"], ["h3"]),
        helper.make_node("Flatten", ["h3"], ["h4"], axis=1),
        helper.make_node("Gemm", ["h4", "g1.w", "g1.b"], ["h5"], "g1", transB=1),
        helper.make_node("Relu", ["h5"], ["h6"]),
        helper.make_node("Gemm", ["h6", "g2.w"], ["h7"], "g2", alpha=0.5),
        helper.make_node("Relu", ["h7"], ["h8"]),
        helper.make_node("MatMul", ["h8", "m.w"], ["y"], "m"),
    ]
    graph = helper.make_graph(
        nodes,
        "synthetic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
        [numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def synthetic_inputs(n: int, seed: int = 1) -> dict[str, np.ndarray]:
    """Correlated inputs (a smooth field plus noise), so the layer Hessians are far from diagonal."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, 3, 1, 1)) + np.linspace(-1, 1, 6)[None, None, :, None]
    return {"x": (base + 0.3 * rng.standard_normal((n, 3, 6, 6))).astype(np.float32)}


@pytest.fixture(scope="session")
def synthetic() -> onnx.ModelProto:
    return synthetic_model()


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(outputs, feeds)
