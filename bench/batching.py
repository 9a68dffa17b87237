"""Dynamic batching on a BERT-style encoder (CPU): slimserve with batching vs without, at concurrency 32.

Model: bench/models.py ``encoder()``: 4 layers, hidden 256, 4 heads, FFN 1024, sequence 64, random weights,
inputs input_ids / attention_mask INT64 [N,64], output pooled FP32 [N,256]. Load: wrk, 32 connections,
each POSTing one sequence (binary tensors) back to back. Each configuration gets a fresh server.

Bar: the batching configuration reaches >= 2x the requests/s of the same server without batching, and
its p99 is <= 3x its own p50.

    .venv/bin/python bench/batching.py                  # the compared pair, 3 interleaved rounds (~2.5 min)
    .venv/bin/python bench/batching.py --rounds 1 --sweep   # the pair and every configuration in SWEEP (~4.5 min)
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import common
import models
from common import Result

CONCURRENCY = 32


def _config(instances: int, threads: int, batching: bool, **kw: Any) -> dict[str, Any]:
    """An upload config: ``instances`` x ``threads`` intra-op threads, batching on or off."""
    b: dict[str, Any] = {"enabled": batching}
    if batching:
        b["max_queue_delay_us"] = kw.pop("delay_us", 0)
        if "preferred" in kw:
            b["preferred_batch_sizes"] = kw.pop("preferred")
    return {
        "max_batch_size": kw.pop("max_batch_size", 32),
        "instances": instances,
        "intra_op_threads": threads,
        "batching": b,
    }


#: name -> upload config. These two are the pair the bar compares. Both use slimserve's defaults on this 2-core
#: machine (one instance, intra-op threads = cores / instances = 2, max_batch_size 32). "batching" adds the
#: batching settings that did best in the sweep: wait up to 5 ms for a preferred batch of 16 or 32.
CONFIGS: dict[str, dict[str, Any]] = {
    "no-batching": _config(1, 2, False),
    "batching": _config(1, 2, True, delay_us=5000, preferred=[16, 32]),
}

#: the other configurations tried (--sweep)
SWEEP: dict[str, dict[str, Any]] = {
    "batching-nodelay": _config(1, 2, True),  # take what queued while the instance was busy, never wait
    "batching-delay2ms": _config(1, 2, True, delay_us=2000),
    "batching-max8": _config(1, 2, True, max_batch_size=8),
    "no-batching-1x1": _config(1, 1, False),
    "batching-1x1": _config(1, 1, True),
    "no-batching-2x1": _config(2, 1, False),
    "batching-2x1": _config(2, 1, True),
}


def ceiling(threads: int, repeats: int = 3, seconds: float = 1.0) -> dict[str, float]:
    """In-process ONNX Runtime rows/s at batch 1 and 32 (best of ``repeats`` interleaved runs, which is robust to
    background load): what batching can gain in the compute itself."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    path = models.write(common.BENCH_DIR / "models")["encoder"]
    session = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    best = {1: float("inf"), 32: float("inf")}
    for _ in range(repeats):
        for batch in best:
            best[batch] = min(best[batch], models.time_run(session, models.encoder_input(batch), seconds))
    out = {}
    for batch, per_run in best.items():
        out[f"batch{batch}_rows_per_s"] = batch / per_run
        out[f"batch{batch}_ms"] = per_run * 1e3
    out["ratio"] = out["batch32_rows_per_s"] / out["batch1_rows_per_s"]
    return out


def measure(name: str, config: dict[str, Any], seconds: float, server_cpus: str | None, client_cpus: str | None):
    model = models.write(common.BENCH_DIR / "models")["encoder"]
    body, hlen = common.v2_binary_body(models.encoder_input(1), [models.ENCODER_OUTPUT])
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(hlen)}
    with common.slimserve(cpus=server_cpus, log_name=f"slimserve-{name}") as url:
        common.upload(url, "encoder", model, config)
        r = common.wrk(
            f"{url}/v2/models/encoder/infer",
            body,
            headers,
            concurrency=CONCURRENCY,
            seconds=seconds,
            warmup=3,
            cpus=client_cpus,
            target=name,
            mode="binary",
        )
        r.extra["batches"] = batch_histogram(url)
    return r


