"""Shadow traffic's cost to the primary: the same server and load with and without 100 % shadowing.

Model: the bench MLP 64 -> 256 -> 256 -> 10 (bench/models.py), batch 1, JSON body, ONNX Runtime with 1
intra-op thread. The candidate is the same architecture with other weights (seed 1), added as the variant
``shadow`` of version 1. One slimserve on core 0 (``taskset``), wrk on core 1, concurrency 8 (issue 14's bar).

Points alternate on the one server, in ABBA order over ``--rounds``: A has no traffic policy, B has
``{"split": {"original": 1.0}, "shadow": {"shadow": 1.0}}`` (every request mirrored). The summary is the
median over rounds of B/A for throughput and p99 (wrk's). Also reported per point: the server's CPU time per
request (from /proc: on a shared machine the one ratio that other load does not move much), and per B point
how many requests were compared, failed, and dropped (a full shadow queue drops samples: that is how the
mirror bounds its cost).
Bars: throughput B/A >= 0.90, p99 B/A <= 1.20.

    flock /tmp/slimserve-bench.lock .venv/bin/python bench/shadow.py            # ~1.5 min
    flock /tmp/slimserve-bench.lock .venv/bin/python bench/shadow.py --seconds 5 --rounds 2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path

import common
import httpx
import models
from common import Result

from model_store import Catalog, LocalBlobStore, NewVariant

POLICY = {"split": {"original": 1.0}, "shadow": {"shadow": 1.0}}
BAR_THROUGHPUT = 0.90
BAR_P99 = 1.20


@contextlib.contextmanager
def server(data: Path, cpus: str | None) -> Iterator[tuple[str, int]]:
    port = common.free_port()
    env = dict(os.environ)
    env.update({"SLIMSERVE_LOG_LEVEL": "warning", "SLIMSERVE_SYNC_INTERVAL_S": "1", "SLIMSERVE_INTRA_OP_THREADS": "1"})
    for k in ("SLIMSERVE_ADMIN_TOKEN", "SLIMSERVE_INFERENCE_TOKEN", "SLIMSERVE_DATABASE_URL", "SLIMSERVE_BLOB_DIR"):
        env.pop(k, None)
    argv = [*common.pin(cpus), str(common.VENV_BIN / "slimserve"), "serve", "--host", common.HOST]
    argv += ["--port", str(port), "--data-dir", str(data)]
    url = f"http://{common.HOST}:{port}"
    with common.process(argv, env=env, cwd=common.REPO, ready_url=f"{url}/v2/health/ready", log_name="shadow") as p:
        yield url, p.pid  # taskset execs the server: the same pid


def shadow_counts(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = {"compared": 0.0, "error": 0.0, "dropped": 0.0}
    for line in text.splitlines():
        m = re.match(r'slimserve_shadow_requests_total\{.*outcome="(\w+)".*\} (\S+)', line)
        if m:
            out[m.group(1)] += float(m.group(2))
        elif line.startswith("slimserve_shadow_dropped_total{"):
            out["dropped"] += float(line.rsplit(" ", 1)[1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--no-pin", action="store_true")
    args = ap.parse_args()
    server_cpus, load_cpus = (None, None) if args.no_pin else ("0", "1")
    common.BENCH_DIR.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="shadow-", dir=common.BENCH_DIR) as tmp:
        data = Path(tmp)
        primary = data / "mlp.onnx"
        primary.write_bytes(models.mlp(seed=0))
        candidate = models.mlp(seed=1)
        with server(data / "store", server_cpus) as (url, pid):
            common.upload(url, "mlp", primary, common.MODEL_CONFIG)
            blobs, catalog = (
                LocalBlobStore(data / "store" / "blobs"),
                Catalog(f"sqlite:///{data / 'store' / 'catalog.db'}"),
            )
            catalog.add_variant("mlp", 1, NewVariant("shadow", "pruned", blobs.put_bytes(candidate), len(candidate)))
            catalog.close()
            with httpx.Client(base_url=url, timeout=30) as c:
                for _ in range(200):
                    if c.get("/v2/models/mlp:shadow/ready").status_code == 200:
                        break
                    common.time.sleep(0.1)
                body = common.v2_json_body(models.mlp_input(1))
                headers = {"Content-Type": "application/json"}
                results: list[tuple[str, Result, dict[str, float]]] = []
                order = [("A", "B") if r % 2 == 0 else ("B", "A") for r in range(args.rounds)]
                for r, pair in enumerate(order):
                    for point in pair:
                        if point == "B":
                            assert c.put("/v1/models/mlp/versions/1/traffic", json=POLICY).status_code == 200
                        else:
                            c.delete("/v1/models/mlp/versions/1/traffic")
                        # warm up here, not in the measured call, so the counters' delta covers the measured requests
                        common.wrk(
                            f"{url}/v2/models/mlp/infer",
                            body,
                            headers,
                            concurrency=args.concurrency,
                            seconds=2,
                            warmup=0,
                            cpus=load_cpus,
                        )
                        before, cpu0 = shadow_counts(url), common.proc_cpu(pid)[1]
                        res = common.wrk(
                            f"{url}/v2/models/mlp/infer",
                            body,
                            headers,
                            concurrency=args.concurrency,
                            seconds=args.seconds,
                            warmup=0,
                            cpus=load_cpus,
                            target="no shadow" if point == "A" else "shadow 100%",
                            mode="json",
                        )
                        after, cpu1 = shadow_counts(url), common.proc_cpu(pid)[1]
                        delta = {k: after[k] - before[k] for k in after}
                        delta["cpu_us_per_request"] = (cpu1 - cpu0) / max(res.requests, 1) * 1e6
                        results.append((point, res, delta))
                        print(f"round {r + 1} {point}: {res.line()}  shadow {delta}", flush=True)
    a = [res for p, res, _ in results if p == "A"]
    b = [(res, d) for p, res, d in results if p == "B"]
    tput = statistics.median(rb.throughput / ra.throughput for (rb, _), ra in zip(b, a, strict=True))
    p99 = statistics.median(rb.p99_ms / ra.p99_ms for (rb, _), ra in zip(b, a, strict=True))
    mirrored = statistics.median(d["compared"] / max(rb.requests, 1) for rb, d in b)
    a_cpu = [d["cpu_us_per_request"] for p, _, d in results if p == "A"]
    cpu = statistics.median(d["cpu_us_per_request"] / ca for (_, d), ca in zip(b, a_cpu, strict=True))
    rows = [
        [*res.row(), f"{d['cpu_us_per_request']:.0f}", f"{d.get('compared', 0):.0f}", f"{d.get('dropped', 0):.0f}"]
        for _, res, d in results
    ]
    print()
    print(common.table(rows, [*common.HEADER, "server CPU us/req", "compared", "dropped"]))
    print()
    verdict_t = "MET" if tput >= BAR_THROUGHPUT else "NOT MET"
    verdict_p = "MET" if p99 <= BAR_P99 else "NOT MET"
    print(f"throughput B/A (median of {args.rounds}): {tput:.3f} (bar >= {BAR_THROUGHPUT}): {verdict_t}")
    print(f"p99 B/A (median of {args.rounds}): {p99:.3f} (bar <= {BAR_P99}): {verdict_p}")
    print(f"server CPU per request B/A (median of {args.rounds}; the load-independent cost): {cpu:.3f}")
    print(f"share of B's requests compared (the rest dropped or in flight): {mirrored:.3f}")
    path = common.save(
        "shadow",
        {
            "machine": common.machine_notes(),
            "args": vars(args),
            "points": [{"point": p, "result": res, "shadow": d} for p, res, d in results],
            "throughput_ratio": tput,
            "p99_ratio": p99,
            "compared_share": mirrored,
            "cpu_per_request_ratio": cpu,
        },
    )
    print(f"raw numbers: {path}")


if __name__ == "__main__":
    common.run_main(main)
