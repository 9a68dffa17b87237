"""INT8 static quantization (compression.quantize) on real, trained models run with ONNX Runtime.

Fast tests use a scikit-learn MLP trained on the bundled digits set, written into ONNX three ways (MatMul,
Conv + Gemm transB=1, and a residual block whose input also feeds an Add). The slow test quantizes the real
all-MiniLM-L6-v2 sentence encoder (tests/compression/encoder.py) and asserts the bar: mean cosine >= 0.99.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compression.metrics import compare
from compression.quantize import QuantReport, quantize_model
from compression.quantize_graph import smooth, weight_nodes

OPSET = [helper.make_opsetid("", 17)]


@dataclass(frozen=True)
class Trained:
    w1: np.ndarray  # [64, H]
    b1: np.ndarray
    w2: np.ndarray  # [H, 10]
    b2: np.ndarray
    x_calib: np.ndarray  # [N, 64] float32 in 0..1
    x_eval: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@pytest.fixture(scope="module")
def trained() -> Trained:
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    idx = np.random.default_rng(0).permutation(len(x))
    train, calib, ev, test = idx[:1000], idx[1000:1256], idx[1256:1500], idx[1500:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=150, random_state=0).fit(x[train], y[train])
    w1, w2 = (c.astype(np.float32) for c in clf.coefs_)
    b1, b2 = (b.astype(np.float32) for b in clf.intercepts_)
    return Trained(w1, b1, w2, b2, x[calib], x[ev], x[test], y[test].astype(np.int64))


def _model(
    nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], inits: dict[str, np.ndarray], out_dim: int = 10
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        inputs,
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", out_dim])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    m = helper.make_model(graph, opset_imports=OPSET)
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def mlp(t: Trained, outlier: float = 1.0) -> onnx.ModelProto:
    """x[N,64] -> MatMul -> Add -> Relu -> MatMul -> Add -> logits. ``outlier`` > 1 divides row 0 of W1 by it:
    fed x with column 0 multiplied by it, the function is unchanged but x gets one huge channel."""
    w1 = t.w1.copy()
    w1[0] /= outlier
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
        helper.make_node("MatMul", ["h2", "w2"], ["l0"], name="fc2"),
        helper.make_node("Add", ["l0", "b2"], ["logits"], name="fc2_bias"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])
    return _model(nodes, [x], {"w1": w1, "b1": t.b1, "w2": t.w2, "b2": t.b2})


def conv_gemm(t: Trained) -> onnx.ModelProto:
    """The same network as Conv (8x8 kernel over the 1x8x8 image) -> Relu -> Flatten -> Gemm(transB=1)."""
    hidden = t.w1.shape[1]
    nodes = [
        helper.make_node("Conv", ["image", "cw", "cb"], ["c"], name="conv", kernel_shape=[8, 8]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "gw", "gb"], ["logits"], name="gemm", transB=1),
    ]
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8])
    inits = {"cw": t.w1.T.reshape(hidden, 1, 8, 8), "cb": t.b1, "gw": t.w2.T.copy(), "gb": t.b2}
    return _model(nodes, [image], inits)


def residual(t: Trained) -> onnx.ModelProto:
    """h = relu(x W1 + b1); z = h + h W2'; logits = z W3: h feeds a quantized MatMul and a float Add."""
    hidden = t.w1.shape[1]
    w_mid = (np.random.default_rng(1).standard_normal((hidden, hidden)) * 0.05).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h"], name="relu"),
        helper.make_node("MatMul", ["h", "w_mid"], ["m"], name="mid"),
        helper.make_node("Add", ["h", "m"], ["z"], name="skip"),
        helper.make_node("MatMul", ["z", "w2"], ["l0"], name="fc2"),
        helper.make_node("Add", ["l0", "b2"], ["logits"], name="fc2_bias"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])
    return _model(nodes, [x], {"w1": t.w1, "b1": t.b1, "w_mid": w_mid, "w2": t.w2, "b2": t.b2})


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, feed)[0]


def inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def weight_dq(model: onnx.ModelProto, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(int8 weight, scale, zero point, axis) of the DequantizeLinear feeding ``name``'s weight input."""
    dq = producers(model)[node(model, name).input[1]]
    assert dq.op_type == "DequantizeLinear"
    values = inits(model)
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    return values[dq.input[0]], values[dq.input[1]], values[dq.input[2]], axis


def activation_dq(model: onnx.ModelProto, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) of the Q -> DQ pair on ``name``'s activation input."""
    prod = producers(model)
    dq = prod[node(model, name).input[0]]
    assert dq.op_type == "DequantizeLinear"
    q = prod[dq.input[0]]
    assert q.op_type == "QuantizeLinear"
    assert list(q.input[1:]) == list(dq.input[1:]), "Q and DQ must share scale and zero point"
    values = inits(model)
    return values[dq.input[1]], values[dq.input[2]]


# --- structure ----------------------------------------------------------------------------------------------


def test_mlp_qdq_structure_and_accuracy(trained: Trained) -> None:
    model = mlp(trained)
    models, report = quantize_model(model, {"x": trained.x_calib}, evaluation={"x": trained.x_eval}, smooth_alpha=None)
    assert isinstance(report, QuantReport)
    assert set(models) == {"qdq", "cpu"}  # x86: the CPU form takes uint8 activations
    assert report.nodes_quantized == 2 and report.fallback_nodes == []
    assert report.per_channel and report.symmetric and report.method == "minmax"
    assert report.metric == "top1_agreement"  # [N, 10] logits: a classifier
    qdq = models["qdq"]
    onnx.checker.check_model(qdq)
    for name, w in (("fc1", trained.w1), ("fc2", trained.w2)):
        q, scale, zp, axis = weight_dq(qdq, name)
        assert q.dtype == np.int8 and q.shape == w.shape
        assert axis == 1 and scale.shape == (w.shape[1],), "per-channel along MatMul's output axis"
        assert zp.dtype == np.int8 and not zp.any(), "symmetric weights: zero points 0"
        assert np.abs(q).max() == 127  # symmetric full range per channel
        np.testing.assert_allclose(q * scale, w, atol=float(scale.max()) / 2 + 1e-7)
        a_scale, a_zp = activation_dq(qdq, name)
        assert a_scale.shape == () and a_zp.dtype == np.int8 and a_zp == 0
    # nothing but the weight ops sees Q/DQ; MatMul outputs are not re-quantized
    dq_outputs = {n.output[0] for n in qdq.graph.node if n.op_type == "DequantizeLinear"}
    for n in qdq.graph.node:
        if n.op_type not in ("MatMul", "QuantizeLinear", "DequantizeLinear"):
            assert not set(n.input) & dq_outputs, f"{n.name} reads a dequantized tensor"
    assert sum(n.op_type == "QuantizeLinear" for n in qdq.graph.node) == 2
    _, a_zp = activation_dq(models["cpu"], "fc1")
    assert a_zp.dtype == np.uint8
    # value_info from ORT's shape inference is dropped (it lets ORT fuse a slow SkipLayerNormalization on CPU)
    assert all(not m.graph.value_info for m in models.values())
    # accuracy against fp32 on held-out digits
    feed = {"x": trained.x_test}
    ref = run(model, feed)
    for form, m in models.items():
        out = run(m, feed)
        agreement = compare(ref, out, trained.y_test)
        assert agreement.top1_agreement is not None and agreement.top1_agreement >= 0.98, form
        assert agreement.accuracy_delta is not None and agreement.accuracy_delta >= -0.02, form
    assert report.form_metrics["qdq"] == report.metric_after >= 0.98


def test_conv_and_gemm_per_channel_axes(trained: Trained) -> None:
    model = conv_gemm(trained)
    image = lambda x: x.reshape(-1, 1, 8, 8)  # noqa: E731
    models, report = quantize_model(
        model, {"image": image(trained.x_calib)}, evaluation={"image": image(trained.x_eval)}, method="percentile"
    )
    assert report.nodes_quantized == 2
    qdq, cpu = models["qdq"], models["cpu"]
    q, scale, zp, axis = weight_dq(qdq, "conv")
    assert q.shape == (64, 1, 8, 8) and axis == 0 and scale.shape == (64,) and not zp.any()
    q, scale, zp, axis = weight_dq(qdq, "gemm")  # transB=1: weight [out, in], output channels on axis 0
    assert q.shape == (10, 64) and axis == 0 and scale.shape == (10,) and not zp.any()
    # the CPU form also quantizes the Conv output, so ONNX Runtime can run QLinearConv; the TensorRT form doesn't
    conv_out = node(qdq, "conv").output[0]
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == conv_out for n in qdq.graph.node)
    conv_out = node(cpu, "conv").output[0]
    assert any(n.op_type == "QuantizeLinear" and n.input[0] == conv_out for n in cpu.graph.node)
    ref = run(model, {"image": image(trained.x_test)})
    for m in models.values():
        assert compare(ref, run(m, {"image": image(trained.x_test)})).top1_agreement >= 0.98


