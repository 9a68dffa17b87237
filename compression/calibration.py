"""Calibration data: the one parse and the one check of samples against a model's inputs.

The upload route, the compress route and every compression stage (prune's activation capture, quantize's
calibration and scoring, evaluate, latency) go through ``parse_npz`` / ``check_samples``, so data that passes
the upload runs in every stage, and data that no stage could use is refused at the door, with the rule it
breaks. The rules:

* an ``.npz`` (``numpy.savez``) of arrays named after the model's inputs, plus an optional ``labels`` array;
  no pickles; at most ``MAX_ARRAYS`` arrays and ``MAX_BYTES`` once decompressed, read from the ``.npy``
  headers before anything is inflated (a few MiB of deflated zeros can claim gigabytes);
* each array has its input's rank with the samples on axis 0; every other static dimension matches;
* element types cast to the input's within their kind (ints to floats, float64 to float32; never floats to
  ints), and float values are finite once cast (``1e39`` is not an FP32);
* ``labels``: one integer class id per sample (it is an input like the others when the model has an input
  named ``labels``);
* every array has the same number of samples, at least one;
* a model whose first (batch) dimension is fixed, say ``[1, 3, 224, 224]``, is fed ``b`` samples at a time:
  the sample count must be a multiple of ``b`` (always true for ``b = 1``).
"""

from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

import numpy as np
import onnx

from backends import TensorSpec
from backends.datatypes import V2_TO_NUMPY
from backends.onnx_model import model_interface

MAX_ARRAYS = 64
MAX_BYTES = 1 << 30  # all arrays together, decompressed
LABELS = "labels"


class CalibrationError(ValueError):
    """The calibration data does not fit the model; the message names the rule. The service answers 400."""


@dataclass(frozen=True)
class Samples:
    """Arrays named after the model's inputs, samples on axis 0, cast to the inputs' element types."""

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None = None  # class ids, one per sample
    batch: int | None = None  # the model's fixed batch size; None when the batch dimension is free

    @property
    def count(self) -> int:
        return len(next(iter(self.arrays.values())))

    def batches(self, size: int) -> Iterator[dict[str, np.ndarray]]:
        """Consecutive feeds of ``size`` samples (the model's fixed batch size instead, when it has one)."""
        step = self.batch or max(1, size)
        for start in range(0, self.count, step):
            yield {k: v[start : start + step] for k, v in self.arrays.items()}

    def take(self, index: np.ndarray) -> Samples:
        labels = None if self.labels is None else self.labels[index]
        return replace(self, arrays={k: v[index] for k, v in self.arrays.items()}, labels=labels)

    def split(self, holdout_fraction: float, seed: int = 0) -> tuple[Samples, Samples]:
        """(calibration, held-out): a seeded random split, both parts whole batches of the model's batch size."""
        _, n_eval = holdout_sizes(self.count, self.batch, holdout_fraction)
        order = np.random.default_rng(seed).permutation(self.count)
        return self.take(order[n_eval:]), self.take(order[:n_eval])


def holdout_sizes(count: int, batch: int | None, holdout_fraction: float) -> tuple[int, int]:
    """(calibration samples, held-out samples) for ``count`` samples: both non-empty, whole batches."""
    if not 0.0 < holdout_fraction < 1.0:
        raise CalibrationError(f"the held-out fraction must be between 0 and 1, got {holdout_fraction}")
    b = batch or 1
    if count % b:
        raise CalibrationError(
            f"the model takes batches of exactly {b} (its first dimension is fixed), so the number of calibration "
            f"samples must be a multiple of {b}; got {count}"
        )
    groups = count // b
    if groups < 2:
        need = f"2 batches of {b} (the model's fixed batch size)" if b > 1 else "2 samples"
        raise CalibrationError(
            f"calibration data needs at least {need}: some are held out to measure accuracy; it has {count}"
        )
    held = min(groups - 1, max(1, round(groups * holdout_fraction)))
    return (groups - held) * b, held * b


def fixed_batch(inputs: list[TensorSpec]) -> int | None:
    """The batch size the model insists on (a fixed first dimension), or None when it is free."""
    fixed = {t.name: t.shape[0] for t in inputs if t.shape and t.shape[0] > 0}
    if len(set(fixed.values())) > 1:
        raise CalibrationError(
            f"the model's inputs fix different first (batch) dimensions {fixed}: samples on axis 0 cannot feed them"
        )
    return next(iter(fixed.values()), None)


def model_inputs(model: onnx.ModelProto) -> list[TensorSpec]:
    """The inputs a caller feeds (graph inputs that no initializer provides)."""
    return model_interface(model)[0]


