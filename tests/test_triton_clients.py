"""The unmodified Triton clients against slimserve: tritonclient.http and perf_analyzer (HTTP and gRPC);
tritonclient.grpc has its own module, tests/test_grpc.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import Server, upload
from tests.onnx_models import mlp, mlp_reference

tc = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")


@pytest.fixture(scope="module")
def triton(server: Server):  # type: ignore[no-untyped-def]
    with server.client() as c:
        assert upload(c, "tc-mlp", mlp()).status_code == 201
    client = tc.InferenceServerClient(server.url.removeprefix("http://"))
    yield client
    client.close()


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_infer(triton, binary: bool) -> None:  # type: ignore[no-untyped-def]
    x = np.random.default_rng(3).random((5, 4), dtype=np.float32)
    inp = tc.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outs = [tc.InferRequestedOutput("probs", binary_data=binary)]
    res = triton.infer("tc-mlp", [inp], outputs=outs, request_id="r1")
    np.testing.assert_allclose(res.as_numpy("probs"), mlp_reference(x), rtol=1e-5, atol=1e-6)
    assert res.get_response()["id"] == "r1"
    assert res.as_numpy("logits") is None  # not requested


def test_tritonclient_defaults_and_variants(triton) -> None:  # type: ignore[no-untyped-def]
    x = np.ones((1, 4), np.float32)
    inp = tc.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(x)
    res = triton.infer("tc-mlp:original", [inp], model_version="1")  # no outputs: all, binary
    assert res.as_numpy("logits").shape == (1, 3)
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("tc-mlp")
    meta = triton.get_model_metadata("tc-mlp")
    assert meta["inputs"][0]["name"] == "x"
    cfg = triton.get_model_config("tc-mlp")
    assert cfg["max_batch_size"] == 32 and cfg["input"][0]["dims"] == [4]
    stats = triton.get_inference_statistics("tc-mlp")
    assert stats["model_stats"][0]["inference_count"] >= 1
    assert any(m["name"] == "tc-mlp" for m in triton.get_model_repository_index())


def test_tritonclient_errors_are_exceptions(triton) -> None:  # type: ignore[no-untyped-def]
    from tritonclient.utils import InferenceServerException

    inp = tc.InferInput("x", [1, 3], "FP32")
    inp.set_data_from_numpy(np.ones((1, 3), np.float32))
    with pytest.raises(InferenceServerException, match="expects"):
        triton.infer("tc-mlp", [inp])
    with pytest.raises(InferenceServerException, match=r"\[404\] model 'no-such-model' is unknown"):
        triton.infer("no-such-model", [inp])


def _perf_analyzer() -> tuple[Path, dict[str, str]] | None:
    exe = Path(sys.executable).parent / "perf_analyzer"
    if not exe.exists():
        exe_str = shutil.which("perf_analyzer")
        if not exe_str:
            return None
        exe = Path(exe_str)
    env = dict(os.environ)
    try:
        import nvidia.cuda_runtime as cr

        libdir = str(Path(next(iter(cr.__path__))) / "lib")
        env["LD_LIBRARY_PATH"] = libdir + os.pathsep + env.get("LD_LIBRARY_PATH", "")
    except ImportError:
        return None
    probe = subprocess.run([str(exe), "--help"], env=env, capture_output=True, text=True)
    if "error while loading shared libraries" in probe.stderr:
        return None
    return exe, env


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_runs_against_slimserve(triton, server: Server, protocol: str) -> None:  # type: ignore[no-untyped-def]
    found = _perf_analyzer()
    if found is None:
        pytest.skip(
            "perf_analyzer cannot run: needs tritonclient 2.41.0's binary, nvidia-cuda-runtime-cu12 and "
            "Debian's libb64-0d (make setup installs them)"
        )
    exe, env = found
    out = subprocess.run(
        [
            str(exe),
            "-m",
            "tc-mlp",
            "-u",
            server.url.removeprefix("http://") if protocol == "http" else f"127.0.0.1:{server.grpc_port}",
            "-i",
            protocol,
            "-b",
            "2",
            "--concurrency-range",
            "2",
            # a run, not a benchmark: count windows, and any spread counts as stable (the CPUs here are shared)
            "--measurement-mode",
            "count_windows",
            "--measurement-request-count",
            "50",
            "--max-trials",
            "3",
            "-s",
            "100000",
            "-v",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Throughput:" in out.stdout
    assert "Server:" in out.stdout  # read the statistics extension
