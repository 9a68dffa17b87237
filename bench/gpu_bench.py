"""The GPU figures of issue 12, on a MiniLM-shaped encoder, taken by bench/gpu_check.sh on the lent GPU machine.

The encoder is bench/models.py's ``encoder()`` at all-MiniLM-L6-v2's shape (6 layers, hidden 384, 12 heads, FFN
1536, sequence 128, vocabulary 30522), with random weights: built on the spot, nothing to carry, speed only.

1. In process, ONNX Runtime CUDA (``load_backend("onnxruntime-cuda")``, IO binding, outputs copied back) fp32 vs
   fp16 at batch 1, 32 and 256: the median of timed runs after a warm-up. Bar: fp16 >= 1.8x fp32 at batch 256.
2. Through the server: one keep-alive connection (``http.client``, binary tensors) sending batch-1 requests one
   after another; the server's overhead is its p50 minus the in-process p50 at batch 1 (the client's own time is
   left in: the figure is an upper bound). Bar: <= 0.5 ms.
3. Dynamic batching at concurrency 32: 32 connections (4 processes x 8 threads) sending batch-1 requests back to
   back for ``--seconds``, to the same server config with batching on (max_batch_size 32, 1 ms queue delay) and
   off. Bar: batching >= 2x the requests/s.

    python3 bench/gpu_bench.py [--seconds 10] [--out result.json]
    python3 bench/gpu_bench.py --dry-run      # the same code on ONNX Runtime CPU, tiny sizes: checks the plumbing

Without a GPU and onnxruntime-gpu it stops at once, saying what is missing (exit 2), unless --dry-run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import common  # noqa: E402
import models  # noqa: E402

MINILM = {"layers": 6, "hidden": 384, "heads": 12, "ffn": 1536, "seq": 128, "vocab": 30522}
TINY = {"layers": 1, "hidden": 64, "heads": 2, "ffn": 128, "seq": 16, "vocab": 512}
BARS = {"fp16_speedup_b256": 1.8, "server_overhead_ms": 0.5, "batching_speedup_c32": 2.0}


def problem() -> str | None:
    """Why this machine cannot take the GPU figures (None: it can)."""
    from backends import gpu

    ort = gpu.onnxruntime_version_and_providers()
    if not gpu.list_gpus():
        return "no NVIDIA GPU: nvidia-smi is absent or lists none"
    if ort is None or "CUDAExecutionProvider" not in ort[1]:
        return f"onnxruntime {ort[0] if ort else '(none)'} has no CUDAExecutionProvider: install onnxruntime-gpu"
    return None


def in_process(model: bytes, shape: dict[str, int], kind: str, batches: list[int], seconds: float) -> dict:
    from backends import BackendOptions, load_backend

    out: dict[str, dict[int, float]] = {}
    for precision in ("fp32", "fp16"):
        backend = load_backend(kind, model, BackendOptions(precision=precision, extra={"max_batch_size": max(batches)}))
        out[precision] = {}
        for b in batches:
            feeds = models.encoder_input(b, shape["seq"], shape["vocab"])
            for _ in range(5):
                backend.infer(feeds)
            times = []
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline or len(times) < 10:
                t0 = time.perf_counter()
                backend.infer(feeds)
                times.append(time.perf_counter() - t0)
            out[precision][b] = statistics.median(times) * 1e3
        backend.unload()
    return out


def _request(shape: dict[str, int]) -> tuple[bytes, dict[str, str]]:
    body, header_len = common.v2_binary_body(models.encoder_input(1, shape["seq"], shape["vocab"]), ["pooled"])
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(header_len)}
    return body, headers


def _client(port: int, body: bytes, headers: dict[str, str], stop_at: float, latencies: list[float] | None) -> int:
    conn = http.client.HTTPConnection(common.HOST, port, timeout=60)
    n = 0
    while time.perf_counter() < stop_at:
        t0 = time.perf_counter()
        conn.request("POST", "/v2/models/enc/infer", body, headers)
        r = conn.getresponse()
        r.read()
        if r.status != 200:
            raise RuntimeError(f"infer answered {r.status}")
        if latencies is not None:
            latencies.append(time.perf_counter() - t0)
        n += 1
    conn.close()
    return n


def _load_process(port: int, threads: int, body: bytes, headers: dict[str, str], start: float, stop: float) -> int:
    while time.perf_counter() < start:
        time.sleep(0.001)
    counts: list[int] = []
    workers = [
        threading.Thread(target=lambda: counts.append(_client(port, body, headers, stop, None))) for _ in range(threads)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(counts)


def server(model_path: Path, config: dict[str, Any], log_name: str) -> Any:
    """A fresh server (its own store, no job workers) with the encoder uploaded as ``enc``; yields its port."""
    import contextlib

    @contextlib.contextmanager
    def run() -> Any:
        port = common.free_port()
        env = {**os.environ, "SLIMSERVE_LOG_LEVEL": "warning", "SLIMSERVE_JOB_WORKERS": "0"}
        with tempfile.TemporaryDirectory(prefix="slimserve-gpu-") as data:
            argv = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--data-dir", data]
            url = f"http://{common.HOST}:{port}"
            with common.process(argv, env=env, cwd=HERE.parent, ready_url=f"{url}/v2/health/ready", log_name=log_name):
                common.upload(url, "enc", model_path, config)
                yield port

    return run()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0, help="measurement time per point")
    ap.add_argument("--dry-run", action="store_true", help="ONNX Runtime CPU and a tiny encoder: plumbing only")
    ap.add_argument("--out", type=Path, help="write the numbers as JSON here")
    args = ap.parse_args()
    if not args.dry_run and (why := problem()):
        print(f"gpu_bench: cannot take the GPU figures here: {why} (docs/gpu.md)", file=sys.stderr)
        sys.exit(2)
    shape = TINY if args.dry_run else MINILM
    kind = "onnxruntime-cpu" if args.dry_run else "onnxruntime-cuda"
    batches = [1, 4] if args.dry_run else [1, 32, 256]
    concurrency, processes = (4, 2) if args.dry_run else (32, 4)
    model = models.encoder(**shape)
    report: dict[str, Any] = {"dry_run": args.dry_run, "backend": kind, "shape": shape}

    lat = in_process(model, shape, kind, batches, args.seconds / 4)
    report["in_process_ms"] = lat
    big = max(batches)
    report["fp16_speedup"] = lat["fp32"][big] / lat["fp16"][big]

    with tempfile.TemporaryDirectory(prefix="slimserve-gpu-") as tmp:
        path = Path(tmp) / "encoder.onnx"
        path.write_bytes(model)
        base = {"backend": kind, "max_batch_size": 32, "instances": 1}
        body, headers = _request(shape)
        with server(path, {**base, "batching": {"enabled": False}}, "gpu-overhead") as port:
            _client(port, body, headers, time.perf_counter() + 1.0, None)  # warm the connection and the variant
            times: list[float] = []
            _client(port, body, headers, time.perf_counter() + args.seconds / 2, times)
        report["server_p50_ms"] = statistics.median(times) * 1e3
        report["server_overhead_ms"] = report["server_p50_ms"] - lat["fp32"][1]

        rps = {}
        configs = {
            "unbatched": {**base, "batching": {"enabled": False}},
            "batching": {**base, "batching": {"enabled": True, "max_queue_delay_us": 1000}},
        }
        ctx = mp.get_context("spawn")
        for name, config in configs.items():
            with server(path, config, f"gpu-{name}") as port:
                _client(port, body, headers, time.perf_counter() + 1.0, None)
                start = time.perf_counter() + 3.0  # the processes start and wait for the same moment
                stop = start + args.seconds
                with ctx.Pool(processes) as pool:
                    jobs = [
                        pool.apply_async(_load_process, (port, concurrency // processes, body, headers, start, stop))
                        for _ in range(processes)
                    ]
                    total = sum(j.get(timeout=args.seconds + 120) for j in jobs)
                rps[name] = total / args.seconds
        report["requests_per_s_c32"] = rps
        report["batching_speedup"] = rps["batching"] / rps["unbatched"]

    print_report(report, batches)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1, default=str))


def print_report(r: dict[str, Any], batches: list[int]) -> None:
    lat = r["in_process_ms"]
    note = " (DRY RUN: plumbing only, no bar applies)" if r["dry_run"] else ""
    print(f"\n# {r['backend']}, encoder {r['shape']}{note}\n")
    print("| batch | fp32 p50 ms | fp16 p50 ms | fp16 speedup |")
    print("|---|---|---|---|")
    for b in batches:
        print(f"| {b} | {lat['fp32'][b]:.3f} | {lat['fp16'][b]:.3f} | {lat['fp32'][b] / lat['fp16'][b]:.2f}x |")
    rps = r["requests_per_s_c32"]
    rows = [
        ("fp16 / fp32 speed at the largest batch", f"{r['fp16_speedup']:.2f}x", ">=", "fp16_speedup_b256",
         r["fp16_speedup"]),
        ("server p50 - in-process p50, batch 1 (fp32)", f"{r['server_overhead_ms']:.3f} ms", "<=", "server_overhead_ms",
         r["server_overhead_ms"]),
        (f"batching / unbatched requests/s ({rps['batching']:.0f} / {rps['unbatched']:.0f})",
         f"{r['batching_speedup']:.2f}x", ">=", "batching_speedup_c32", r["batching_speedup"]),
    ]  # fmt: skip
    print("\n| figure | measured | bar | verdict |")
    print("|---|---|---|---|")
    for label, shown, op, bar, value in rows:
        ok = value >= BARS[bar] if op == ">=" else value <= BARS[bar]
        verdict = "n/a (dry run)" if r["dry_run"] else ("pass" if ok else "FAIL")
        print(f"| {label} | {shown} | {op} {BARS[bar]} | {verdict} |")


if __name__ == "__main__":
    common.run_main(main)
