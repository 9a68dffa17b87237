"""The pipeline in process: every variant owns its details and its evaluation, checked against direct
evaluations of its own model; the int8-cpu policy; constant folding and fixed batch sizes end to end."""

from __future__ import annotations

import numpy as np
import pytest

from backends import TensorSpec
from compression.calibration import check_samples
from compression.evaluate import evaluate_variant
from compression.pipeline import CPU_FORM_MARGIN, CompressionData, run_pipeline
from compression.spec import CompressionSpec
from tests.onnx_models import computed_weights_mlp, conv_net, mlp


def data(n: int, shape: tuple[int, ...], batch: int | None = None, seed: int = 0) -> CompressionData:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *shape)).astype(np.float32)
    spec = TensorSpec("x", "FP32", (batch or -1, *shape))
    return CompressionData.split(check_samples({"x": x}, [spec], labels=rng.integers(0, 3, n)), 0.5)


def spec(**kw: object) -> CompressionSpec:
    return CompressionSpec.model_validate({"latency_runs": 3, **kw})


def test_each_variant_owns_its_details_and_evaluation() -> None:
    original = mlp(in_dim=16, hidden=64, out_dim=3)
    d = data(64, (16,))
    result = run_pipeline(original, spec(quantize={"cpu_form": "always"}, encode={}), d, lambda *_: None)
    variants = {v.name: v for v in result.variants}
    assert set(variants) == {"int8", "int8-cpu", "encoded"}
    assert d.evaluation is not None
    seen: set[int] = set()
    for name, v in variants.items():
        owned = [v.details, v.details["evaluation"], *([v.details["quantize"]] if "quantize" in v.details else [])]
        for obj in owned:
            assert id(obj) not in seen, f"{name} shares a details dict"
            seen.add(id(obj))
        direct = evaluate_variant(original, v.runnable, d.evaluation, d.evaluation.labels)["primary"]
        accuracy = v.details["evaluation"]["accuracy"]
        assert {k: accuracy[k] for k in ("kind", "kind_why")} == {k: direct.pop(k) for k in ("kind", "kind_why")}
        assert {k: a for k, a in accuracy.items() if k not in ("kind", "kind_why")} == pytest.approx(
            direct, rel=1e-6, abs=1e-9
        ), name
        assert v.details["accuracy_delta"] == direct["accuracy_delta"]
        row = next(r for r in result.table if r["variant"] == name)
        assert row["accuracy"] == v.details["evaluation"]["accuracy"] and row["size_bytes"] == len(v.stored)
    assert variants["int8"].details["form"] == "qdq" and variants["int8-cpu"].details["form"] == "cpu"
    assert variants["int8"].details["evaluation"] != variants["int8-cpu"].details["evaluation"]


def test_int8_cpu_policy() -> None:
    original = mlp(in_dim=16, hidden=64, out_dim=3)
    d = data(32, (16,))
    never = run_pipeline(original, spec(quantize={"cpu_form": "never"}), d, lambda *_: None)
    assert [v.name for v in never.variants] == ["int8"]
    auto = run_pipeline(original, spec(quantize={}), d, lambda *_: None)
    decision = auto.variants[0].details["int8_cpu"]
    assert decision["policy"] == "auto" and decision["margin"] == CPU_FORM_MARGIN
    assert decision["published"] == (decision["high"] < 1 - CPU_FORM_MARGIN)
    assert ("int8-cpu" in [v.name for v in auto.variants]) == decision["published"]
    assert any(n.startswith("int8-cpu ") and "interval" in n for n in auto.notes)


def test_computed_weights_and_fixed_batch_end_to_end() -> None:
    folded = run_pipeline(
        computed_weights_mlp(), spec(prune={"sparsity": 0.5}, quantize={}), data(32, (32,)), lambda *_: None
    )
    assert any("folded" in n for n in folded.notes)
    assert folded.variants[1].details["quantize"]["nodes_quantized"] == 3
    rows = {r["variant"]: r for r in folded.table}
    assert rows["pruned"]["sparsity"] >= 0.45 and rows["original"]["sparsity"] == 0.0
    fixed = run_pipeline(
        conv_net(batch=4),
        spec(prune={"sparsity": 0.5}, quantize={"cpu_form": "always"}, encode={}),
        data(16, (3, 8, 8), batch=4),
        lambda *_: None,
    )
    for row in fixed.table:
        assert row["latency"]["batch_size"] == 4, row["variant"]
        assert row["variant"] == "original" or row["accuracy"]["samples"] == 8


def test_dishonest_variants_never_become_the_default() -> None:
    from compression.pipeline import choose_default, honesty
    from tests.onnx_models import mlp

    model = mlp(in_dim=64, hidden=64, out_dim=8)  # float weights only
    honest, why = honesty("int8-qdq", len(model) - 10, len(model), model)
    assert not honest and "mostly float" in why  # an "int8" whose weights stayed float (issue 11's encoder)
    honest, why = honesty("pruned", len(model), len(model), model)
    assert not honest and "not smaller" in why
    assert honesty("encoded", len(model) // 4, len(model), model) == (True, "4.00x smaller than the original")

    def row(name: str, p50: float, honest: bool, delta: float = 0.0) -> dict:  # type: ignore[type-arg]
        return {"variant": name, "accuracy_delta": delta, "latency": {"p50_ms": p50}, "honest": honest}

    table = [
        row("original", 10.0, True),
        row("int8", 5.0, False),
        row("int8-cpu", 6.0, True),
        row("x", 1.0, True, -0.5),
    ]
    assert choose_default(table, 0.01) == "int8-cpu"  # the faster int8 is dishonest; x is outside the tolerance
    timed: list[str] = []
    assert choose_default(table, 0.01, lambda n: timed.append(n) or False) == "original"  # not faster beyond noise
    assert timed == ["int8-cpu"]
