"""The serving-config tuner: thread sizing from the cgroup CPU quota, the per-variant config overlay, and a
tuning run against the real scheduler and real ONNX Runtime sessions (measurements are not asserted: only what
holds on every run)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from compression.calibration import Samples
from compression.optimize.spec import OptimizeSpec
from service import settings as settings_module
from service import tuning
from service.model_config import ModelConfig, for_variant
from service.settings import cgroup_cpu_quota, usable_cpus
from tests.onnx_models import mlp


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_cgroup_v2_quota(tmp_path: Path) -> None:
    assert cgroup_cpu_quota(write(tmp_path / "a", {"cpu.max": "150000 100000\n"})) == 1.5
    assert cgroup_cpu_quota(write(tmp_path / "b", {"cpu.max": "max 100000\n"})) is None
    assert cgroup_cpu_quota(tmp_path / "nothing") is None


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    root = write(tmp_path / "v1", {"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"})
    assert cgroup_cpu_quota(root) == 0.5
    unlimited = write(tmp_path / "v1u", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"})
    assert cgroup_cpu_quota(unlimited) is None


def test_usable_cpus_is_capped_by_the_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings_module.os, "sched_getaffinity", lambda _pid: set(range(8)))
    assert usable_cpus(write(tmp_path / "q", {"cpu.max": "250000 100000"})) == 3  # limits.cpu 2.5 -> 3 threads
    assert usable_cpus(write(tmp_path / "s", {"cpu.max": "20000 100000"})) == 1  # 0.2 CPU: still one thread
    assert usable_cpus(write(tmp_path / "n", {"cpu.max": "max 100000"})) == 8  # no quota: the affinity mask
    assert usable_cpus(write(tmp_path / "w", {"cpu.max": "1600000 100000"})) == 8  # quota above the mask


def test_a_variants_tuned_config_fills_what_the_user_left_unset() -> None:
    tuned = {
        "serving_config": {
            "config": {
                "max_batch_size": 16,
                "instances": 2,
                "intra_op_threads": 1,
                "max_queue_delay_us": 500,
                "allow_spinning": False,
            }
        }
    }
    got = for_variant(ModelConfig(), tuned)
    assert (got.max_batch_size, got.instances, got.intra_op_threads, got.allow_spinning) == (16, 2, 1, False)
    assert got.batching.max_queue_delay_us == 500
    user = ModelConfig.model_validate({"instances": 1, "batching": {"max_queue_delay_us": 0}})
    mixed = for_variant(user, tuned)
    assert mixed.instances == 1 and mixed.batching.max_queue_delay_us == 0 and mixed.max_batch_size == 16
    assert for_variant(user, {}) is user


def test_one_client_tunes_only_threads_and_spinning() -> None:
    # one client's single-row requests cannot choose threads for the batches a batchable model also serves
    assert tuning.candidates(2, 1, True) == {"intra_op_threads": [2], "allow_spinning": [True, False]}
    assert tuning.candidates(2, 1, False) == {"intra_op_threads": [2, 1], "allow_spinning": [True, False]}
    assert set(tuning.candidates(2, 8, True)) == {
        "max_batch_size",
        "max_queue_delay_us",
        "instances",
        "intra_op_threads",
        "allow_spinning",
    }
    assert tuning.candidates(2, 8, True)["max_batch_size"] == [8, 1]
    assert "max_batch_size" not in tuning.candidates(2, 8, False)  # a fixed batch dimension: nothing to batch


def test_tune_measures_the_real_scheduler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tuning, "WINDOW_S", 0.2)
    model = mlp(in_dim=16, hidden=64, out_dim=4)
    samples = Samples({"x": np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)})
    spec = OptimizeSpec(objective="throughput", latency_budget_ms=1000.0, concurrency=4)
    seen: list[float] = []
    out = tuning.tune(model, samples, spec, seen.append)
    grid = tuning.candidates(usable_cpus(), 4, True)
    assert set(out["config"]) == set(grid)
    assert out["config"]["max_batch_size"] in grid["max_batch_size"] and out["config"]["instances"] in grid["instances"]
    base = 1 + sum(len(v) - 1 for v in grid.values())  # the default, then each knob's other values
    extra = len(out["trials"]) - base  # confirmation rounds of winning changes, a pair each
    assert extra >= 0 and extra % (2 * tuning.CONFIRM_ROUNDS) == 0 and seen[-1] == 1.0
    assert all(t["requests"] >= 4 and t["p99_ms"] >= t["p50_ms"] > 0 for t in out["trials"])
    assert out["within_budget"] == (out["measured"]["p99_ms"] <= 1000.0) and out["cpus"] == usable_cpus()
    assert any(t["config"] == out["config"] and t["throughput"] == out["measured"]["throughput"] for t in out["trials"])
