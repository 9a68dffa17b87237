"""PRUNE on real models: the digits CNN (accuracy bars) and a synthetic model with every weight layout."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from compression import onnx_graph as og
from compression.calibration import check_feeds
from compression.evaluate import model_sparsity
from compression.prune import check_2_4, prune_model
from tests import onnx_models
from tests.compression.conftest import run, synthetic_inputs


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# --------------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": -0.1}, "sparsity must be"),
        ({"sparsity": 0.96}, "sparsity must be"),
        ({"sparsity": "0.5"}, "sparsity must be"),
        ({"sparsity": 0.5, "pattern": "1:4"}, "pattern must be"),
        ({"sparsity": 0.5, "scope": "layer"}, "scope must be"),
        ({"sparsity": 0.7, "pattern": "2:4"}, "2:4 pattern fixes sparsity"),
        ({"sparsity": 0.5, "calibration": {"input": np.zeros((4, 3, 6, 6), np.float32)}}, "missing: \\['x'\\]"),
        ({"sparsity": 0.5, "calibration": {"x": np.zeros((0, 3, 6, 6), np.float32)}}, "no samples"),
        ({"sparsity": 0.5, "calibration": {"x": np.zeros((4, 3, 7, 7), np.float32)}}, "the input is"),
        ({"sparsity": 0.5, "calibration": {"x": np.full((4, 3, 6, 6), "a")}}, "does not cast"),
    ],
)
def test_bad_arguments_raise_value_error(synthetic: onnx.ModelProto, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        prune_model(synthetic, **kwargs)


def test_model_with_nothing_prunable_comes_back_unchanged() -> None:
    tiny = onnx.load_from_string(onnx_models.mlp())  # 4x8 and 8x3 weights
    out, report = prune_model(tiny, 0.9)
    assert out.SerializeToString() == tiny.SerializeToString()
    assert report.layers == [] and report.overall_sparsity == 0.0
    reasons = {s["name"]: s["reason"] for s in report.skipped}
    assert reasons["w1"].startswith("tiny layer") and reasons["w2"].startswith("tiny layer")
    assert "not a MatMul/Gemm/Conv weight" in reasons["b1"]
    no_weights = onnx.load_from_string(onnx_models.identity_all_types())
    out, report = prune_model(no_weights, 0.5, "2:4")
    assert out.SerializeToString() == no_weights.SerializeToString() and report.skipped == []


# --------------------------------------------------------------------------------------------- layouts


def test_activation_rows_reproduce_every_layer(synthetic: onnx.ModelProto) -> None:
    """im2col rows (stride 2, padding) and Gemm/MatMul rows times to_rows(W)^T give each node's output."""
    feeds = synthetic_inputs(5)
    samples = check_feeds(synthetic, feeds)
    refs, _ = og.linear_weights(synthetic)
    assert [r.name for r in refs] == ["c0.w", "c1.w", "g1.w", "g2.w", "m.w"]
    outs = {"c0.w": "h0", "c1.w": "h2", "g1.w": "h5", "g2.w": "h7", "m.w": "y"}
    bias = {"c0.w": "c0.b", "g1.w": "g1.b"}
    probe = onnx.ModelProto()
    probe.CopyFrom(synthetic)
    for r in refs:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(outs[r.name], onnx.TensorProto.FLOAT, None))
    got = dict(zip([o.name for o in probe.graph.output], run(probe, feeds), strict=True))
    w = weights(synthetic)
    for r in refs:
        x = np.concatenate(list(og.iter_activations(synthetic, r, samples, chunk=2)))
        y = x @ og.to_rows(w[r.name], r).T.astype(np.float64)
        if r.name in bias:
            y += w[bias[r.name]]
        expect = got[outs[r.name]]
        if r.op == "Conv":
            expect = np.moveaxis(expect, 1, -1).reshape(-1, expect.shape[1])
        if r.name == "g2.w":
            expect = expect / 0.5  # Gemm alpha scales the product only
        np.testing.assert_allclose(y, expect, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(og.from_rows(og.to_rows(w[r.name], r), r), w[r.name])


@pytest.mark.parametrize("calibrated", [False, True])
def test_2_4_groups_run_along_input_channels(synthetic: onnx.ModelProto, calibrated: bool) -> None:
    calib = synthetic_inputs(64) if calibrated else None
    out, report = prune_model(synthetic, 0.5, "2:4", calibration=calib)
    w = weights(out)
    pruned = {la["name"] for la in report.layers}
    assert pruned == {"c1.w", "g1.w", "g2.w", "m.w"}
    assert {s["name"]: s["reason"] for s in report.skipped}["c0.w"].startswith("2:4 needs input channels")
    # independent of to_rows: count non-zeros per group of 4 along each layout's input axis
    groups = {
        "c1.w": w["c1.w"].reshape(32, 32, 4, 3, 3),  # Conv [O, I, kh, kw]: along I
        "g1.w": w["g1.w"].reshape(64, 72, 4),  # Gemm transB=1, [N, K]: along K
        "g2.w": w["g2.w"].reshape(16, 4, 64),  # Gemm transB=0, [K, N]: along K
        "m.w": w["m.w"].reshape(16, 4, 16),  # MatMul [K, N]: along K
    }
    axis = {"c1.w": 2, "g1.w": 2, "g2.w": 1, "m.w": 1}
    for name, g in groups.items():
        assert (np.count_nonzero(g, axis=axis[name]) <= 2).all(), name
        assert np.count_nonzero(g == 0) >= g.size // 2
    assert check_2_4(out, sorted(pruned)) == []
    assert check_2_4(synthetic, ["g1.w"]) == ["g1.w"]
    np.testing.assert_array_equal(w["c0.w"], weights(synthetic)["c0.w"])


def test_magnitude_per_layer_and_global(synthetic: onnx.ModelProto) -> None:
    out, report = prune_model(synthetic, 0.6)
    orig, w = weights(synthetic), weights(out)
    for la in report.layers:
        a, b = orig[la["name"]], w[la["name"]]
        assert la["sparsity"] == pytest.approx(0.6, abs=1 / a.size) and la["method"] == "magnitude"
        dropped = np.abs(a[b == 0])
        assert dropped.max() <= np.abs(a[b != 0]).min()  # the smallest magnitudes went
        np.testing.assert_array_equal(b[b != 0], a[b != 0])  # no reconstruction without data
    assert report.overall_sparsity == pytest.approx(0.6, abs=1e-3)
    glob, grep = prune_model(synthetic, 0.6, scope="global")
    assert grep.overall_sparsity == pytest.approx(0.6, abs=1e-3)
    assert max(la["sparsity"] for la in grep.layers) - min(la["sparsity"] for la in grep.layers) > 0.05
    assert model_sparsity(glob) == pytest.approx(grep.overall_sparsity)


def test_obs_reconstruction_beats_magnitude(synthetic: onnx.ModelProto) -> None:
    calib, held_out = synthetic_inputs(256), synthetic_inputs(128, seed=7)
    ref = run(synthetic, held_out)[0]
    errors = {}
    for name, c in [("magnitude", None), ("obs", calib)]:
        out, report = prune_model(synthetic, 0.7, calibration=c)
        assert report.overall_sparsity == pytest.approx(0.7, abs=0.01)
        y = run(out, held_out)[0]
        errors[name] = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
        if c is not None:
            assert all(la["method"] == "obs" for la in report.layers)
            assert report.calibration_samples == 256
    assert errors["obs"] < 0.6 * errors["magnitude"], errors


def test_prune_is_deterministic_reports_progress_and_leaves_input_alone(synthetic: onnx.ModelProto) -> None:
    before = synthetic.SerializeToString()
    seen: list[float] = []
    a, _ = prune_model(synthetic, 0.5, calibration=synthetic_inputs(32), progress=seen.append)
    as_float64 = {"x": synthetic_inputs(32)["x"].astype(np.float64)}  # cast to the input's float32
    b, _ = prune_model(synthetic, 0.5, calibration=as_float64)
    assert a.SerializeToString() == b.SerializeToString()
    assert synthetic.SerializeToString() == before
    assert seen == sorted(seen) and seen[-1] == 1.0 and len(seen) == 5
    onnx.checker.check_model(a)


# --------------------------------------------------------------------------------------------- digits bars


def test_digits_baseline_accuracy(digits: onnx.ModelProto, accuracy) -> None:
    assert accuracy(digits) >= 0.97
    assert sum(numpy_helper.to_array(t).size for t in digits.graph.initializer) == 283_786


def test_digits_70_percent_reconstructed_loses_at_most_one_point(digits: onnx.ModelProto, pruned, accuracy) -> None:
    base = accuracy(digits)
    obs_model, obs = pruned(0.7)
    mag_model, mag = pruned(0.7, calibrated=False)
    assert obs.overall_sparsity >= 0.70 and model_sparsity(obs_model) >= 0.70
    assert [la["name"] for la in obs.layers] == ["conv2.weight", "fc1.weight", "fc2.weight"]
    assert {s["name"]: s["reason"] for s in obs.skipped}["conv1.weight"].startswith("tiny layer")
    acc_obs, acc_mag = accuracy(obs_model), accuracy(mag_model)
    assert base - acc_obs <= 0.01, (base, acc_obs, acc_mag)
    assert acc_obs >= acc_mag
    # reconstruction error is what OBS minimises: it must be far below magnitude pruning's, layer by layer
    for lo, lm in zip(obs.layers, mag.layers, strict=True):
        assert lo["reconstruction_error"] < lm["reconstruction_error"]


def test_digits_2_4_valid_and_accurate(digits: onnx.ModelProto, pruned, accuracy) -> None:
    base = accuracy(digits)
    for calibrated in (False, True):
        model, report = pruned(0.5, "2:4", calibrated)
        names = [la["name"] for la in report.layers]
        assert names == ["conv2.weight", "fc1.weight", "fc2.weight"]
        assert check_2_4(model, names) == []
        assert report.overall_sparsity >= 0.5
    assert base - accuracy(pruned(0.5, "2:4", True)[0]) <= 0.01
