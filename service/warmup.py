"""What a variant is warmed up on, and what came of it.

Warm-up runs one inference before a variant serves, so the first request does not pay for lazy
initialisation. Made-up inputs (zeros) are not enough for models whose inputs are shapes or sizes (an
``Expand`` to an input shape, ``Split`` sizes, ``Range`` limits, a ``Reshape`` target): ONNX Runtime runs them
on real values and refuses zeros. So each input takes, in this order: the version's ``config.warmup`` data
(the way Triton's ``model_warmup`` gives samples), the first sample of the version's calibration .npz, or
made-up values. Only made-up values can be wrong for a runnable model, so a warm-up that fails on them is
not a refusal (``WarmupReport.warmed`` is False and the first request warms the variant); a warm-up that
ran past its deadline always is.
"""

from __future__ import annotations

import io
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from backends import TensorSpec
from backends.base import concrete_shape
from backends.datatypes import empty_tensor, numpy_dtype
from service.model_config import WarmupConfig, WarmupInput

#: where an input's warm-up value came from; the first two are the user's real samples
SAMPLE_SOURCES = ("config", "calibration")


class WarmupConfigError(ValueError):
    """``config.warmup`` does not fit the model's inputs (the upload answers 422 with this message)."""


@dataclass(frozen=True)
class WarmupPlan:
    feeds: dict[str, np.ndarray]
    #: input name -> "config", "calibration", "zero" or "random"
    sources: dict[str, str]

    @property
    def all_samples(self) -> bool:
        """Every input is a real sample: a failure is the model's (or the samples'), not the warm-up's."""
        return all(s in SAMPLE_SOURCES for s in self.sources.values())

    def describe(self) -> str:
        by: dict[str, list[str]] = {}
        for name, source in self.sources.items():
            by.setdefault(source, []).append(name)
        return ", ".join(f"{source} for {sorted(names)}" for source, names in sorted(by.items())) or "no inputs"


@dataclass(frozen=True)
class WarmupReport:
    warmed: bool
    #: where the warm-up values came from (``WarmupPlan.describe``)
    inputs: str = ""
    #: why the variant is not warmed (a failure on made-up inputs): the first request warms it instead
    reason: str | None = None


def plan_warmup(
    inputs: list[TensorSpec], config: WarmupConfig, calibration: dict[str, np.ndarray] | None = None
) -> WarmupPlan:
    """The feeds for one warm-up inference. Raises WarmupConfigError when ``config`` does not fit ``inputs``."""
    specs = {t.name: t for t in inputs}
    unknown = sorted(set(config.inputs) - set(specs))
    if unknown:
        raise WarmupConfigError(f"warmup.inputs names {unknown}; the model's inputs are {sorted(specs)}")
    feeds: dict[str, np.ndarray] = {}
    sources: dict[str, str] = {}
    rng = np.random.default_rng(0)
    for spec in inputs:
        given = config.inputs.get(spec.name)
        sample = (calibration or {}).get(spec.name)
        if given is not None and given.data is not None:
            feeds[spec.name], sources[spec.name] = _explicit(spec, given), "config"
        elif given is None and sample is not None and _fits(spec, sample.shape):
            feeds[spec.name], sources[spec.name] = sample.astype(numpy_dtype(spec.datatype), copy=False), "calibration"
        else:
            fill = given.fill if given is not None else "zero"
            shape = _made_up_shape(spec, given)
            feeds[spec.name], sources[spec.name] = _made_up(spec, shape, fill, rng), fill
    return WarmupPlan(feeds, sources)