def test_unquantized_consumers_read_float(trained: Trained) -> None:
    """ORT points every consumer of a quantized tensor at its DQ; the residual Add must keep the float."""
    model = residual(trained)
    models, report = quantize_model(model, {"x": trained.x_calib}, evaluation={"x": trained.x_eval}, smooth_alpha=None)
    assert report.nodes_quantized == 3
    for m in models.values():
        skip = node(m, "skip")
        assert skip.input[0] == "h", "the residual Add reads the float tensor"
        assert producers(m)[node(m, "mid").input[0]].op_type == "DequantizeLinear"


# --- calibration methods, SmoothQuant, fallback ----------------------------------------------------------------


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_calibration_methods(trained: Trained, method: str) -> None:
    model = mlp(trained)
    models, report = quantize_model(
        model, {"x": trained.x_calib}, method=method, evaluation={"x": trained.x_eval}, smooth_alpha=None
    )
    assert report.method == method
    ref = run(model, {"x": trained.x_test})
    for m in models.values():
        assert compare(ref, run(m, {"x": trained.x_test})).top1_agreement >= 0.97


def test_smooth_is_exact_in_float(trained: Trained) -> None:
    """Before rounding, SmoothQuant changes nothing: (x / s)(s W) == x W, and the residual still reads h."""
    model = residual(trained)
    x = trained.x_calib
    amax = {"x": np.abs(x).max(0), "h": np.abs(run_intermediate(model, "h", x)).max(0)}
    smoothed = onnx.ModelProto()
    smoothed.CopyFrom(model)
    assert smooth(smoothed, weight_nodes(smoothed), amax, alpha=0.8) == 2  # x and h; z has no amax here
    onnx.checker.check_model(smoothed)
    np.testing.assert_allclose(run(smoothed, {"x": x}), run(model, {"x": x}), rtol=1e-4, atol=1e-4)
    assert node(smoothed, "skip").input[0] == "h"
    assert node(smoothed, "mid").input[0] != "h"


def run_intermediate(model: onnx.ModelProto, tensor: str, x: np.ndarray) -> np.ndarray:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, None))
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run([tensor], {"x": x})[0]


Feed = dict[str, np.ndarray]


def outlier_case(t: Trained, factor: float = 300.0) -> tuple[onnx.ModelProto, Feed, Feed, Feed]:
    """The MLP with one input channel scaled by ``factor`` (and W1's row by 1/factor): same function, but
    per-tensor int8 on x now spends its range on that channel, as with a transformer's outlier dimensions."""

    def feed(x: np.ndarray) -> dict[str, np.ndarray]:
        x = x.copy()
        x[:, 0] = x[:, 0] * factor + factor  # the pixel is 0 at the border: shift it so the channel is alive
        return {"x": x}

    model = mlp(t, outlier=factor)
    b1 = next(i for i in model.graph.initializer if i.name == "b1")
    w1 = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w1"))
    b1.CopyFrom(numpy_helper.from_array(t.b1 - factor * w1[0], "b1"))  # undo the shift
    return model, feed(t.x_calib), feed(t.x_eval), feed(t.x_test)


def test_fallback_reduces_error_and_lists_nodes(trained: Trained) -> None:
    model, calib, ev, test = outlier_case(trained)
    ref = run(model, test)
    np.testing.assert_allclose(ref, run(mlp(trained), {"x": trained.x_test}), rtol=1e-3, atol=1e-3)
    plain_models, plain = quantize_model(model, calib, evaluation=ev, smooth_alpha=None, metric="cosine")
    assert plain.metric_before_fallback < 0.99, "the outlier channel should hurt per-tensor int8"
    tolerance = 0.5 * (1 - plain.metric_before_fallback)
    models, report = quantize_model(
        model, calib, evaluation=ev, smooth_alpha=None, metric="cosine", tolerance=tolerance
    )
    assert report.fallback_nodes[0] == "fc1", "fc1 reads the outlier channel: it goes back to float first"
    assert report.metric_after > report.metric_before_fallback
    assert 1 - report.metric_after <= tolerance and report.tolerance_met
    assert report.nodes_quantized == 2 - len(report.fallback_nodes)
    for m in models.values():
        fc1 = node(m, "fc1")
        assert all(producers(m).get(i) is None or producers(m)[i].op_type != "DequantizeLinear" for i in fc1.input)
    for form, m in models.items():
        before = compare(ref, run(plain_models[form], test)).mean_cosine
        assert compare(ref, run(m, test)).mean_cosine > before, form


