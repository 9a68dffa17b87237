"""What the gRPC wire codec costs per call (service/grpc/codec.py), in process: parsing the ModelInferRequest,
``decode_request`` and ``encode_response`` plus serialisation, for bench/models.py's MLP at batch 1 (raw contents).
docs/benchmarks/grpc-h2load.md sets these against the server's whole CPU per call.

    taskset -c 1 .venv/bin/python bench/grpc_codec.py
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path

import grpc_load
import models
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from backends import TensorSpec
from service.grpc._generated import grpc_service_pb2 as pb
from service.grpc.codec import decode_request, encode_response
from service.tensors import TensorLimits


def main() -> None:
    x = models.mlp_input(1)[models.MLP_INPUT]
    data = grpc_load.request("mlp", {models.MLP_INPUT: x})
    req = pb.ModelInferRequest.FromString(data)
    spec = {models.MLP_INPUT: TensorSpec(models.MLP_INPUT, "FP32", (-1, x.shape[1]))}
    outputs = frozenset({models.MLP_OUTPUT})
    limits = TensorLimits()
    result = {models.MLP_OUTPUT: np.zeros((1, 10), np.float32)}
    steps = {
        "parse the request": lambda: pb.ModelInferRequest.FromString(data),
        "decode_request": lambda: decode_request(req, spec, outputs, 64, limits),
        "encode_response + serialise": lambda: encode_response(
            "mlp", 1, None, result, [models.MLP_OUTPUT]
        ).SerializeToString(),
    }
    n = 20000
    for label, fn in steps.items():
        best = min(timeit.repeat(fn, number=n, repeat=5)) / n
        print(f"{label}: {best * 1e6:.1f} us")


if __name__ == "__main__":
    main()
