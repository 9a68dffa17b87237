"""Model transforms and checks for the GPU precisions: FP16 conversion (FP32 I/O kept) and Q/DQ detection.

Used by the ONNX Runtime GPU backends and by native TensorRT; nothing here needs a GPU.
"""

from __future__ import annotations

from onnx import ModelProto, TensorProto

from backends.base import BackendError

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


def to_fp16(model: ModelProto, op_block_list: list[str] | None = None) -> ModelProto:
    """An FP16 copy of ``model`` whose inputs and outputs stay FP32 (what clients send and expect).

    Uses ``onnxruntime.transformers.float16.convert_float_to_float16``: it ships inside every onnxruntime and
    onnxruntime-gpu wheel (no extra dependency), is maintained by the ONNX Runtime team as a fork of
    onnxconverter-common's converter with fixes (mixed-type Resize/GroupNorm inputs, fp32-only initializers
    kept where a blocked op needs them), and with ``keep_io_types=True`` inserts Cast nodes at the graph
    boundary. Ops in its default block list (TopK, NonMaxSuppression, Range, CumSum, ...) stay FP32. Values
    outside FP16's range are clamped to +-65504. Note: importing it appends the onnxruntime/transformers
    folder to sys.path (a side effect of that package's __init__).
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    copy = ModelProto()
    copy.CopyFrom(model)
    out = convert_float_to_float16(copy, keep_io_types=True, op_block_list=op_block_list)
    _toposort(out)  # the converter appends its input Casts last; onnx.checker requires topological order
    return out


def _toposort(model: ModelProto) -> None:
    """Reorder the main graph's nodes topologically (stable: keeps the given order where it is free)."""
    g = model.graph
    produced = {o: i for i, n in enumerate(g.node) for o in n.output if o}
    deps = [{produced[x] for x in n.input if x in produced and produced[x] != i} for i, n in enumerate(g.node)]
    users: dict[int, list[int]] = {i: [] for i in range(len(g.node))}
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    waiting = [len(d) for d in deps]
    ready = sorted(i for i, w in enumerate(waiting) if w == 0)
    order: list[int] = []
    while ready:
        i = ready.pop(0)
        order.append(i)
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                ready.append(u)
                ready.sort()
    if len(order) != len(g.node):
        raise BackendError("the fp16 graph has a cycle and cannot be ordered")
    nodes = [g.node[i] for i in order]
    copies = [type(n)() for n in nodes]
    for c, n in zip(copies, nodes, strict=True):
        c.CopyFrom(n)
    del g.node[:]
    g.node.extend(copies)


def is_fp16_model(model: ModelProto) -> bool:
    """True when the weights are already FP16 (no FP32 initializers, at least one FP16 one)."""
    types = {init.data_type for init in model.graph.initializer}
    return TensorProto.FLOAT16 in types and TensorProto.FLOAT not in types


def has_qdq(model: ModelProto) -> bool:
    """True for explicitly quantized (QuantizeLinear/DequantizeLinear) models: what TensorRT's int8 needs."""
    return any(n.op_type in QDQ_OPS for n in model.graph.node)
