"""The floor of a Python gRPC server: grpc.aio on uvloop (as slimserve and MLServer run) answering every
``ModelInfer`` with the same pre-serialized response. No request decoding, no model, no metrics: what grpc.aio
itself costs per call on one core, so bench/grpc_h2load.py can say how far above it any Python server can go.

The response is the real answer for bench/models.py's MLP on ``models.mlp_input(1)`` (computed once with ONNX
Runtime at start), so the tritonclient check before each run passes only if the bytes are right.

    taskset -c 0 .venv/bin/python bench/grpc_floor.py --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import grpc
import models
import numpy as np
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from service.grpc._generated import grpc_service_pb2 as pb


def response_bytes(model: Path) -> bytes:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model), sess_options=so, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, models.mlp_input(1))
    resp = pb.ModelInferResponse(model_name="mlp", model_version="1")
    resp.outputs.add(name=models.MLP_OUTPUT, datatype="FP32", shape=out.shape)
    resp.raw_output_contents.append(np.ascontiguousarray(out, "<f4").tobytes())
    return resp.SerializeToString()


async def serve(port: int, answer: bytes) -> None:
    async def model_infer(request: bytes, context: Any) -> bytes:
        return answer

    handler = grpc.unary_unary_rpc_method_handler(model_infer)  # bytes in, bytes out: no (de)serialization
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {"ModelInfer": handler}),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"floor server on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model", type=Path, required=True)
    args = ap.parse_args()
    answer = response_bytes(args.model)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.port, answer))


if __name__ == "__main__":
    main()
