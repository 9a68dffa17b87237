"""A closed-loop gRPC load generator: ``--concurrency`` grpc.aio callers on one channel each sending the same
``ModelInferRequest`` (raw_input_contents) back to back; prints one JSON line with throughput and latency
percentiles. Written here because perf_analyzer -i grpc needs Triton's ModelConfig RPC, which MLServer lacks: the
same tool must drive both servers (bench/grpc_peers.py runs it pinned to its own core).

    .venv/bin/python bench/grpc_load.py 127.0.0.1:8001 mlp --concurrency 8 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from service.grpc._generated import grpc_service_pb2 as pb

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def request(model: str, inputs: dict[str, np.ndarray]) -> bytes:
    """A serialized ``ModelInferRequest`` carrying FP32 ``inputs`` as raw contents (what every bench client sends)."""
    req = pb.ModelInferRequest(model_name=model)
    for name, x in inputs.items():
        req.inputs.add(name=name, datatype="FP32", shape=x.shape)
        req.raw_input_contents.append(np.ascontiguousarray(x, "<f4").tobytes())
    return req.SerializeToString()


async def run(target: str, body: bytes, concurrency: int, seconds: float, warmup: float) -> dict[str, float]:
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(METHOD)  # bytes in, bytes out: no client-side protobuf work in the loop
        samples: list[int] = []
        errors = 0
        recording = False
        stop = False

        async def caller() -> None:
            nonlocal errors
            clock = time.perf_counter_ns
            while not stop:
                t0 = clock()
                try:
                    await call(body, timeout=10)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                if recording:
                    samples.append(clock() - t0)

        tasks = [asyncio.create_task(caller()) for _ in range(concurrency)]
        await asyncio.sleep(warmup)
        recording = True
        t_start = time.perf_counter()
        await asyncio.sleep(seconds)
        recording = False
        elapsed = time.perf_counter() - t_start
        stop = True
        await asyncio.gather(*tasks)
    lat = np.array(samples) / 1e6
    return {
        "requests": len(samples),
        "errors": errors,
        "throughput": len(samples) / elapsed,
        "p50_ms": float(np.percentile(lat, 50)),
        "p90_ms": float(np.percentile(lat, 90)),
        "p99_ms": float(np.percentile(lat, 99)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target")
    ap.add_argument("model")
    ap.add_argument("--input", default="x")
    ap.add_argument("--shape", default="1,64")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    args = ap.parse_args()
    shape = tuple(int(d) for d in args.shape.split(","))
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    body = request(args.model, {args.input: x})
    print("GRPCLOAD " + json.dumps(asyncio.run(run(args.target, body, args.concurrency, args.seconds, args.warmup))))


if __name__ == "__main__":
    main()
