"""The one calibration check (compression.calibration): every rule refused with its reason, casts, fixed batch
sizes, the held-out split, and the same check applied by every stage."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import onnx
import pytest

from backends import TensorSpec
from compression.calibration import (
    CalibrationError,
    Samples,
    check_feeds,
    check_samples,
    fixed_batch,
    holdout_sizes,
    parse_npz,
)
from compression.evaluate import measure_latency, run_model
from compression.prune import prune_model
from compression.quantize import quantize_model
from tests.compression.conftest import run
from tests.compression.optimize_helpers import npz
from tests.onnx_models import conv_net

X = TensorSpec("x", "FP32", (-1, 4))


def test_good_data_is_cast_to_the_input_types() -> None:
    inputs = [X, TensorSpec("ids", "INT64", (-1, 3))]
    s = parse_npz(npz(x=np.ones((6, 4)), ids=np.ones((6, 3), np.int32), labels=np.arange(6)), inputs)
    assert s.count == 6 and s.batch is None and s.arrays["x"].dtype == np.float32
    assert s.arrays["ids"].dtype == np.int64 and list(s.labels) == list(range(6))  # type: ignore[arg-type]
    # an input that happens to be called "labels" is an input, not the class ids
    own = parse_npz(npz(labels=np.ones((2, 4), np.float32)), [TensorSpec("labels", "FP32", (-1, 4))])
    assert own.labels is None and own.arrays["labels"].shape == (2, 4)


BAD = [
    (b"not a zip", "not a readable .npz"),
    (npz(y=np.ones((4, 4), np.float32)), r"missing: \['x'\], unknown: \['y'\]"),
    (npz(x=np.ones((4, 5), np.float32)), r"has shape \[4, 5\], the input is \[-1, 4\]"),
    (npz(x=np.ones((4, 4, 1), np.float32)), "rank 2"),
    (npz(x=np.ones((4, 4))[0, 0]), "rank 2"),
    (npz(x=np.full((4, 4), 0.5, np.float32), labels=np.zeros(3, np.int64)), "same number of samples"),
    (npz(x=np.ones((4, 4), np.float32), labels=np.zeros(4, np.float32)), "1-D integer"),
    (npz(x=np.ones((0, 4), np.float32)), "no samples"),
    (npz(x=np.full((4, 4), np.nan, np.float32)), "NaN"),
    (npz(x=np.full((4, 4), 1e39)), "out of FP32's range"),  # finite in float64, infinite once cast
    (npz(x=np.full((4, 4), "a")), "does not cast to FP32"),
    (npz(x=np.ones((4, 4), np.complex64)), "does not cast"),
]


@pytest.mark.parametrize(("data", "message"), BAD)
def test_bad_data_is_refused_with_the_rule(data: bytes, message: str) -> None:
    with pytest.raises(CalibrationError, match=message):
        parse_npz(data, [X])


def test_floats_never_feed_integer_inputs_and_strings_are_refused() -> None:
    with pytest.raises(CalibrationError, match="does not cast to INT64"):
        check_samples({"ids": np.ones((2, 3), np.float32)}, [TensorSpec("ids", "INT64", (-1, 3))])
    with pytest.raises(CalibrationError, match="only feed numeric inputs"):
        check_samples({"s": np.ones((2, 3))}, [TensorSpec("s", "BYTES", (-1, 3))])
    with pytest.raises(CalibrationError, match="scalar"):
        check_samples({"t": np.ones(2)}, [TensorSpec("t", "FP32", ())])
    assert isinstance(CalibrationError("x"), ValueError)


def test_pickles_and_zip_bombs_are_refused_before_inflating() -> None:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(z := io.BytesIO(), "w") as zf:
        zf.writestr("x.npy", buf.getvalue())
    with pytest.raises(CalibrationError, match="pickles"):
        parse_npz(z.getvalue(), [X])
    # a header that claims 2^31 x 4 float32 rows (32 GiB) in a few bytes: refused from the header alone
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (1 << 31, 4)})
    with zipfile.ZipFile(z := io.BytesIO(), "w") as zf:
        zf.writestr("x.npy", header.getvalue())
    with pytest.raises(CalibrationError, match="over the limit"):
        parse_npz(z.getvalue(), [X])
    with zipfile.ZipFile(z := io.BytesIO(), "w") as zf:
        zf.writestr("x.npy", b"plain bytes, not .npy")
    with pytest.raises(CalibrationError, match=r"not a readable \.npy"):
        parse_npz(z.getvalue(), [X])


def test_fixed_batch_sizes() -> None:
    one = TensorSpec("x", "FP32", (1, 3, 2, 2))
    four = TensorSpec("x", "FP32", (4, 3))
    assert fixed_batch([X]) is None and fixed_batch([one]) == 1 and fixed_batch([X, four]) == 4
    with pytest.raises(CalibrationError, match="different first"):
        fixed_batch([one, TensorSpec("y", "FP32", (4, 3))])
    s = check_samples({"x": np.zeros((16, 3, 2, 2), np.float32)}, [one])
    assert s.batch == 1 and [len(b["x"]) for b in s.batches(64)] == [1] * 16
    with pytest.raises(CalibrationError, match=r"batches of exactly 4.*multiple of 4; got 10"):
        check_samples({"x": np.zeros((10, 3), np.float32)}, [four])
    s4 = check_samples({"x": np.zeros((12, 3), np.float32)}, [four])
    assert [len(b["x"]) for b in s4.batches(64)] == [4, 4, 4]


def test_holdout_split_keeps_whole_batches() -> None:
    assert holdout_sizes(64, None, 0.25) == (48, 16)
    assert holdout_sizes(2, None, 0.9) == (1, 1)
    assert holdout_sizes(16, 8, 0.25) == (8, 8)  # a quarter of 16 is not a whole batch of 8: one batch each
    assert holdout_sizes(48, 4, 0.25) == (36, 12)
    with pytest.raises(CalibrationError, match="at least 2 samples"):
        holdout_sizes(1, None, 0.25)
    with pytest.raises(CalibrationError, match="at least 2 batches of 8"):
        holdout_sizes(8, 8, 0.25)
    with pytest.raises(CalibrationError, match="multiple of 8; got 20"):
        holdout_sizes(20, 8, 0.25)  # a remainder would be dropped silently
    x = np.arange(48 * 3, dtype=np.float32).reshape(48, 3)
    s = check_samples({"x": x}, [TensorSpec("x", "FP32", (4, 3))], labels=np.arange(48))
    cal, ev = s.split(0.25)
    assert (cal.count, ev.count, cal.batch, ev.batch) == (36, 12, 4, 4)
    rows = np.concatenate([cal.arrays["x"][:, 0], ev.arrays["x"][:, 0]]) / 3
    assert sorted(rows.astype(int).tolist()) == list(range(48))  # a partition of the samples
    np.testing.assert_array_equal(ev.labels, ev.arrays["x"][:, 0] // 3)  # labels follow their samples
    again, _ = s.split(0.25)
    np.testing.assert_array_equal(again.arrays["x"], cal.arrays["x"])  # seeded: the same split every time


def fixed_batch_cnn(batch: int) -> onnx.ModelProto:
    return onnx.load_from_string(conv_net(batch))


def test_every_stage_feeds_a_fixed_batch_model_its_batch_size() -> None:
    model = fixed_batch_cnn(1)
    x = np.random.default_rng(0).standard_normal((12, 3, 8, 8)).astype(np.float32)
    whole = np.concatenate([run(model, {"x": x[i : i + 1]})[0] for i in range(12)])
    np.testing.assert_allclose(run_model(model.SerializeToString(), {"x": x})["logits"], whole, rtol=1e-5, atol=1e-6)
    pruned, report = prune_model(model, 0.5, calibration={"x": x})
    assert report.calibration_samples == 12 and any(la["method"] == "obs" for la in report.layers)
    forms, _ = quantize_model(pruned, {"x": x[:8]}, evaluation={"x": x[8:]})
    for m in forms.values():
        assert run(m, {"x": x[:1]})[0].shape == (1, 10)
    latency = measure_latency(model.SerializeToString(), {"x": x}, batch_size=8, runs=3)
    assert latency["batch_size"] == 1  # the only batch size the model runs
    four = fixed_batch_cnn(4)
    assert measure_latency(four.SerializeToString(), {"x": x[:4]}, runs=3)["batch_size"] == 4
    with pytest.raises(CalibrationError, match="multiple of 4"):
        prune_model(four, 0.5, calibration={"x": x[:6]})


def test_check_feeds_accepts_checked_samples() -> None:
    model = fixed_batch_cnn(1)
    s = check_feeds(model, {"x": np.zeros((3, 3, 8, 8))})
    assert isinstance(s, Samples) and s.arrays["x"].dtype == np.float32 and s.batch == 1
    assert check_feeds(model, s).count == 3
