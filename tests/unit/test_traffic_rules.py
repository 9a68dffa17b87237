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
