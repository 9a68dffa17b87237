"""Static checks and introspection of ONNX models, before any runtime sees them.

Uploaded bytes are hostile until proven otherwise: they are parsed, checked with ``onnx.checker``,
and refused if they reference external data (a path outside the upload is how CVE-class bugs in
older ONNX Runtime releases read arbitrary files) or use operator domains no backend here runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from google.protobuf.message import DecodeError
from onnx import ModelProto, TensorProto
from onnx.external_data_helper import _get_all_tensors

from backends.base import TensorSpec
from backends.datatypes import ONNX_TO_V2

# Operator domains ONNX Runtime's CPU and GPU builds implement.
KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training"})
MAX_DECLARED_ELEMENTS = 1 << 31  # a static dimension product above this is refused as absurd


class InvalidModel(ValueError):
    """The bytes are not a model slimserve will load; the message says why."""


@dataclass(frozen=True)
class ModelInfo:
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opsets: dict[str, int]
    producer: str
    num_nodes: int
    num_parameters: int

    @property
    def batchable(self) -> bool:
        """True when every input and output has a dynamic (or symbolic) first dimension."""
        return all(t.shape and t.shape[0] == -1 for t in [*self.inputs, *self.outputs])


def parse_model(data: bytes) -> ModelProto:
    if not data:
        raise InvalidModel("the model file is empty")
    model = ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise InvalidModel(f"not an ONNX model: the protobuf does not parse ({e})") from None
    if not model.HasField("graph"):
        raise InvalidModel("not an ONNX model: it has no graph")
    return model


def _value_specs(values: list[onnx.ValueInfoProto], what: str) -> list[TensorSpec]:
    specs = []
    for vi in values:
        if not vi.type.HasField("tensor_type"):
            raise InvalidModel(f"{what} {vi.name!r} is not a tensor (sequences and maps are not served)")
        tt = vi.type.tensor_type
        dt = ONNX_TO_V2.get(tt.elem_type)
        if dt is None:
            raise InvalidModel(f"{what} {vi.name!r} has an unsupported element type {tt.elem_type}")
        shape: list[int] = []
        if tt.HasField("shape"):
            for d in tt.shape.dim:
                if d.HasField("dim_value"):
                    if d.dim_value < 0:
                        raise InvalidModel(f"{what} {vi.name!r} has a negative dimension")
                    shape.append(int(d.dim_value))
                else:
                    shape.append(-1)
        else:
            raise InvalidModel(f"{what} {vi.name!r} has no declared shape (its rank is needed)")
        static = 1
        for d in shape:
            static *= max(d, 1)
        if static > MAX_DECLARED_ELEMENTS:
            raise InvalidModel(f"{what} {vi.name!r} declares {static} elements, over the limit")
        specs.append(TensorSpec(vi.name, dt, tuple(shape)))
    return specs


def inspect_model(model: ModelProto) -> ModelInfo:
    """Validate a parsed model and describe its interface. Raises InvalidModel with a reason."""
    for t in _get_all_tensors(model):
        if t.data_location == TensorProto.EXTERNAL or t.external_data:
            raise InvalidModel(
                f"tensor {t.name!r} refers to external data; upload a self-contained model "
                "(onnx.save_model(model, path, save_as_external_data=False))"
            )
    opsets = {o.domain or "": o.version for o in model.opset_import}
    unknown = sorted(d for d in opsets if d not in KNOWN_DOMAINS)
    if unknown:
        raise InvalidModel(f"the model uses operator domains no backend implements: {unknown}")
    if "" not in opsets and "ai.onnx" not in opsets:
        raise InvalidModel("the model imports no default ONNX opset")
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, Exception) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidModel(f"onnx.checker rejected the model: {msg[:500]}") from None
    g = model.graph
    if not g.node:
        raise InvalidModel("the graph has no nodes")
    init_names = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in init_names]
    if not g.output:
        raise InvalidModel("the graph has no outputs")
    nparams = 0
    for init in g.initializer:
        n = 1
        for d in init.dims:
            n *= d
        nparams += n
    return ModelInfo(
        inputs=_value_specs(list(inputs), "input"),
        outputs=_value_specs(list(g.output), "output"),
        opsets=opsets,
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        num_nodes=len(g.node),
        num_parameters=nparams,
    )


def load_and_inspect(data: bytes) -> tuple[ModelProto, ModelInfo]:
    model = parse_model(data)
    return model, inspect_model(model)
