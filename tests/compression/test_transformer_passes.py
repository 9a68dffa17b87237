"""Transformer fusions (graph_opt), dynamic int8 with SmoothQuant (dynamic) and weight-only MatMulNBits
(weight_only): small models built with onnx.helper, and the MiniLM graph with random weights (no download)."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compression.dynamic import quantize_dynamic_int8
from compression.graph_opt import canonicalize, fuse_transformer
from compression.metrics import compare
from compression.weight_only import quantize_weight_only
from tests.compression import encoder as E
from tests.compression.conftest import run

VOCAB = 500


def _mlp(k: int = 64, hidden: int = 128, out: int = 32, outliers: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((k, hidden)) / np.sqrt(k)).astype(np.float32)
    w2 = (rng.standard_normal((hidden, out)) / np.sqrt(hidden)).astype(np.float32)
    scale = np.ones(k, np.float32)
    if outliers:  # a few input channels 50x larger than the rest, as in a transformer's residual stream
        scale[[3, 17]] = 50.0
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(scale, "s")]
    nodes = [
        helper.make_node("Mul", ["x", "s"], ["xs"], "scale"),
        helper.make_node("MatMul", ["xs", "w1"], ["h"], "fc1"),
        helper.make_node("Relu", ["h"], ["r"], "relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], "fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _x(n: int, k: int = 64, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)}


def _random_minilm() -> onnx.ModelProto:
    """tests/compression/encoder.py's graph (6 layers, hidden 384) with random weights and a small vocabulary."""
    return E.build_encoder(E.random_weights(E.LAYERS, VOCAB))


def _ids(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 24, n)
    mask = (np.arange(32)[None, :] < lengths[:, None]).astype(np.int64)
    return {
        "input_ids": rng.integers(1, VOCAB, (n, 32)).astype(np.int64) * mask,
        "attention_mask": mask,
        "token_type_ids": np.zeros((n, 32), np.int64),
    }


@pytest.fixture(scope="module")
def minilm() -> onnx.ModelProto:
    return _random_minilm()


def test_canonicalize_splits_multi_axis_unsqueeze() -> None:
    axes = numpy_helper.from_array(np.array([1, 2], np.int64), "axes")
    graph = helper.make_graph(
        [helper.make_node("Unsqueeze", ["m", "axes"], ["u"], "u"), helper.make_node("Relu", ["u"], ["y"], "r")],
        "g",
        [helper.make_tensor_value_info("m", TensorProto.FLOAT, ["N", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 1, 5])],
        [axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out, split = canonicalize(model)
    onnx.checker.check_model(out)
    assert split == 1 and [n.op_type for n in out.graph.node] == ["Unsqueeze", "Unsqueeze", "Relu"]
    x = {"m": np.arange(10, dtype=np.float32).reshape(2, 5)}
    assert np.array_equal(run(model, x)[0], run(out, x)[0])


def test_fuse_transformer_on_a_model_without_attention_changes_nothing() -> None:
    model = _mlp()
    fused, report = fuse_transformer(model)
    assert report.fused == {} and "nothing fused" in report.notes[0]
    x = _x(8)
    np.testing.assert_allclose(run(model, x)[0], run(fused, x)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="model_type"):
        fuse_transformer(model, model_type="resnet")


def test_fuse_transformer_fuses_minilm_attention_with_the_raw_mask(minilm: onnx.ModelProto) -> None:
    fused, report = fuse_transformer(minilm)
    assert report.fused == {"Attention": 6, "BiasGelu": 6} and report.canonicalized == 1
    assert "SkipLayerNormalization" not in {n.op_type for n in fused.graph.node}  # off by default (slower here)
    feeds = _ids(8, seed=3)
    # left padding too: the fused graph reads the mask itself, not a right-padding length
    feeds_left = {k: v[:, ::-1].copy() for k, v in feeds.items()}
    for f in (feeds, feeds_left):
        np.testing.assert_allclose(run(minilm, f)[0], run(fused, f)[0], atol=2e-5)


def test_dynamic_int8_smoothquant_per_channel_mlp() -> None:
    model = _mlp(outliers=True)
    calibration, evaluation, test = _x(128), _x(64, seed=2), _x(64, seed=3)
    quantized, report = quantize_dynamic_int8(model, calibration, evaluation, metric="cosine", embeddings=False)
    onnx.checker.check_model(quantized)
    ops = collections.Counter(n.op_type for n in quantized.graph.node)
    assert report.nodes_quantized == 2 and ops["MatMul"] == 0
    assert set(report.sweep) == {"none", "0.5", "0.75", "0.9"} and report.quality == max(report.sweep.values())
    assert compare(run(model, test)[0], run(quantized, test)[0]).mean_cosine > 0.995
    weights = [t for t in quantized.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) == 2]
    assert len(weights) == 2 and quantized.ByteSize() < 0.4 * model.ByteSize()
    with pytest.raises(ValueError, match="smooth_alpha"):
        quantize_dynamic_int8(model, calibration, evaluation, smooth_alpha=1.5)
    with pytest.raises(ValueError, match="opset"):
        old = onnx.ModelProto()
        old.CopyFrom(model)
        old.opset_import[0].version = 11
        quantize_dynamic_int8(old, calibration, evaluation)


@pytest.mark.slow
def test_dynamic_int8_on_fused_minilm(minilm: onnx.ModelProto) -> None:
    fused, _ = fuse_transformer(minilm)
    quantized, report = quantize_dynamic_int8(fused, _ids(32, 1), _ids(16, 2), smooth_alpha=0.75, metric="cosine")
    ops = collections.Counter(n.op_type for n in quantized.graph.node)
    assert ops["QAttention"] == 6 and report.nodes_quantized == 24 and report.smooth_alpha == 0.75
    assert report.embeddings is not None and report.embeddings["quantized"]
    test = _ids(16, 3)
    assert compare(run(minilm, test)[0], run(quantized, test)[0]).mean_cosine > 0.99
    assert quantized.ByteSize() < 0.3 * minilm.ByteSize()


@pytest.mark.parametrize(("bits", "block", "cosine"), [(4, 32, 0.99), (8, 128, 0.9999)])
def test_weight_only_matmulnbits(bits: int, block: int, cosine: float) -> None:
    model = _mlp()
    quantized, report = quantize_weight_only(model, bits=bits, block_size=block)
    assert report.nodes_quantized == 2 and report.nodes_left == []
    assert {n.op_type for n in quantized.graph.node} >= {"MatMulNBits"}
    assert quantized.ByteSize() < (0.25 if bits == 4 else 0.5) * model.ByteSize()  # 8 bit: K=64 padded to 128
    x = _x(16)
    assert compare(run(model, x)[0], run(quantized, x)[0]).mean_cosine > cosine


def test_weight_only_excludes_and_checks_arguments() -> None:
    model = _mlp()
    _, report = quantize_weight_only(model, exclude=["fc2"])
    assert report.nodes_quantized == 1 and report.nodes_left == [{"name": "fc2", "reason": "excluded"}]
    for kwargs in ({"bits": 3}, {"block_size": 24}, {"accuracy_level": 7}):
        with pytest.raises(ValueError):
            quantize_weight_only(model, **kwargs)  # type: ignore[arg-type]
