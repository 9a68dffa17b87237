"""What GPU, driver and GPU runtimes this machine has: pure parsers plus probes that return nothing when absent.

Nothing here needs a GPU to import or to run: every probe answers ``[]`` or ``None`` on a CPU-only machine.
The parsers are separate functions so they can be tested on captured ``nvidia-smi`` text.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import importlib.util
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Fields of ``nvidia-smi --query-gpu`` (all documented in ``nvidia-smi --help-query-gpu``; ``compute_cap`` needs
# driver >= 510). memory.total is in MiB with ``nounits``. The CUDA version the driver supports is not a
# query-gpu field on every driver, so it comes from libcuda (cuDriverGetVersion) or the nvidia-smi banner.
QUERY_FIELDS = ("index", "name", "uuid", "compute_cap", "memory.total", "driver_version")
NVIDIA_SMI_TIMEOUT_S = 10.0
_NOT_AVAILABLE = {"", "N/A", "[N/A]", "[Not Supported]", "Not Supported"}


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str  # e.g. "NVIDIA H100 80GB HBM3"
    uuid: str  # "GPU-..."
    compute_capability: str  # "9.0"
    memory_bytes: int | None  # None where the driver reports [N/A] (unified-memory parts)
    driver_version: str  # "550.54.15"
    cuda_driver_version: str | None = None  # the newest CUDA the driver supports, "12.4"

    @property
    def sm(self) -> str:
        """The architecture as compilers spell it: "sm_90"."""
        return "sm_" + self.compute_capability.replace(".", "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class NvidiaSmiParseError(ValueError):
    """nvidia-smi printed something other than the CSV asked for."""


def parse_query_gpu_csv(text: str, cuda_driver_version: str | None = None) -> list[GpuInfo]:
    """Parse ``nvidia-smi --query-gpu=<QUERY_FIELDS> --format=csv,noheader,nounits`` output.

    One line per GPU, fields separated by ", ". GPU names contain spaces but no commas, so a plain split
    is exact. Blank lines are ignored; a line with the wrong field count raises NvidiaSmiParseError.
    """
    gpus = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != len(QUERY_FIELDS):
            raise NvidiaSmiParseError(
                f"line {lineno}: expected {len(QUERY_FIELDS)} fields ({', '.join(QUERY_FIELDS)}), "
                f"got {len(parts)}: {line!r}"
            )
        index, name, uuid, cc, mem, driver = parts
        if not index.isdigit():
            raise NvidiaSmiParseError(f"line {lineno}: GPU index {index!r} is not a number")
        if not re.fullmatch(r"\d+\.\d+", cc):
            raise NvidiaSmiParseError(f"line {lineno}: compute capability {cc!r} is not of the form 9.0")
        memory = None if mem in _NOT_AVAILABLE else _mib_to_bytes(mem, lineno)
        gpus.append(GpuInfo(int(index), name, uuid, cc, memory, driver, cuda_driver_version))
    return gpus


def _mib_to_bytes(text: str, lineno: int) -> int:
    try:
        return int(float(text) * 1024 * 1024)
    except ValueError:
        raise NvidiaSmiParseError(f"line {lineno}: memory.total {text!r} is not a number of MiB") from None


def parse_smi_banner_cuda_version(text: str) -> str | None:
    """The "CUDA Version: 12.4" of plain ``nvidia-smi`` (or "CUDA Version : 12.4" of ``nvidia-smi -q``)."""
    m = re.search(r"CUDA Version\s*:\s*(\d+\.\d+)", text)
    return m.group(1) if m else None


def decode_cuda_version(v: int) -> str | None:
    """cudaRuntimeGetVersion / cuDriverGetVersion encode 1000*major + 10*minor: 12040 -> "12.4"."""
    if v <= 0:
        return None
    return f"{v // 1000}.{(v % 1000) // 10}"


def decode_tensorrt_version(v: int) -> str | None:
    """getInferLibVersion(): 10000*major + 100*minor + patch since TensorRT 10 (101602 -> "10.16.2"),
    1000*major + 100*minor + patch before (8601 -> "8.6.1")."""
    if v <= 0:
        return None
    if v >= 100000:
        return f"{v // 10000}.{(v // 100) % 100}.{v % 100}"
    return f"{v // 1000}.{(v // 100) % 10}.{v % 100}"


def _run_smi(args: list[str]) -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, *args], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def list_gpus() -> list[GpuInfo]:
    """The NVIDIA GPUs nvidia-smi sees; ``[]`` when there is no nvidia-smi, no driver or no GPU."""
    text = _run_smi([f"--query-gpu={','.join(QUERY_FIELDS)}", "--format=csv,noheader,nounits"])
    if not text:
        return []
    cuda = cuda_driver_version()
    if cuda is None:
        cuda = parse_smi_banner_cuda_version(_run_smi([]) or "")
    try:
        return parse_query_gpu_csv(text, cuda)
    except NvidiaSmiParseError:
        return []


def _load(names: list[str], dirs: list[Path]) -> ctypes.CDLL | None:
    for d in [*dirs, None]:
        for n in names:
            try:
                return ctypes.CDLL(str(d / n) if d else n)
            except OSError:
                continue
    return None


def _package_dirs(*packages: str) -> list[Path]:
    """Folders of pip-installed NVIDIA library packages (nvidia-cuda-runtime-cu12, tensorrt_libs, ...)."""
    found = []
    for pkg in packages:
        try:
            spec = importlib.util.find_spec(pkg)
        except (ImportError, ValueError):
            continue
        for loc in (spec.submodule_search_locations or []) if spec else []:
            for sub in (Path(loc), Path(loc) / "lib"):
                if sub.is_dir():
                    found.append(sub)
    return found


@functools.lru_cache(maxsize=1)
def cuda_driver_version() -> str | None:
    """The CUDA version the installed driver supports (cuDriverGetVersion from libcuda.so.1)."""
    lib = _load(["libcuda.so.1", "libcuda.so"], [])
    if lib is None:
        return None
    v = ctypes.c_int(0)
    try:
        rc = lib.cuDriverGetVersion(ctypes.byref(v))
    except (AttributeError, OSError):
        return None
    return decode_cuda_version(v.value) if rc == 0 else None


@functools.lru_cache(maxsize=1)
def cuda_runtime_version() -> str | None:
    """The CUDA runtime (libcudart) this process would load: cuda-python's, else a pip or system libcudart.

    cudaRuntimeGetVersion needs no GPU, so this answers on CPU machines that carry the runtime library.
    """
    for mod in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            cudart = importlib.import_module(mod)
            err, v = cudart.cudaRuntimeGetVersion()
            if int(getattr(err, "value", err)) == 0:
                return decode_cuda_version(int(v))
        except Exception:  # any failure means "try the next way"
            continue
    names = [f"libcudart.so.{m}" for m in (13, 12, 11)] + ["libcudart.so"]
    lib = _load(names, _package_dirs("nvidia.cu13", "nvidia.cuda_runtime"))
    if lib is None:
        return None
    v = ctypes.c_int(0)
    try:
        rc = lib.cudaRuntimeGetVersion(ctypes.byref(v))
    except (AttributeError, OSError):
        return None
    return decode_cuda_version(v.value) if rc == 0 else None


@functools.lru_cache(maxsize=1)
def tensorrt_version() -> str | None:
    """TensorRT's version: the Python package's, else libnvinfer's getInferLibVersion (what the TRT EP loads)."""
    try:
        import tensorrt as trt  # optional and heavy: imported only here

        v = getattr(trt, "__version__", None)
        if isinstance(v, str) and v[:1].isdigit():
            return v
    except Exception:  # the PyPI stub raises at import when the real wheel is missing
        pass
    return tensorrt_library_version()


