"""slimserve vs KServe's Python ModelServer vs Seldon MLServer, same ONNX model, same load, one run.

Each peer serves bench/models.py's MLP (64 -> 256 -> 256 -> 10) through its documented custom-model API with
ONNX Runtime (bench/peer_servers/), the same onnxruntime version as slimserve, 1 intra-op thread everywhere.
All three servers run at once on core 0 (``taskset``; idle while another is measured), and wrk runs on
core 1. Every point is wrk with 1 thread POSTing the identical v2 JSON body (batch 1) to
/v2/models/mlp/infer. perf_analyzer is not used here: KServe and MLServer have no /config endpoint and
their metadata lists no inputs for a custom model, which perf_analyzer needs.

Rounds interleave the servers (the order rotates each round) so that drifting background load hits all
three alike; the summary takes the median per server over the rounds.

Bar: at concurrency 8, slimserve >= 1.5x the requests/s of both KServe and MLServer, with a lower p99.

The peers' virtualenvs are created under .bench/ on first use (a few minutes, from PyPI):
.bench/kserve-venv (kserve, onnxruntime) and .bench/mlserver-venv (mlserver, onnxruntime).

    .venv/bin/python bench/peers.py                      # ~3.5 minutes once the venvs exist
    .venv/bin/python bench/peers.py --rounds 1 --seconds 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import common
import httpx
import models
import numpy as np
from common import Result

HERE = Path(__file__).resolve().parent
PEERS = HERE / "peer_servers"
BAR_RATIO = 1.5

#: the versions this benchmark was written against; ONNX Runtime is pinned to slimserve's own version
PEER_PACKAGES = {
    "kserve": ["kserve==0.21.0"],
    "mlserver": ["mlserver==1.7.1"],
}


def ensure_venv(name: str) -> Path:
    """.bench/<name>-venv with the peer and the same onnxruntime as slimserve; created on first use."""
    venv = common.BENCH_DIR / f"{name}-venv"
    pkgs = [*PEER_PACKAGES[name], f"onnxruntime=={version('onnxruntime')}"]
    marker = venv / ".bench-installed"
    if marker.exists() and marker.read_text() == " ".join(pkgs):
        return venv
    print(f"creating {venv.relative_to(common.REPO)}: pip install {' '.join(pkgs)} (a few minutes)", flush=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True, timeout=600)
    subprocess.run([*pip, *pkgs], check=True, timeout=1200)
    marker.write_text(" ".join(pkgs))
    return venv


def kserve_server(model: Path, cpus: str | None) -> contextlib.AbstractContextManager[str]:
    return common.retrying(lambda: _kserve_server(model, cpus))


@dataclass(frozen=True)
class MLServer:
    """A running MLServer: REST base URL, gRPC address (host:port), Prometheus metrics URL, and its model repository
    folder (on its command line: what names its process)."""

    url: str
    grpc: str
    metrics: str
    repo: str


def mlserver_server(model: Path, cpus: str | None) -> contextlib.AbstractContextManager[MLServer]:
    return common.retrying(lambda: _mlserver_server(model, cpus))


@contextlib.contextmanager
def _kserve_server(model: Path, cpus: str | None) -> Iterator[str]:
    venv = ensure_venv("kserve")
    port = common.free_port()
    argv = [
        *common.pin(cpus),
        str(venv / "bin" / "python"),
        str(PEERS / "kserve_onnx.py"),
        "--http_port",
        str(port),
        "--enable_grpc",
        "false",
        "--enable_latency_logging",
        "false",
        "--model_name",
        "mlp",
        "--model_path",
        str(model),
        "--threads",
        "1",
    ]
    url = f"http://{common.HOST}:{port}"
    with common.process(argv, cwd=common.REPO, ready_url=f"{url}/v2/models/mlp/ready", log_name="kserve"):
        yield url


@contextlib.contextmanager
def _mlserver_server(model: Path, cpus: str | None) -> Iterator[MLServer]:
    venv = ensure_venv("mlserver")
    http, grpc, metrics = common.free_port(), common.free_port(), common.free_port()
    with tempfile.TemporaryDirectory(prefix="mlserver-", dir=common.BENCH_DIR) as repo:
        settings = {
            "host": common.HOST,
            "http_port": http,
            "grpc_port": grpc,
            "metrics_port": metrics,
            "parallel_workers": 0,
            "debug": False,
        }
        Path(repo, "settings.json").write_text(json.dumps(settings))
        Path(repo, "mlp").mkdir()
        model_settings = {
            "name": "mlp",
            "implementation": "mlserver_onnx.OnnxModel",
            "parameters": {"uri": str(model), "extra": {"threads": 1}},
        }
        Path(repo, "mlp", "model-settings.json").write_text(json.dumps(model_settings))
        env = dict(os.environ, PYTHONPATH=str(PEERS))
        argv = [*common.pin(cpus), str(venv / "bin" / "mlserver"), "start", repo]
        url = f"http://{common.HOST}:{http}"
        with common.process(argv, env=env, cwd=repo, ready_url=f"{url}/v2/models/mlp/ready", log_name="mlserver"):
            yield MLServer(url, f"{common.HOST}:{grpc}", f"http://{common.HOST}:{metrics}/metrics", repo)


@contextlib.contextmanager
def slimserve_server(model: Path, cpus: str | None) -> Iterator[str]:
    with common.slimserve(cpus=cpus, intra_op_threads=1) as url:
        common.upload(url, "mlp", model, common.MODEL_CONFIG)
        yield url


def check(url: str, body: bytes, expected: np.ndarray) -> dict[str, Any]:
    """One request: the answer must match in-process ONNX Runtime. Also notes what perf_analyzer would need."""
    r = httpx.post(f"{url}/v2/models/mlp/infer", content=body, headers={"Content-Type": "application/json"})
    r.raise_for_status()
    out = r.json()["outputs"][0]
    got = np.asarray(out["data"], np.float32).reshape(out["shape"])
    if not np.allclose(got, expected, atol=1e-5):
        raise RuntimeError(f"{url} answered {got}, expected {expected}")
    meta = httpx.get(f"{url}/v2/models/mlp").json()
    config = httpx.get(f"{url}/v2/models/mlp/config").status_code
    return {"metadata_inputs": len(meta.get("inputs") or []), "config_status": config}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=6, help="measurement per point (default 6)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--concurrency", default="1,8", help="comma-separated (default 1,8)")
    ap.add_argument("--no-pin", action="store_true", help="don't pin the servers and wrk to cores")
    args = ap.parse_args()
    common.need_wrk()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    server_cpus, client_cpus = (None, None) if args.no_pin else ("0", "1")
    for name in PEER_PACKAGES:
        ensure_venv(name)
    notes = common.machine_notes()
    print(f"machine: {notes}  servers cpus={server_cpus} wrk cpus={client_cpus}", flush=True)

    model = models.write(common.BENCH_DIR / "models")["mlp"]
    inputs = models.mlp_input(1)
    json_body = common.v2_json_body(inputs)
    bin_body, hlen = common.v2_binary_body(inputs, [models.MLP_OUTPUT])
    expected = _reference(model, inputs)
    results: list[Result] = []
    with contextlib.ExitStack() as stack:
        urls = {
            "slimserve": stack.enter_context(slimserve_server(model, server_cpus)),
            "kserve": stack.enter_context(kserve_server(model, server_cpus)),
            "mlserver": stack.enter_context(mlserver_server(model, server_cpus)).url,
        }
        probes = {name: check(url, json_body, expected) for name, url in urls.items()}
        print(f"all three answer correctly; perf_analyzer prerequisites: {probes}", flush=True)
        points: list[tuple[str, str]] = [(n, "json") for n in urls] + [("slimserve", "binary")]
        for rnd in range(args.rounds):
            order = common.rotated(points[:3], rnd) + points[3:]
            for name, mode in order:
                for c in concurrencies:
                    if mode == "binary":
                        body = bin_body
                        headers = {"Content-Type": "application/octet-stream"}
                        headers["Inference-Header-Content-Length"] = str(hlen)
                    else:
                        body, headers = json_body, {"Content-Type": "application/json"}
                    r = common.wrk(
                        f"{urls[name]}/v2/models/mlp/infer",
                        body,
                        headers,
                        concurrency=c,
                        seconds=args.seconds,
                        cpus=client_cpus,
                        target=name,
                        mode=mode,
                    )
                    r.extra["round"] = rnd
                    results.append(r)
                    print(f"round {rnd}: {r.line()}", flush=True)

    summary = evaluate(results, concurrencies)
    print()
    print(common.table(summary["rows"], [*common.HEADER[:4], "req/s (median)", "range", "p50 ms", "p99 ms"]))
    print()
    for line in summary["lines"]:
        print(line)
    path = common.save(
        "peers",
        {
            "machine": notes,
            "server_cpus": server_cpus,
            "client_cpus": client_cpus,
            "seconds": args.seconds,
            "rounds": args.rounds,
            "versions": _versions(),
            "perf_analyzer_prerequisites": probes,
            "results": results,
            "summary": {k: v for k, v in summary.items() if k != "rows"},
        },
    )
    print(f"\nraw results: {path.relative_to(common.REPO)}")


def _reference(model: Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, inputs)[0]


def _versions() -> dict[str, str]:
    out = {"slimserve": version("slimserve"), "onnxruntime": version("onnxruntime")}
    for name in PEER_PACKAGES:
        py = common.BENCH_DIR / f"{name}-venv" / "bin" / "python"
        code = f"from importlib.metadata import version; print(version('{name}'))"
        out[name] = subprocess.run([str(py), "-c", code], capture_output=True, text=True).stdout.strip()
    return out


def evaluate(results: list[Result], concurrencies: list[int]) -> dict[str, Any]:
    groups: dict[tuple[str, str, int], list[Result]] = {}
    for r in results:
        groups.setdefault((r.target, r.mode, r.concurrency), []).append(r)
    med: dict[str, dict[str, float]] = {}
    rows = []
    for (target, mode, c), rs in sorted(groups.items(), key=lambda kv: (kv[0][2], kv[0][1] != "json", kv[0][0])):
        tp = [r.throughput for r in rs]
        m = {
            "throughput": statistics.median(tp),
            "p50_ms": statistics.median(r.p50_ms for r in rs),
            "p99_ms": statistics.median(r.p99_ms for r in rs),
            "min": min(tp),
            "max": max(tp),
            "errors": sum(r.errors for r in rs),
        }
        med[f"{target}/{mode}/c{c}"] = m
        rows.append(
            [
                target,
                "wrk",
                mode,
                str(c),
                f"{m['throughput']:,.0f}",
                f"{m['min']:,.0f}-{m['max']:,.0f}",
                f"{m['p50_ms']:.3f}",
                f"{m['p99_ms']:.3f}",
            ]
        )
    lines = []
    met = None
    c = 8 if 8 in concurrencies else max(concurrencies)
    s = med.get(f"slimserve/json/c{c}")
    if s:
        met = True
        for peer in ("kserve", "mlserver"):
            p = med.get(f"{peer}/json/c{c}")
            if not p:
                continue
            ratio = s["throughput"] / p["throughput"]
            ok = ratio >= BAR_RATIO and s["p99_ms"] < p["p99_ms"]
            met = met and ok
            lines.append(
                f"c={c} slimserve vs {peer}: {ratio:.2f}x req/s ({s['throughput']:,.0f} vs {p['throughput']:,.0f}); "
                f"p99 {s['p99_ms']:.3f} vs {p['p99_ms']:.3f} ms -> {'MET' if ok else 'NOT MET'}"
            )
        lines.append(f"BAR (>= {BAR_RATIO}x both peers at c={c}, lower p99): {'MET' if met else 'NOT MET'}")
    return {"medians": med, "rows": rows, "lines": lines, "met": met}


if __name__ == "__main__":
    common.run_main(main)
