"""INT8 embeddings (compression.embeddings) on small models built with onnx.helper, and on the real encoder."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compression.embeddings import quantize_embeddings
from compression.metrics import compare
from compression.quantize import quantize_model

VOCAB, DIM = 1000, 96


def _model(opset: int = 17, tied: bool = False, big_add: bool = False) -> onnx.ModelProto:
    """ids [N, S] -> Gather(table) -> (+ big constant) -> MatMul -> ReduceMean over S -> [N, 16]."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((VOCAB, DIM)).astype(np.float32) * rng.uniform(0.1, 3.0, (VOCAB, 1)).astype(np.float32)
    inits = [
        numpy_helper.from_array(table, "table"),
        numpy_helper.from_array((rng.standard_normal((DIM, 16)) / 10).astype(np.float32), "w"),
    ]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], "embed")]
    x = "e"
    if big_add:
        inits.append(numpy_helper.from_array(rng.standard_normal((1, 8, DIM)).astype(np.float32) * 0, "zero_pad"))
        inits.append(numpy_helper.from_array(rng.standard_normal((700, DIM)).astype(np.float32), "bias_table"))
        nodes.append(helper.make_node("ReduceMean", ["bias_table"], ["bias_row"], "bias_mean", axes=[0], keepdims=1))
        nodes.append(helper.make_node("Add", [x, "bias_row"], ["e2"], "add_bias"))
        x = "e2"
    nodes.append(helper.make_node("MatMul", [x, "w"], ["h"], "proj"))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])]
    nodes.append(helper.make_node("ReduceMean", ["h"], ["y"], "pool", axes=[1], keepdims=0))
    if tied:  # the table also serves as an output projection (tied embeddings)
        nodes.append(helper.make_node("MatMul", ["w_in", "table"], ["logits"], "tied"))
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", DIM]))
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 8])]
    if tied:
        inputs.append(helper.make_tensor_value_info("w_in", TensorProto.FLOAT, ["N", VOCAB]))
    graph = helper.make_graph(nodes, "emb", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _ids(n: int = 32) -> dict[str, np.ndarray]:
    return {"ids": np.random.default_rng(1).integers(0, VOCAB, (n, 8)).astype(np.int64)}


def test_gather_table_becomes_int8_rows_and_outputs_stay_close() -> None:
    model = _model()
    quantized, report = quantize_embeddings(model, min_elements=1000)
    onnx.checker.check_model(quantized)
    [entry] = report.quantized
    assert entry["name"] == "table" and entry["form"] == "gather-then-dequantize"
    types = {t.name: t.data_type for t in quantized.graph.initializer}
    assert (
        "table" not in types
        and types["table_int8"] == TensorProto.INT8
        and types["table_row_scales"] == TensorProto.FLOAT
    )
    # gathered first: no DequantizeLinear over the whole table, the int8 table is read by a Gather
    assert not [n for n in quantized.graph.node if n.op_type == "DequantizeLinear"]
    assert any(n.op_type == "Gather" and n.input[0] == "table_int8" for n in quantized.graph.node)
    assert quantized.ByteSize() < 0.3 * model.ByteSize()
    assert report.bytes_saved == entry["bytes_before"] - entry["bytes_after"] > 0
    feeds = _ids()
    ref, out = _run(model, feeds)[0], _run(quantized, feeds)[0]
    assert compare(ref, out).mean_cosine > 0.9999
    # per-row scales: the error of a row is bounded by half its step
    table = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "table"))
    assert entry["max_abs_error"] <= (np.abs(table).max(axis=1) / 127 / 2 + 1e-6).max()


def test_small_tied_and_old_opset_tables_are_left_alone() -> None:
    _, small = quantize_embeddings(_model())  # 96 000 values: above the 65 536 default
    assert [e["name"] for e in small.quantized] == ["table"]
    _, tiny = quantize_embeddings(_model(), min_elements=200_000)
    assert tiny.quantized == [] and tiny.bytes_saved == 0
    tied_model = _model(tied=True)
    same, tied = quantize_embeddings(tied_model, min_elements=1000)
    assert tied.quantized == [] and "MatMul" in tied.skipped[0]["reason"]
    assert same.SerializeToString() == tied_model.SerializeToString()
    _, old = quantize_embeddings(_model(opset=11), min_elements=1000)
    assert old.quantized == [] and "opset" in old.skipped[0]["reason"]
    with pytest.raises(ValueError, match="min_elements"):
        quantize_embeddings(_model(), min_elements=0)


def test_other_tables_get_a_dequantize_in_front_when_asked() -> None:
    model = _model(big_add=True)
    _, default = quantize_embeddings(model, min_elements=1000)
    assert [e["name"] for e in default.quantized] == ["table"]
    assert any(s["name"] == "bias_table" and "other_tables off" in s["reason"] for s in default.skipped)
    quantized, report = quantize_embeddings(model, min_elements=1000, other_tables=True)
    onnx.checker.check_model(quantized)
    forms = {e["name"]: e["form"] for e in report.quantized}
    assert forms == {"table": "gather-then-dequantize", "bias_table": "DequantizeLinear(axis=0) in front"}
    feeds = _ids()
    assert compare(_run(model, feeds)[0], _run(quantized, feeds)[0]).mean_cosine > 0.9999


def test_quantize_model_embeddings_option_measures_against_float() -> None:
    model = _model()
    calibration, evaluation = _ids(64), {"ids": np.random.default_rng(2).integers(0, VOCAB, (32, 8)).astype(np.int64)}
    plain, plain_report = quantize_model(model, calibration, evaluation=evaluation, metric="cosine")
    forms, report = quantize_model(model, calibration, evaluation=evaluation, metric="cosine", embeddings=True)
    assert plain_report.embeddings is None
    assert report.embeddings is not None and [e["name"] for e in report.embeddings["quantized"]] == ["table"]
    assert forms["qdq"].ByteSize() < 0.4 * plain["qdq"].ByteSize()
    # quality is against the float model (not the int8-embedding one): below 1, and still close
    assert 0.99 < report.metric_after < 1.0
    assert compare(_run(model, evaluation)[0], _run(forms["qdq"], evaluation)[0]).mean_cosine > 0.99


@pytest.mark.slow
def test_encoder_embeddings_int8() -> None:
    """The real all-MiniLM-L6-v2: the 47 MB word-embedding table goes int8; embeddings barely move."""
    from tests.compression import encoder as E

    try:
        path = E.encoder_path()
        feeds = E.encoder_inputs(16, seed=3)
    except E.EncoderUnavailable as e:
        pytest.skip(str(e))
    model = onnx.load(path)
    quantized, report = quantize_embeddings(model)
    names = {e["name"] for e in report.quantized}
    assert names == {"embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"}
    assert quantized.ByteSize() < 0.62 * model.ByteSize()  # 90.3 MB -> 54.7 MB
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert compare(ref, _run(quantized, feeds)[0]).mean_cosine > 0.9999
