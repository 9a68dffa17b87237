"""The declared search space (compression.passes): consistent knobs, valid chains, real entry points."""

from __future__ import annotations

import importlib

import pytest

from compression.passes import OUT_OF_SPACE, PASSES, RECIPES, check_chain


def test_every_pass_points_at_a_real_function_and_has_a_reason() -> None:
    for p in PASSES.values():
        module, _, function = p.entry.split(" ")[0].partition(":")
        assert callable(getattr(importlib.import_module(module), function)), p.entry
        assert p.why and p.objectives and p.targets
        for other in p.exclusive:
            assert p.name in PASSES[other].exclusive, f"{p.name} / {other}: exclusivity must be mutual"
    assert all(OUT_OF_SPACE.values())


def test_knob_grids_are_well_formed() -> None:
    for p in PASSES.values():
        for k in p.knobs:
            assert k.default in k.values, (p.name, k.name)
            assert len(set(map(repr, k.values))) == len(k.values), (p.name, k.name)
            if k.loss_grows is not None:
                assert len(k.values) >= 2, (p.name, k.name)
                numbers = [v for v in k.values if isinstance(v, int | float) and not isinstance(v, bool)]
                if len(numbers) == len(k.values):  # numeric monotone grids are sorted, so a search can bisect
                    assert numbers in (sorted(numbers), sorted(numbers, reverse=True)), (p.name, k.name)


def test_check_chain_orders_and_refuses_conflicts() -> None:
    assert check_chain(["encode", "share", "allocate", "dead_channels"]) == [
        "dead_channels",
        "allocate",
        "share",
        "encode",
    ]
    assert check_chain(["int8_dynamic", "fuse_transformer"]) == ["fuse_transformer", "int8_dynamic"]
    with pytest.raises(ValueError, match="same job"):
        check_chain(["int8_static", "int8_dynamic"])
    with pytest.raises(ValueError, match="same job"):
        check_chain(["int8_static", "encode"])
    with pytest.raises(ValueError, match="unknown"):
        check_chain(["magic"])
    with pytest.raises(ValueError, match="twice"):
        check_chain(["encode", "encode"])


def test_recipes_are_valid_chains_with_declared_knobs() -> None:
    for name, steps in RECIPES.items():
        check_chain([p for p, _ in steps])
        for p, knobs in steps:
            declared = {k.name: k for k in PASSES[p].knobs}
            for knob, value in knobs.items():
                assert knob in declared, (name, p, knob)
                assert value in declared[knob].values, (name, p, knob, value)
