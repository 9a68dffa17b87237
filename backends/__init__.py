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
]
