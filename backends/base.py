"""The backend interface: numpy in, numpy out. Backends know nothing of HTTP or the catalogue."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # KServe v2 name: FP32, INT64, ...
    shape: tuple[int, ...]  # -1 marks a dynamic dimension

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        """The inverse of ``to_dict``."""
        return cls(d["name"], d["datatype"], tuple(d["shape"]))


class BackendError(RuntimeError):
    """The runtime failed to load or run a model."""


class BackendUnavailable(BackendError):
    """The runtime (or the device it needs) is not present on this machine."""


class InvalidInput(BackendError):
    """The runtime refused the inputs (shape, type or values): the caller's fault, not the server's."""


class WarmupTimeout(BackendError):
    """The warm-up inference ran past its deadline: an endless loop or a compute bomb, never served."""


def is_batchable(inputs: list[TensorSpec], outputs: list[TensorSpec]) -> bool:
    """True when every input and output has a dynamic first dimension: requests can be merged along it."""
    return all(t.shape and t.shape[0] == -1 for t in [*inputs, *outputs])


@dataclass
class BackendOptions:
    intra_op_threads: int = 0  # 0: the runtime's default
    inter_op_threads: int = 1
    #: ONNX Runtime's session.intra_op.allow_spinning (idle threads spin for work); None: the runtime's default
    allow_spinning: bool | None = None
    precision: str = "fp32"
    extra: dict[str, Any] = field(default_factory=dict)


class Backend(ABC):
    """A loaded model on one runtime and device. ``infer`` may be called from several threads."""

    #: stable label used in metrics and metadata, e.g. "onnxruntime-cpu"
    name: str = "abstract"
    #: one inference's work is bounded by its inputs' shapes, and it runs on the host in microseconds when the
    #: model is small: a scheduler may run a cheap request on its caller's thread (service/scheduler.py, "Inline
    #: runs"). False unless a backend knows it (onnx_model.compute_bounded_by_shapes on the CPU)
    inline_safe: bool = False
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @abstractmethod
    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run the model. ``outputs`` limits which outputs are computed and returned."""

    def warmup(self, feeds: dict[str, np.ndarray] | None = None) -> None:
        """Run one inference so first requests don't pay for lazy initialisation: on ``feeds`` when the caller
        has real samples, else on zeros (``zero_feeds``)."""
        self.infer(feeds if feeds is not None else self.zero_feeds())

    def zero_feeds(self, batch_size: int = 1) -> dict[str, np.ndarray]:
        """Zeros for every input, dynamic dimensions set to ``batch_size`` (the first) and 1 (the others)."""
        from backends.datatypes import empty_tensor

        return {t.name: empty_tensor(t.datatype, concrete_shape(t.shape, batch_size)) for t in self.inputs}

    def unload(self) -> None:  # noqa: B027 - optional hook
        """Free the runtime's resources."""

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name}


def concrete_shape(shape: tuple[int, ...], batch: int = 1) -> tuple[int, ...]:
    return tuple((batch if i == 0 else 1) if d < 0 else d for i, d in enumerate(shape))
