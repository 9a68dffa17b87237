"""Calibrated weight sharing (compression.codebook) and the ENCODE changes it relies on (exact codebooks,
per-layer bits), on the synthetic model of conftest.py (every linear-layer layout) and the digits CNN."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from compression import onnx_graph as og
from compression.codebook import obs_round, refit_centroids, share_calibrated
from compression.encode import decode_model, encode_model, estimate_bytes, share_weights
from compression.metrics import compare
from compression.prune import prune_model
from tests.compression.conftest import run, synthetic_inputs


def _distinct_nonzeros(model: onnx.ModelProto) -> dict[str, int]:
    refs, _ = og.linear_weights(model, min_weights=256)
    out = {}
    for r in refs:
        w = og.get_weight(model, r)
        out[r.name] = int(np.unique(w[w != 0]).size)
    return out


def test_share_calibrated_values_mask_and_error(synthetic: onnx.ModelProto) -> None:
    calibration, test = synthetic_inputs(256, seed=1), synthetic_inputs(128, seed=2)
    pruned, _ = prune_model(synthetic, 0.6, calibration=calibration)
    shared, report = share_calibrated(pruned, 3, calibration, layer_bits={"g1.w": 2})
    assert {la["name"]: la["bits"] for la in report.layers}["g1.w"] == 2
    for name, count in _distinct_nonzeros(shared).items():
        assert count <= (4 if name == "g1.w" else 8), name
    refs, _ = og.linear_weights(pruned, min_weights=256)
    for r in refs:  # the pruning mask survives: zeros stay zero, non-zeros stay non-zero (or the input was dead)
        before, after = og.get_weight(pruned, r), og.get_weight(shared, r)
        assert np.all(after[before == 0] == 0)
    for la in report.layers:
        if "error" in la:  # OBS rounding + refit never does worse than plain k-means on the layer's output
            assert la["error"] <= la["error_kmeans"] + 1e-9, la
            assert la["method"] == "obs + least-squares centroids"
    plain = encode_model(pruned, 3)[0]
    ref = run(synthetic, test)[0]
    assert compare(ref, run(shared, test)[0]).mean_cosine >= compare(ref, run(decode_model(plain), test)[0]).mean_cosine


def test_encode_keeps_shared_values_exactly(synthetic: onnx.ModelProto) -> None:
    calibration = synthetic_inputs(128, seed=1)
    shared, report = share_calibrated(synthetic, 4, calibration)
    bits = {la["name"]: la["bits"] for la in report.layers}
    blob, encoded = encode_model(shared, 4, layer_bits=bits)
    decoded = decode_model(blob)
    for a, b in zip(shared.graph.initializer, decoded.graph.initializer, strict=True):
        assert np.array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b)), a.name
    for layer in encoded.layers:
        assert layer["bits"] == 4 and layer["centroids"] <= 16
        w = onnx.numpy_helper.to_array(next(t for t in shared.graph.initializer if t.name == layer["name"]))
        coded = layer["code_bytes"] + layer["gap_bytes"] + layer["table_bytes"]
        assert abs(estimate_bytes(w, 4) - coded) <= 0.05 * coded + 16  # the allocation's price is the real one


def test_encode_layer_bits_and_exact_codebook() -> None:
    w = np.array([[0.0, 0.5, -0.25, 0.5], [0.125, 0.0, -0.25, 0.125]], np.float32)
    book, codes = share_weights(w, 2)  # 4 distinct non-zeros fit 2 bits: kept exactly
    assert np.array_equal(book, [-0.25, 0.125, 0.5]) and np.array_equal(book[codes], w[w != 0])
    with pytest.raises(ValueError, match="not an initializer"):
        encode_model(onnx.ModelProto(), 4, layer_bits={"nope": 3})


def test_obs_round_and_refit_reduce_output_error() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 64)) @ rng.standard_normal((64, 64))  # correlated inputs
    h = x.T @ x
    w = rng.standard_normal((32, 64))
    w[rng.random(w.shape) < 0.5] = 0.0
    book, codes = share_weights(w, 3)
    kmeans = np.zeros_like(w)
    kmeans[w != 0] = book[codes]

    def err(m: np.ndarray) -> float:
        d = m - w
        return float(((d @ h) * d).sum())

    rounded = obs_round(w, h, book.astype(np.float64))
    refit = refit_centroids(rounded, w, h, book.astype(np.float64))
    assert err(refit) <= err(rounded) < err(kmeans)
    assert np.all(refit[w == 0] == 0) and np.unique(refit[refit != 0]).size <= 8


def test_share_calibrated_on_digits_keeps_accuracy(
    digits: onnx.ModelProto, digits_data: object, accuracy: object
) -> None:
    calibration = {"input": digits_data.x_calib}  # type: ignore[attr-defined]
    shared, _report = share_calibrated(digits, 3, calibration)
    assert all(count <= 8 for count in _distinct_nonzeros(shared).values())
    assert accuracy(shared) >= accuracy(digits) - 0.01  # type: ignore[operator]
    with pytest.raises(ValueError, match="bits"):
        share_calibrated(digits, 9, calibration)
    with pytest.raises(ValueError, match="not shareable"):
        share_calibrated(digits, 3, calibration, layer_bits={"fc2.bias": 3})
