"""The optimize job in process: the output judge, the goals' validation, the trials table's claims, and searches
on the digits CNN, a small MLP and a one-layer MiniLM-shaped encoder (random weights)."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from pydantic import ValidationError
from sqlalchemy import update

from compression.calibration import Samples
from compression.evaluate import run_model
from compression.metrics import compare
from compression.optimize.judge import judge_outputs, output_kind
from compression.optimize.search import Search, model_family
from compression.optimize.spec import OptimizeSpec
from compression.pipeline import CompressionData
from model_store import ModelStore, open_store
from model_store.schema import TrialRow
from tests import onnx_models
from tests.compression import digits as D
from tests.compression import encoder as E
from tests.compression.optimize_helpers import run_job, search_mlp, store_with


def small_encoder(layers: int = 1, vocab: int = 300) -> bytes:
    """tests/compression/encoder.py's MiniLM graph (hidden 384, L2-normalized [N, 384] output) with ``layers``
    layers and random weights."""
    return E.build_encoder(E.random_weights(layers, vocab), layers).SerializeToString()


def encoder_feeds(n: int, seq: int = 16, vocab: int = 300, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (n, seq)).astype(np.int64)
    mask = np.ones((n, seq), np.int64)
    mask[:, seq // 2 + rng.integers(0, seq // 2) :] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros((n, seq), np.int64)}


# -- the judge ------------------------------------------------------------------------------------------------


def test_sentence_embedding_is_judged_by_cosine() -> None:
    model = small_encoder()
    out = run_model(model, encoder_feeds(16))[E.OUTPUT_NAME]
    assert out.shape == (16, 384)
    metric, why = output_kind(out)
    assert metric == "cosine" and "unit L2 norm" in why
    # the same embedding without the normalization still reads as an embedding: its argmax keeps to few dimensions
    raw = out * np.linspace(1, 3, 16, dtype=np.float32)[:, None]
    raw[:, 7] += 5.0
    assert output_kind(raw)[0] == "cosine"
    # the compress job's `auto` metric follows the judge: no top-1 over 384 "classes"
    assert compare(out, out * 0.99).kind == "cosine"


def test_digit_logits_are_judged_by_top1(digits_bytes: bytes, digits_data: D.Digits) -> None:
    logits = run_model(digits_bytes, {"input": digits_data.x_test})["logits"]
    assert logits.shape[1] == 10
    metric, why = output_kind(logits)
    assert metric == "top1" and "argmax over 10 classes" in why
    judged = judge_outputs({"logits": logits})
    assert judged["logits"].metric == "top1" and not judged["logits"].overridden


def test_other_outputs_and_the_override() -> None:
    rng = np.random.default_rng(0)
    probs = rng.random((20, 1000))
    probs /= probs.sum(1, keepdims=True)
    assert output_kind(probs.astype(np.float32))[0] == "top1"  # 1000 classes, but rows are probabilities
    assert output_kind(rng.standard_normal(20).astype(np.float32))[0] == "relative_error"
    assert output_kind(rng.standard_normal((20, 1)).astype(np.float32))[0] == "relative_error"
    assert output_kind(rng.integers(0, 5, (20, 3)))[0] == "exact"
    assert output_kind(rng.standard_normal((4, 16, 384)).astype(np.float32))[0] == "cosine"
    judged = judge_outputs({"y": probs}, "cosine")
    assert judged["y"].metric == "cosine" and judged["y"].overridden
    with pytest.raises(ValueError, match="unknown metric"):
        judge_outputs({"y": probs}, "f1")


# -- goals ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"tolerance": 0.01, "objectiv": "size"}, "Extra inputs"),
        ({"tolerance": -0.1}, "greater than or equal"),
        ({"objective": "accuracy"}, "latency"),
        ({"concurrency": 8}, "give latency_budget_ms too"),
        ({"targets": ["cpu", "cpu"]}, "targets repeat"),
        ({"targets": ["tensorrt", "cuda", "cpu"], "objective": "latency"}, None),
        ({"max_trials": 0}, "greater than or equal"),
    ],
)
def test_goals_are_validated(raw: dict, message: str | None) -> None:  # type: ignore[type-arg]
    if message is None:
        OptimizeSpec.model_validate(raw)
        return
    with pytest.raises(ValidationError, match=message):
        OptimizeSpec.model_validate(raw)


# -- trials ---------------------------------------------------------------------------------------------------


def test_a_trial_is_claimed_once_and_reused_when_done(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'c.db'}", tmp_path / "blobs")
    trials = store.trials
    chain = [["prune", {"sparsity": 0.5}]]
    assert trials.claim("job", "k1", chain, "a", 30).outcome == "mine"
    assert trials.claim("job", "k1", chain, "b", 30).outcome == "busy"  # a holds a live lease
    assert trials.claim("job", "k1", chain, "a", 30).outcome == "mine"  # its own claim again (a resumed attempt)
    assert not trials.finish("job", "k1", "b", {"loss": 0.1})  # only the holder finishes it
    assert trials.finish("job", "k1", "a", {"loss": 0.1}, "d" * 64, "e" * 64)
    done = trials.claim("job", "k1", chain, "b", 30)
    assert done.outcome == "done" and done.record is not None and done.record.metrics == {"loss": 0.1}
    assert done.record.owner == "a" and "d" * 64 in trials.referenced_digests()
    # an abandoned trial (its holder's lease lapsed) goes to the next claimant
    assert trials.claim("job", "k2", chain, "a", 30).outcome == "mine"
    with store.catalog.db.tx() as s:
        past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
        s.execute(update(TrialRow).where(TrialRow.key == "k2").values(lease_expires=past))
    assert trials.claim("job", "k2", chain, "b", 30).outcome == "mine"
    assert trials.get("job", "k2").owner == "b"  # type: ignore[union-attr]


def test_racing_claims_have_one_winner(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'c.db'}", tmp_path / "blobs")
    outcomes: list[str] = []
    barrier = threading.Barrier(4)

    def claim(owner: str) -> None:
        barrier.wait()
        outcomes.append(store.trials.claim("job", "k", [], owner, 30).outcome)

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["busy", "busy", "busy", "mine"]


# -- searches -------------------------------------------------------------------------------------------------


def mlp_store(tmp_path: Path) -> tuple[ModelStore, bytes]:
    model, calibration = search_mlp()
    return store_with(tmp_path, "mlp", model, calibration), model


def test_unreachable_goals_end_as_a_result(tmp_path: Path) -> None:
    store, _ = mlp_store(tmp_path)
    result = run_job(store, "mlp", {"tolerance": 0.0, "metric": "cosine", "objective": "latency", "max_trials": 3})
    assert result["choice"] is None and result["variant"] is None
    assert result["message"].startswith("no variant within tolerance; the closest was ")
    assert result["judgements"]["probs"] == {
        "output": "probs",
        "metric": "cosine",
        "why": "set by the user (cosine)",
        "overridden": True,
    }
    assert result["trials"][0]["ladder"] == "original"
    assert all(not r["within_tolerance"] for r in result["trials"][1:])
    assert store.catalog.get_version("mlp", 1).default_variant == "original"


def test_budget_stops_the_search_with_the_best_so_far(tmp_path: Path) -> None:
    store, _ = mlp_store(tmp_path)
    result = run_job(store, "mlp", {"tolerance": 0.5, "objective": "size", "max_trials": 1})
    assert result["stopped"] == "max_trials (1) reached: best found so far"
    assert len(result["trials"]) == 2  # the original and one trial
    assert result["frontier"] and all(isinstance(k, str) for k in result["frontier"])


def test_digits_search_reports_every_trial_and_never_makes_a_slower_default(
    tmp_path: Path, digits_data: D.Digits
) -> None:
    x = np.concatenate([digits_data.x_calib, digits_data.x_train[D.N_CALIB :]])
    y = np.concatenate([digits_data.y_calib, digits_data.y_train[D.N_CALIB :]])
    store = store_with(tmp_path, "digits", D.digits_model(), {"input": x, "labels": y})
    result = run_job(store, "digits", {"tolerance": 0.01, "objective": "latency", "max_trials": 2})
    assert result["family"] == "cnn" and result["judgements"]["logits"]["metric"] == "top1"
    rows = result["trials"]
    assert rows[0]["chain"] == [] and rows[0]["loss"] == 0.0
    for r in rows:
        assert {"loss", "size_bytes", "p50_ms", "p99_ms", "throughput", "on_frontier", "chosen"} <= set(r)
    version = store.catalog.get_version("digits", 1)
    if result["variant"] is None:
        assert "the original stays" in result["message"] or "no variant" in result["message"]
        assert version.default_variant == "original"
    else:  # published: the default only when it is faster than the original beyond the noise
        variant = version.variant("optimized")
        assert variant is not None and variant.details["honest"] == result["honest"]
        assert (version.default_variant == "optimized") == result["honest"]
        chosen = next(r for r in rows if r["chosen"])
        assert chosen["timing"]["rounds"] >= 6 and chosen["honest"] == (chosen["timing"]["high"] < 0.95)


def test_encoder_search_judges_cosine_and_quantizes(tmp_path: Path) -> None:
    model = small_encoder()
    store = store_with(tmp_path, "enc", model, encoder_feeds(48))
    result = run_job(store, "enc", {"tolerance": 0.02, "objective": "size", "max_trials": 2})
    assert result["family"] == "transformer"
    assert result["judgements"][E.OUTPUT_NAME]["metric"] == "cosine"
    done = [r for r in result["trials"][1:] if r["state"] == "done"]
    assert done, result["trials"]
    for r in done:
        assert 0.0 <= r["loss"] <= 1.0 and r["outputs"][E.OUTPUT_NAME]["top1_agreement"] is not None
        if any(name.startswith("int8") for name, _ in r["chain"]):
            assert r["int8_weight_share"] > 0.5


def test_model_family_from_the_graph(digits: onnx.ModelProto) -> None:
    assert model_family(digits) == "cnn"
    assert model_family(onnx.load_from_string(small_encoder())) == "transformer"
    assert model_family(onnx.load_from_string(onnx_models.mlp())) == "mlp"


def test_a_resumed_search_builds_no_finished_trial_again(tmp_path: Path) -> None:
    """Two Search objects on one job (a killed attempt and its successor, or two workers): the second reuses."""
    store, model = mlp_store(tmp_path)
    spec = OptimizeSpec(tolerance=0.05, objective="latency", max_trials=3)
    _, calibration = search_mlp()
    data = CompressionData.split(Samples(calibration), spec.holdout_fraction)
    assert data.calibration is not None and data.evaluation is not None

    def search(owner: str) -> Search:
        return Search(
            "job-1", model, spec, data.calibration, data.evaluation, store.trials, store.blobs, lambda s, f: None, owner
        )  # type: ignore[arg-type]

    first = search("first").run()
    second = search("second")
    again = second.run()
    assert second.built == 0 and again.reused == len(first.trials)
    assert [r["key"] for r in again.trials] == [r["key"] for r in first.trials]
    assert {t.owner for t in store.trials.list("job-1")} == {"first"}


def test_plans_follow_family_objective_and_targets() -> None:
    from compression.optimize.search import plan

    cpu = {ladder.name: ladder for ladder in plan("transformer", OptimizeSpec(objective="latency"))}
    assert list(cpu) == ["int8_dynamic", "int8_static", "fused"]
    assert cpu["int8_static"].only_if_needed and not cpu["int8_dynamic"].only_if_needed
    assert cpu["int8_dynamic"].rungs[cpu["int8_dynamic"].start][0][0] == "fuse_transformer"  # the recipe first
    trt = {
        ladder.name: ladder for ladder in plan("transformer", OptimizeSpec(objective="latency", targets=["tensorrt"]))
    }
    assert list(trt) == ["int8_static"] and not trt["int8_static"].only_if_needed  # QDQ is what TensorRT takes
    size = plan("cnn", OptimizeSpec(objective="size"))
    assert [ladder.name for ladder in size] == ["allocate"]
    assert size[0].rungs[size[0].start] == [("allocate", {"target_ratio": 40})]  # the cnn-size recipe's budget
