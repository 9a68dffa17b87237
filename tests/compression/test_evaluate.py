"""EVALUATE: running models in batches, comparing variants, sparsity and latency, on real ONNX Runtime runs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from compression.encode import encode_model
from compression.evaluate import evaluate_variant, measure_latency, model_sparsity, run_model
from tests import onnx_models
from tests.compression.conftest import run


def test_run_model_batches_like_one_run(digits_bytes: bytes, digits_data) -> None:
    feeds = {"input": digits_data.x_test[:100]}
    whole = run(onnx.load_from_string(digits_bytes), feeds)[0]
    for b in (7, 64, 1000):
        out = run_model(digits_bytes, feeds, batch_size=b)
        assert list(out) == ["logits"]
        np.testing.assert_allclose(out["logits"], whole, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="batch_size"):
        run_model(digits_bytes, feeds, batch_size=0)
    with pytest.raises(ValueError, match=r"named after the model's inputs \['input'\]; missing: \['input'\]"):
        run_model(digits_bytes, {"x": digits_data.x_test[:4]})


def test_identical_variant_agrees_fully(digits_bytes: bytes, digits_data) -> None:
    r = evaluate_variant(digits_bytes, digits_bytes, {"input": digits_data.x_test}, digits_data.y_test)
    p = r["primary"]
    assert r["outputs"]["logits"] == p
    assert p["top1_agreement"] == 1.0 and p["max_abs_error"] == 0.0 and p["mean_cosine"] == pytest.approx(1.0)
    assert p["accuracy_reference"] == p["accuracy_candidate"] >= 0.97 and p["accuracy_delta"] == 0.0
    assert r["size_ratio"] == 1.0 and r["sparsity"] == 0.0
    assert r["bits_per_weight"] == pytest.approx(8 * len(digits_bytes) / 283_786)


def test_pruned_and_encoded_variants(digits_bytes: bytes, digits_data, pruned) -> None:
    model, report = pruned(0.7)
    assert model_sparsity(model) == pytest.approx(report.overall_sparsity)
    feeds = {"input": digits_data.x_test}
    plain = evaluate_variant(digits_bytes, model.SerializeToString(), feeds, digits_data.y_test)
    blob, _ = encode_model(model, 5)
    coded = evaluate_variant(digits_bytes, blob, feeds, digits_data.y_test)
    assert coded["size_bytes"] == len(blob) < plain["size_bytes"] / 10
    assert coded["sparsity"] == pytest.approx(plain["sparsity"])  # the encoding keeps zeros exact
    for r in (plain, coded):
        assert 0.97 <= r["primary"]["top1_agreement"] < 1.0
        assert 0.99 < r["primary"]["mean_cosine"] < 1.0 and r["primary"]["max_abs_error"] > 0


def test_non_classifier_outputs_get_cosine_and_error() -> None:
    ref = onnx_models.mlp(in_dim=4, hidden=8, out_dim=1, seed=0)
    cand = onnx_models.mlp(in_dim=4, hidden=8, out_dim=1, seed=1)
    x = {"x": np.random.default_rng(0).standard_normal((32, 4)).astype(np.float32)}
    r = evaluate_variant(ref, cand, x)
    assert set(r["outputs"]) == {"probs", "logits"} and r["primary"] == r["outputs"]["probs"]
    logits = r["outputs"]["logits"]
    assert logits["top1_agreement"] is None and logits["accuracy_candidate"] is None
    assert logits["max_abs_error"] > 0 and -1.0 <= logits["mean_cosine"] < 1.0
    fewer = onnx.load_from_string(cand)
    fewer.graph.output.pop(0)  # only "logits" left
    with pytest.raises(ValueError, match=r"lacks output\(s\) \['probs'\]"):
        evaluate_variant(ref, fewer.SerializeToString(), x)


def test_measure_latency(digits_bytes: bytes, digits_data) -> None:
    r = measure_latency(digits_bytes, {"input": digits_data.x_test[:3]}, batch_size=8, runs=20, warmup=2, threads=1)
    assert r["runs"] == 20 and r["batch_size"] == 8 and r["backend"] == "onnxruntime-cpu"
    assert 0 < r["p50_ms"] <= r["p99_ms"] and r["mean_ms"] > 0
    with pytest.raises(ValueError):
        measure_latency(digits_bytes, {"input": digits_data.x_test[:3]}, runs=0)
