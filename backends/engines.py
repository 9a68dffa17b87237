"""The engine cache key: everything a compiled TensorRT engine depends on, hashed.

A TensorRT engine (native, or the one ONNX Runtime's TensorRT execution provider builds) is not portable: it
is specific to the GPU model and architecture, the TensorRT version, the precision and sparsity it was built
for, the optimization profile (min/opt/max input shapes) and the CUDA stack it was built against. ONNX
Runtime's own docs tell users to delete the TRT EP's cache by hand when any of those change. Here, instead,
every one of them is a field of :class:`EngineKey`, so a change gives another :attr:`EngineKey.digest` and
another cache entry: a stale engine is never found, rather than found and mis-loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends.base import TensorSpec
from backends.gpu import GpuInfo

PRECISIONS = ("fp32", "fp16", "int8")
ENGINE_BACKENDS = ("tensorrt", "onnxruntime-tensorrt")
KEY_SCHEMA = 1  # bump when the meaning of a field changes: every old key then misses

#: {input name: {"min": [...], "opt": [...], "max": [...]}}
Profile = dict[str, dict[str, list[int]]]
_BOUNDS = ("min", "opt", "max")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def derive_profile(
    inputs: Sequence[TensorSpec],
    max_batch_size: int | None,
    overrides: Mapping[str, Mapping[str, Sequence[int]]] | None = None,
    *,
    opt_batch_size: int | None = None,
) -> Profile:
    """Min/opt/max shapes for every input, as TensorRT optimization profiles need them.

    A static dimension is that value in all three. A dynamic first (batch) dimension is 1 / opt_batch_size
    (default: max_batch_size) / max_batch_size. Any other dynamic dimension has no safe default (sequence
    length? image size?): the input needs an entry in ``overrides`` giving its full min/opt/max shapes, and
    without one this raises ValueError naming the input and the dimension. Overrides may also be given for
    inputs that need none, to narrow or widen the batch range of that input.
    """
    overrides = dict(overrides or {})
    names = [t.name for t in inputs]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ValueError(f"shape overrides name inputs the model does not have: {unknown} (inputs: {names})")
    profile: Profile = {}
    for spec in inputs:
        if spec.name in overrides:
            profile[spec.name] = _checked_override(spec, overrides[spec.name])
            continue
        lo: list[int] = []
        opt: list[int] = []
        hi: list[int] = []
        for i, d in enumerate(spec.shape):
            if d >= 0:
                lo.append(d)
                opt.append(d)
                hi.append(d)
            elif i == 0:
                mbs, obs = _batch_range(spec.name, max_batch_size, opt_batch_size)
                lo.append(1)
                opt.append(obs)
                hi.append(mbs)
            else:
                raise ValueError(
                    f"input {spec.name!r} dimension {i} is dynamic (shape {list(spec.shape)}): give its "
                    f"min/opt/max shapes in the shape overrides, "
                    f"e.g. {{{spec.name!r}: {{'min': [...], 'opt': [...], 'max': [...]}}}}"
                )
        profile[spec.name] = {"min": lo, "opt": opt, "max": hi}
    return profile


def _batch_range(name: str, max_batch_size: int | None, opt_batch_size: int | None) -> tuple[int, int]:
    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(
            f"input {name!r} has a dynamic batch dimension: max_batch_size must be >= 1, got {max_batch_size!r}"
        )
    opt = max_batch_size if opt_batch_size is None else opt_batch_size
    if not 1 <= opt <= max_batch_size:
        raise ValueError(f"opt_batch_size must be between 1 and max_batch_size ({max_batch_size}), got {opt}")
    return max_batch_size, opt


def _checked_override(spec: TensorSpec, bounds: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    missing = [b for b in _BOUNDS if b not in bounds]
    if missing:
        raise ValueError(f"shape override for input {spec.name!r} lacks {missing}: give min, opt and max")
    out = {b: [int(d) for d in bounds[b]] for b in _BOUNDS}
    for b in _BOUNDS:
        if len(out[b]) != len(spec.shape):
            raise ValueError(
                f"shape override {b} for input {spec.name!r} has rank {len(out[b])}, "
                f"the input has rank {len(spec.shape)}"
            )
    for i, d in enumerate(spec.shape):
        if d >= 0 and any(out[b][i] != d for b in _BOUNDS):
            raise ValueError(f"shape override for input {spec.name!r} changes static dimension {i} (= {d})")
    validate_profile({spec.name: out})
    return out


def validate_profile(profile: Mapping[str, Mapping[str, Sequence[int]]]) -> None:
    """Raise ValueError unless each input has same-rank min <= opt <= max shapes of positive dimensions."""
    for name, bounds in profile.items():
        try:
            lo, opt, hi = (list(bounds[b]) for b in _BOUNDS)
        except KeyError:
            raise ValueError(f"profile for input {name!r} needs min, opt and max") from None
        if not len(lo) == len(opt) == len(hi):
            raise ValueError(f"profile for input {name!r}: min/opt/max have different ranks")
        for i, (a, b, c) in enumerate(zip(lo, opt, hi, strict=True)):
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in (a, b, c)):
                raise ValueError(f"profile for input {name!r} dimension {i}: dimensions must be integers")
            if a < 1 or not a <= b <= c:
                raise ValueError(
                    f"profile for input {name!r} dimension {i}: need 1 <= min <= opt <= max, got {a}/{b}/{c}"
                )


@dataclass(frozen=True)
class RuntimeVersions:
    """The software half of what an engine depends on."""

    cuda_driver: str | None = None
    cuda_runtime: str | None = None
    tensorrt: str | None = None
    onnxruntime: str | None = None

    @classmethod
    def detect(cls) -> RuntimeVersions:
        from backends import gpu

        ort = gpu.onnxruntime_version_and_providers()
        return cls(
            gpu.cuda_driver_version(), gpu.cuda_runtime_version(), gpu.tensorrt_version(), ort[0] if ort else None
        )


@dataclass(frozen=True)
class EngineKey:
    """Identity of one compiled engine. Equal keys mean "this engine can be reused"; any change means rebuild."""

    variant_sha256: str  # sha256 of the ONNX variant the engine is built from
    backend: str  # "tensorrt" (native) or "onnxruntime-tensorrt" (the TRT EP's engine cache)
    precision: str  # fp32 | fp16 | int8
    gpu_name: str  # "NVIDIA H100 80GB HBM3": engines are tuned per GPU model, not just per architecture
    compute_capability: str  # "9.0": engines never cross architectures
    driver_version: str  # conservative: a driver upgrade rebuilds
    cuda_driver_version: str | None
    cuda_runtime_version: str | None
    tensorrt_version: str  # engines never cross TensorRT versions
    onnxruntime_version: str | None  # the TRT EP's cache format and partitioning follow the ORT release
    profile: Profile
    sparse: bool = False  # 2:4 structured-sparsity variant built with SPARSE_WEIGHTS / trt_sparsity_enable
    build_options: dict[str, Any] = field(default_factory=dict)  # workspace bytes, optimization level, ...
    schema: int = KEY_SCHEMA

    def __post_init__(self) -> None:
        if not _SHA256.fullmatch(self.variant_sha256):
            raise ValueError(f"variant_sha256 must be 64 lowercase hex digits, got {self.variant_sha256!r}")
        if self.backend not in ENGINE_BACKENDS:
            raise ValueError(f"engine backend must be one of {ENGINE_BACKENDS}, got {self.backend!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not self.tensorrt_version:
            raise ValueError("an engine key needs the TensorRT version: engines are not portable across versions")
        if self.backend == "onnxruntime-tensorrt" and not self.onnxruntime_version:
            raise ValueError("a TensorRT EP engine key needs the onnxruntime version")
        if self.backend == "tensorrt" and self.onnxruntime_version is not None:
            raise ValueError("a native TensorRT engine does not depend on onnxruntime: leave onnxruntime_version None")
        if not re.fullmatch(r"\d+\.\d+", self.compute_capability):
            raise ValueError(f"compute capability must look like '9.0', got {self.compute_capability!r}")
        validate_profile(self.profile)
        # canonical, detached copies: later changes to the caller's dicts cannot change the key
        object.__setattr__(self, "profile", json.loads(_canonical_json(self.profile)))
        object.__setattr__(self, "build_options", json.loads(_canonical_json(self.build_options)))

    @classmethod
    def create(
        cls,
        *,
        variant_sha256: str,
        backend: str,
        precision: str,
        gpu: GpuInfo,
        runtime: RuntimeVersions,
        profile: Profile,
        sparse: bool = False,
        build_options: Mapping[str, Any] | None = None,
    ) -> EngineKey:
        return cls(
            variant_sha256=variant_sha256,
            backend=backend,
            precision=precision,
            gpu_name=gpu.name,
            compute_capability=gpu.compute_capability,
            driver_version=gpu.driver_version,
            cuda_driver_version=gpu.cuda_driver_version or runtime.cuda_driver,
            cuda_runtime_version=runtime.cuda_runtime,
            tensorrt_version=runtime.tensorrt or "",
            onnxruntime_version=runtime.onnxruntime if backend == "onnxruntime-tensorrt" else None,
            profile=profile,
            sparse=sparse,
            build_options=dict(build_options or {}),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "variant_sha256": self.variant_sha256,
            "backend": self.backend,
            "precision": self.precision,
            "gpu": {"name": self.gpu_name, "compute_capability": self.compute_capability},
            "cuda": {
                "driver": self.driver_version,
                "cuda_driver": self.cuda_driver_version,
                "cuda_runtime": self.cuda_runtime_version,
            },
            "runtime": {"tensorrt": self.tensorrt_version, "onnxruntime": self.onnxruntime_version},
            "profile": self.profile,
            "sparse": self.sparse,
            "build_options": self.build_options,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EngineKey:
        return cls(
            variant_sha256=d["variant_sha256"],
            backend=d["backend"],
            precision=d["precision"],
            gpu_name=d["gpu"]["name"],
            compute_capability=d["gpu"]["compute_capability"],
            driver_version=d["cuda"]["driver"],
            cuda_driver_version=d["cuda"]["cuda_driver"],
            cuda_runtime_version=d["cuda"]["cuda_runtime"],
            tensorrt_version=d["runtime"]["tensorrt"],
            onnxruntime_version=d["runtime"]["onnxruntime"],
            profile=d["profile"],
            sparse=d["sparse"],
            build_options=d["build_options"],
            schema=d["schema"],
        )

    def canonical_json(self) -> str:
        """Sorted keys, no whitespace, ASCII: the same key gives the same bytes on every machine."""
        return _canonical_json(self.to_dict())

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.canonical_json().encode("ascii")).hexdigest()

    def matches_device(self, gpu: GpuInfo) -> bool:
        """True when ``gpu`` is the GPU model and architecture this engine was built for."""
        return gpu.name == self.gpu_name and gpu.compute_capability == self.compute_capability

    def mismatches(self, gpu: GpuInfo, runtime: RuntimeVersions) -> list[str]:
        """Why this engine cannot be used on ``gpu`` with ``runtime`` (empty: it can)."""
        why = []
        if gpu.name != self.gpu_name:
            why.append(f"GPU {gpu.name!r} != {self.gpu_name!r}")
        if gpu.compute_capability != self.compute_capability:
            why.append(f"compute capability {gpu.compute_capability} != {self.compute_capability}")
        if gpu.driver_version != self.driver_version:
            why.append(f"driver {gpu.driver_version} != {self.driver_version}")
        if runtime.tensorrt != self.tensorrt_version:
            why.append(f"TensorRT {runtime.tensorrt} != {self.tensorrt_version}")
        if runtime.cuda_runtime != self.cuda_runtime_version:
            why.append(f"CUDA runtime {runtime.cuda_runtime} != {self.cuda_runtime_version}")
        if self.backend == "onnxruntime-tensorrt" and runtime.onnxruntime != self.onnxruntime_version:
            why.append(f"onnxruntime {runtime.onnxruntime} != {self.onnxruntime_version}")
        return why

    def cache_dir(self, root: Path) -> Path:
        """Where this engine's files live under a cache root: one folder per digest."""
        return Path(root) / self.backend / self.digest


def timing_cache_name(gpu: GpuInfo, runtime: RuntimeVersions) -> str:
    """A file name for a TensorRT timing cache. Timing caches may be shared between models, but are specific
    to the device, CUDA and TensorRT versions, so they are keyed by exactly those."""
    ident = _canonical_json(
        {"gpu": gpu.name, "cc": gpu.compute_capability, "trt": runtime.tensorrt, "cuda": runtime.cuda_runtime}
    )
    return f"timing-{gpu.sm}-trt{runtime.tensorrt}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}.cache"
