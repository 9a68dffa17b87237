"""gRPC against MLServer, and what the gRPC path adds over in-process ONNX Runtime (issue 13's bars).

Model: the MLP 64 -> 256 -> 256 -> 10 (bench/models.py), batch 1, ONNX Runtime with 1 intra-op thread. Servers on
core 0, load generators on core 1 (``taskset``).

- c=8, slimserve gRPC vs MLServer gRPC: bench/grpc_load.py (the same grpc.aio closed-loop client for both; raw
  tensor contents), ``--rounds`` interleaved rounds. Bar: slimserve >= 1.5x MLServer's throughput (median of the
  rounds) with a lower p99.
- c=1, slimserve REST vs gRPC, both by perf_analyzer (-i http with binary tensors, -i grpc: the same C++ client
  either way), against in-process ``InferenceSession.run`` (bench/overhead.py's worker). Bar: gRPC's p50 minus
  the in-process p50 is no more than REST's.

    flock /tmp/slimserve-bench.lock .venv/bin/python bench/grpc_peers.py [--seconds 6] [--rounds 3]

The Python client limits the c=8 comparison (it spends about as much CPU per call as the servers):
bench/grpc_h2load.py retakes these bars with h2load, a C client (docs/benchmarks/grpc-h2load.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
from pathlib import Path

import common
import models
import overhead
import peers
from common import Result

HERE = Path(__file__).resolve().parent


def grpc_load(target: str, concurrency: int, seconds: float, name: str, cpus: str | None) -> Result:
    argv = [*common.pin(cpus), sys.executable, str(HERE / "grpc_load.py"), target, "mlp", "--shape", "1,64"]
    argv += ["--concurrency", str(concurrency), "--seconds", str(seconds)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120)
    line = next((x for x in out.stdout.splitlines() if x.startswith("GRPCLOAD ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"grpc_load failed ({out.returncode}): {out.stdout[-500:]} {out.stderr[-1500:]}")
    d = json.loads(line.removeprefix("GRPCLOAD "))
    return Result(
        name,
        "grpc_load",
        "raw",
        concurrency,
        d["throughput"],
        d["p50_ms"],
        d["p99_ms"],
        d["requests"],
        d["errors"],
        {"p90_ms": d["p90_ms"]},
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    server_cpus, client_cpus = "0", "1"
    model = models.write(common.BENCH_DIR / "models")["mlp"]
    results: list[Result] = []
    with contextlib.ExitStack() as stack:
        slim_url = stack.enter_context(peers.slimserve_server(model, server_cpus))
        slim = common.grpc_address(slim_url)
        mls = stack.enter_context(peers.mlserver_server(model, server_cpus)).grpc
        targets = {"slimserve": slim, "mlserver": mls}
        for rnd in range(args.rounds):
            for name in common.rotated(list(targets), rnd):
                r = grpc_load(targets[name], 8, args.seconds, name, client_cpus)
                r.extra["round"] = rnd
                results.append(r)
                print(f"round {rnd}: {r.line()}", flush=True)
        c1 = [
            common.perf_analyzer(slim_url, "mlp", concurrency=1, cpus=client_cpus, target="slimserve REST"),
            common.perf_analyzer(
                slim, "mlp", concurrency=1, cpus=client_cpus, target="slimserve gRPC", protocol="grpc"
            ),
        ]
        for r in c1:
            print(r.line(), flush=True)
        # the C++ client at c=8 on slimserve: is grpc_load or the server the limit of the rounds above?
        ref = common.perf_analyzer(
            slim, "mlp", concurrency=8, cpus=client_cpus, target="slimserve gRPC (perf_analyzer)", protocol="grpc"
        )
        print(ref.line(), flush=True)
    (inproc,) = overhead.in_process(model, args.seconds, [1], server_cpus)
    print(inproc.line())

    lines = []
    med = {n: statistics.median(r.throughput for r in results if r.target == n) for n in ("slimserve", "mlserver")}
    p99 = {n: statistics.median(r.p99_ms for r in results if r.target == n) for n in ("slimserve", "mlserver")}
    ratio = med["slimserve"] / med["mlserver"]
    ok = ratio >= peers.BAR_RATIO and p99["slimserve"] < p99["mlserver"]
    lines.append(
        f"c=8 gRPC: slimserve {med['slimserve']:,.0f} req/s p99 {p99['slimserve']:.2f} ms, MLServer "
        f"{med['mlserver']:,.0f} req/s p99 {p99['mlserver']:.2f} ms: {ratio:.2f}x -> {'PASS' if ok else 'FAIL'}"
    )
    rest_add, grpc_add = (r.p50_ms - inproc.p50_ms for r in c1)
    lines.append(
        f"c=1 added over in-process p50 {inproc.p50_ms:.3f} ms: REST {rest_add:.3f} ms, gRPC {grpc_add:.3f} ms -> "
        f"{'PASS' if grpc_add <= rest_add else 'FAIL'}"
    )
    print(common.table([r.row() for r in [*results, *c1, ref, inproc]]))
    for line in lines:
        print(line)
    everything = [*results, *c1, ref, inproc]
    common.save("grpc_peers", {"results": everything, "summary": lines, "machine": common.machine_notes()})


if __name__ == "__main__":
    common.run_main(main)
