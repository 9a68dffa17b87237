"""Serving overhead: in-process ONNX Runtime vs slimserve over HTTP, same model, same core, one run.

Model: an MLP 64 -> 256 -> 256 -> 10 (bench/models.py), batch 1, ONNX Runtime with 1 intra-op thread.
Targets, each at concurrency 1 and 8:

- in-process: ``InferenceSession.run`` called back to back (at concurrency 8: from 8 threads on one session);
- slimserve over HTTP (POST /v2/models/mlp/infer), driven by wrk (binary and JSON bodies) and by Triton's
  perf_analyzer (binary and JSON tensor formats).

The server (and the in-process loop) run on core 0, the load generators on core 1 (``taskset``), unless
``--no-pin``. Bar: at concurrency 1 the server adds at most 0.5 ms to the in-process p50, measured with
wrk's binary body (the leanest client; perf_analyzer's own client adds ~0.1 ms and is reported beside it).

    .venv/bin/python bench/overhead.py                 # ~2-3 minutes
    .venv/bin/python bench/overhead.py --seconds 5 --no-perf-analyzer
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import common
import models
import numpy as np
from common import Result

BAR_MS = 0.5


def in_process_worker(model: Path, seconds: float, concurrencies: list[int], threads: int) -> list[dict[str, float]]:
    """Runs in a child process (pinned like the server): session.run back to back from ``c`` threads."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model), sess_options=so, providers=["CPUExecutionProvider"])
    feeds = models.mlp_input(1)
    for _ in range(2000):
        session.run(None, feeds)
    out = []
    for c in concurrencies:
        samples: list[list[int]] = [[] for _ in range(c)]
        stop = threading.Event()

        def loop(mine: list[int], stop: threading.Event = stop) -> None:
            run, clock = session.run, time.perf_counter_ns
            while not stop.is_set():
                t0 = clock()
                run(None, feeds)
                mine.append(clock() - t0)

        workers = [threading.Thread(target=loop, args=(samples[i],)) for i in range(c)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        time.sleep(seconds)
        stop.set()
        for w in workers:
            w.join()
        elapsed = time.perf_counter() - t0
        lat = np.concatenate([np.asarray(s, dtype=np.int64) for s in samples]) / 1e6
        out.append(
            {
                "concurrency": c,
                "throughput": len(lat) / elapsed,
                "p50_ms": float(np.percentile(lat, 50)),
                "p99_ms": float(np.percentile(lat, 99)),
                "requests": len(lat),
            }
        )
    return out


def in_process(model: Path, seconds: float, concurrencies: list[int], cpus: str | None) -> list[Result]:
    argv = [
        *common.pin(cpus),
        sys.executable,
        str(Path(__file__).resolve()),
        "--in-process-worker",
        str(model),
        "--seconds",
        str(seconds),
        "--concurrency",
        ",".join(map(str, concurrencies)),
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds * len(concurrencies) + 120, check=True)
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    return [
        Result(
            "in-process", "in-process", "-", r["concurrency"], r["throughput"], r["p50_ms"], r["p99_ms"], r["requests"]
        )
        for r in rows
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10, help="measurement per wrk / in-process point (default 10)")
    ap.add_argument("--concurrency", default="1,8", help="comma-separated (default 1,8)")
    ap.add_argument("--no-pin", action="store_true", help="don't pin the server and the load generator to cores")
    ap.add_argument("--no-perf-analyzer", action="store_true", help="wrk only")
    ap.add_argument("--no-wrk", action="store_true", help="perf_analyzer only")
    ap.add_argument("--in-process-worker", metavar="MODEL", help=argparse.SUPPRESS)
    args = ap.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    if args.in_process_worker:
        print(json.dumps(in_process_worker(Path(args.in_process_worker), args.seconds, concurrencies, 1)))
        return

    server_cpus, client_cpus = (None, None) if args.no_pin else ("0", "1")
    use_pa = not args.no_perf_analyzer and common.perf_analyzer_cmd() is not None
    use_wrk = not args.no_wrk and common.wrk_available()
    if not (use_pa or use_wrk):
        raise SystemExit("no load generator: apt-get install -y wrk, and/or the test extras for perf_analyzer")
    model = models.write(common.BENCH_DIR / "models")["mlp"]
    notes = common.machine_notes()
    print(f"machine: {notes}  server cpus={server_cpus} load generator cpus={client_cpus}", flush=True)

    results: list[Result] = in_process(model, args.seconds, concurrencies, server_cpus)
    for r in results:
        print(r.line(), flush=True)
    inputs = models.mlp_input(1)
    bin_body, hlen = common.v2_binary_body(inputs, [models.MLP_OUTPUT])
    json_body = common.v2_json_body(inputs)
    binary_headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(hlen)}
    bodies = {"binary": (bin_body, binary_headers), "json": (json_body, {"Content-Type": "application/json"})}
    with common.slimserve(cpus=server_cpus, intra_op_threads=1) as url:
        common.upload(url, "mlp", model, common.MODEL_CONFIG)
        infer = f"{url}/v2/models/mlp/infer"
        for c in concurrencies:
            todo = []
            if use_wrk:
                todo += [("wrk", mode) for mode in bodies]
            if use_pa:
                todo += [("perf_analyzer", mode) for mode in bodies]
            for tool, mode in todo:
                if tool == "wrk":
                    body, headers = bodies[mode]
                    r = common.wrk(
                        infer,
                        body,
                        headers,
                        concurrency=c,
                        seconds=args.seconds,
                        cpus=client_cpus,
                        target="slimserve",
                        mode=mode,
                    )
                else:
                    r = common.perf_analyzer(url, "mlp", concurrency=c, json_mode=mode == "json", cpus=client_cpus)
                results.append(r)
                print(r.line(), flush=True)

    verdict = evaluate(results)
    print()
    print(common.table([r.row() for r in results]))
    print()
    for line in verdict["lines"]:
        print(line)
    path = common.save(
        "overhead",
        {
            "machine": notes,
            "server_cpus": server_cpus,
            "client_cpus": client_cpus,
            "seconds": args.seconds,
            "results": results,
            "verdict": verdict,
        },
    )
    print(f"\nraw results: {path.relative_to(common.REPO)}")


