"""The tail at high concurrency (issue 13): p50/p90/p99 at concurrency 32 on the digits CNN, batch 1.

The server is pinned to core 0 and the load generator to core 1: REST with wrk (JSON body), gRPC with
perf_analyzer -i grpc (the C++ client; wrk speaks no HTTP/2). Bar: p99 <= 3x p50 for both, with no loss of
throughput against the run before the fix (docs/benchmarks/tail.md has both).

    flock /tmp/slimserve-bench.lock .venv/bin/python bench/tail.py [--seconds 10] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import common
import numpy as np

sys.path.insert(0, str(common.REPO))
from tests.compression import digits as D

#: the request every tail measurement sends: one 8x8 digit
DIGIT = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)


@contextlib.contextmanager
def digits_server(log_name: str) -> Iterator[tuple[str, Path]]:
    """slimserve on core 0 (one intra-op thread) serving the digits CNN as "digits"; yields its URL and the model."""
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "digits.onnx"
        model.write_bytes(D.digits_model())
        with common.slimserve(cpus="0", intra_op_threads=1, log_name=log_name) as url:
            common.upload(url, "digits", model, common.MODEL_CONFIG)
            yield url, model


def report(r: common.Result) -> None:
    print(r.line(), f"p90 {r.extra['p90_ms']:.3f} ms, p99/p50 {r.p99_ms / r.p50_ms:.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--no-grpc", action="store_true")
    args = ap.parse_args()
    results = []
    with digits_server("tail") as (url, _):
        r = common.wrk(
            f"{url}/v2/models/digits/infer",
            common.v2_json_body({"input": DIGIT}),
            {"Content-Type": "application/json"},
            concurrency=args.concurrency,
            seconds=args.seconds,
            cpus="1",
            target="slimserve REST",
            mode="json",
        )
        results.append(r)
        report(r)
        if not args.no_grpc:
            r = common.perf_analyzer(
                common.grpc_address(url),
                "digits",
                concurrency=args.concurrency,
                interval_ms=int(args.seconds * 1000 / 3),
                cpus="1",
                target="slimserve gRPC",
                protocol="grpc",
            )
            results.append(r)
            report(r)
    print(common.table([r.row() for r in results]))
    common.save("tail", {"results": results, "machine": common.machine_notes(), "git": common.git_state()})


if __name__ == "__main__":
    common.run_main(main)
