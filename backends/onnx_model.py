"""Static checks and introspection of ONNX models, before any runtime sees them.

Uploaded bytes are hostile until proven otherwise: they are parsed, checked with ``onnx.checker``,
and refused if they reference external data (a path outside the upload is how CVE-class bugs in
older ONNX Runtime releases read arbitrary files) or use operator domains no backend here runs.

Graphs that would exhaust the server when it loads or warms them up are refused too: too many nodes (a
"protobuf bomb" of millions of tiny nodes parses in a second but takes gigabytes and tens of seconds in
the checker and the runtime), tensors whose size is known before running and is absurd (ConstantOfShape,
Expand, Tile, Range, Resize or Reshape with constant shapes, found by ONNX shape inference with data
propagation, dynamic dimensions set to 1 as in the warm-up), and Loops that only an enormous trip count
stops. Sizes that depend on input *values* cannot be known statically; they need a runtime memory cap.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import onnx.inliner
import onnx.shape_inference
from google.protobuf.message import DecodeError
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, helper, numpy_helper

from backends.base import TensorSpec
from backends.datatypes import ONNX_TO_V2

# Operator domains ONNX Runtime's CPU and GPU builds implement.
KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training"})
MAX_DECLARED_ELEMENTS = 1 << 31  # a static dimension product above this is refused as absurd
MAX_NODES = 1 << 18  # nodes in the graph, its subgraphs and model-local functions together
MAX_TENSOR_BYTES = 1 << 30  # any tensor whose size is known before running (dynamic dimensions = 1)
MAX_LOOP_ITERATIONS = 1 << 20  # a Loop that nothing but its trip count stops
_SKELETON_INITIALIZER_BYTES = 1 << 16  # larger initializers keep only name, type and dims for inference


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


# Where NodeProto messages sit, as (message kind, field number) -> kind of the embedded message.
_WIRE_CHILDREN = {
    ("model", ModelProto.DESCRIPTOR.fields_by_name["graph"].number): "graph",
    ("model", ModelProto.DESCRIPTOR.fields_by_name["functions"].number): "function",
    ("graph", GraphProto.DESCRIPTOR.fields_by_name["node"].number): "node",
    ("function", onnx.FunctionProto.DESCRIPTOR.fields_by_name["node"].number): "node",
    ("node", NodeProto.DESCRIPTOR.fields_by_name["attribute"].number): "attribute",
    ("attribute", onnx.AttributeProto.DESCRIPTOR.fields_by_name["g"].number): "graph",
    ("attribute", onnx.AttributeProto.DESCRIPTOR.fields_by_name["graphs"].number): "graph",
}


def _count_nodes_on_the_wire(data: bytes, limit: int) -> int | None:
    """Count the nodes of the graph, its subgraphs and functions from the protobuf wire format, without
    parsing, and stop once past ``limit``. Parsed protobuf takes ~15x the bytes in memory, so a "protobuf
    bomb" of millions of tiny nodes must be refused before it is parsed. Returns None for bytes that
    are not well-formed protobuf (the parser then says what is wrong)."""
    mv = memoryview(data)
    count = 0
    stack = [(0, len(data), "model")]
    while stack:
        pos, end, kind = stack.pop()
        while pos < end:
            key, pos = _varint(mv, pos, end)
            if key is None:
                return None
            wire = key & 7
            if wire == 0:
                value, pos = _varint(mv, pos, end)
                if value is None:
                    return None
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            elif wire == 2:
                length, pos = _varint(mv, pos, end)
                if length is None or pos + length > end:
                    return None
                child = _WIRE_CHILDREN.get((kind, key >> 3))
                if child == "node":
                    count += 1
                    if count > limit:
                        return count
                if child is not None:
                    stack.append((pos, pos + length, child))
                pos += length
            else:
                return None  # groups (deprecated) or garbage
        if pos != end:
            return None
    return count


def _varint(mv: memoryview, pos: int, end: int) -> tuple[int | None, int]:
    value = shift = 0
    while pos < end and shift < 64:
        b = mv[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
    return None, pos


def parse_model(data: bytes) -> ModelProto:
    if not data:
        raise InvalidModel("the model file is empty")
    counted = _count_nodes_on_the_wire(data, MAX_NODES)
    if counted is not None and counted > MAX_NODES:
        raise InvalidModel(f"the model has more than {MAX_NODES} nodes (subgraphs and functions included), the limit")
    model = ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        if "MaxDepth" in str(e):
            raise InvalidModel(
                "the model nests subgraphs deeper than the protobuf parser allows (100 nested messages)"
            ) from None
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


def _subgraphs(node: NodeProto) -> Iterator[GraphProto]:
    for a in node.attribute:
        if a.HasField("g"):
            yield a.g
        yield from a.graphs


def _all_graphs(model: ModelProto) -> Iterator[GraphProto]:
    """The main graph and every subgraph (If, Loop, Scan bodies), model-local functions' included."""
    stack = [model.graph]
    for f in model.functions:
        for n in f.node:
            stack.extend(_subgraphs(n))
    while stack:
        g = stack.pop()
        yield g
        for n in g.node:
            stack.extend(_subgraphs(n))


