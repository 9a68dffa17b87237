"""The v2 model metadata and Triton model configuration of a served variant, true to the runtime serving it.

Triton tooling (perf_analyzer, Model Analyzer, Model Navigator) reads ``platform``, ``backend`` and
``instance_group.kind`` to decide what it is talking to, so each of slimserve's runtimes is reported as
Triton would describe the same deployment:

| backend                | platform           | backend       | kind       | accelerator            |
|------------------------|--------------------|---------------|------------|------------------------|
| `onnxruntime-cpu`      | `onnxruntime_onnx` | `onnxruntime` | `KIND_CPU` |                        |
| `onnxruntime-cuda`     | `onnxruntime_onnx` | `onnxruntime` | `KIND_GPU` |                        |
| `onnxruntime-tensorrt` | `onnxruntime_onnx` | `onnxruntime` | `KIND_GPU` | gpu: `tensorrt`        |
| `tensorrt`             | `tensorrt_plan`    | `tensorrt`    | `KIND_GPU` |                        |

The views are built from a :class:`ServedDescription` (plain data), so the mapping is testable without a
GPU or a loaded model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from backends import TensorSpec
from backends.datatypes import v2_to_triton_config
from service.loaded import LoadedVariants
from service.scheduler import SchedulerConfig
from service.variant_build import ServedVariant

#: the protocol extensions both front ends implement (REST GET /v2, gRPC ServerMetadata)
EXTENSIONS = ["binary_tensor_data", "statistics", "model_repository", "model_configuration", "schedule_policy"]


@dataclass(frozen=True)
class Runtime:
    platform: str
    backend: str
    kind: str
    gpu_accelerator: str | None = None


RUNTIMES: dict[str, Runtime] = {
    "onnxruntime-cpu": Runtime("onnxruntime_onnx", "onnxruntime", "KIND_CPU"),
    "onnxruntime-cuda": Runtime("onnxruntime_onnx", "onnxruntime", "KIND_GPU"),
    "onnxruntime-tensorrt": Runtime("onnxruntime_onnx", "onnxruntime", "KIND_GPU", gpu_accelerator="tensorrt"),
    "tensorrt": Runtime("tensorrt_plan", "tensorrt", "KIND_GPU"),
}


def runtime_of(backend: str) -> Runtime:
    """The Triton description of a backend; a backend this table does not know is reported as such, never
    as ONNX Runtime on the CPU."""
    return RUNTIMES.get(backend) or Runtime(backend, backend, "KIND_AUTO")


@dataclass(frozen=True)
class ServedDescription:
    """What the views need to know about one served variant."""

    variant: str
    backend: str  # slimserve's backend name: onnxruntime-cpu, onnxruntime-cuda, onnxruntime-tensorrt, tensorrt
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_batch_size: int
    instances: int
    scheduling: SchedulerConfig
    precision: str = "fp32"
    device_id: int | None = None  # the GPU, for GPU backends


def describe(sv: ServedVariant) -> ServedDescription:
    info = sv.backend_info
    device = info.get("device_id")
    return ServedDescription(
        variant=sv.variant,
        backend=sv.backend,
        inputs=sv.inputs,
        outputs=sv.outputs,
        max_batch_size=sv.max_batch_size,
        instances=sv.instances,
        scheduling=sv.scheduler.config,
        precision=str(info.get("precision") or sv.config.precision),
        device_id=device if isinstance(device, int) else None,
    )


def model_metadata(d: ServedDescription, name: str, versions: list[int]) -> dict[str, Any]:
    """The v2 model metadata response (GET /v2/models/{name}[/versions/{v}])."""
    return {
        "name": name,
        "versions": [str(v) for v in versions],
        "platform": runtime_of(d.backend).platform,
        "inputs": [t.to_dict() for t in d.inputs],
        "outputs": [t.to_dict() for t in d.outputs],
        "parameters": {"variant": d.variant, "backend": d.backend, "max_batch_size": d.max_batch_size},
    }


def triton_config(d: ServedDescription, name: str) -> dict[str, Any]:
    """The model's configuration in Triton's JSON form (GET /v2/models/{name}/config)."""

    def tensor(t: TensorSpec) -> dict[str, Any]:
        dims = t.shape[1:] if d.max_batch_size > 0 else t.shape
        return {"name": t.name, "data_type": v2_to_triton_config(t.datatype), "dims": list(dims)}

    rt = runtime_of(d.backend)
    group: dict[str, Any] = {"name": d.variant, "kind": rt.kind, "count": d.instances}
    if rt.kind == "KIND_GPU" and d.device_id is not None:
        group["gpus"] = [d.device_id]
    out: dict[str, Any] = {
        "name": name,
        "platform": rt.platform,
        "backend": rt.backend,
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": d.max_batch_size,
        "input": [tensor(t) for t in d.inputs],
        "output": [tensor(t) for t in d.outputs],
        "instance_group": [group],
        "parameters": {
            "slimserve_variant": {"string_value": d.variant},
            "slimserve_backend": {"string_value": d.backend},
            "slimserve_precision": {"string_value": d.precision},
        },
    }
    if rt.gpu_accelerator:
        accelerator: dict[str, Any] = {"name": rt.gpu_accelerator}
        if d.precision != "fp32":
            # Triton's ONNX Runtime backend spells the TensorRT EP's precision as precision_mode FP16 / INT8
            accelerator["parameters"] = {"precision_mode": d.precision.upper()}
        out["optimization"] = {"execution_accelerators": {"gpu_execution_accelerator": [accelerator]}}
    cfg = d.scheduling
    if cfg.batching and d.max_batch_size > 1:
        out["dynamic_batching"] = {
            "preferred_batch_size": list(cfg.preferred_batch_sizes),
            "max_queue_delay_microseconds": cfg.max_queue_delay_ns // 1000,
            "default_queue_policy": {"max_queue_size": cfg.max_queue_size},
        }
    return out


def statistics(sv: ServedVariant, name: str) -> dict[str, Any]:
    """One entry of Triton's statistics extension (``model_stats``)."""
    return {"name": name, "version": str(sv.version), **sv.stats.to_dict()}


def all_statistics(loaded: LoadedVariants) -> list[dict[str, Any]]:
    """Every served variant's statistics, named as requests name it (``model`` for the default variant)."""
    out = []
    for ver in loaded.served_versions():
        for vname, sv in ver.variants.items():
            label = ver.model if vname == ver.default_variant else f"{ver.model}:{vname}"
            out.append(statistics(sv, label))
    return out
