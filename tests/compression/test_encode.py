"""ENCODE: weight sharing, gap coding and rANS into one artifact; decode restores a runnable model."""

from __future__ import annotations

import struct

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compression.encode import MAGIC, decode_model, encode_model, share_model_weights, share_weights
from compression.evaluate import evaluate_variant
from tests import onnx_models
from tests.compression.conftest import run, synthetic_inputs

BITS = 4  # the operating point of the prune -> encode bar
SPARSITY = 0.8


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("bits", [1, 9, 4.0, True, "4"])
def test_bad_bits_raise_value_error(synthetic: onnx.ModelProto, bits: object) -> None:
    with pytest.raises(ValueError, match="bits must be an integer in"):
        encode_model(synthetic, bits)  # type: ignore[arg-type]


def test_corrupt_artifacts_raise_value_error(synthetic: onnx.ModelProto) -> None:
    blob, _ = encode_model(synthetic, 4)
    bad = {
        "magic": b"ONNX" + blob[4:],
        "version": blob[:4] + bytes([99]) + blob[5:],
        "truncated": blob[:-10],
        "meta": blob[:9] + bytes(b ^ 0x5A for b in blob[9:40]) + blob[40:],
        "empty": b"",
        "meta length": blob[:5] + struct.pack("<I", 1 << 30) + blob[9:],
    }
    for what, data in bad.items():
        with pytest.raises(ValueError):
            decode_model(data)
            pytest.fail(what)


def test_share_weights_is_a_lloyd_fixed_point() -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal(5000) * (rng.random(5000) > 0.6)
    book, codes = share_weights(w, 3)
    nz = w[w != 0]
    assert len(book) <= 8 and np.all(np.diff(book) > 0) and len(codes) == nz.size
    # every value sits at its nearest centroid, and every centroid is the mean of its values
    nearest = np.abs(nz[:, None] - book[None, :].astype(np.float64)).argmin(1)
    np.testing.assert_array_equal(codes, nearest)
    for k in range(len(book)):
        assert book[k] == pytest.approx(nz[codes == k].mean(), rel=1e-5)
    assert share_weights(np.zeros(10), 4)[0].size == 0


def test_decode_restores_the_shared_weights_exactly(digits: onnx.ModelProto, pruned, accuracy) -> None:
    model, _ = pruned(SPARSITY)
    blob, report = encode_model(model, BITS)
    assert blob[:4] == MAGIC and report.encoded_bytes == len(blob)
    decoded = decode_model(blob)
    onnx.checker.check_model(decoded)
    want, got, orig = initializers(share_model_weights(model, BITS)), initializers(decoded), initializers(model)
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].tobytes() == want[name].tobytes(), name
        np.testing.assert_array_equal(got[name] == 0, orig[name] == 0)  # zeros kept exact, no new ones
    encoded = {la["name"] for la in report.layers}
    assert encoded == {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}
    for name in encoded:
        assert len(np.unique(got[name][got[name] != 0])) <= 2**BITS
    for name in {"conv1.bias", "fc1.bias"}:
        np.testing.assert_array_equal(got[name], orig[name])  # small tensors stay exact in the skeleton
    x = {"input": np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)}
    np.testing.assert_array_equal(run(decoded, x)[0], run(share_model_weights(model, BITS), x)[0])
    assert encode_model(model, BITS)[0] == blob  # deterministic


def test_streams_within_3_percent_of_their_entropy(pruned) -> None:
    model, _ = pruned(SPARSITY)
    _, report = encode_model(model, BITS)
    for la in report.layers:
        for stream in ("code", "gap"):
            coded, bound = la[f"{stream}_bytes"], la[f"{stream}_entropy_bytes"]
            if bound == 0:
                assert coded == 0
            else:
                assert coded <= 1.03 * bound, (la["name"], stream, coded, bound)
        assert la["achieved_bits_per_weight"] <= 1.03 * la["entropy_bits_per_weight"]
        assert la["bits_per_weight"] > la["achieved_bits_per_weight"]  # plus its codebook and count tables
    assert report.stream_bytes + report.overhead_bytes == report.encoded_bytes


def test_prune_then_encode_is_20x_smaller_within_one_point(digits_bytes: bytes, digits_data, pruned) -> None:
    model, _ = pruned(SPARSITY)
    blob, report = encode_model(model, BITS)
    assert report.original_bytes == len(digits_bytes)
    assert len(digits_bytes) / len(blob) >= 20.0, report.ratio
    assert report.bits_per_weight_overall == pytest.approx(8 * len(blob) / 283_786)
    result = evaluate_variant(digits_bytes, blob, {"input": digits_data.x_test}, digits_data.y_test)
    primary = result["primary"]
    assert result["size_bytes"] == len(blob) and result["sparsity"] >= SPARSITY
    assert primary["accuracy_reference"] - primary["accuracy_candidate"] <= 0.01, primary


def test_long_zero_runs_use_escapes_and_round_trip(synthetic: onnx.ModelProto) -> None:
    model = onnx.ModelProto()
    model.CopyFrom(synthetic)
    t = next(t for t in model.graph.initializer if t.name == "c1.w")
    w = numpy_helper.to_array(t).copy()
    keep = np.zeros(w.size, dtype=bool)
    keep[[0, 1, 700, 701, 20_000, w.size - 1]] = True  # gaps of 698 and ~19k zeros
    w.ravel()[~keep] = 0
    t.CopyFrom(numpy_helper.from_array(w, t.name))
    blob, report = encode_model(model, 2)
    layer = next(la for la in report.layers if la["name"] == "c1.w")
    assert layer["escapes"] > 0 and layer["nonzeros"] == 6
    np.testing.assert_array_equal(
        initializers(decode_model(blob))["c1.w"], initializers(share_model_weights(model, 2))["c1.w"]
    )
    feeds = synthetic_inputs(4)
    np.testing.assert_array_equal(run(decode_model(blob), feeds)[0], run(share_model_weights(model, 2), feeds)[0])


def test_models_with_nothing_to_encode_round_trip_exactly() -> None:
    for data in (onnx_models.mlp(), onnx_models.identity_all_types()):
        model = onnx.load_from_string(data)
        seen: list[float] = []
        blob, report = encode_model(model, 4, progress=seen.append)
        assert report.layers == [] and seen == [1.0]
        assert decode_model(blob).SerializeToString() == data
    reasons = {s["name"]: s["reason"] for s in encode_model(onnx.load_from_string(onnx_models.mlp()), 4)[1].skipped}
    assert reasons["w1"].startswith("small tensor") and reasons["b1"].startswith("not a MatMul/Gemm/Conv")


def test_float16_dense_weights_round_trip() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float16)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "fp16",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 32])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    blob, report = encode_model(model, 6)
    (layer,) = report.layers
    assert layer["gap_bytes"] == 0 and layer["nonzeros"] == w.size  # dense: the gap stream is all zeros
    got = initializers(decode_model(blob))["w"]
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, initializers(share_model_weights(model, 6))["w"])
    assert np.abs(got.astype(np.float32) - w).max() < 0.1
