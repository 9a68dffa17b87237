"""Build targets: the hardware identity an engine is built for, found by discovery.

An engine is only valid on the hardware it was built for, so build jobs name a target and only a worker that has
it may claim them. A target is a short string:

* ``cpu-<arch>-<isa level>``, e.g. ``cpu-x86_64-avx512vnni``: the instruction-set level decides which kernels
  ONNX Runtime's MLAS picks and the NCHWc block size its layout optimizer bakes into an ORT_ENABLE_ALL graph
  (8 floats on AVX2, 16 on AVX-512), which is why ONNX Runtime warns that such a graph is tied to its machine.
* ``gpu-<product slug>-sm<cc>``, e.g. ``gpu-nvidia-h100-80gb-hbm3-sm90``: TensorRT tunes engines per GPU model,
  and never across architectures. The slug of nvidia-smi's name ("NVIDIA H100 80GB HBM3") equals the slug of the
  GPU operator's ``nvidia.com/gpu.product`` node label ("NVIDIA-H100-80GB-HBM3"), so a chart can name the target
  of a node pool from its label.

Runtime versions (ONNX Runtime, TensorRT, CUDA, driver) are not part of the target: they are part of the engine
key (``backends.engines``), so an upgrade gives new keys while the hardware identity stays.
"""

from __future__ import annotations

import functools
import platform
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from backends.gpu import GpuInfo, list_gpus

#: x86-64 levels, best first: (level, /proc/cpuinfo flags it needs). Each names a kernel family MLAS dispatches on:
#: AMX tiles for int8 GEMM; AVX-512 VNNI (int8 dot products); AVX-512 (16-float NCHWc blocks); AVX-VNNI on AVX2
#: machines; AVX2+FMA (8-float NCHWc blocks); AVX; SSE4.
X86_LEVELS: tuple[tuple[str, frozenset[str]], ...] = (
    ("amx", frozenset({"amx_tile", "amx_int8", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"})),
    ("avx512vnni", frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"})),
    ("avx512", frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl"})),
    ("avxvnni", frozenset({"avx_vnni", "avx2", "fma"})),
    ("avx2", frozenset({"avx2", "fma"})),
    ("avx", frozenset({"avx"})),
    ("sse4", frozenset({"sse4_1", "sse4_2"})),
)
#: arm64 levels, best first (the "Features" line): SVE with int8 matrix multiply, int8 matrix multiply (SMMLA),
#: int8 dot products (SDOT), plain NEON.
ARM_LEVELS: tuple[tuple[str, frozenset[str]], ...] = (
    ("sve-i8mm", frozenset({"sve", "i8mm", "asimddp"})),
    ("i8mm", frozenset({"i8mm", "asimddp"})),
    ("dotprod", frozenset({"asimddp"})),
    ("neon", frozenset({"asimd"})),
)
BASELINE = "base"
TARGET_PATTERN = re.compile(r"cpu-[a-z0-9_]+-[a-z0-9-]+|gpu-[a-z0-9]+(?:-[a-z0-9]+)*-sm\d{2,3}")


@dataclass(frozen=True)
class Target:
    id: str  # "cpu-x86_64-avx2" | "gpu-nvidia-l4-sm89"
    kind: str  # "cpu" | "gpu"
    gpu: GpuInfo | None = None  # the device, for GPU targets

    @property
    def is_gpu(self) -> bool:
        return self.kind == "gpu"


def slug(text: str) -> str:
    """Lowercase, runs of anything but letters and digits become one '-': "NVIDIA H100 80GB HBM3" and the node
    label "NVIDIA-H100-80GB-HBM3" both give "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def parse_cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of the first processor in /proc/cpuinfo text ("flags" on x86, "Features" on arm64)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return set()


def normalize_arch(machine: str) -> str:
    m = machine.lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(m, slug(m).replace("-", "_") or "unknown")


def isa_level(arch: str, flags: Iterable[str]) -> str:
    """The best level of ``arch`` whose flags are all present, else ``base``."""
    have = set(flags)
    levels = X86_LEVELS if arch == "x86_64" else ARM_LEVELS if arch == "aarch64" else ()
    for level, needs in levels:
        if needs <= have:
            return level
    return BASELINE


def cpu_target_id(machine: str, cpuinfo: str) -> str:
    arch = normalize_arch(machine)
    return f"cpu-{arch}-{isa_level(arch, parse_cpu_flags(cpuinfo))}"


def gpu_target_id(gpu: GpuInfo) -> str:
    return f"gpu-{slug(gpu.name)}-sm{gpu.compute_capability.replace('.', '')}"


@functools.lru_cache(maxsize=1)
def cpu_target() -> Target:
    """This machine's CPU target (read once: the CPU does not change under a running process)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        cpuinfo = ""  # not Linux: the level is "base", which is still a correct (if coarse) identity
    return Target(cpu_target_id(platform.machine(), cpuinfo), "cpu")


def gpu_target(gpu: GpuInfo) -> Target:
    return Target(gpu_target_id(gpu), "gpu", gpu)


def gpu_targets() -> list[Target]:
    """One target per visible GPU, in device order (two GPUs of one model share a target id)."""
    return [gpu_target(g) for g in list_gpus()]


def detect_targets() -> list[Target]:
    """Every target this machine has: its CPU, then each distinct GPU model (the first device of each)."""
    out = [cpu_target()]
    for t in gpu_targets():
        if all(t.id != o.id for o in out):
            out.append(t)
    return out


def resolve_targets(spec: str, available: list[Target] | None = None) -> list[Target]:
    """What a worker advertises for ``--targets``: ``auto`` (all of this machine's), ``none``, or a comma-separated
    list of targets this machine has. A target it does not have is refused (ValueError): a worker that claimed
    builds for hardware it lacks would make engines for the wrong machine."""
    have = detect_targets() if available is None else available
    text = spec.strip().lower()
    if text in ("", "auto"):
        return list(have)
    if text == "none":
        return []
    by_id = {t.id: t for t in have}
    out: list[Target] = []
    for raw in text.split(","):
        name = raw.strip()
        if not TARGET_PATTERN.fullmatch(name):
            raise ValueError(
                f"{name!r} is not a build target (cpu-<arch>-<isa level> or gpu-<product>-sm<cc>, "
                f"e.g. {have[0].id if have else 'cpu-x86_64-avx2'})"
            )
        if name not in by_id:
            raise ValueError(f"this machine has no target {name!r}; it has {', '.join(by_id) or 'none'}")
        if by_id[name] not in out:
            out.append(by_id[name])
    return out
