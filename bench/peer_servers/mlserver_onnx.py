"""An ONNX model as a Seldon MLServer custom runtime, for bench/peers.py.

Run in its own virtualenv (.bench/mlserver-venv: ``pip install mlserver onnxruntime``) with this folder on
PYTHONPATH, from a model repository whose model-settings.json names ``mlserver_onnx.OnnxModel``::

    {"name": "mlp", "implementation": "mlserver_onnx.OnnxModel",
     "parameters": {"uri": "/abs/path/mlp.onnx", "extra": {"threads": 1}}}

and a settings.json with ``"parallel_workers": 0`` (inference in the server process: with the default
worker pool the worker process dies on this machine). ``bench/peers.py`` writes both files.
"""

from __future__ import annotations

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxModel(MLModel):
    async def load(self) -> bool:
        params = self.settings.parameters
        if params is None or not params.uri:
            raise ValueError("model-settings.json needs parameters.uri (the .onnx file)")
        extra = params.extra or {}
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = int(extra.get("threads", 1))
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self._session = ort.InferenceSession(params.uri, sess_options=so, providers=["CPUExecutionProvider"])
        self._output_names = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {inp.name: NumpyCodec.decode_input(inp) for inp in payload.inputs}
        results = self._session.run(self._output_names, feeds)
        outputs = [
            NumpyCodec.encode_output(name=n, payload=r) for n, r in zip(self._output_names, results, strict=True)
        ]
        return InferenceResponse(id=payload.id, model_name=self.name, outputs=outputs)
