"""A small CNN trained on scikit-learn's bundled digits (8x8 images, 1797 samples; no download), as ONNX.

Trained with plain numpy (im2col convolutions, Adam): the data set is tiny, so a few seconds of numpy on 2 cores
reach ~98% held-out accuracy, and the test install needs no PyTorch (a ~200 MB wheel for 20 lines of autograd).

    input [N, 1, 8, 8] float32 in 0..1
    Conv 1->32 3x3 pad 1, Relu, Conv 32->64 3x3 pad 1, Relu, MaxPool 2x2   -> [N, 64, 4, 4]
    Flatten, Gemm 1024->256 (transB=1), Relu, MatMul 256->10, Add           -> logits [N, 10]

283,786 float32 parameters (1.14 MB). The trained model is cached under ``tests/.cache/`` keyed by a hash of
this file, so changing the training code retrains it. The split is fixed: 600 held-out test samples, the rest
for training; the calibration samples are the first 512 training samples (never test samples).
"""

from __future__ import annotations

import hashlib
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEED = 0
N_TEST = 600
N_CALIB = 512
EPOCHS = 20
BATCH = 32
LR = 1e-3
CACHE_DIR = Path(__file__).resolve().parent.parent / ".cache"


@dataclass(frozen=True)
class Digits:
    x_train: np.ndarray  # [N, 1, 8, 8] float32
    y_train: np.ndarray  # [N] int64
    x_calib: np.ndarray
    y_calib: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_data() -> Digits:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(SEED).permutation(len(y))
    test, train = perm[:N_TEST], perm[N_TEST:]
    calib = train[:N_CALIB]
    return Digits(x[train], y[train], x[calib], y[calib], x[test], y[test])


def _im2col(x: np.ndarray) -> np.ndarray:
    """NHWC [B, H, W, C] -> [B*H*W, 9*C], 3x3 kernel, pad 1, columns (kh, kw, c)."""
    b, h, w, c = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = np.stack([xp[:, i : i + h, j : j + w] for i, j in itertools.product(range(3), range(3))], axis=3)
    return cols.reshape(b * h * w, 9 * c)