def check_samples(
    arrays: Mapping[str, np.ndarray],
    inputs: list[TensorSpec],
    labels: np.ndarray | None = None,
    what: str = "calibration",
) -> Samples:
    """Check arrays against the model's inputs (the rules in the module docstring) and cast them to its types."""
    if not isinstance(arrays, Mapping) or not arrays:
        raise CalibrationError(f"{what} data is empty: give arrays named after the model's inputs, samples on axis 0")
    specs = {t.name: t for t in inputs}
    missing = sorted(set(specs) - set(arrays))
    unknown = sorted(set(arrays) - set(specs))
    if missing or unknown:
        raise CalibrationError(
            f"{what} arrays must be named after the model's inputs {sorted(specs)}; missing: {missing}, "
            f"unknown: {unknown}"
        )
    batch = fixed_batch(inputs)
    out = {t.name: _checked(t, np.asarray(arrays[t.name]), what) for t in inputs}
    counts = {name: len(a) for name, a in out.items()}
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise CalibrationError(f"{what} `labels` must be a 1-D integer array (one class id per sample)")
        counts[LABELS] = len(labels)
    if len(set(counts.values())) != 1:
        raise CalibrationError(f"{what} arrays must have the same number of samples on axis 0, got {counts}")
    n = next(iter(counts.values()))
    if n < 1:
        raise CalibrationError(f"{what} data has no samples")
    if batch is not None and n % batch:
        raise CalibrationError(
            f"the model takes batches of exactly {batch} (its first dimension is fixed), so the number of {what} "
            f"samples must be a multiple of {batch}; got {n}"
        )
    return Samples(out, labels, batch)


def _checked(spec: TensorSpec, arr: np.ndarray, what: str) -> np.ndarray:
    want = V2_TO_NUMPY.get(spec.datatype)
    if want is None:
        raise CalibrationError(f"input {spec.name!r} is {spec.datatype}: {what} data can only feed numeric inputs")
    if not spec.shape:
        raise CalibrationError(f"input {spec.name!r} is a scalar: {what} samples need a first axis to stack on")
    if arr.ndim != len(spec.shape):
        raise CalibrationError(
            f"{what} array {spec.name!r} has shape {list(arr.shape)}; the input has rank {len(spec.shape)} "
            f"({list(spec.shape)}), so the arrays need that rank with the samples on the first axis"
        )
    for got, expected in zip(arr.shape[1:], spec.shape[1:], strict=True):
        if expected >= 0 and got != expected:
            raise CalibrationError(
                f"{what} array {spec.name!r} has shape {list(arr.shape)}, the input is {list(spec.shape)}"
            )
    if arr.dtype.kind not in "biuf" or not np.can_cast(arr.dtype, want, casting="same_kind"):
        raise CalibrationError(f"{what} array {spec.name!r} is {arr.dtype}, which does not cast to {spec.datatype}")
    if arr.dtype != want:
        with np.errstate(over="ignore", invalid="ignore"):
            arr = arr.astype(want)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise CalibrationError(
            f"{what} array {spec.name!r} holds NaN or infinite values (or values out of {spec.datatype}'s range)"
        )
    return arr


def parse_npz(data: bytes, inputs: list[TensorSpec], what: str = "calibration") -> Samples:
    """Parse an .npz and check it against the model's inputs (see the module docstring)."""
    try:
        npz = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise CalibrationError(f"{what} is not a readable .npz file: {e}") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise CalibrationError(f"{what} must be an .npz archive (numpy.savez), not a single .npy array")
    with npz:
        if len(npz.files) > MAX_ARRAYS:
            raise CalibrationError(f"{what} holds {len(npz.files)} arrays, over the limit of {MAX_ARRAYS}")
        total = 0
        for name in npz.files:
            shape, dtype = _npy_header(npz, name, what)
            total += math.prod(shape) * dtype.itemsize
        if total > MAX_BYTES:
            raise CalibrationError(f"{what} arrays hold {total} bytes once decompressed, over the limit of {MAX_BYTES}")
        arrays: dict[str, np.ndarray] = {}
        for name in npz.files:
            try:
                arrays[name] = npz[name]
            except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
                raise CalibrationError(f"{what} array {name!r} cannot be read: {e}") from None
    input_names = {t.name for t in inputs}
    labels = arrays.pop(LABELS) if LABELS in arrays and LABELS not in input_names else None
    return check_samples(arrays, inputs, labels, what)


def _npy_header(npz: np.lib.npyio.NpzFile, name: str, what: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one .npz member, from its .npy header (the data stays compressed)."""
    member = f"{name}.npy" if f"{name}.npy" in npz.zip.namelist() else name
    try:
        with npz.zip.open(member) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
    except (ValueError, OSError, KeyError, zipfile.BadZipFile, EOFError) as e:
        raise CalibrationError(f"{what} array {name!r} is not a readable .npy array: {e}") from None
    if dtype.hasobject:
        raise CalibrationError(f"{what} array {name!r} holds Python objects (pickles), which are not accepted")
    return tuple(shape), dtype


def check_feeds(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray] | Samples, what: str = "calibration"
) -> Samples:
    """``check_samples`` against a parsed model's inputs: what every stage runs on the data it is given."""
    if isinstance(feeds, Samples):
        return check_samples(feeds.arrays, model_inputs(model), feeds.labels, what)
    return check_samples(feeds, model_inputs(model), None, what)