def _explicit(spec: TensorSpec, given: WarmupInput) -> np.ndarray:
    try:
        arr = np.asarray(given.data)
    except ValueError as e:  # ragged nesting
        raise WarmupConfigError(f"warmup.inputs.{spec.name}.data is not a regular array: {e}") from None
    if arr.dtype.kind not in "biuf":
        raise WarmupConfigError(f"warmup.inputs.{spec.name}.data must hold numbers or booleans only")
    want = numpy_dtype(spec.datatype)
    if not np.can_cast(arr.dtype, want, casting="same_kind"):
        raise WarmupConfigError(f"warmup.inputs.{spec.name}.data holds {arr.dtype}, the input is {spec.datatype}")
    if given.shape is not None:
        if math.prod(given.shape) != arr.size:
            raise WarmupConfigError(f"warmup.inputs.{spec.name}: {arr.size} values do not fill the shape {given.shape}")
        arr = arr.reshape(given.shape)
    if arr.dtype.kind in "iu" and want.kind in "iu":
        info = np.iinfo(want)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise WarmupConfigError(f"warmup.inputs.{spec.name}.data holds values out of {spec.datatype}'s range")
    if not _fits(spec, arr.shape):
        raise WarmupConfigError(
            f"warmup.inputs.{spec.name} has shape {list(arr.shape)}; the input is {list(spec.shape)} (-1: any)"
        )
    return arr.astype(want)


def _made_up_shape(spec: TensorSpec, given: WarmupInput | None) -> tuple[int, ...]:
    if given is None or given.shape is None:
        return concrete_shape(spec.shape)
    if not _fits(spec, tuple(given.shape)):
        raise WarmupConfigError(
            f"warmup.inputs.{spec.name}.shape {given.shape} does not fit the input's {list(spec.shape)} (-1: any)"
        )
    return tuple(given.shape)


def _made_up(spec: TensorSpec, shape: tuple[int, ...], fill: str, rng: np.random.Generator) -> np.ndarray:
    dtype = numpy_dtype(spec.datatype)
    if fill == "zero" or dtype.kind == "O":  # BYTES: empty strings
        return empty_tensor(spec.datatype, shape)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.kind in "iu":
        return rng.integers(0, 16, shape).astype(dtype)
    return rng.random(shape).astype(dtype)


def _fits(spec: TensorSpec, shape: tuple[int, ...]) -> bool:
    return len(shape) == len(spec.shape) and all(d < 0 or d == s for d, s in zip(spec.shape, shape, strict=True))


# -- the first calibration sample ------------------------------------------------------------------------------


def first_calibration_sample(npz: bytes | Path, inputs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """One request's worth of each input from a calibration .npz (samples on axis 0): ``arr[:k]`` with k the
    input's fixed batch dimension, or 1 where it is dynamic.

    Only that prefix of each member is inflated (the .npz may hold a gigabyte): numpy reads whole members, so
    the .npy header is parsed here and the first rows are read from the member's stream. Arrays that do not
    fit an input are left out (that input then warms up on made-up values). The archive was checked at upload.
    """
    out: dict[str, np.ndarray] = {}
    source: BinaryIO | Path = io.BytesIO(npz) if isinstance(npz, bytes) else npz
    with zipfile.ZipFile(source) as z:
        members = set(z.namelist())
        for spec in inputs:
            member = f"{spec.name}.npy" if f"{spec.name}.npy" in members else spec.name
            if member not in members:
                continue
            with z.open(member) as f:
                arr = _read_prefix(f, spec)
            if arr is not None:
                out[spec.name] = arr
    return out


def _read_prefix(f: BinaryIO, spec: TensorSpec) -> np.ndarray | None:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        return None
    if dtype.hasobject or not shape:
        return None
    rows = spec.shape[0] if spec.shape and spec.shape[0] > 0 else 1
    if shape[0] < rows:
        return None
    if fortran:  # rows are not contiguous: read the whole member (bounded by the upload's calibration cap)
        whole = np.frombuffer(f.read(), dtype=dtype, count=math.prod(shape)).reshape(shape, order="F")
        arr = np.ascontiguousarray(whole[:rows])
    else:
        count = rows * math.prod(shape[1:])
        arr = np.frombuffer(f.read(count * dtype.itemsize), dtype=dtype, count=count).reshape((rows, *shape[1:]))
    return arr if _fits(spec, arr.shape) else None
