"""ONNX Runtime on the CPU: a variant as uploaded, or its prebuilt engine (an offline-optimized graph)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np

from backends.base import Backend, BackendError, BackendOptions, BackendUnavailable, InvalidInput, WarmupTimeout
from backends.onnx_model import compute_bounded_by_shapes, model_interface, parse_model

try:
    import onnxruntime as ort
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as _OrtInvalidArgument
except ImportError:  # pragma: no cover - the install always carries one ONNX Runtime flavour
    ort = None  # type: ignore[assignment]
    _OrtInvalidArgument = Exception  # type: ignore[assignment,misc]


class OnnxRuntimeBackend(Backend):
    """A model on ONNX Runtime with one execution provider, chosen explicitly."""

    PROVIDERS = {"onnxruntime-cpu": "CPUExecutionProvider"}

    def __init__(
        self,
        model: bytes | Path,
        options: BackendOptions | None = None,
        kind: str = "onnxruntime-cpu",
    ) -> None:
        if ort is None:
            raise BackendUnavailable("onnxruntime is not installed (pip install 'slimserve[cpu]')")
        if kind not in self.PROVIDERS:
            raise BackendUnavailable(f"unknown ONNX Runtime backend {kind!r}")
        provider = self.PROVIDERS[kind]
        if provider not in ort.get_available_providers():
            raise BackendUnavailable(f"{provider} is not available in this onnxruntime build")
        opts = options or BackendOptions()
        data = model.read_bytes() if isinstance(model, Path) else model
        # Untrusted bytes were validated in full (inspect_model) where they entered the store; a backend
        # only needs the interface, and may be built many times (instances, replicas, restarts).
        proto = parse_model(data)
        inputs, outputs = model_interface(proto)
        self.inline_safe = compute_bounded_by_shapes(proto)
        del proto
        self.engine: dict[str, Any] | None = None
        source: bytes | str = data
        so = session_options(opts)
        engine_dir = opts.extra.get("engine_dir")
        if engine_dir is not None:
            # The variant's prebuilt engine (compression.engine_build): its graph was optimized at ORT_ENABLE_ALL
            # for this target when it was built, so loading it skips the optimizer (the load time it saves).
            manifest = json.loads((Path(engine_dir) / "manifest.json").read_text())
            source = str(Path(engine_dir) / manifest["load"])
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            self.engine = {"digest": manifest.get("digest"), "format": manifest.get("format")}
        try:
            self._session = ort.InferenceSession(source, sess_options=so, providers=[provider])
        except Exception as e:
            what = "its prebuilt engine" if engine_dir is not None else "the model"
            raise BackendError(f"ONNX Runtime could not load {what}: {_first_line(e)}") from None
        self.name = kind
        self.inputs = inputs
        self.outputs = outputs
        self._output_names = [o.name for o in self.outputs]
        self._run_options = ort.RunOptions()
        self._warmup_timeout_s = float(opts.extra.get("warmup_timeout_s", 60.0))

    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        names = outputs or self._output_names
        try:
            results = self._session.run(names, inputs, self._run_options)
        except _OrtInvalidArgument as e:
            raise InvalidInput(_first_line(e)) from None
        except Exception as e:
            raise BackendError(f"inference failed: {_first_line(e)}") from None
        return dict(zip(names, results, strict=True))

    def warmup(self, feeds: dict[str, np.ndarray] | None = None) -> None:
        """Warm up under a time bound: a model that computes for too long (an endless Loop, an absurd graph)
        raises WarmupTimeout instead of holding a core forever. Other failures keep their kind: InvalidInput
        for inputs the model refuses (made-up warm-up values often are), BackendError for the rest."""
        run_options = ort.RunOptions()
        timer = threading.Timer(self._warmup_timeout_s, lambda: setattr(run_options, "terminate", True))
        timer.daemon = True
        timer.start()
        try:
            self._session.run(None, feeds if feeds is not None else self.zero_feeds(), run_options)
        except _OrtInvalidArgument as e:
            if run_options.terminate:
                raise WarmupTimeout(f"warm-up did not finish within {self._warmup_timeout_s:g} s") from None
            raise InvalidInput(f"warm-up failed: {_first_line(e)}") from None
        except Exception as e:
            if run_options.terminate:
                raise WarmupTimeout(f"warm-up did not finish within {self._warmup_timeout_s:g} s") from None
            raise BackendError(f"warm-up failed: {_first_line(e)}") from None
        finally:
            timer.cancel()

    def describe(self) -> dict[str, Any]:
        d = {"backend": self.name, "providers": self._session.get_providers(), "onnxruntime": ort.__version__}
        if self.engine is not None:
            d["engine"] = self.engine
        return d


def session_options(opts: BackendOptions) -> Any:
    """ONNX Runtime session options shared by every ONNX Runtime backend (CPU and GPU)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if opts.intra_op_threads:
        so.intra_op_num_threads = opts.intra_op_threads
    so.inter_op_num_threads = max(1, opts.inter_op_threads)
    if opts.allow_spinning is not None:
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if opts.allow_spinning else "0")
    so.log_severity_level = 3
    return so


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:500]