def _all_nodes(model: ModelProto) -> Iterator[NodeProto]:
    for f in model.functions:
        yield from f.node
    for g in _all_graphs(model):
        yield from g.node


def _all_tensors(model: ModelProto) -> Iterator[tuple[TensorProto, list[int] | None]]:
    """Every tensor stored in the model, with the dense shape when it is a sparse tensor's values.

    Wider than ``onnx.external_data_helper``: sparse initializers and sparse attributes carry external
    data too, and ONNX Runtime loads it (relative to its working directory for a model given as bytes).
    """
    for g in _all_graphs(model):
        yield from ((t, None) for t in g.initializer)
        for sp in g.sparse_initializer:
            yield sp.values, list(sp.dims)
            yield sp.indices, None
    for n in _all_nodes(model):
        for a in n.attribute:
            if a.HasField("t"):
                yield a.t, None
            yield from ((t, None) for t in a.tensors)
            sparse = [a.sparse_tensor] if a.HasField("sparse_tensor") else []
            for sp in [*sparse, *a.sparse_tensors]:
                yield sp.values, list(sp.dims)
                yield sp.indices, None


def _itemsize(elem_type: int) -> int:
    try:
        return int(helper.tensor_dtype_to_np_dtype(elem_type).itemsize) or 1
    except (KeyError, TypeError, ValueError):
        return 4


def _nbytes(dims: list[int], elem_type: int) -> int:
    n = 1
    for d in dims:
        n *= max(int(d), 1)
    return n * _itemsize(elem_type)


def _check_stored_tensors(model: ModelProto) -> None:
    for t, dense in _all_tensors(model):
        if t.data_location == TensorProto.EXTERNAL or t.external_data:
            raise InvalidModel(
                f"tensor {t.name!r} refers to external data; upload a self-contained model "
                "(onnx.save_model(model, path, save_as_external_data=False))"
            )
        if dense is not None and _nbytes(dense, t.data_type) > MAX_TENSOR_BYTES:
            raise InvalidModel(
                f"sparse tensor {t.name!r} has a dense shape {dense} of {_nbytes(dense, t.data_type)} bytes, "
                f"over the limit of {MAX_TENSOR_BYTES} bytes per tensor"
            )


