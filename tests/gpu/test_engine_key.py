"""Everything of the GPU path that runs without a GPU: discovery parsing, the engine key, shape profiles,
provider options, the no-silent-fallback check, fp16 conversion, and the IO-binding plumbing on ORT CPU."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import re
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from backends import BackendError, BackendOptions, BackendUnavailable, load_backend
from backends import gpu as gpuinfo
from backends import onnxruntime_gpu as og
from backends.base import InvalidInput, TensorSpec
from backends.engines import (
    CPU_ENGINE_FORMAT,
    EngineKey,
    RuntimeVersions,
    derive_profile,
    engine_key_for,
    timing_cache_name,
    validate_profile,
)
from backends.gpu_options import GpuSettings, cuda_provider_options, profile_option_strings, tensorrt_provider_options
from backends.onnxruntime_backend import OnnxRuntimeBackend
from backends.ort_providers import check_providers
from backends.precision import has_qdq, is_fp16_model, to_fp16
from backends.targets import Target, gpu_target
from tests.gpu import dynamic_seq_model, elem_types, load, qdq_linear, static_mlp
from tests.onnx_models import mlp, mlp_reference

# The output format of `nvidia-smi --query-gpu=index,name,uuid,compute_cap,memory.total,driver_version
# --format=csv,noheader,nounits`: ", "-separated, MiB without units. Names and memory.total are what these GPUs
# report in public nvidia-smi output (H100 80GB HBM3: 81559, H200: 143771, L40S: 46068); the UUIDs are invented.
H100_CSV = "0, NVIDIA H100 80GB HBM3, GPU-4f2a9c1e-7b3d-5e8f-a1c2-9d0e3f4b5a6c, 9.0, 81559, 550.54.15\n"
MIXED_CSV = (
    "0, NVIDIA H200, GPU-11111111-2222-3333-4444-555555555555, 9.0, 143771, 570.86.15\n"
    "1, NVIDIA L40S, GPU-66666666-7777-8888-9999-000000000000, 8.9, 46068, 570.86.15\n"
    "\n"
)
BANNER = (
    "+-----------------------------------------------------------------------------------------+\n"
    "| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: 12.4     |\n"
    "|-----------------------------------------+------------------------+----------------------+\n"
)
CUDA_EP_PRESENT = "CUDAExecutionProvider" in ort.get_available_providers()


# -- GPU discovery ---------------------------------------------------------------------------------------------


def test_parse_h100_query_output() -> None:
    (g,) = gpuinfo.parse_query_gpu_csv(H100_CSV, cuda_driver_version="12.4")
    assert g.index == 0
    assert g.name == "NVIDIA H100 80GB HBM3"
    assert g.uuid.startswith("GPU-4f2a9c1e")
    assert g.compute_capability == "9.0" and g.sm == "sm_90"
    assert g.memory_bytes == 81559 * 1024 * 1024
    assert g.driver_version == "550.54.15"
    assert g.cuda_driver_version == "12.4"


def test_parse_several_gpus_skips_blank_lines() -> None:
    gpus = gpuinfo.parse_query_gpu_csv(MIXED_CSV)
    assert [(g.index, g.name, g.compute_capability) for g in gpus] == [
        (0, "NVIDIA H200", "9.0"),
        (1, "NVIDIA L40S", "8.9"),
    ]
    assert gpus[0].memory_bytes == 143771 << 20


def test_parse_not_available_memory() -> None:
    (g,) = gpuinfo.parse_query_gpu_csv("0, NVIDIA GB10, GPU-x, 12.1, [N/A], 580.95.05\n")
    assert g.memory_bytes is None and g.compute_capability == "12.1"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("0, NVIDIA H100 80GB HBM3, 9.0, 81559\n", "expected 6 fields"),
        ("0, NVIDIA H100, GPU-x, nine, 81559, 550.54.15\n", "compute capability"),
        ("x, NVIDIA H100, GPU-x, 9.0, 81559, 550.54.15\n", "index"),
        ("0, NVIDIA H100, GPU-x, 9.0, lots, 550.54.15\n", "memory.total"),
    ],
)
def test_parse_rejects_malformed_lines(text: str, match: str) -> None:
    with pytest.raises(gpuinfo.NvidiaSmiParseError, match=match):
        gpuinfo.parse_query_gpu_csv(text)


def test_banner_and_query_cuda_version() -> None:
    assert gpuinfo.parse_smi_banner_cuda_version(BANNER) == "12.4"
    assert gpuinfo.parse_smi_banner_cuda_version("CUDA Version                              : 13.0\n") == "13.0"
    assert gpuinfo.parse_smi_banner_cuda_version("no driver here") is None


def test_version_decoding() -> None:
    assert gpuinfo.decode_cuda_version(12040) == "12.4"
    assert gpuinfo.decode_cuda_version(13000) == "13.0"
    assert gpuinfo.decode_cuda_version(0) is None
    assert gpuinfo.decode_tensorrt_version(101602) == "10.16.2"
    assert gpuinfo.decode_tensorrt_version(110000) == "11.0.0"
    assert gpuinfo.decode_tensorrt_version(8601) == "8.6.1"


def test_list_gpus_uses_the_query_and_degrades(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def fake_smi(args: list[str]) -> str | None:
        calls.append(args)
        return H100_CSV if args else BANNER

    monkeypatch.setattr(gpuinfo, "_run_smi", fake_smi)
    monkeypatch.setattr(gpuinfo, "cuda_driver_version", lambda: None)
    (g,) = gpuinfo.list_gpus()
    assert g.name == "NVIDIA H100 80GB HBM3" and g.cuda_driver_version == "12.4"  # from the banner
    assert calls[0] == [f"--query-gpu={','.join(gpuinfo.QUERY_FIELDS)}", "--format=csv,noheader,nounits"]
    monkeypatch.setattr(gpuinfo, "_run_smi", lambda args: "garbage without commas\n" if args else "")
    assert gpuinfo.list_gpus() == []  # unparseable output reads as "no GPU", never as an exception


def test_list_gpus_without_nvidia_smi(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpuinfo.shutil, "which", lambda _: None)
    assert gpuinfo.list_gpus() == []


def test_runtime_probes_answer_none_or_a_version() -> None:
    for fn in (gpuinfo.cuda_driver_version, gpuinfo.cuda_runtime_version, gpuinfo.tensorrt_version):
        fn.cache_clear()
        v = fn()
        assert v is None or re.fullmatch(r"\d+\.\d+(\.\d+)?", v), v
    ver, providers = gpuinfo.onnxruntime_version_and_providers() or ("", [])
    assert ver == ort.__version__ and "CPUExecutionProvider" in providers
    report = gpuinfo.environment_report()
    assert set(report) >= {"gpus", "cuda_driver", "cuda_runtime", "tensorrt", "onnxruntime"}


@pytest.mark.skipif(importlib.util.find_spec("nvidia.cuda_runtime") is None, reason="nvidia-cuda-runtime-cu12 absent")
def test_cuda_runtime_version_from_the_pip_runtime() -> None:
    gpuinfo.cuda_runtime_version.cache_clear()
    # cudaRuntimeGetVersion needs no GPU: the pip wheel's libcudart answers on a CPU machine
    assert re.fullmatch(r"1[0-9]\.\d", gpuinfo.cuda_runtime_version() or "")


# -- the engine key --------------------------------------------------------------------------------------------

H100 = gpuinfo.GpuInfo(0, "NVIDIA H100 80GB HBM3", "GPU-a", "9.0", 81559 << 20, "550.54.15", "12.4")
H200 = gpuinfo.GpuInfo(0, "NVIDIA H200", "GPU-b", "9.0", 143771 << 20, "550.54.15", "12.4")
RUNTIME = RuntimeVersions(
    cuda_driver="12.4", cuda_runtime="12.9", tensorrt="10.13.3", onnxruntime="1.31.1", driver="550.54.15"
)
SHA = hashlib.sha256(b"variant").hexdigest()
PROFILE = {"x": {"min": [1, 4], "opt": [8, 4], "max": [8, 4]}}
CPU = Target("cpu-x86_64-avx512vnni", "cpu")
X4 = [TensorSpec("x", "FP32", (-1, 4))]
GPU_OPTS = BackendOptions(precision="fp16", extra={"max_batch_size": 8, "workspace_bytes": 1 << 30})


def native_key(**changes: Any) -> EngineKey:
    base = engine_key_for("tensorrt", SHA, X4, GPU_OPTS, gpu_target(H100), RUNTIME)
    return dataclasses.replace(base, **changes) if changes else base


def ep_key(**changes: Any) -> EngineKey:
    k = engine_key_for("onnxruntime-tensorrt", SHA, X4, GPU_OPTS, gpu_target(H100), RUNTIME)
    return dataclasses.replace(k, **changes) if changes else k


def cpu_key(**changes: Any) -> EngineKey:
    k = engine_key_for("onnxruntime-cpu", SHA, X4, BackendOptions(), CPU, RUNTIME)
    return dataclasses.replace(k, **changes) if changes else k


def runtime(**changes: Any) -> dict[str, Any]:
    return {**native_key().runtime, **changes}


CHANGES: dict[str, dict[str, Any]] = {
    "variant": {"variant_sha256": hashlib.sha256(b"other").hexdigest()},
    "builder": {"builder": "onnxruntime-tensorrt", "runtime": {**runtime(), "onnxruntime": "1.31.1"}},
    "precision fp32": {"precision": "fp32"},
    "precision int8": {"precision": "int8"},
    "gpu model (same architecture)": {"target": gpu_target(H200).id},
    "compute capability": {"target": "gpu-nvidia-h100-80gb-hbm3-sm89"},
    "driver": {"runtime": runtime(driver="580.95.05")},
    "cuda driver": {"runtime": runtime(cuda_driver="13.0")},
    "cuda runtime": {"runtime": runtime(cuda_runtime="13.0")},
    "tensorrt minor": {"runtime": runtime(tensorrt="10.14.1")},
    "tensorrt major": {"runtime": runtime(tensorrt="11.0.0")},
    "profile max batch": {"profile": {"x": {"min": [1, 4], "opt": [8, 4], "max": [16, 4]}}},
    "profile opt": {"profile": {"x": {"min": [1, 4], "opt": [4, 4], "max": [8, 4]}}},
    "sparse": {"sparse": True},
    "workspace": {"build_options": {"workspace_bytes": 2 << 30, "optimization_level": None}},
    "optimization level": {"build_options": {"workspace_bytes": 1 << 30, "optimization_level": 5}},
    "schema": {"schema": 3},
}


@pytest.mark.parametrize("what", sorted(CHANGES))
def test_every_field_changes_the_digest(what: str) -> None:
    assert native_key(**CHANGES[what]).digest != native_key().digest


def test_all_changed_keys_are_distinct() -> None:
    digests = [native_key().digest] + [native_key(**c).digest for c in CHANGES.values()]
    assert len(set(digests)) == len(digests)


def test_ep_key_depends_on_the_onnxruntime_version() -> None:
    assert ep_key().digest != ep_key(runtime={**ep_key().runtime, "onnxruntime": "1.32.0"}).digest
    assert ep_key().digest != ep_key(runtime={**ep_key().runtime, "tensorrt": "11.0.0"}).digest


def test_cpu_key_is_target_and_onnxruntime_release() -> None:
    k = cpu_key()
    assert (k.builder, k.target, k.precision, k.profile, k.runtime) == (
        "onnxruntime-cpu",
        CPU.id,
        None,
        None,
        {"onnxruntime": "1.31.1"},
    )
    assert k.build_options["format"] == CPU_ENGINE_FORMAT
    assert cpu_key(target="cpu-x86_64-avx2").digest != k.digest  # an AVX2 machine gets its own engine
    assert cpu_key(runtime={"onnxruntime": "1.32.0"}).digest != k.digest  # an ORT upgrade: another engine
    # the GPU stack does not matter to a CPU engine: a TensorRT or driver upgrade keeps it
    other_gpu_stack = dataclasses.replace(RUNTIME, tensorrt="11.0.0", driver="580.1", cuda_runtime="13.0")
    assert engine_key_for("onnxruntime-cpu", SHA, X4, BackendOptions(), CPU, other_gpu_stack).digest == k.digest


def test_digest_is_stable_and_canonical() -> None:
    a = native_key()
    assert re.fullmatch(r"[0-9a-f]{64}", a.digest)
    assert a.digest == native_key().digest
    text = a.canonical_json()
    assert " " not in text
    assert json.loads(text) == a.to_dict()
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    assert a.digest == hashlib.sha256(text.encode()).hexdigest()


def test_dict_order_does_not_matter() -> None:
    two = {"b": {"max": [8, 3], "opt": [8, 3], "min": [1, 3]}, "a": {"min": [1, 4], "opt": [8, 4], "max": [8, 4]}}
    two_reordered = {
        "a": {"max": [8, 4], "min": [1, 4], "opt": [8, 4]},
        "b": {"min": [1, 3], "opt": [8, 3], "max": [8, 3]},
    }
    assert native_key(profile=two).digest == native_key(profile=two_reordered).digest
    opts_a = {"workspace_bytes": 1, "optimization_level": 3}
    opts_b = {"optimization_level": 3, "workspace_bytes": 1}
    assert native_key(build_options=opts_a).digest == native_key(build_options=opts_b).digest


def test_key_is_detached_from_the_callers_dicts() -> None:
    profile = json.loads(json.dumps(PROFILE))
    k = native_key(profile=profile)
    before = k.digest
    profile["x"]["max"][0] = 64
    assert k.digest == before


def test_round_trip_through_a_dict() -> None:
    for k in (native_key(), ep_key(), cpu_key(), native_key(sparse=True, precision="int8")):
        again = EngineKey.from_dict(json.loads(json.dumps(k.to_dict())))
        assert again == k and again.digest == k.digest
    with pytest.raises(ValueError, match="not an engine key"):
        EngineKey.from_dict({"builder": "tensorrt"})


def test_engine_key_for_is_the_one_construction() -> None:
    """The replica that looks an engine up and the job that builds it derive the same key from the same inputs."""
    k = native_key()
    assert (k.target, k.precision, k.profile) == ("gpu-nvidia-h100-80gb-hbm3-sm90", "fp16", PROFILE)
    assert k.runtime == {"tensorrt": "10.13.3", "cuda_runtime": "12.9", "cuda_driver": "12.4", "driver": "550.54.15"}
    assert "onnxruntime" not in k.runtime  # a native engine does not depend on onnxruntime
    assert ep_key().runtime["onnxruntime"] == "1.31.1"
    assert k.build_options == {"workspace_bytes": 1 << 30, "optimization_level": None}
    assert engine_key_for("tensorrt", SHA, X4, GPU_OPTS, gpu_target(H100), RUNTIME) == k
    with pytest.raises(ValueError, match="TensorRT"):
        engine_key_for("tensorrt", SHA, X4, GPU_OPTS, gpu_target(H100), dataclasses.replace(RUNTIME, tensorrt=None))
    with pytest.raises(ValueError, match="needs a GPU target"):
        engine_key_for("tensorrt", SHA, X4, GPU_OPTS, CPU, RUNTIME)
    with pytest.raises(ValueError, match="dimension 1 is dynamic"):
        engine_key_for("tensorrt", SHA, [TensorSpec("x", "FP32", (-1, -1))], GPU_OPTS, gpu_target(H100), RUNTIME)


def test_detect_takes_the_driver_from_the_device() -> None:
    here = RuntimeVersions.detect(H100)
    assert here.driver == "550.54.15" and here.cuda_driver == "12.4"
    assert RuntimeVersions.detect().driver is None
    assert here.for_builder("onnxruntime-cpu") == {"onnxruntime": ort.__version__}


def test_mismatches_name_every_reason() -> None:
    k = native_key()
    assert k.mismatches(k.target, RUNTIME) == []
    why = k.mismatches(gpu_target(H200).id, dataclasses.replace(RUNTIME, tensorrt="11.0.0", driver="580.1"))
    assert any("target" in w for w in why) and any("tensorrt" in w for w in why) and any("driver" in w for w in why)
    assert cpu_key().mismatches(CPU.id, dataclasses.replace(RUNTIME, tensorrt="11.0.0")) == []
    assert cpu_key().mismatches(CPU.id, dataclasses.replace(RUNTIME, onnxruntime="1.32.0")) == [
        "onnxruntime 1.32.0 != 1.31.1"
    ]


def test_cache_locations(tmp_path: Any) -> None:
    k = native_key()
    assert k.cache_dir(tmp_path) == tmp_path / "tensorrt" / k.digest
    a = timing_cache_name(H100, RUNTIME)
    assert a.startswith("timing-sm_90-trt10.13.3-") and a.endswith(".cache")
    assert a != timing_cache_name(H200, RUNTIME)
    assert a != timing_cache_name(H100, dataclasses.replace(RUNTIME, tensorrt="11.0.0"))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"variant_sha256": "abc"}, "64 lowercase hex"),
        ({"builder": "onnxruntime-cuda"}, "engine builder"),
        ({"precision": "bf16"}, "precision"),
        ({"runtime": runtime(tensorrt="")}, "TensorRT version"),
        ({"runtime": {**runtime(), "onnxruntime": "1.31.1"}}, "records the versions"),
        ({"target": "gpu-h100"}, "gpu-<product>-sm<cc> target"),
        ({"target": "cpu-x86_64-avx2"}, "gpu-<product>-sm<cc> target"),
        ({"profile": None}, "shape profile"),
        ({"profile": {"x": {"min": [9, 4], "opt": [8, 4], "max": [8, 4]}}}, "min <= opt <= max"),
    ],
)
def test_invalid_keys_are_refused(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        native_key(**changes)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"target": "gpu-nvidia-l4-sm89"}, "cpu-<arch>-<isa level> target"),
        ({"precision": "fp16"}, "no precision"),
        ({"profile": PROFILE}, "no precision, shape profile"),
        ({"runtime": {"onnxruntime": ""}}, "onnxruntime version"),
    ],
)
def test_invalid_cpu_keys_are_refused(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cpu_key(**changes)


def test_ep_key_needs_the_onnxruntime_version() -> None:
    with pytest.raises(ValueError, match="onnxruntime version"):
        ep_key(runtime={**ep_key().runtime, "onnxruntime": None})


# -- shape profiles --------------------------------------------------------------------------------------------

X = TensorSpec("x", "FP32", (-1, 4))
IMG = TensorSpec("img", "FP32", (-1, 3, 224, 224))
SEQ = TensorSpec("tokens", "INT64", (-1, -1))


def test_dynamic_batch_profile() -> None:
    assert derive_profile([X], 8) == {"x": {"min": [1, 4], "opt": [8, 4], "max": [8, 4]}}
    p = derive_profile([X, IMG], 32, opt_batch_size=4)
    assert p["img"] == {"min": [1, 3, 224, 224], "opt": [4, 3, 224, 224], "max": [32, 3, 224, 224]}


def test_static_profile() -> None:
    assert derive_profile([TensorSpec("x", "FP32", (2, 4))], None) == {
        "x": {"min": [2, 4], "opt": [2, 4], "max": [2, 4]}
    }


def test_other_dynamic_dims_need_overrides() -> None:
    with pytest.raises(ValueError, match=r"input 'tokens' dimension 1 is dynamic"):
        derive_profile([X, SEQ], 8)
    p = derive_profile([X, SEQ], 8, {"tokens": {"min": [1, 1], "opt": [8, 128], "max": [8, 512]}})
    assert p["tokens"] == {"min": [1, 1], "opt": [8, 128], "max": [8, 512]}
    assert p["x"]["max"] == [8, 4]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"nope": {"min": [1, 4], "opt": [1, 4], "max": [1, 4]}}, "inputs the model does not have"),
        ({"x": {"min": [1, 4], "max": [8, 4]}}, "lacks"),
        ({"x": {"min": [1, 4, 1], "opt": [1, 4, 1], "max": [1, 4, 1]}}, "rank"),
        ({"x": {"min": [1, 5], "opt": [1, 5], "max": [1, 5]}}, "static dimension 1"),
        ({"x": {"min": [4, 4], "opt": [2, 4], "max": [8, 4]}}, "min <= opt <= max"),
        ({"x": {"min": [0, 4], "opt": [2, 4], "max": [8, 4]}}, "1 <= min"),
    ],
)
def test_bad_overrides(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        derive_profile([X], 8, overrides)


def test_batch_bounds() -> None:
    with pytest.raises(ValueError, match="max_batch_size must be >= 1"):
        derive_profile([X], 0)
    with pytest.raises(ValueError, match="max_batch_size must be >= 1"):
        derive_profile([X], None)
    with pytest.raises(ValueError, match="opt_batch_size"):
        derive_profile([X], 8, opt_batch_size=9)
    with pytest.raises(ValueError, match="integers"):
        validate_profile({"x": {"min": [1.0], "opt": [1], "max": [1]}})


# -- provider options and settings ------------------------------------------------------------------------------


def test_profile_option_strings() -> None:
    p = derive_profile([X, IMG], 16, opt_batch_size=4)
    lo, opt, hi = profile_option_strings(p)
    assert lo == "img:1x3x224x224,x:1x4"
    assert opt == "img:4x3x224x224,x:4x4"
    assert hi == "img:16x3x224x224,x:16x4"
    with pytest.raises(BackendError, match="cannot be written"):
        profile_option_strings({"a:b": {"min": [1], "opt": [1], "max": [1]}})


def test_cuda_provider_options() -> None:
    assert cuda_provider_options(1, False) == {"device_id": "1", "cudnn_conv_algo_search": "EXHAUSTIVE"}
    assert cuda_provider_options(0, True)["enable_cuda_graph"] == "1"


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_provider_options(precision: str, tmp_path: Any) -> None:
    s = GpuSettings(device_id=0, sparse=True, workspace_bytes=1 << 31, builder_optimization_level=4)
    opts = tensorrt_provider_options(s, precision, PROFILE, tmp_path / "e", tmp_path / "t")
    assert opts["trt_engine_cache_enable"] is True and opts["trt_engine_cache_path"] == str(tmp_path / "e")
    assert opts["trt_timing_cache_enable"] is True and opts["trt_timing_cache_path"] == str(tmp_path / "t")
    assert opts["trt_fp16_enable"] is (precision == "fp16")
    assert opts["trt_int8_enable"] is (precision == "int8")
    assert "trt_int8_calibration_table_name" not in opts  # explicit (Q/DQ) quantization only
    assert opts["trt_sparsity_enable"] is True
    assert opts["trt_max_workspace_size"] == 1 << 31 and opts["trt_builder_optimization_level"] == 4
    assert opts["trt_profile_max_shapes"] == "x:8x4"
    static = tensorrt_provider_options(GpuSettings(), precision, None, tmp_path, tmp_path)
    assert not any(k.startswith("trt_profile") for k in static) and "trt_builder_optimization_level" not in static


def test_settings_from_options(tmp_path: Any) -> None:
    extra = {
        "device_id": 1,
        "max_batch_size": 16,
        "opt_batch_size": 4,
        "sparse": True,
        "engine_cache_dir": str(tmp_path),
    }
    s = GpuSettings.from_options(BackendOptions(extra=extra))
    assert (s.device_id, s.max_batch_size, s.opt_batch_size, s.sparse, s.cache_root()) == (1, 16, 4, True, tmp_path)
    assert GpuSettings.from_options(BackendOptions()).cache_root().name == "slimserve-engines"
    with pytest.raises(BackendError, match="device_id"):
        GpuSettings.from_options(BackendOptions(extra={"device_id": "0"}))


# -- no silent fallback ----------------------------------------------------------------------------------------


def test_check_providers() -> None:
    check_providers("onnxruntime-cuda", ["CUDAExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(BackendUnavailable, match=r"fell back to CPU: because"):
        check_providers("onnxruntime-cuda", ["CUDAExecutionProvider"], ["CPUExecutionProvider"], "because")
    with pytest.raises(BackendUnavailable, match=r"TensorrtExecutionProvider did not load and it fell back to CUDA"):
        check_providers(
            "onnxruntime-tensorrt",
            ["TensorrtExecutionProvider", "CUDAExecutionProvider"],
            ["CUDAExecutionProvider", "CPUExecutionProvider"],
            "no libnvinfer",
        )


@pytest.mark.skipif(CUDA_EP_PRESENT, reason="this onnxruntime has the CUDA provider (a GPU build)")
def test_onnxruntime_cuda_is_unavailable_on_a_cpu_build() -> None:
    for kind in ("onnxruntime-cuda", "onnxruntime-tensorrt"):
        with pytest.raises(BackendUnavailable, match=r"needs (CUDA|Tensorrt)ExecutionProvider.*onnxruntime-gpu"):
            load_backend(kind, mlp())


@pytest.mark.skipif(CUDA_EP_PRESENT, reason="on a GPU build the session really lands on CUDA")
def test_a_silent_cpu_fallback_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend the CUDA provider is available: ONNX Runtime then creates the session anyway, on the CPU only
    (its real, silent behaviour, seen here), and the backend must refuse it with the reason."""
    monkeypatch.setattr(og, "available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(BackendUnavailable, match=r"fell back to CPU: .*(no NVIDIA GPU|not in this onnxruntime wheel)"):
        load_backend("onnxruntime-cuda", mlp())


def test_tensorrt_missing_says_how_to_install() -> None:
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("a tensorrt package is installed")
    with pytest.raises(BackendUnavailable, match=r"TensorRT is not installed: .*pip install tensorrt-cu13"):
        load_backend("tensorrt", mlp())


# -- fp16 conversion -------------------------------------------------------------------------------------------


def test_to_fp16_structure() -> None:
    original = load(mlp())
    before = original.SerializeToString()
    fp16 = to_fp16(original)
    assert original.SerializeToString() == before  # the input is not modified
    assert elem_types(list(fp16.graph.input)) == [TensorProto.FLOAT]  # clients keep sending FP32
    assert elem_types(list(fp16.graph.output)) == [TensorProto.FLOAT, TensorProto.FLOAT]
    assert {i.data_type for i in fp16.graph.initializer} == {TensorProto.FLOAT16}
    assert sum(n.op_type == "Cast" for n in fp16.graph.node) == 3  # one per graph input and output
    onnx.checker.check_model(fp16)
    assert is_fp16_model(fp16) and not is_fp16_model(original)


def test_to_fp16_runs_on_cpu_within_fp16_tolerance() -> None:
    fp16 = to_fp16(load(mlp())).SerializeToString()
    x = np.random.default_rng(3).standard_normal((16, 4)).astype(np.float32)
    ref = OnnxRuntimeBackend(mlp()).infer({"x": x})
    got = OnnxRuntimeBackend(fp16).infer({"x": x})
    assert got["probs"].dtype == np.float32
    np.testing.assert_allclose(got["probs"], mlp_reference(x), atol=5e-3)
    np.testing.assert_allclose(got["logits"], ref["logits"], rtol=1e-2, atol=2e-2)
    assert not np.array_equal(got["logits"], ref["logits"])  # it really computed in FP16


def test_qdq_detection() -> None:
    data, _, _ = qdq_linear()
    assert has_qdq(load(data)) and not has_qdq(load(mlp()))


# -- the IO-binding plumbing, run on ONNX Runtime's CPU provider ------------------------------------------------


class CpuPlumbing(og.OnnxRuntimeGpuBackend):
    """The GPU backend's own code (precision prep, IO binding, static OrtValue binding for CUDA graphs, output
    selection, provider check) with CPU as the device. It proves the ORT API calls, not anything about GPUs."""

    KINDS = {"plumbing-cpu": ("CPUExecutionProvider",)}
    DEVICE_TYPE = "cpu"

    def _providers(self, kind: str, variant: bytes, cuda_graph: bool) -> list[tuple[str, dict[str, Any]]]:
        return [("CPUExecutionProvider", {})]


def plumbing(data: bytes, precision: str = "fp32", **extra: Any) -> CpuPlumbing:
    return CpuPlumbing(data, BackendOptions(precision=precision, extra=extra), kind="plumbing-cpu")


@pytest.mark.parametrize(("precision", "atol"), [("fp32", 1e-6), ("fp16", 5e-3)])
def test_io_binding_path(precision: str, atol: float) -> None:
    b = plumbing(mlp(), precision)
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    out = b.infer({"x": x})
    assert list(out) == ["probs", "logits"]
    np.testing.assert_allclose(out["probs"], mlp_reference(x), atol=atol)
    assert list(b.infer({"x": x}, ["logits"])) == ["logits"]
    d = b.describe()
    assert d["precision"] == precision and d["cuda_graph"] is False
    assert "dynamic shapes" in d["cuda_graph_note"]
    with pytest.raises(InvalidInput, match="unknown outputs"):
        b.infer({"x": x}, ["nope"])
    with pytest.raises(InvalidInput, match="missing input"):
        b.infer({}, None)


def test_static_binding_path_used_by_cuda_graphs() -> None:
    b = plumbing(static_mlp(2), cuda_graph=True)
    assert b.describe()["cuda_graph"] is True
    rng = np.random.default_rng(2)
    for _ in range(3):  # new data each time goes through update_inplace into the same bound buffers
        x = rng.standard_normal((2, 4)).astype(np.float32)
        out = b.infer({"x": x})
        np.testing.assert_allclose(out["probs"], mlp_reference(x), atol=1e-6)
    assert list(b.infer({"x": x}, ["logits"])) == ["logits"]
    with pytest.raises(InvalidInput, match="static shapes"):
        b.infer({"x": np.zeros((3, 4), np.float32)})
    with pytest.raises(InvalidInput, match="static shapes"):
        b.infer({"x": np.zeros((2, 4), np.float64)})


def test_cuda_graph_refused_for_dynamic_models() -> None:
    with pytest.raises(BackendError, match="cuda_graph was requested but cannot be used: dynamic shapes"):
        plumbing(mlp(), cuda_graph=True)
    assert plumbing(mlp(), cuda_graph=False).describe()["cuda_graph"] is False


def test_int8_needs_qdq() -> None:
    with pytest.raises(BackendError, match="explicitly quantized"):
        plumbing(mlp(), "int8")
    data, w, b = qdq_linear()
    x = np.random.default_rng(4).uniform(-1, 1, (6, 4)).astype(np.float32)
    out = plumbing(data, "int8").infer({"x": x})["y"]
    np.testing.assert_allclose(out, x @ w + b, atol=0.1)


def test_dynamic_non_batch_model_loads_on_the_plain_path() -> None:
    b = plumbing(dynamic_seq_model())
    x = np.ones((2, 5, 4), np.float32)
    np.testing.assert_allclose(b.infer({"x": x})["y"], np.full((2, 4), 5.0))
