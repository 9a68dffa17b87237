"""An ONNX model on KServe's Python ModelServer (``kserve`` package), for bench/peers.py.

Run in its own virtualenv (.bench/kserve-venv: ``pip install kserve onnxruntime``)::

    python bench/peer_servers/kserve_onnx.py --http_port 8080 --model_name mlp --model_path mlp.onnx --threads 1

KServe's ``kserve.model_server`` parses its own flags (``--http_port``, ``--enable_grpc``, ...) from
``sys.argv`` when it is imported, so this script's flags are parsed with ``parse_known_args`` alongside.
The model is the custom-model API that KServe documents: a ``kserve.Model`` subclass whose ``predict``
takes and returns the v2 types (InferRequest, InferResponse). The response carries an id: without one
KServe's v2 endpoint answers 500.
"""

from __future__ import annotations

import argparse
import copy
import uuid

import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve import logging as kserve_logging
from kserve.utils.numpy_codec import from_np_dtype

parser = argparse.ArgumentParser()
parser.add_argument("--model_name", default="model")
parser.add_argument("--model_path", required=True)
parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
parser.add_argument(
    "--request_logs", action="store_true", help="keep KServe's per-request access and trace log lines (default: off)"
)
args, _ = parser.parse_known_args()


class OnnxModel(Model):
    def __init__(self, name: str, path: str, threads: int) -> None:
        super().__init__(name)
        self.path = path
        self.threads = threads
        self.session: ort.InferenceSession | None = None
        self.output_names: list[str] = []

    def load(self) -> bool:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self.session = ort.InferenceSession(self.path, sess_options=so, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:  # type: ignore[override]
        assert self.session is not None
        feeds = {inp.name: inp.as_numpy() for inp in payload.inputs}
        results = self.session.run(self.output_names, feeds)
        outputs = [
            InferOutput(name=n, shape=list(r.shape), datatype=from_np_dtype(r.dtype), data=r)
            for n, r in zip(self.output_names, results, strict=True)
        ]
        return InferResponse(response_id=payload.id or str(uuid.uuid4()), model_name=self.name, infer_outputs=outputs)


def _configure_logging() -> None:
    """KServe's own logging config, less the per-request lines (slimserve and MLServer log none either)."""
    config = copy.deepcopy(kserve_logging.KSERVE_LOG_CONFIG)
    if not args.request_logs:
        config["loggers"]["uvicorn.access"]["level"] = "WARNING"
        config["loggers"]["kserve.trace"]["level"] = "WARNING"
    kserve_logging.configure_logging(config)


if __name__ == "__main__":
    _configure_logging()
    model = OnnxModel(args.model_name, args.model_path, args.threads)
    model.load()
    ModelServer().start([model])
