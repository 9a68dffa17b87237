"""Checking an upload completely before anything is written: ONNX structure, runtime load, calibration."""

from __future__ import annotations

import io
import math
import zipfile
from dataclasses import dataclass

import numpy as np

from backends import BackendError, TensorSpec
from backends.datatypes import numpy_dtype
from backends.onnx_model import InvalidModel, ModelInfo, load_and_inspect
from service.errors import BadRequest, Unprocessable
from service.loaded import LoadedInstances, LoadedVariants
from service.model_config import ModelConfig
from service.warmup import WarmupConfigError

MAX_CALIBRATION_ARRAYS = 64
MAX_CALIBRATION_BYTES = 1 << 30  # all arrays together, decompressed


@dataclass
class PreparedUpload:
    info: ModelInfo
    loaded: LoadedInstances
    calibration_samples: int | None


def _npy_header(npz: np.lib.npyio.NpzFile, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one .npz member, from its .npy header (the data stays compressed)."""
    member = f"{name}.npy" if f"{name}.npy" in npz.zip.namelist() else name
    with npz.zip.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    if dtype.hasobject:
        raise ValueError("object arrays (pickles) are not accepted")
    return tuple(shape), dtype


def check_calibration(data: bytes, inputs: list[TensorSpec]) -> int:
    """Validate a calibration .npz against the model's inputs; returns the number of samples."""
    try:
        npz = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise BadRequest(f"calibration is not a readable .npz file: {e}") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise BadRequest("calibration must be an .npz archive (numpy.savez), not a single .npy array")
    with npz:
        names = [n for n in npz.files if n != "labels"]  # optional labels, for accuracy
        if len(names) > MAX_CALIBRATION_ARRAYS:
            raise BadRequest("calibration holds too many arrays")
        # Sizes from the .npy headers, before anything is inflated: a few MiB of deflated zeros can
        # claim gigabytes (a zip bomb), and a member that is not .npy at all loads as raw bytes.
        total = 0
        for name in npz.files:
            try:
                shape, dtype = _npy_header(npz, name)
            except (ValueError, OSError, KeyError, zipfile.BadZipFile, EOFError) as e:
                raise BadRequest(f"calibration array {name!r} is not a readable .npy array: {e}") from None
            total += math.prod(shape) * dtype.itemsize
        if total > MAX_CALIBRATION_BYTES:
            raise BadRequest(
                f"calibration arrays hold {total} bytes once decompressed, over the limit of {MAX_CALIBRATION_BYTES}"
            )
        specs = {t.name: t for t in inputs}
        unknown = sorted(set(names) - set(specs))
        missing = sorted(set(specs) - set(names))
        if unknown or missing:
            raise BadRequest(
                f"calibration arrays must be named after the model's inputs {sorted(specs)}; "
                f"unknown: {unknown}, missing: {missing}"
            )
        counts = set()
        for name in names:
            try:
                arr = npz[name]
            except (ValueError, OSError, zipfile.BadZipFile) as e:
                raise BadRequest(f"calibration array {name!r} cannot be read: {e}") from None
            spec = specs[name]
            if arr.ndim != len(spec.shape):
                raise BadRequest(
                    f"calibration array {name!r} has shape {list(arr.shape)}; the model input has rank "
                    f"{len(spec.shape)} ({list(spec.shape)}), samples on the first axis"
                )
            for i, (got, want) in enumerate(zip(arr.shape, spec.shape, strict=True)):
                if i > 0 and want >= 0 and got != want:
                    raise BadRequest(
                        f"calibration array {name!r} has shape {list(arr.shape)}, the input is {list(spec.shape)}"
                    )
            if not np.can_cast(arr.dtype, numpy_dtype(spec.datatype), casting="same_kind"):
                raise BadRequest(f"calibration array {name!r} is {arr.dtype}, the input is {spec.datatype}")
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise BadRequest(f"calibration array {name!r} holds NaN or infinite values")
            counts.add(arr.shape[0])
        if "labels" in npz.files:
            labels = npz["labels"]
            if labels.ndim != 1 or labels.dtype.kind not in "iu":
                raise BadRequest("calibration `labels` must be a 1-D integer array (class ids)")
            counts.add(labels.shape[0])
        if len(counts) != 1 or math.prod(counts) < 1:
            raise BadRequest(f"calibration arrays must agree on a non-zero sample count, got {sorted(counts)}")
        return counts.pop()


def prepare_upload(
    loaded: LoadedVariants, model_bytes: bytes, config: ModelConfig, calibration: bytes | None
) -> PreparedUpload:
    """Blocking: parse, check, load on the runtime and warm up. Raises BadRequest saying what is wrong."""
    try:
        _, info = load_and_inspect(model_bytes)
    except InvalidModel as e:
        raise BadRequest(str(e)) from None
    samples = check_calibration(calibration, info.inputs) if calibration is not None else None
    try:
        instances = loaded.build_instances(model_bytes, config, calibration, strict=True)
    except WarmupConfigError as e:
        raise Unprocessable(f"config: {e}") from None
    except BackendError as e:
        raise BadRequest(f"the model does not load or run: {e}") from None
    except (MemoryError, ValueError) as e:
        raise BadRequest(f"the model does not load or run: {type(e).__name__}: {e}") from None
    return PreparedUpload(info, instances, samples)
