"""The split and the promotion rules as pure functions: deterministic picks, window merging, every rule's edge."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from service.promotion import Verdict, applied, evaluate
from service.traffic import Route, TrafficPolicy
from service.traffic_window import PairWindow, VariantWindow, VersionWindow, merge


def policy(**rules: Any) -> TrafficPolicy:
    return TrafficPolicy.model_validate(
        {
            "split": {"original": 0.8, "canary": 0.2},
            "shadow": {"int8": 1.0},
            "rules": {"min_samples": 10, "tolerance": 0.02, "p99_margin": 0.2, **rules},
        }
    )


def window(
    primary_latency: float = 0.010,
    candidate_latency: float = 0.002,
    agree: float = 1.0,
    rows: int = 20,
    cand_errors: int = 0,
    canary_errors: int = 0,
) -> dict[str, Any]:
    w = VersionWindow(epoch=0)
    p = w.variant("original")
    p.requests = rows
    p.latencies.extend([primary_latency] * rows)
    c = w.variant("canary")
    c.requests = rows
    c.errors = canary_errors
    c.latencies.extend([primary_latency] * rows)
    pair = w.pair("original", "int8")
    pair.requests, pair.errors = rows, cand_errors
    pair.latencies.extend([candidate_latency] * rows)
    pair.rows = pair.top1_rows = rows
    pair.top1_agree = agree * rows
    pair.cosine_sum = 0.99 * rows
    return w.to_dict()


def test_the_sticky_split_is_a_pure_function_of_the_key_and_follows_the_weights() -> None:
    p = TrafficPolicy.model_validate({"split": {"b": 0.25, "a": 0.75, "z": 0.0}, "sticky": "X-User"})
    r1, r2 = Route(p), Route(p)
    picks = [r1.pick({"x-user": f"k{i}"}) for i in range(4000)]
    assert picks == [r2.pick({"x-user": f"k{i}"}) for i in range(4000)]
    share = Counter(picks)
    assert set(share) == {"a", "b"}  # a zero weight gets nothing
    assert 0.22 < share["b"] / 4000 < 0.28
    seeded = [Route(p, seed=1).pick(None) for _ in range(3)]
    assert len(set(seeded)) == 1  # a seeded draw repeats
    assert TrafficPolicy.model_validate({"split": {"a": 1.0}, "sticky": "request-id"}).sticky_header == "x-request-id"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"split": {"a": 0.6, "b": 0.6}}, "sum to 1"),
        ({"split": {"a": -1.0, "b": 2.0}}, ">= 0"),
        ({"split": {"a": 1.0}, "shadow": {"b": -0.1}}, "[0, 1]"),
        ({"split": {"a/../b": 1.0}}, "not a variant name"),
        ({"split": {"a": float("nan")}}, "finite"),
    ],
)
def test_bad_policies_are_refused(body: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValueError) as e:
        TrafficPolicy.model_validate(body)
    assert reason in str(e.value)


def test_merge_sums_replicas() -> None:
    m = merge([window(rows=20), window(rows=30, agree=0.5)])
    pair = m.pairs[("original", "int8")]
    assert m.replicas == 2 and pair.rows == 50 and pair.requests == 50
    assert pair.agreement == pytest.approx((20 + 15) / 50)
    assert m.live["original"].requests == 50 and len(m.live["original"].latencies) == 50


def test_a_faithful_faster_candidate_is_promoted_and_gets_the_split() -> None:
    v = evaluate(policy(), "original", merge([window()]))
    assert v is not None and (v.action, v.candidate) == ("promote", "int8")
    assert v.numbers["agreement"] == 1.0 and v.numbers["candidate_p99_s"] == pytest.approx(0.002)
    new, default = applied(policy(), v, "original")
    assert default == "int8" and new["split"] == {"int8": 1.0} and new["shadow"] == {}


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"rows": 9}, None),  # under min_samples: no decision either way
        ({"candidate_latency": 0.009}, None),  # faithful, but not faster by the margin: hold
        ({"agree": 0.9}, ("rollback", "int8", "agreement")),
        ({"cand_errors": 5}, ("rollback", "int8", "error rate")),
        ({"canary_errors": 5}, ("rollback", "canary", "error rate")),
    ],
)
def test_rules(kw: dict[str, Any], expected: tuple[str, str, str] | None) -> None:
    v = evaluate(policy(), "original", merge([window(**kw)]))
    if expected is None:
        assert v is None
    else:
        assert v is not None and (v.action, v.candidate) == expected[:2] and expected[2] in v.reason


def test_p99_and_max_abs_error_limits_roll_back() -> None:
    v = evaluate(policy(rollback_p99_s=0.001), "original", merge([window()]))
    assert v is not None and (v.action, v.candidate) == ("rollback", "canary")  # the canary's live p99 is 10 ms
    assert v.reason == "p99 0.010000 s > 0.001 s"
    w = window()
    w["pairs"][0]["max_abs_error"] = 0.5
    v = evaluate(policy(max_abs_error=0.1), "original", merge([w]))
    assert v is not None and v.action == "rollback" and "max abs error" in v.reason


def test_rollback_takes_the_candidate_out_and_renormalizes() -> None:
    p = policy()
    new, default = applied(p, Verdict("rollback", "canary", "", {}), "original")
    assert default is None and new["split"] == {"original": 1.0} and new["shadow"] == {"int8": 1.0}
    only = TrafficPolicy.model_validate({"split": {"canary": 1.0}})
    new, _ = applied(only, Verdict("rollback", "canary", "", {}), "original")
    assert new["split"] == {"original": 1.0}  # nothing left: the primary takes it all


def test_windows_serialize_what_they_counted() -> None:
    w = VersionWindow(epoch=3)
    assert isinstance(w.variant("a"), VariantWindow) and isinstance(w.pair("a", "b"), PairWindow)
    d = w.to_dict()
    assert d["live"]["a"]["requests"] == 0 and d["pairs"][0]["candidate"] == "b"


def test_shadow_samples_join_up_to_the_candidates_batch_size() -> None:
    import numpy as np

    from service.shadow import _chunks, _stack, compare_outputs
    from service.traffic import ShadowSample

    w = VersionWindow(epoch=0)

    def sample(rows: int) -> ShadowSample:
        x = np.zeros((rows, 2), np.float32)
        return ShadowSample("m", 1, "original", "int8", {"x": x}, None, rows, {"y": x}, w)

    samples = [sample(r) for r in (3, 3, 2, 5)]
    assert [[s.rows for s in c] for c in _chunks(samples, 8)] == [[3, 3, 2], [5]]
    assert [len(c) for c in _chunks(samples, 0)] == [1, 1, 1, 1]  # no batch axis: one by one
    joined = _stack([s.outputs for s in samples])
    assert joined is not None and joined["y"].shape == (13, 2)
    assert _stack([{"y": np.zeros((1, 2))}, {"y": np.zeros((1, 3))}]) is None
    ref = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], np.float32)
    cand = np.array([[0.8, 0.2], [0.7, 0.3], [0.6, 0.4]], np.float32)
    c = compare_outputs({"probs": ref}, {"probs": cand})
    assert (c.rows, c.top1_rows) == (3, 3) and c.top1_agree == pytest.approx(2.0)
    assert c.max_abs_error == pytest.approx(0.5)