def _col2im(dcols: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    b, h, w, c = shape
    d = dcols.reshape(b, h, w, 9, c)
    dxp = np.zeros((b, h + 2, w + 2, c), dtype=dcols.dtype)
    for k, (i, j) in enumerate(itertools.product(range(3), range(3))):
        dxp[:, i : i + h, j : j + w] += d[:, :, :, k]
    return dxp[:, 1:-1, 1:-1]


def _init_params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    def he(fan_in: int, shape: tuple[int, ...]) -> np.ndarray:
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    return {
        "c1w": he(9, (9, 32)),
        "c1b": np.zeros(32, np.float32),
        "c2w": he(288, (288, 64)),
        "c2b": np.zeros(64, np.float32),
        "f1w": he(1024, (1024, 256)),
        "f1b": np.zeros(256, np.float32),
        "f2w": he(256, (256, 10)),
        "f2b": np.zeros(10, np.float32),
    }


def _forward(p: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    b = x.shape[0]
    c1 = _im2col(x.transpose(0, 2, 3, 1))
    z1 = c1 @ p["c1w"] + p["c1b"]
    a1 = np.maximum(z1, 0).reshape(b, 8, 8, 32)
    c2 = _im2col(a1)
    z2 = c2 @ p["c2w"] + p["c2b"]
    a2 = np.maximum(z2, 0).reshape(b, 4, 2, 4, 2, 64)
    pooled = a2.max(axis=(2, 4))  # [B, 4, 4, 64]
    flat = pooled.transpose(0, 3, 1, 2).reshape(b, 1024)  # NCHW flatten order, as ONNX Flatten sees it
    z3 = flat @ p["f1w"] + p["f1b"]
    a3 = np.maximum(z3, 0)
    logits = a3 @ p["f2w"] + p["f2b"]
    cache = {"c1": c1, "z1": z1, "c2": c2, "z2": z2, "a2": a2, "pooled": pooled, "flat": flat, "z3": z3, "a3": a3}
    return logits, cache


def _backward(p: dict[str, np.ndarray], cache: dict[str, np.ndarray], dlogits: np.ndarray) -> dict[str, np.ndarray]:
    b = dlogits.shape[0]
    g = {"f2w": cache["a3"].T @ dlogits, "f2b": dlogits.sum(0)}
    dz3 = (dlogits @ p["f2w"].T) * (cache["z3"] > 0)
    g["f1w"], g["f1b"] = cache["flat"].T @ dz3, dz3.sum(0)
    dpool = (dz3 @ p["f1w"].T).reshape(b, 64, 4, 4).transpose(0, 2, 3, 1)
    a2, pooled = cache["a2"], cache["pooled"]
    win = a2 == pooled[:, :, None, :, None, :]
    da2 = win * (dpool[:, :, None, :, None, :] / win.sum(axis=(2, 4), keepdims=True))
    dz2 = da2.reshape(b * 64, 64) * (cache["z2"] > 0)
    g["c2w"], g["c2b"] = cache["c2"].T @ dz2, dz2.sum(0)
    da1 = _col2im(dz2 @ p["c2w"].T, (b, 8, 8, 32))
    dz1 = da1.reshape(b * 64, 32) * (cache["z1"] > 0)
    g["c1w"], g["c1b"] = cache["c1"].T @ dz1, dz1.sum(0)
    return g


def train(data: Digits) -> dict[str, np.ndarray]:
    """Adam on softmax cross-entropy; deterministic for a given numpy/BLAS."""
    rng = np.random.default_rng(SEED)
    p = _init_params(rng)
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(v) for k, v in p.items()}
    t = 0
    for _ in range(EPOCHS):
        order = rng.permutation(len(data.y_train))
        for s in range(0, len(order), BATCH):
            idx = order[s : s + BATCH]
            logits, cache = _forward(p, data.x_train[idx])
            e = np.exp(logits - logits.max(1, keepdims=True))
            probs = e / e.sum(1, keepdims=True)
            probs[np.arange(len(idx)), data.y_train[idx]] -= 1.0
            grads = _backward(p, cache, (probs / len(idx)).astype(np.float32))
            t += 1
            for k in p:
                m[k] = 0.9 * m[k] + 0.1 * grads[k]
                v[k] = 0.999 * v[k] + 0.001 * grads[k] ** 2
                mh, vh = m[k] / (1 - 0.9**t), v[k] / (1 - 0.999**t)
                p[k] = (p[k] - LR * mh / (np.sqrt(vh) + 1e-8)).astype(np.float32)
    return p


def predict(p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    return _forward(p, x)[0]


def to_onnx(p: dict[str, np.ndarray]) -> onnx.ModelProto:
    inits = {
        "conv1.weight": p["c1w"].reshape(3, 3, 1, 32).transpose(3, 2, 0, 1),
        "conv1.bias": p["c1b"],
        "conv2.weight": p["c2w"].reshape(3, 3, 32, 64).transpose(3, 2, 0, 1),
        "conv2.bias": p["c2b"],
        "fc1.weight": p["f1w"].T,  # [256, 1024], Gemm transB=1 (as torch.nn.Linear exports)
        "fc1.bias": p["f1b"],
        "fc2.weight": p["f2w"],  # [256, 10], MatMul [K, N]
        "fc2.bias": p["f2b"],
    }
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], "relu1"),
        helper.make_node("Conv", ["r1", "conv2.weight", "conv2.bias"], ["c2"], "conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], "relu2"),
        helper.make_node("MaxPool", ["r2"], ["p2"], "pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p2"], ["flat"], "flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc1.weight", "fc1.bias"], ["f1"], "fc1", transB=1),
        helper.make_node("Relu", ["f1"], ["r3"], "relu3"),
        helper.make_node("MatMul", ["r3", "fc2.weight"], ["f2"], "fc2"),
        helper.make_node("Add", ["f2", "fc2.bias"], ["logits"], "fc2_bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(np.ascontiguousarray(a, dtype=np.float32), n) for n, a in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="slimserve-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def cache_key() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def digits_model(cache_dir: Path = CACHE_DIR) -> bytes:
    """The trained CNN as ONNX bytes, trained on first use and cached on disk."""
    path = cache_dir / f"digits-cnn-{cache_key()}.onnx"
    if path.is_file():
        return path.read_bytes()
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    data = load_data()
    with threadpool_limits(1):  # tiny matrices: one BLAS thread is faster, and immune to a busy machine
        model = to_onnx(train(data)).SerializeToString()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(model)
    tmp.replace(path)
    return model
