"""Runtimes behind one small interface: numpy arrays in, numpy arrays out."""

from __future__ import annotations

from pathlib import Path

from backends.base import (
    Backend,
    BackendError,
    BackendOptions,
    BackendUnavailable,
    InvalidInput,
    TensorSpec,
    WarmupTimeout,
    is_batchable,
)

ORT_INSTALL_HINT = "pip install 'slimserve[cpu]' (or 'slimserve[gpu]' for the CUDA and TensorRT runtimes)"


def require_onnxruntime() -> str:
    """The installed ONNX Runtime's version; ``BackendUnavailable`` naming the install command when there is
    none. Every model is checked, warmed up and compressed with ONNX Runtime, so without it the server can only
    refuse work: better to refuse to start, and say what to install."""
    try:
        import onnxruntime
    except Exception as e:  # ImportError, or a broken wheel (a missing shared library raises OSError)
        raise BackendUnavailable(
            f"no ONNX Runtime is installed ({type(e).__name__}: {e}). slimserve needs one flavour: {ORT_INSTALL_HINT}"
        ) from None
    return str(onnxruntime.__version__)


def load_backend(kind: str, model: bytes | Path, options: BackendOptions | None = None) -> Backend:
    """Create a backend of the named kind for an ONNX model (bytes or a local file)."""
    if kind in ("onnxruntime-cuda", "onnxruntime-tensorrt"):
        from backends.onnxruntime_gpu import OnnxRuntimeGpuBackend

        return OnnxRuntimeGpuBackend(model, options, kind=kind)
    if kind == "tensorrt":
        from backends.tensorrt_backend import load_tensorrt

        return load_tensorrt(model, options)
    if kind.startswith("onnxruntime-"):
        from backends.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(model, options, kind=kind)
    raise BackendUnavailable(f"unknown backend {kind!r}")


__all__ = [
    "Backend",
    "BackendError",
    "BackendOptions",
    "BackendUnavailable",
    "InvalidInput",
    "TensorSpec",
    "WarmupTimeout",
    "is_batchable",
    "load_backend",
    "require_onnxruntime",
]