def test_smoothquant_fixes_outliers_without_fallback(trained: Trained) -> None:
    model, calib, ev, test = outlier_case(trained)
    _, plain = quantize_model(model, calib, evaluation=ev, smooth_alpha=None, metric="cosine")
    models, report = quantize_model(model, calib, evaluation=ev, metric="cosine")  # smooth_alpha="auto"
    assert report.smooth_alpha is not None and any("SmoothQuant" in n for n in report.notes)
    assert report.metric_after > plain.metric_after
    assert report.nodes_quantized == 2
    ref = run(model, test)
    assert compare(ref, run(models["qdq"], test)).mean_cosine > 0.995


def test_progress_and_held_out_split(trained: Trained) -> None:
    seen: list[float] = []
    _, report = quantize_model(mlp(trained), {"x": trained.x_calib}, progress=seen.append, smooth_alpha=0.5)
    assert seen and seen[-1] == 1.0 and seen == sorted(seen) and all(0 <= f <= 1 for f in seen)
    assert any("held out" in n for n in report.notes)
    assert report.smooth_alpha == 0.5


def test_old_opset_and_fixed_batch(trained: Trained) -> None:
    model = mlp(trained)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 8  # the model takes batches of exactly 8
    model.opset_import[0].version = 11
    onnx.checker.check_model(model)
    models, report = quantize_model(model, {"x": trained.x_calib}, evaluation={"x": trained.x_eval[:240]})
    assert any("opset 11 to 13" in n for n in report.notes)
    assert all(m.opset_import[0].version >= 13 for m in models.values())
    assert report.metric_after >= 0.98
    with pytest.raises(ValueError, match="batches of exactly 8"):
        quantize_model(model, {"x": trained.x_calib[:12]})


# --- bad arguments -------------------------------------------------------------------------------------------


def test_bad_arguments(trained: Trained) -> None:
    model = mlp(trained)
    cal = {"x": trained.x_calib[:32]}
    with pytest.raises(ValueError, match="unknown calibration method"):
        quantize_model(model, cal, method="kl")  # type: ignore[arg-type]
    for tol in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="tolerance"):
            quantize_model(model, cal, tolerance=tol)
    with pytest.raises(ValueError, match="empty"):
        quantize_model(model, {})
    with pytest.raises(ValueError, match=r"missing: \['x'\]"):
        quantize_model(model, {"y": trained.x_calib})
    with pytest.raises(ValueError, match="no samples"):
        quantize_model(model, {"x": trained.x_calib[:0]})
    with pytest.raises(ValueError, match=r"evaluation arrays must be named after the model's inputs"):
        quantize_model(model, cal, evaluation={"z": trained.x_eval})
    relu_only = _model(
        [helper.make_node("Relu", ["x"], ["logits"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10])],
        {},
    )
    with pytest.raises(ValueError, match="nothing to quantize"):
        quantize_model(relu_only, {"x": np.ones((4, 10), np.float32)})


# --- the bar, on the real sentence encoder ---------------------------------------------------------------------


@pytest.mark.slow
def test_encoder_int8_keeps_embeddings() -> None:
    from tests.compression import encoder as E

    try:
        path = E.encoder_path()
        calibration, evaluation, test = (E.encoder_inputs(n, seed=s) for n, s in ((96, 1), (64, 2), (128, 3)))
    except E.EncoderUnavailable as e:
        pytest.skip(str(e))
    model = onnx.load(path)
    models, report = quantize_model(model, calibration, evaluation=evaluation, metric="cosine")
    assert set(models) == {"qdq", "cpu"} and report.nodes_quantized == 36  # 6 layers x (Q, K, V, O, FFN1, FFN2)
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = s.run(None, test)[0]
    for form, m in models.items():
        cosine = compare(ref, run(m, test)).mean_cosine
        assert cosine >= 0.99, f"{form}: mean embedding cosine {cosine:.4f} < 0.99 ({report.notes})"
