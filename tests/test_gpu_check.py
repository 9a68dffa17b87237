"""The prepared GPU check (bench/gpu_check.sh, bench/gpu_bench.py) as far as it runs without a GPU: it stops at once
with the reason where there is none, and its measuring code runs end to end on ONNX Runtime CPU (--dry-run)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

ENV = {k: v for k, v in os.environ.items() if not k.startswith("SLIMSERVE_")}


@pytest.mark.slow  # starts processes
def test_the_gpu_check_stops_at_once_saying_what_is_missing(tmp_path: object) -> None:
    from backends import gpu

    if gpu.list_gpus():
        pytest.skip("this machine has a GPU: the check would run")
    out = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**ENV, "PYTHON": sys.executable, "OUT": str(tmp_path)})  # fmt: skip
    assert out.returncode == 2, out.stdout + out.stderr
    assert "gpu_check: no NVIDIA GPU" in out.stdout
    assert '"targets"' in (tmp_path / "environment.txt").read_text()  # type: ignore[operator]


@pytest.mark.slow
def test_the_gpu_bench_measures_end_to_end_on_the_cpu(tmp_path: object) -> None:
    result = tmp_path / "r.json"  # type: ignore[operator]
    out = subprocess.run([sys.executable, "bench/gpu_bench.py", "--dry-run", "--seconds", "1", "--out", str(result)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "DRY RUN" in out.stdout and "n/a (dry run)" in out.stdout and "FAIL" not in out.stdout
    import json

    r = json.loads(result.read_text())
    assert r["requests_per_s_c32"]["batching"] > 0 and r["requests_per_s_c32"]["unbatched"] > 0
    assert set(r["in_process_ms"]) == {"fp32", "fp16"} and r["server_p50_ms"] > 0
