"""Graph helpers for compression.quantize: weight ops, SmoothQuant, float consumers.

numpy + onnx only; the ONNX Runtime parts live in compression/quantize.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compression.onnx_graph import unique_name

WEIGHT_OPS = ("MatMul", "Gemm", "Conv")


# --- graph ---------------------------------------------------------------------------------------------------


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique name (the quantizer selects and excludes nodes by name)."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)


@dataclass(frozen=True)
class WeightNode:
    name: str
    op_type: str
    activation: str  # the float input that gets quantized with the weight
    weight: str  # initializer name
    smoothable: bool  # input channels of the activation map onto rows/columns of a 2-D weight


def weight_nodes(model: onnx.ModelProto) -> list[WeightNode]:
    """MatMul / Gemm / Conv whose weight is a float initializer: the ops worth running in int8.

    Activation x activation MatMuls (attention scores), Add, LayerNorm, Softmax, GELU stay float.
    """
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type not in WEIGHT_OPS or n.domain not in ("", "ai.onnx") or len(n.input) < 2:
            continue
        w = inits.get(n.input[1])
        if w is None or w.data_type != TensorProto.FLOAT or n.input[0] in inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "MatMul":
            if len(w.dims) != 2:  # a batched weight has no single output-channel axis for per-channel scales
                continue
            smoothable = True
        elif n.op_type == "Gemm":
            smoothable = not attrs.get("transA", 0)
        else:
            smoothable = False
        out.append(WeightNode(n.name, n.op_type, n.input[0], n.input[1], smoothable))
    return out


def add_outputs(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    present = {o.name for o in m.graph.output}
    for t in tensors:
        if t not in present:
            m.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    return m


def smooth(model: onnx.ModelProto, nodes: list[WeightNode], amax: dict[str, np.ndarray], alpha: float) -> int:
    """SmoothQuant (Xiao et al. 2023) in place: X W = (X diag(1/s)) (diag(s) W), s_j = max|X_j|^a / max|W_j|^(1-a).

    The per-channel outliers of X move into the rows of W, which per-channel int8 handles well. 1/s is a Mul
    inserted in front of the quantized consumers of X only, so other consumers (a residual Add) still read X.
    Returns the number of activations smoothed.
    """
    inits = {i.name: i for i in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    groups: dict[str, list[WeightNode]] = {}
    for wn in nodes:
        if wn.smoothable and wn.activation in amax:
            groups.setdefault(wn.activation, []).append(wn)
    taken = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.initializer}
    inserted: list[tuple[int, onnx.NodeProto]] = []
    order = {id(n): i for i, n in enumerate(model.graph.node)}
    done = 0
    for x, group in groups.items():
        weights, axes = [], []
        for wn in group:
            node = by_name[wn.name]
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            axes.append(1 if trans_b else 0)  # the axis of W indexed by input channel
            weights.append(numpy_helper.to_array(inits[wn.weight]))
        a = amax[x].astype(np.float64)
        if any(w.shape[ax] != a.shape[0] for w, ax in zip(weights, axes, strict=True)):
            continue
        # weights shared with another (unsmoothed) use cannot be rescaled
        users = sum(1 for n in model.graph.node for i in n.input if i in {wn.weight for wn in group})
        if users != len(group):
            continue
        wmax = np.max([np.abs(w).max(axis=1 - ax) for w, ax in zip(weights, axes, strict=True)], axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            s = a**alpha / np.maximum(wmax, 1e-12) ** (1.0 - alpha)
        s = np.where((a > 0) & (wmax > 0) & np.isfinite(s), s, 1.0)
        s = np.clip(s, 1e-5, 1e5).astype(np.float32)
        for wn, w, ax in zip(group, weights, axes, strict=True):
            scaled = w * (s[:, None] if ax == 0 else s[None, :])
            inits[wn.weight].CopyFrom(numpy_helper.from_array(scaled.astype(np.float32), wn.weight))
        scale_name = unique_name(f"{x}_smooth_inv_scale", taken)
        out_name = unique_name(f"{x}_smoothed", taken)
        model.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), scale_name))
        mul = helper.make_node("Mul", [x, scale_name], [out_name], name=unique_name(f"{x}_SmoothQuantMul", taken))
        first = min(order[id(by_name[wn.name])] for wn in group)
        for wn in group:
            node = by_name[wn.name]
            node.input[0] = out_name
        inserted.append((first, mul))
        done += 1
    for pos, mul in sorted(inserted, key=lambda t: -t[0]):
        model.graph.node.insert(pos, mul)
    return done


def float_for_unquantized_consumers(model: onnx.ModelProto, quantized: set[str]) -> int:
    """Give consumers that are not quantized ops the float tensor instead of its Q->DQ copy.

    onnxruntime's QDQ quantizer points every consumer of a quantized activation at a DequantizeLinear output
    (the shared one, or one of its own with DedicatedQDQPair), so a residual Add reading a LayerNorm output that
    also feeds quantized MatMuls adds the int8 rounding error into the residual stream. Only tensors that are the
    input of a quantized op are touched: a Conv output's Q/DQ placed for the next op (what ORT fuses into
    QLinearConv) stays. Q/DQ pairs left without consumers are removed. Returns how many inputs were rewired.
    """
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    source: dict[str, str] = {}  # DQ output -> the float tensor its Q read
    feeds_quantized: set[str] = set()
    for n in graph.node:
        q = producer.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear":
            continue
        source[n.output[0]] = q.input[0]
        if any(c.name in quantized for c in consumers.get(n.output[0], [])):
            feeds_quantized.add(q.input[0])
    changed = 0
    for n in graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") or n.name in quantized:
            continue
        for i, x in enumerate(n.input):
            if x in source and source[x] in feeds_quantized:
                n.input[i] = source[x]
                changed += 1
    if changed:
        _prune_dead_qdq(graph)
    return changed


def _prune_dead_qdq(graph: onnx.GraphProto) -> None:
    outputs = {o.name for o in graph.output}
    for op in ("DequantizeLinear", "QuantizeLinear"):
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.op_type == op and n.output[0] not in used]
        for n in dead:
            graph.node.remove(n)