def evaluate(results: list[Result]) -> dict[str, object]:
    def find(target: str, tool: str, mode: str, c: int) -> Result | None:
        return next(
            (r for r in results if (r.target, r.tool, r.mode, r.concurrency) == (target, tool, mode, c)),
            None,
        )

    lines = []
    base = {c: find("in-process", "in-process", "-", c) for c in (1, 8)}
    added: dict[str, float] = {}
    for r in results:
        b = base.get(r.concurrency)
        if r.target == "in-process" or b is None:
            continue
        key = f"{r.tool}/{r.mode}/c{r.concurrency}"
        added[key] = r.p50_ms - b.p50_ms
        lines.append(
            f"{key}: p50 {r.p50_ms:.3f} ms = in-process {b.p50_ms:.3f} ms + {added[key]:.3f} ms; "
            f"throughput {r.throughput:,.0f} req/s = {r.throughput / b.throughput:.2f}x in-process"
        )
    primary = added.get("wrk/binary/c1", added.get("perf_analyzer/binary/c1"))
    met = primary is not None and primary <= BAR_MS
    lines.append(
        f"BAR (server adds <= {BAR_MS} ms to the in-process p50 at concurrency 1, wrk binary): "
        + ("n/a" if primary is None else f"{primary:.3f} ms -> {'MET' if met else 'NOT MET'}")
    )
    return {"added_p50_ms": added, "bar_ms": BAR_MS, "primary_added_ms": primary, "met": met, "lines": lines}


if __name__ == "__main__":
    common.run_main(main)