@functools.lru_cache(maxsize=1)
def tensorrt_library_version() -> str | None:
    """getInferLibVersion() of the libnvinfer the dynamic loader (or the tensorrt_libs wheel) provides."""
    lib = _load(["libnvinfer.so.11", "libnvinfer.so.10", "libnvinfer.so"], _package_dirs("tensorrt_libs"))
    if lib is None:
        return None
    try:
        fn = lib.getInferLibVersion
        fn.restype = ctypes.c_int32
        return decode_tensorrt_version(int(fn()))
    except (AttributeError, OSError):
        return None


def onnxruntime_version_and_providers() -> tuple[str, list[str]] | None:
    """(version, available execution providers) of the installed ONNX Runtime flavour, or None."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    return ort.__version__, list(ort.get_available_providers())


def environment_report() -> dict[str, Any]:
    """Everything above in one dict, for /v2 metadata, logs and bug reports."""
    ort = onnxruntime_version_and_providers()
    return {
        "gpus": [g.to_dict() for g in list_gpus()],
        "cuda_driver": cuda_driver_version(),
        "cuda_runtime": cuda_runtime_version(),
        "tensorrt": tensorrt_version(),
        "onnxruntime": ort[0] if ort else None,
        "onnxruntime_providers": ort[1] if ort else [],
    }
