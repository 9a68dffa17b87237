"""The traffic catalogue on SQLite and PostgreSQL: policies bump the revision and restart the window, a decision
is a compare-and-set on the window (two replicas racing take it once), rows go with their version."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from model_store import Catalog, NewDecision, NewVariant, RecordNotFound, TrafficCatalog


@pytest.fixture(params=["sqlite", "postgres"])
def catalog(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Catalog]:
    url = (
        f"sqlite:///{tmp_path / 'catalog.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    )
    c = Catalog(url)
    c.create_version("m", [NewVariant("original", "original", "a" * 64, 1)], {}, "original")
    c.add_variant("m", 1, NewVariant("int8", "int8", "b" * 64, 1))
    yield c
    c.close()


def decision(replica: str) -> NewDecision:
    return NewDecision("promote", "int8", "original", False, "agreement 1.0", {"compared_rows": 10}, replica)


def test_policy_lifecycle_moves_the_revision_and_the_window(catalog: Catalog) -> None:
    t = TrafficCatalog(catalog.db)
    r0 = catalog.revision()
    assert t.get_policy("m", 1) is None
    rec = t.set_policy("m", 1, {"split": {"original": 1.0}})
    assert rec.epoch == 0 and catalog.revision() == r0 + 1
    rec = t.set_policy("m", 1, {"split": {"int8": 1.0}})
    assert rec.epoch == 1 and rec.policy == {"split": {"int8": 1.0}}
    assert [(p.model, p.version, p.epoch) for p in t.policies()] == [("m", 1, 1)]
    t.write_stats("m", 1, "r1", 1, {"live": {}, "pairs": [], "n": 1})
    t.write_stats("m", 1, "r1", 1, {"live": {}, "pairs": [], "n": 2})  # a rewrite, not a second row
    t.write_stats("m", 1, "r2", 1, {"live": {}, "pairs": [], "n": 5})
    assert sorted(w["n"] for w in t.window("m", 1, 1)) == [2, 5]
    assert t.window("m", 1, 0) == []
    assert t.delete_policy("m", 1) and not t.delete_policy("m", 1)
    assert t.window("m", 1, 1) == []
    with pytest.raises(RecordNotFound):
        t.set_policy("m", 9, {"split": {}})


def test_a_decision_is_taken_once_on_a_window(catalog: Catalog) -> None:
    t = TrafficCatalog(catalog.db)
    t.set_policy("m", 1, {"split": {"original": 1.0}, "shadow": {"int8": 1.0}})
    barrier = threading.Barrier(4)
    results: list[object] = []

    def race(i: int) -> None:
        barrier.wait()
        results.append(t.decide("m", 1, 0, decision(f"r{i}"), {"split": {"int8": 1.0}}, "int8"))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sum(r is not None for r in results) == 1
    got = t.decisions("m", 1)
    assert len(got) == 1 and got[0].action == "promote" and got[0].numbers == {"compared_rows": 10}
    v = catalog.get_version("m", 1)
    assert v.default_variant == "int8" and v.pinned_default
    p = t.get_policy("m", 1)
    assert p is not None and p.epoch == 1 and p.policy == {"split": {"int8": 1.0}}
    # a decision on the old window, or after a policy change, is refused
    assert t.decide("m", 1, 0, decision("late"), None, None) is None
    t.set_policy("m", 1, {"split": {"original": 1.0}})
    assert t.decide("m", 1, 1, decision("late"), None, None) is None
    assert len(t.decisions("m", 1)) == 1


def test_traffic_rows_go_with_their_version(catalog: Catalog) -> None:
    t = TrafficCatalog(catalog.db)
    t.set_policy("m", 1, {"split": {"original": 1.0}})
    t.write_stats("m", 1, "r1", 0, {"live": {}, "pairs": []})
    assert t.decide("m", 1, 0, decision("r1"), None, None) is not None
    catalog.delete_version("m", 1)
    assert t.policies() == []
    with pytest.raises(RecordNotFound):
        t.decisions("m", 1)
