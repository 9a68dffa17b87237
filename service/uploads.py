"""Checking an upload completely before anything is written: ONNX structure, runtime load, calibration."""

from __future__ import annotations

from dataclasses import dataclass

from backends import BackendError
from backends.engines import GPU_BUILDERS
from backends.onnx_model import InvalidModel, ModelInfo, load_and_inspect
from compression.calibration import CalibrationError, Samples, parse_npz
from service.errors import BadRequest, Unprocessable
from service.loaded import LoadedVariants
from service.model_config import ModelConfig
from service.variant_build import LoadedInstances
from service.warmup import WarmupConfigError


@dataclass
class PreparedUpload:
    info: ModelInfo
    loaded: LoadedInstances
    calibration: Samples | None  # the checked calibration samples, when the upload has them

    @property
    def calibration_samples(self) -> int | None:
        return None if self.calibration is None else self.calibration.count


def prepare_upload(
    loaded: LoadedVariants, model_bytes: bytes, config: ModelConfig, calibration: bytes | None
) -> PreparedUpload:
    """Blocking: parse, check, load on the runtime and warm up. Raises BadRequest saying what is wrong."""
    try:
        _, info = load_and_inspect(model_bytes)
    except InvalidModel as e:
        raise BadRequest(str(e)) from None
    try:
        samples = parse_npz(calibration, info.inputs) if calibration is not None else None
    except CalibrationError as e:
        raise BadRequest(str(e)) from None
    # A backend that serves prebuilt engines (onnxruntime-tensorrt, tensorrt) would build one to load the model: a
    # request never builds. The model is checked on ONNX Runtime CPU instead (it loads, and warms up on its samples),
    # and the replicas load it through their sync, once its engine is built by a job.
    engine_built = config.backend in GPU_BUILDERS
    check = config.model_copy(update={"backend": "onnxruntime-cpu", "instances": 1}) if engine_built else config
    try:
        instances = loaded.builder.build_instances(model_bytes, check, calibration, strict=True)
    except WarmupConfigError as e:
        raise Unprocessable(f"config: {e}") from None
    except BackendError as e:
        raise BadRequest(f"the model does not load or run: {e}") from None
    except (MemoryError, ValueError) as e:
        raise BadRequest(f"the model does not load or run: {type(e).__name__}: {e}") from None
    if engine_built:
        instances.unload()
        instances = LoadedInstances([], instances.seconds, instances.warmup)
    return PreparedUpload(info, instances, samples)
