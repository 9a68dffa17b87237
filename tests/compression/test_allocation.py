"""Per-layer sparsity (prune_model layer_sparsity), dead channels, and the sensitivity-based size allocation."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compression import onnx_graph as og
from compression.allocation import LayerOption, allocate, compress_to_budget, measure
from compression.encode import decode_model
from compression.prune import prune_model, zero_dead_channels
from tests.compression import digits as D
from tests.compression.conftest import run, synthetic_inputs


def test_layer_sparsity_sets_each_layer(synthetic: onnx.ModelProto) -> None:
    calibration = synthetic_inputs(128)
    _pruned, report = prune_model(synthetic, 0.5, calibration=calibration, layer_sparsity={"c1.w": 0.8, "g1.w": 0.2})
    by_name = {la["name"]: la["sparsity"] for la in report.layers}
    assert by_name["c1.w"] >= 0.8 and 0.2 <= by_name["g1.w"] < 0.3 and by_name["g2.w"] >= 0.5
    with pytest.raises(ValueError, match="not prunable"):
        prune_model(synthetic, 0.5, layer_sparsity={"c0.b": 0.5})
    with pytest.raises(ValueError, match="sparsity must be"):
        prune_model(synthetic, 0.5, layer_sparsity={"c1.w": 0.99})
    with pytest.raises(ValueError, match="unstructured"):
        prune_model(synthetic, 0.5, pattern="2:4", layer_sparsity={"c1.w": 0.5})


def _mlp(dead_columns: list[int], residual: bool = False) -> onnx.ModelProto:
    """x[N,8] -> MatMul 8x16 -> Relu -> MatMul 16x4 (some input rows zero) -> y; optionally Relu also feeds y2."""
    rng = np.random.default_rng(0)
    w2 = rng.standard_normal((16, 4)).astype(np.float32)
    w2[dead_columns] = 0.0
    inits = [numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w1"),
             numpy_helper.from_array(w2, "w2")]  # fmt: skip
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], "fc1"),
        helper.make_node("Relu", ["h"], ["r"], "relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], "fc2"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])]
    if residual:
        nodes.append(helper.make_node("ReduceSum", ["r"], ["y2"], "side", keepdims=0))
        outputs.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["N"]))
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])], outputs, inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_dead_channels_are_zeroed_exactly() -> None:
    model = _mlp([1, 5, 9])
    cleaned, report = zero_dead_channels(model)
    w1 = onnx.numpy_helper.to_array(next(t for t in cleaned.graph.initializer if t.name == "w1"))
    assert np.all(w1[:, [1, 5, 9]] == 0) and np.count_nonzero(w1) == 8 * 13
    assert report == [{"producer": "w1", "consumer": "w2", "channels": 3, "weights": 24}]
    x = {"x": np.random.default_rng(1).standard_normal((32, 8)).astype(np.float32)}
    assert np.array_equal(run(model, x)[0], run(cleaned, x)[0])
    # a channel that also reaches another consumer is not dead
    side, side_report = zero_dead_channels(_mlp([1, 5, 9], residual=True))
    assert side_report == [] and np.count_nonzero(og.get_weight(side, og.linear_weights(side, 0)[0][0])) == 128


def test_dead_channels_through_conv_flatten_gemm(digits: onnx.ModelProto, digits_data: D.Digits) -> None:
    fc1 = next(t for t in digits.graph.initializer if t.name == "fc1.weight")
    w = onnx.numpy_helper.to_array(fc1).copy()  # [256, 1024], columns = conv2 channel x 16 positions
    w[:, 16 * 3 : 16 * 4] = 0.0  # nothing reads conv2 channel 3
    model = onnx.ModelProto()
    model.CopyFrom(digits)
    next(t for t in model.graph.initializer if t.name == "fc1.weight").CopyFrom(
        numpy_helper.from_array(w, "fc1.weight")
    )
    cleaned, report = zero_dead_channels(model)
    conv2 = onnx.numpy_helper.to_array(next(t for t in cleaned.graph.initializer if t.name == "conv2.weight"))
    assert np.all(conv2[3] == 0) and {"producer": "conv2.weight", "consumer": "fc1.weight"}.items() <= report[0].items()
    x = {"input": digits_data.x_test}
    assert np.array_equal(run(model, x)[0], run(cleaned, x)[0])
    # with calibration: fc1 units that never fire on it lose their fc2 weights, then their fc1 rows
    calibrated, calibrated_report = zero_dead_channels(digits, {"input": digits_data.x_calib})
    assert any(r["producer"] == "fc1.weight" and r["channels"] > 0 for r in calibrated_report)
    assert np.array_equal(
        run(digits, {"input": digits_data.x_calib})[0], run(calibrated, {"input": digits_data.x_calib})[0]
    )


def test_allocate_fits_the_budget_and_trades_loss_for_bytes() -> None:
    options = [
        LayerOption("a", s, b, loss, size)
        for s, b, loss, size in ((0.0, 4, 0.0, 1000), (0.5, 4, 0.01, 600), (0.9, 2, 0.2, 100))
    ] + [LayerOption("b", s, b, loss, size) for s, b, loss, size in ((0.0, 4, 0.0, 500), (0.8, 3, 0.001, 150))]
    roomy = allocate(options, budget_bytes=2000, fixed_bytes=100)
    assert roomy.feasible and roomy.layer_sparsity == {"a": 0.0, "b": 0.0} and roomy.predicted_loss == 0
    tight = allocate(options, budget_bytes=900, fixed_bytes=100)
    assert tight.feasible and tight.predicted_bytes <= 900 and tight.layer_sparsity == {"a": 0.5, "b": 0.8}
    impossible = allocate(options, budget_bytes=200, fixed_bytes=100)
    assert not impossible.feasible and impossible.layer_bits == {"a": 2, "b": 3}
    losses = [allocate(options, b, 100).predicted_loss for b in (2000, 1300, 900, 400)]
    assert losses == sorted(losses)  # a smaller budget never buys a smaller loss


@pytest.mark.slow
def test_compress_to_budget_meets_30x_within_a_point(digits: onnx.ModelProto, digits_data: D.Digits, accuracy) -> None:  # type: ignore[no-untyped-def]
    """The digits bar on held-out samples, with a small sensitivity grid to keep the test short."""
    calibration = {"input": digits_data.x_calib}
    validation = {"input": digits_data.x_train[D.N_CALIB :]}
    base, _ = zero_dead_channels(digits, calibration)
    options = measure(base, calibration, validation, sparsities=(0.0, 0.8, 0.85, 0.9), bits=(2, 3, 4))
    assert len(options[0]) == 3 * 4 * 3 and options[2] == "kl"
    result, _ = compress_to_budget(digits, calibration, validation, 30, options=options)
    ratio = len(digits.SerializeToString()) / result.size_bytes
    assert ratio >= 30 * 0.95 and result.allocation.feasible
    assert abs(result.size_bytes - result.allocation.predicted_bytes) < 0.1 * result.size_bytes
    assert accuracy(decode_model(result.artifact)) >= accuracy(digits) - 0.01