def _skeleton(model: ModelProto) -> ModelProto:
    """A copy for shape inference: big initializers keep only their type and dims, dynamic input
    dimensions become 1 (what the warm-up feeds), model-local functions are inlined."""
    light = ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    src, g = model.graph, light.graph
    g.name = src.name
    g.node.extend(src.node)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    g.sparse_initializer.extend(src.sparse_initializer)
    for t in src.initializer:
        if t.ByteSize() <= _SKELETON_INITIALIZER_BYTES:
            g.initializer.append(t)
        else:
            stub = g.initializer.add()
            stub.name, stub.data_type = t.name, t.data_type
            stub.dims.extend(t.dims)
    for vi in src.input:
        new = g.input.add()
        new.CopyFrom(vi)
        if new.type.HasField("tensor_type"):
            for d in new.type.tensor_type.shape.dim:
                if not d.HasField("dim_value"):
                    d.dim_value = 1
    if light.functions:
        light = onnx.inliner.inline_local_functions(light)
    return light


def _constants(model: ModelProto) -> dict[str, TensorProto]:
    out: dict[str, TensorProto] = {}
    for g in _all_graphs(model):
        out.update((t.name, t) for t in g.initializer)
        for n in g.node:
            if n.op_type == "Constant" and n.output:
                for a in n.attribute:
                    if a.name == "value" and a.HasField("t"):
                        out[n.output[0]] = a.t
                    elif a.name == "value_int":
                        out[n.output[0]] = numpy_helper.from_array(np.array(a.i, dtype=np.int64), n.output[0])
    return out


def _scalar(t: TensorProto | None) -> int | None:
    if t is None or t.ByteSize() > 1024:
        return None
    try:
        arr = numpy_helper.to_array(t)
    except (ValueError, TypeError):
        return None
    return int(arr.reshape(-1)[0]) if arr.size == 1 else None


def _condition_is_invariant(body: GraphProto, consts: dict[str, TensorProto]) -> bool:
    """True when the body's output condition never changes: its input condition passed through, a
    constant, or a value from the enclosing scope."""
    if len(body.input) < 2 or not body.output:
        return False
    producers = {o: n for n in body.node for o in n.output}
    name = body.output[0].name
    for _ in range(len(body.node) + 1):
        node = producers.get(name)
        if node is None or node.op_type != "Identity" or not node.input:
            break
        name = node.input[0]
    body_inputs = {i.name for i in body.input}
    return name == body.input[1].name or name in consts or (name not in producers and name not in body_inputs)


def _check_loops(model: ModelProto) -> None:
    consts = _constants(model)
    for g in _all_graphs(model):
        for n in g.node:
            if n.op_type != "Loop" or n.domain not in ("", "ai.onnx"):
                continue
            trip_name = n.input[0] if n.input else ""
            cond_name = n.input[1] if len(n.input) > 1 else ""
            trips = _scalar(consts.get(trip_name)) if trip_name else None
            if trip_name and trips is None:
                continue  # the trip count is computed at run time: not decidable here
            if trips is not None and trips <= MAX_LOOP_ITERATIONS:
                continue
            if cond_name and _scalar(consts.get(cond_name)) == 0:
                continue  # never entered
            body = next((a.g for a in n.attribute if a.name == "body" and a.HasField("g")), None)
            if body is None:
                continue  # the checker refuses a Loop without a body
            if (not trip_name and not cond_name) or _condition_is_invariant(body, consts):
                runs = "forever" if trips is None else f"{trips} times"
                raise InvalidModel(
                    f"Loop node {n.name!r} would run {runs}: its condition never changes, so only the trip count "
                    f"stops it, and the limit is {MAX_LOOP_ITERATIONS} iterations"
                )


