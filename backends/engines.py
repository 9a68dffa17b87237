"""The engine key: everything a built engine depends on, hashed; and the one place keys are made.

An engine is what a builder makes from a variant for one target (``backends.targets``): a TensorRT plan (native,
or the cache ONNX Runtime's TensorRT execution provider writes), or ONNX Runtime's offline-optimized CPU graph.
None is portable. A TensorRT engine is specific to the GPU model and architecture, the TensorRT version, the
precision and sparsity it was built for, the optimization profile (min/opt/max input shapes) and the CUDA stack
it was built against; an ORT_ENABLE_ALL graph to the CPU's instruction set and the ONNX Runtime release. ONNX
Runtime's own docs tell users to delete the TRT EP's cache by hand when any of those change. Here, instead, every
one of them is a field of :class:`EngineKey`, so a change gives another :attr:`EngineKey.digest` and another
engine: a stale engine is never found, rather than found and mis-loaded.

``engine_key_for`` is the only constructor callers use: the serving replica that looks an engine up, the build
job that makes it and the GPU backends that cache one all derive the key the same way.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends.base import BackendOptions, TensorSpec
from backends.gpu import GpuInfo
from backends.gpu_options import GpuSettings
from backends.targets import TARGET_PATTERN, Target

PRECISIONS = ("fp32", "fp16", "int8")
#: builder -> the runtime versions its engines depend on (the ``runtime`` part of the key)
RUNTIME_FIELDS: dict[str, tuple[str, ...]] = {
    "onnxruntime-cpu": ("onnxruntime",),
    "onnxruntime-tensorrt": ("onnxruntime", "tensorrt", "cuda_runtime", "cuda_driver", "driver"),
    "tensorrt": ("tensorrt", "cuda_runtime", "cuda_driver", "driver"),
}
BUILDERS = tuple(RUNTIME_FIELDS)
GPU_BUILDERS = ("onnxruntime-tensorrt", "tensorrt")
#: the serving backend -> the builder whose engines it serves (the CPU one only when engines are asked for)
ENGINE_BUILDER = {b: b for b in BUILDERS}
#: how the CPU builder stores its graph: "onnx" (the optimized ONNX graph) loaded faster than "ort" (ONNX Runtime's
#: flatbuffer format) in bench/engines_cpu.py, and stays readable by onnx tools (docs/benchmarks.md)
CPU_ENGINE_FORMAT = "onnx"
KEY_SCHEMA = 2  # bump when the meaning of a field changes: every old key then misses

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

    cuda_driver: str | None = None  # the newest CUDA the driver supports ("13.0")
    cuda_runtime: str | None = None
    tensorrt: str | None = None
    onnxruntime: str | None = None
    driver: str | None = None  # the NVIDIA driver ("580.95.05"); conservative: a driver upgrade rebuilds

    @classmethod
    def detect(cls, gpu: GpuInfo | None = None) -> RuntimeVersions:
        """This process's versions. GPU builders pass their device (its driver); the CPU builder needs none."""
        from backends import gpu as probes

        ort = probes.onnxruntime_version_and_providers()
        return cls(
            (gpu.cuda_driver_version if gpu else None) or probes.cuda_driver_version(),
            probes.cuda_runtime_version(),
            probes.tensorrt_version(),
            ort[0] if ort else None,
            gpu.driver_version if gpu else None,
        )

    def for_builder(self, builder: str) -> dict[str, str | None]:
        """The versions ``builder``'s engines depend on, as the key stores them."""
        return {name: getattr(self, name) for name in RUNTIME_FIELDS[builder]}


