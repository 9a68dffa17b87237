"""The v2 metadata and Triton model configuration per runtime, built from served-variant descriptions.

No GPU is needed: the views read only the description, which is what a loaded CUDA, TensorRT-EP or native
TensorRT variant would hand them (tests/unit/test_dataplane.py describes a real loaded CPU variant).
"""

from __future__ import annotations

import pytest

from backends import TensorSpec
from service.scheduler import SchedulerConfig
from service.triton_views import RUNTIMES, ServedDescription, model_metadata, runtime_of, triton_config

SCHED = SchedulerConfig(
    max_batch_size=16,
    batching=True,
    max_queue_delay_ns=500_000,
    preferred_batch_sizes=(4, 8),
    max_queue_size=128,
    default_timeout_ns=None,
)


def _desc(backend: str, precision: str = "fp32", device_id: int | None = None, mbs: int = 16) -> ServedDescription:
    return ServedDescription(
        variant="int8",
        backend=backend,
        inputs=[TensorSpec("x", "FP32", (-1, 3, 224, 224))],
        outputs=[TensorSpec("probs", "FP16", (-1, 1000))],
        max_batch_size=mbs,
        instances=2,
        scheduling=SCHED,
        precision=precision,
        device_id=device_id,
    )


def test_onnxruntime_cpu() -> None:
    cfg = triton_config(_desc("onnxruntime-cpu"), "resnet")
    assert (cfg["platform"], cfg["backend"]) == ("onnxruntime_onnx", "onnxruntime")
    assert cfg["instance_group"] == [{"name": "int8", "kind": "KIND_CPU", "count": 2}]
    assert "optimization" not in cfg


def test_onnxruntime_cuda() -> None:
    cfg = triton_config(_desc("onnxruntime-cuda", device_id=1), "resnet")
    assert (cfg["platform"], cfg["backend"]) == ("onnxruntime_onnx", "onnxruntime")
    assert cfg["instance_group"] == [{"name": "int8", "kind": "KIND_GPU", "count": 2, "gpus": [1]}]
    assert "optimization" not in cfg


def test_onnxruntime_tensorrt_execution_provider() -> None:
    cfg = triton_config(_desc("onnxruntime-tensorrt", device_id=0), "resnet")
    assert (cfg["platform"], cfg["backend"]) == ("onnxruntime_onnx", "onnxruntime")
    assert cfg["instance_group"][0]["kind"] == "KIND_GPU"
    assert cfg["optimization"] == {"execution_accelerators": {"gpu_execution_accelerator": [{"name": "tensorrt"}]}}
    fp16 = triton_config(_desc("onnxruntime-tensorrt", precision="fp16"), "resnet")
    assert fp16["optimization"]["execution_accelerators"]["gpu_execution_accelerator"] == [
        {"name": "tensorrt", "parameters": {"precision_mode": "FP16"}}
    ]
    assert "gpus" not in fp16["instance_group"][0]  # no device known: none claimed


def test_native_tensorrt() -> None:
    cfg = triton_config(_desc("tensorrt", precision="int8", device_id=0), "resnet")
    assert (cfg["platform"], cfg["backend"]) == ("tensorrt_plan", "tensorrt")
    assert cfg["instance_group"] == [{"name": "int8", "kind": "KIND_GPU", "count": 2, "gpus": [0]}]
    assert "optimization" not in cfg
    assert cfg["parameters"]["slimserve_precision"] == {"string_value": "int8"}


@pytest.mark.parametrize(
    ("backend", "platform"),
    [
        ("onnxruntime-cpu", "onnxruntime_onnx"),
        ("onnxruntime-cuda", "onnxruntime_onnx"),
        ("onnxruntime-tensorrt", "onnxruntime_onnx"),
        ("tensorrt", "tensorrt_plan"),
    ],
)
def test_metadata_platform_follows_the_runtime(backend: str, platform: str) -> None:
    meta = model_metadata(_desc(backend), "resnet", [1, 3])
    assert meta["platform"] == platform and meta["versions"] == ["1", "3"]
    assert meta["parameters"] == {"variant": "int8", "backend": backend, "max_batch_size": 16}
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3, 224, 224]}]


def test_every_backend_slimserve_loads_is_in_the_table_and_an_unknown_one_is_not_called_cpu() -> None:
    assert set(RUNTIMES) == {"onnxruntime-cpu", "onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt"}
    other = runtime_of("openvino")
    assert other.kind == "KIND_AUTO" and other.platform == "openvino"


def test_dims_batching_and_datatypes() -> None:
    cfg = triton_config(_desc("onnxruntime-cpu"), "resnet")
    assert cfg["max_batch_size"] == 16
    assert cfg["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [3, 224, 224]}]
    assert cfg["output"] == [{"name": "probs", "data_type": "TYPE_FP16", "dims": [1000]}]
    assert cfg["dynamic_batching"] == {
        "preferred_batch_size": [4, 8],
        "max_queue_delay_microseconds": 500,
        "default_queue_policy": {"max_queue_size": 128},
    }
    flat = triton_config(_desc("onnxruntime-cpu", mbs=0), "resnet")
    assert flat["input"][0]["dims"] == [-1, 3, 224, 224] and "dynamic_batching" not in flat