def _check_runtime_sizes(model: ModelProto) -> None:
    """Refuse tensors whose size shape inference can compute and that are absurd at warm-up (batch 1)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(
            _skeleton(model), check_type=False, strict_mode=False, data_prop=True
        )
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidModel(f"ONNX shape inference failed: {msg[:500]}") from None
    for g in _all_graphs(inferred):
        for vi in [*g.input, *g.value_info, *g.output]:
            tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
            if tt is None or not tt.HasField("shape"):
                continue
            dims = [d.dim_value if d.HasField("dim_value") else 1 for d in tt.shape.dim]
            size = _nbytes(dims, tt.elem_type)
            if size > MAX_TENSOR_BYTES:
                raise InvalidModel(
                    f"tensor {vi.name!r} would have shape {dims} ({size} bytes, counting dynamic dimensions as 1) "
                    f"when the model runs, over the limit of {MAX_TENSOR_BYTES} bytes per tensor; "
                    f"its elements: {size // _itemsize(tt.elem_type)}"
                )
    _check_loops(inferred)


#: control flow: how long it runs is decided by values (a trip count, a condition, a branch)
_VALUE_DRIVEN_OPS = frozenset({"Loop", "Scan", "If"})
#: the domains whose operators compute_bounded_by_shapes knows (the training preview ops are not analysed)
_ANALYSED_DOMAINS = KNOWN_DOMAINS - {"ai.onnx.preview.training"}
#: operators whose output size is an input's values, by the index of that input (a constant there is harmless)
_SIZE_INPUTS = {
    "Range": (0, 1, 2),
    "ConstantOfShape": (0,),
    "Expand": (1,),
    "Tile": (1,),
    "Resize": (2, 3),
    "Upsample": (1,),
    "OneHot": (1,),
    "Pad": (1,),
    "CenterCropPad": (1,),
    "HannWindow": (0,),
    "HammingWindow": (0,),
    "BlackmanWindow": (0,),
    "MelWeightMatrix": (0, 1),
    "DFT": (1,),
    "STFT": (1, 3),
    "Col2Im": (1, 2),
    "MaxUnpool": (2,),
    "AffineGrid": (1,),
    "ImageDecoder": (0,),  # the decoded image's size is in the encoded bytes
}


def compute_bounded_by_shapes(model: ModelProto) -> bool:
    """True when one inference's work is bounded by its inputs' shapes: no control flow, and no operator whose
    output size comes from a tensor computed at run time (``Range`` up to an input's value, ``Expand`` to a
    shape read from the input...). Then a request's cost can be predicted from its element count, which is what
    lets a scheduler run a cheap request on the event loop (service/scheduler.py); otherwise a request with
    small inputs could compute for seconds there. Conservative: a size computed from shapes (``Shape`` ->
    ``Expand``) counts as run-time too."""
    consts = _constants(model)
    for n in _all_nodes(model):
        if n.domain not in _ANALYSED_DOMAINS:
            return False  # a call of a model-local function, or an unknown domain: refused, conservatively
        if n.op_type in _VALUE_DRIVEN_OPS:
            return False
        for i in _SIZE_INPUTS.get(n.op_type, ()):
            if i < len(n.input) and n.input[i] and n.input[i] not in consts:
                return False
    return True


def model_interface(model: ModelProto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The model's input and output specs, without validating the rest (microseconds, not the ~100 ms of
    ``inspect_model`` on a large model). For artifacts that were validated when they entered the store."""
    g = model.graph
    init_names = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in init_names]
    return _value_specs(inputs, "input"), _value_specs(list(g.output), "output")


def inspect_model(model: ModelProto) -> ModelInfo:
    """Validate a parsed model and describe its interface. Raises InvalidModel with a reason."""
    nodes = sum(1 for _ in _all_nodes(model))
    if nodes > MAX_NODES:
        raise InvalidModel(
            f"the model has {nodes} nodes (subgraphs and functions included), over the limit of {MAX_NODES}"
        )
    _check_stored_tensors(model)
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
    if not g.output:
        raise InvalidModel("the graph has no outputs")
    inputs, outputs = model_interface(model)
    _check_runtime_sizes(model)
    nparams = 0
    for init in g.initializer:
        n = 1
        for d in init.dims:
            n *= d
        nparams += n
    return ModelInfo(
        inputs=inputs,
        outputs=outputs,
        opsets=opsets,
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        num_nodes=len(g.node),
        num_parameters=nparams,
    )


def load_and_inspect(data: bytes) -> tuple[ModelProto, ModelInfo]:
    model = parse_model(data)
    return model, inspect_model(model)