@dataclass(frozen=True)
class EngineKey:
    """Identity of one engine. Equal keys mean "this engine can be reused"; any change means another engine."""

    variant_sha256: str  # sha256 of the ONNX variant the engine is built from
    builder: str  # onnxruntime-cpu | onnxruntime-tensorrt | tensorrt
    target: str  # "cpu-x86_64-avx2" | "gpu-nvidia-h100-80gb-hbm3-sm90" (backends.targets)
    precision: str | None  # fp32 | fp16 | int8 for GPU builders; None: the variant as stored (CPU)
    runtime: dict[str, str | None]  # RUNTIME_FIELDS[builder]: an upgrade of any of them is another engine
    profile: Profile | None  # TensorRT's min/opt/max shapes (GPU builders); None for the CPU builder
    sparse: bool = False  # 2:4 structured-sparsity variant built with SPARSE_WEIGHTS / trt_sparsity_enable
    build_options: dict[str, Any] = field(default_factory=dict)  # workspace, optimization level, format
    schema: int = KEY_SCHEMA

    def __post_init__(self) -> None:
        if not _SHA256.fullmatch(self.variant_sha256):
            raise ValueError(f"variant_sha256 must be 64 lowercase hex digits, got {self.variant_sha256!r}")
        if self.builder not in BUILDERS:
            raise ValueError(f"engine builder must be one of {BUILDERS}, got {self.builder!r}")
        gpu = self.builder in GPU_BUILDERS
        if not TARGET_PATTERN.fullmatch(self.target) or self.target.startswith("gpu-") != gpu:
            kind = "gpu-<product>-sm<cc>" if gpu else "cpu-<arch>-<isa level>"
            raise ValueError(f"a {self.builder} engine needs a {kind} target, got {self.target!r}")
        if sorted(self.runtime) != sorted(RUNTIME_FIELDS[self.builder]):
            raise ValueError(f"a {self.builder} key records the versions {RUNTIME_FIELDS[self.builder]}")
        if "onnxruntime" in self.runtime and not self.runtime["onnxruntime"]:
            raise ValueError(f"a {self.builder} key needs the onnxruntime version")
        if gpu:
            if not self.runtime.get("tensorrt"):
                raise ValueError("an engine key needs the TensorRT version: engines are not portable across versions")
            if self.precision not in PRECISIONS:
                raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
            if self.profile is None:
                raise ValueError("a TensorRT engine key needs the shape profile")
            validate_profile(self.profile)
        elif self.precision is not None or self.profile is not None or self.sparse:
            raise ValueError("a CPU engine has no precision, shape profile or sparsity of its own: leave them unset")
        # canonical, detached copies: later changes to the caller's dicts cannot change the key
        for name in ("runtime", "profile", "build_options"):
            object.__setattr__(self, name, json.loads(_canonical_json(getattr(self, name))))

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "variant_sha256": self.variant_sha256,
            "builder": self.builder,
            "target": self.target,
            "precision": self.precision,
            "runtime": self.runtime,
            "profile": self.profile,
            "sparse": self.sparse,
            "build_options": self.build_options,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EngineKey:
        try:
            return cls(
                variant_sha256=d["variant_sha256"],
                builder=d["builder"],
                target=d["target"],
                precision=d["precision"],
                runtime=dict(d["runtime"]),
                profile=d["profile"],
                sparse=bool(d["sparse"]),
                build_options=dict(d["build_options"]),
                schema=int(d["schema"]),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"not an engine key: {type(e).__name__}: {e}") from None

    def canonical_json(self) -> str:
        """Sorted keys, no whitespace, ASCII: the same key gives the same bytes on every machine."""
        return _canonical_json(self.to_dict())

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.canonical_json().encode("ascii")).hexdigest()

    @property
    def is_gpu(self) -> bool:
        return self.builder in GPU_BUILDERS

    def mismatches(self, target: str, runtime: RuntimeVersions) -> list[str]:
        """Why a machine with ``target`` and ``runtime`` cannot build or load this engine (empty: it can)."""
        why = [] if target == self.target else [f"target {target} != {self.target}"]
        mine = runtime.for_builder(self.builder)
        why += [f"{name} {mine[name]} != {want}" for name, want in sorted(self.runtime.items()) if mine[name] != want]
        return why

    def cache_dir(self, root: Path) -> Path:
        """Where this engine's files live under a cache root: one folder per digest."""
        return Path(root) / self.builder / self.digest


def engine_key_for(
    builder: str,
    variant_sha256: str,
    inputs: Sequence[TensorSpec],
    options: BackendOptions,
    target: Target,
    runtime: RuntimeVersions,
) -> EngineKey:
    """The key of the engine ``builder`` makes from a variant (its sha256 and inputs) served with ``options`` on
    ``target``. Raises ValueError when no key can be made: no shape profile for a dynamic input, a GPU builder
    without a GPU target or without TensorRT."""
    if builder not in BUILDERS:
        raise ValueError(f"engine builder must be one of {BUILDERS}, got {builder!r}")
    if builder not in GPU_BUILDERS:
        return EngineKey(
            variant_sha256=variant_sha256,
            builder=builder,
            target=target.id,
            precision=None,
            runtime=runtime.for_builder(builder),
            profile=None,
            build_options={"format": CPU_ENGINE_FORMAT, "graph_optimization_level": "ORT_ENABLE_ALL"},
        )
    if target.gpu is None:
        raise ValueError(f"a {builder} engine needs a GPU target, got {target.id!r}")
    if not runtime.tensorrt:
        raise ValueError(f"{builder}: TensorRT (libnvinfer) is not installed, so no engine can be built or loaded")
    s = GpuSettings.from_options(options)
    profile = derive_profile(inputs, s.max_batch_size, s.shape_overrides, opt_batch_size=s.opt_batch_size)
    return EngineKey(
        variant_sha256=variant_sha256,
        builder=builder,
        target=target.id,
        precision=options.precision,
        runtime=runtime.for_builder(builder),
        profile=profile,
        sparse=s.sparse,
        build_options={"workspace_bytes": s.workspace_bytes, "optimization_level": s.builder_optimization_level},
    )


def timing_cache_name(gpu: GpuInfo, runtime: RuntimeVersions) -> str:
    """A file name for a TensorRT timing cache. Timing caches may be shared between models, but are specific
    to the device, CUDA and TensorRT versions, so they are keyed by exactly those."""
    ident = _canonical_json(
        {"gpu": gpu.name, "cc": gpu.compute_capability, "trt": runtime.tensorrt, "cuda": runtime.cuda_runtime}
    )
    return f"timing-{gpu.sm}-trt{runtime.tensorrt}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}.cache"
