"""Constant folding (compression.fold): weights computed by constant subgraphs -- Reshape(Constant),
Transpose(initializer), ConstantOfShape -- are found by quantize, prune and encode, on real ONNX Runtime runs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from compression.encode import decode_model, encode_model
from compression.evaluate import model_sparsity
from compression.fold import fold_constants, has_constant_subgraph
from compression.metrics import compare
from compression.prune import prune_model
from compression.quantize import quantize_model
from tests.compression.conftest import run
from tests.onnx_models import computed_weights_mlp, mlp

WEIGHT_OF = {"fc1": "Reshape(Constant)", "fc2": "Transpose(initializer)", "fc3": "ConstantOfShape"}


@pytest.fixture(scope="module")
def computed() -> onnx.ModelProto:
    return onnx.load_from_string(computed_weights_mlp())


def inputs(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 32)).astype(np.float32)}


def test_folding_gives_initializer_weights_in_plain_onnx(computed: onnx.ModelProto) -> None:
    assert has_constant_subgraph(computed)
    folded, note = fold_constants(computed)
    assert note is not None and "folded" in note
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Relu", "MatMul", "Relu", "MatMul"]
    inits = {t.name for t in folded.graph.initializer}
    assert all(n.input[1] in inits for n in folded.graph.node if n.op_type == "MatMul")
    # plain ONNX: the model's own opset imports only, standard operators, and onnx.checker passes
    assert {n.domain for n in folded.graph.node} == {""}
    opsets = [(o.domain, o.version) for o in computed.opset_import]
    assert [(o.domain, o.version) for o in folded.opset_import] == opsets
    assert folded.producer_name == computed.producer_name
    onnx.checker.check_model(folded)
    x = inputs(16)
    np.testing.assert_array_equal(run(folded, x)[0], run(computed, x)[0])


def test_a_model_without_constant_subgraphs_is_left_alone() -> None:
    plain = onnx.load_from_string(mlp())
    assert not has_constant_subgraph(plain)
    same, note = fold_constants(plain)
    assert same is plain and note is None


def test_computed_weights_quantize(computed: onnx.ModelProto) -> None:
    models, report = quantize_model(computed, inputs(64), evaluation=inputs(32, seed=1), metric="cosine")
    assert report.nodes_quantized == 3 and any("folded" in n for n in report.notes)
    test = inputs(32, seed=2)
    ref = run(computed, test)[0]
    for form, m in models.items():
        producers = {o: n for n in m.graph.node for o in n.output}
        for name, how in WEIGHT_OF.items():
            node = next(n for n in m.graph.node if n.name == name)
            weight_from = producers.get(node.input[1])
            assert weight_from is not None and weight_from.op_type == "DequantizeLinear", (form, how)
        assert compare(ref, run(m, test)[0]).mean_cosine > 0.99, form


def test_computed_weights_prune_and_encode(computed: onnx.ModelProto) -> None:
    pruned, report = prune_model(computed, 0.5, calibration=inputs(64))
    layers = {la["name"]: la for la in report.layers}
    assert len(layers) == 2 and all(la["sparsity"] >= 0.5 and la["method"] == "obs" for la in layers.values())
    assert {s["name"]: s["reason"] for s in report.skipped}.get("w3", "").startswith("tiny layer")  # 640 weights
    assert any("folded" in n for n in report.notes)
    assert model_sparsity(pruned) == pytest.approx(report.overall_sparsity)
    assert model_sparsity(computed) == 0.0  # counted on the folded weights, the same layers as prune's
    x = inputs(32, seed=3)
    assert compare(run(computed, x)[0], run(pruned, x)[0]).mean_cosine > 0.9
    blob, ereport = encode_model(computed, 5)
    assert len(ereport.layers) == 3 and any("folded" in n for n in ereport.notes)
    assert compare(run(computed, x)[0], run(decode_model(blob), x)[0]).mean_cosine > 0.99