def batch_histogram(url: str) -> dict[str, Any]:
    """Executions and mean batch size from the statistics extension (whole run, warm-up included)."""
    import httpx

    st = httpx.get(f"{url}/v2/models/encoder/stats", timeout=10).json()["model_stats"][0]
    execs, rows = st["execution_count"], st["inference_count"]
    return {"executions": execs, "rows": rows, "mean_batch": round(rows / execs, 2) if execs else 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=15, help="measurement per point (default 15)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the compared pair (default 3)")
    ap.add_argument("--sweep", action="store_true", help="also measure every configuration in SWEEP (one round)")
    ap.add_argument("--only", help="comma-separated configuration names to measure (one round each)")
    ap.add_argument("--pin", action="store_true", help="server on core 0, wrk on core 1 (default: no pinning)")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the in-process batch-1 vs batch-32 measurement")
    args = ap.parse_args()
    common.need_wrk()
    server_cpus, client_cpus = ("0", "1") if args.pin else (None, None)
    notes = common.machine_notes()
    print(f"machine: {notes}  server cpus={server_cpus} wrk cpus={client_cpus}", flush=True)
    every = {**CONFIGS, **SWEEP}
    plan: list[str]
    if args.only:
        plan = args.only.split(",")
        unknown = [n for n in plan if n not in every]
        if unknown:
            raise SystemExit(f"unknown configurations {unknown}; known: {sorted(every)}")
    else:
        plan = [n for _ in range(args.rounds) for n in CONFIGS]
        if args.sweep:
            plan += list(SWEEP)
    limit = None
    if not args.no_ceiling:
        limit = ceiling(CONFIGS["batching"]["intra_op_threads"])
        print(
            f"in-process ONNX Runtime, {CONFIGS['batching']['intra_op_threads']} thread(s): "
            f"batch 1 {limit['batch1_rows_per_s']:.0f} rows/s ({limit['batch1_ms']:.2f} ms), "
            f"batch 32 {limit['batch32_rows_per_s']:.0f} rows/s: {limit['ratio']:.2f}x from batching the compute alone",
            flush=True,
        )
    results: list[Result] = []
    for name in plan:
        r = measure(name, every[name], args.seconds, server_cpus, client_cpus)
        results.append(r)
        print(f"{r.line()}, mean batch {r.extra['batches']['mean_batch']}", flush=True)
    summary = evaluate(results)
    print()
    rows = [[*r.row(), str(r.extra["batches"]["mean_batch"])] for r in results]
    print(common.table(rows, [*common.HEADER, "mean batch"]))
    print()
    for line in summary["lines"]:
        print(line)
    path = common.save(
        "batching",
        {
            "machine": notes,
            "server_cpus": server_cpus,
            "client_cpus": client_cpus,
            "model": models.ENCODER,
            "concurrency": CONCURRENCY,
            "seconds": args.seconds,
            "configs": {n: every[n] for n in dict.fromkeys(plan)},
            "in_process_ceiling": limit,
            "results": results,
            "summary": summary,
        },
    )
    print(f"\nraw results: {path.relative_to(common.REPO)}")


def evaluate(results: list[Result]) -> dict[str, Any]:
    by: dict[str, list[Result]] = {}
    for r in results:
        by.setdefault(r.target, []).append(r)
    lines = []
    med: dict[str, dict[str, float]] = {}
    for name, rs in by.items():
        tp = [r.throughput for r in rs]
        med[name] = {
            "throughput": statistics.median(tp),
            "p50_ms": statistics.median(r.p50_ms for r in rs),
            "p99_ms": statistics.median(r.p99_ms for r in rs),
            "runs": len(rs),
            "throughput_min": min(tp),
            "throughput_max": max(tp),
        }
        m = med[name]
        lines.append(
            f"{name}: median of {len(rs)}: {m['throughput']:,.0f} req/s (range {min(tp):,.0f}-{max(tp):,.0f}), "
            f"p50 {m['p50_ms']:.2f} ms, p99 {m['p99_ms']:.2f} ms"
        )
    out: dict[str, Any] = {"medians": med, "lines": lines}
    if "batching" in med and "no-batching" in med:
        b, n = med["batching"], med["no-batching"]
        ratio = b["throughput"] / n["throughput"]
        tail = b["p99_ms"] / b["p50_ms"]
        met_tp, met_tail = ratio >= 2.0, tail <= 3.0
        out.update({"throughput_ratio": ratio, "p99_over_p50": tail, "met": met_tp and met_tail})
        lines.append(f"BAR throughput with/without batching >= 2x: {ratio:.2f}x -> {'MET' if met_tp else 'NOT MET'}")
        lines.append(f"BAR batching p99 <= 3x p50: {tail:.2f}x -> {'MET' if met_tail else 'NOT MET'}")
    return out


if __name__ == "__main__":
    common.run_main(main)
