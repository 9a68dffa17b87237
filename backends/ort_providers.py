"""ONNX Runtime's GPU execution providers: which this build has, loading CUDA and cuDNN from the nvidia-*
wheels once per process, and the check that refuses a session that silently fell back to the CPU.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

from backends.base import BackendUnavailable
from backends.onnxruntime_backend import _first_line

try:
    import onnxruntime as ort
except ImportError:  # pragma: no cover - the install always carries one ONNX Runtime flavour
    ort = None  # type: ignore[assignment]

CUDA_EP = "CUDAExecutionProvider"
TRT_EP = "TensorrtExecutionProvider"
_preload_note: str | None = None
_preload_lock = threading.Lock()
_preloaded = False


def available_providers() -> list[str]:
    return list(ort.get_available_providers()) if ort is not None else []


def preload_cuda_libraries() -> str | None:
    """``onnxruntime.preload_dlls()`` once per process (CUDA and cuDNN from the nvidia-* wheels), where this
    onnxruntime has it (1.32 does). Returns a note when it failed; the session check still has the last word."""
    global _preloaded, _preload_note
    with _preload_lock:
        if not _preloaded:
            _preloaded = True
            fn = getattr(ort, "preload_dlls", None)
            if fn is not None:
                try:
                    fn()
                except Exception as e:
                    _preload_note = f"onnxruntime.preload_dlls() failed: {_first_line(e)}"
        return _preload_note


def explain_provider_failure(provider: str) -> str:
    """Best guess at why ``provider`` did not load, found the way ONNX Runtime fails: by loading its library."""
    from backends.gpu import list_gpus

    reasons = []
    if not list_gpus():
        reasons.append("nvidia-smi reports no NVIDIA GPU (no GPU, no driver, or the container was started without one)")
    lib = {CUDA_EP: "cuda", TRT_EP: "tensorrt"}.get(provider)
    if lib and ort is not None:
        path = Path(ort.__file__).parent / "capi" / f"libonnxruntime_providers_{lib}.so"
        if not path.exists():
            reasons.append(f"{path.name} is not in this onnxruntime wheel (a CPU build: install onnxruntime-gpu)")
        else:
            try:
                ctypes.CDLL(str(path))
            except OSError as e:
                reasons.append(f"loading {path.name} failed: {_first_line(e)}")
    if _preload_note:
        reasons.append(_preload_note)
    return (
        "; ".join(reasons) or "no cause found here: rerun with SessionOptions.log_severity_level = 0 to see ORT's log"
    )


def check_providers(kind: str, requested: list[str], actual: list[str], reason: str | None = None) -> None:
    """Raise BackendUnavailable unless every requested provider is in the session's providers."""
    missing = [p for p in requested if p not in actual]
    if not missing:
        return
    gpu_left = [p for p in actual if p in (CUDA_EP, TRT_EP)]
    target = gpu_left[0] if gpu_left else "CPU"
    why = reason if reason is not None else explain_provider_failure(missing[0])
    raise BackendUnavailable(
        f"{kind}: ONNX Runtime was asked for {requested} but the session has {actual}: {missing[0]} did not load "
        f"and it fell back to {target}: {why}"
    )
