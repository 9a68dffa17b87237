"""ONNX graph helpers shared by the prune, encode and evaluate stages.

* which initializers are the weights of linear layers (MatMul, Gemm, Conv), and why others are left alone;
* a layer's weight as a 2-D ``[outputs, inputs]`` matrix whose columns run over the input channels fastest, so
  that "4 consecutive columns" are 4 consecutive input channels (the 2:4 group) and match the im2col columns;
* capturing a layer's input activations on calibration data with ONNX Runtime, streamed in chunks and folded
  into ``X^T X`` (the layer Hessian of the reconstruction loss) without keeping the activations.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

if TYPE_CHECKING:
    import onnxruntime as ort

    from compression.calibration import Samples

LINEAR_OPS = ("MatMul", "Gemm", "Conv")
FLOAT_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64}
MIN_PRUNABLE_WEIGHTS = 1024  # smaller layers (a first conv, a tiny head) cost little and prune badly
CHUNK_ELEMENTS = 1 << 23  # activation rows folded into X^T X at once (64 MiB of float64)


@dataclass(frozen=True)
class WeightRef:
    """An initializer used as the weight of one linear node."""

    name: str  # initializer name
    index: int  # position in graph.initializer
    node_index: int
    op: str  # MatMul | Gemm | Conv
    activation: str  # the node input the weight multiplies
    shape: tuple[int, ...]
    trans_a: bool = False  # Gemm: activations are stored transposed
    trans_b: bool = False  # Gemm: weight stored [N, K]

    @property
    def in_channels(self) -> int:
        """The input-channel count: the axis 2:4 groups run along."""
        if self.op == "Conv":
            return self.shape[1]
        return self.shape[1] if self.trans_b else self.shape[0]


def unique_name(name: str, taken: set[str]) -> str:
    """``name``, or ``name_1``, ``name_2``... the first not in ``taken`` (which it joins): for nodes and
    tensors a pass adds to a graph."""
    out, i = name, 1
    while out in taken:
        out, i = f"{name}_{i}", i + 1
    taken.add(out)
    return out


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _subgraph_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name read by nodes inside subgraphs (If/Loop/Scan bodies)."""
    used: set[str] = set()
    for node in graph.node:
        for a in node.attribute:
            for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                for n in g.node:
                    used.update(n.input)
                used |= _subgraph_names(g)
    return used


def _weight_operand(node: onnx.NodeProto, inits: set[str]) -> tuple[str | None, str]:
    """(the weight initializer this node multiplies, or None with a reason)."""
    ins = list(node.input)
    if node.op_type in ("MatMul", "Gemm"):
        if len(ins) >= 2 and ins[1] in inits and ins[0] not in inits:
            return ins[1], ""
        if len(ins) >= 2 and ins[0] in inits:
            return None, "weight is the left operand of the product"
        return None, ""
    if node.op_type == "Conv" and len(ins) >= 2 and ins[1] in inits:
        return ins[1], ""
    return None, ""


def linear_weights(
    model: onnx.ModelProto, min_weights: int = MIN_PRUNABLE_WEIGHTS
) -> tuple[list[WeightRef], list[dict]]:
    """The prunable linear-layer weights in node order, and every other float initializer with the reason."""
    g = model.graph
    index = {t.name: i for i, t in enumerate(g.initializer)}
    consumers: dict[str, int] = {}
    for node in g.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    in_subgraphs = _subgraph_names(g)
    refs: list[WeightRef] = []
    reasons: dict[str, str] = {}
    for ni, node in enumerate(g.node):
        if node.domain not in ("", "ai.onnx") or node.op_type not in LINEAR_OPS:
            continue
        name, why = _weight_operand(node, set(index))
        if name is None:
            for i in node.input:
                if i in index and why:
                    reasons.setdefault(i, why)
            continue
        t = g.initializer[index[name]]
        shape = tuple(int(d) for d in t.dims)
        n = int(np.prod(shape)) if shape else 1
        reason = ""
        if t.data_type not in FLOAT_TYPES:
            reason = f"element type {TensorProto.DataType.Name(t.data_type)} is not float16/32/64"
        elif t.data_location == TensorProto.EXTERNAL:
            reason = "stored as external data"
        elif consumers.get(name, 0) > 1 or name in in_subgraphs:
            reason = "shared by several nodes (no single layer to reconstruct)"
        elif node.op_type == "MatMul" and len(shape) != 2:
            reason = f"MatMul weight of rank {len(shape)} (only 2-D weights are pruned)"
        elif node.op_type == "Gemm" and len(shape) != 2:
            reason = "Gemm weight is not 2-D"
        elif node.op_type == "Conv" and int(_attr(node, "group", 1)) != 1:
            reason = f"grouped/depthwise Conv (group={_attr(node, 'group', 1)})"
        elif node.op_type == "Conv" and len(shape) < 3:
            reason = "Conv weight of rank < 3"
        elif n < min_weights:
            reason = f"tiny layer ({n} weights < {min_weights})"
        if reason:
            reasons[name] = reason
            continue
        refs.append(
            WeightRef(
                name=name,
                index=index[name],
                node_index=ni,
                op=node.op_type,
                activation=node.input[0],
                shape=shape,
                trans_a=node.op_type == "Gemm" and bool(_attr(node, "transA", 0)),
                trans_b=node.op_type == "Gemm" and bool(_attr(node, "transB", 0)),
            )
        )
    chosen = {r.name for r in refs}
    skipped = []
    for t in g.initializer:
        if t.name in chosen or (t.data_type not in FLOAT_TYPES and t.name not in reasons):
            continue
        why = reasons.get(t.name, "not a MatMul/Gemm/Conv weight (bias, norm, embedding, constant...)")
        skipped.append({"name": t.name, "reason": why})
    return refs, skipped


def get_weight(model: onnx.ModelProto, ref: WeightRef) -> np.ndarray:
    return numpy_helper.to_array(model.graph.initializer[ref.index])


def set_weight(model: onnx.ModelProto, ref: WeightRef, value: np.ndarray) -> None:
    old = model.graph.initializer[ref.index]
    dtype = FLOAT_TYPES[old.data_type]
    model.graph.initializer[ref.index].CopyFrom(numpy_helper.from_array(value.astype(dtype), old.name))


def to_rows(w: np.ndarray, ref: WeightRef) -> np.ndarray:
    """The weight as [outputs, inputs]; Conv columns ordered (kernel..., in_channel)."""
    if ref.op == "Conv":
        return np.moveaxis(w, 1, -1).reshape(w.shape[0], -1)
    return w if ref.trans_b else w.T


def from_rows(m: np.ndarray, ref: WeightRef) -> np.ndarray:
    if ref.op == "Conv":
        o, i, *k = ref.shape
        return np.moveaxis(m.reshape(o, *k, i), -1, 1)
    return m if ref.trans_b else m.T


def _conv_geometry(node: onnx.NodeProto, spatial: tuple[int, ...], kernel: tuple[int, ...]) -> tuple[list, list, list]:
    nd = len(kernel)
    strides = list(_attr(node, "strides", [1] * nd))
    dil = list(_attr(node, "dilations", [1] * nd))
    pads = list(_attr(node, "pads", [0] * (2 * nd)))
    auto = _attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    if auto == "VALID":
        pads = [0] * (2 * nd)
    elif auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * nd)
        for a in range(nd):
            out = -(-spatial[a] // strides[a])
            total = max((out - 1) * strides[a] + (kernel[a] - 1) * dil[a] + 1 - spatial[a], 0)
            small, big = total // 2, total - total // 2
            pads[a], pads[a + nd] = (small, big) if auto == "SAME_UPPER" else (big, small)
    return strides, dil, pads


def im2col(x: np.ndarray, node: onnx.NodeProto, kernel: tuple[int, ...]) -> np.ndarray:
    """Conv input [N, C, *spatial] -> rows [N * out_positions, prod(kernel) * C], columns (kernel..., C)."""
    nd = len(kernel)
    strides, dil, pads = _conv_geometry(node, tuple(x.shape[2:]), kernel)
    x = np.pad(x, [(0, 0), (0, 0), *[(pads[a], pads[a + nd]) for a in range(nd)]])
    sp = x.shape[2:]
    out = [(sp[a] - (kernel[a] - 1) * dil[a] - 1) // strides[a] + 1 for a in range(nd)]
    patches = []
    for off in itertools.product(*[range(k) for k in kernel]):
        sl = tuple(
            slice(off[a] * dil[a], off[a] * dil[a] + (out[a] - 1) * strides[a] + 1, strides[a]) for a in range(nd)
        )
        patches.append(x[(slice(None), slice(None), *sl)])  # [N, C, *out]
    cols = np.stack(patches, axis=-1)  # [N, C, *out, K]
    cols = np.moveaxis(cols, 1, -1)  # [N, *out, K, C]
    return cols.reshape(-1, len(patches) * x.shape[1])


def activation_rows(act: np.ndarray, model: onnx.ModelProto, ref: WeightRef) -> np.ndarray:
    """A captured activation as rows whose columns line up with ``to_rows(weight)``."""
    if ref.op == "Conv":
        return im2col(act, model.graph.node[ref.node_index], ref.shape[2:])
    if ref.trans_a:
        act = act.T
    return act.reshape(-1, act.shape[-1])


def _session(model: onnx.ModelProto, extra_outputs: list[tuple[str, int]]) -> ort.InferenceSession:
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    present = {o.name for o in m.graph.output}
    for name, elem in extra_outputs:
        if name not in present:
            m.graph.output.append(helper.make_tensor_value_info(name, elem, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])


def iter_activations(model: onnx.ModelProto, ref: WeightRef, feeds: Samples, chunk: int = 64) -> Iterator[np.ndarray]:
    """The layer's input rows (float64) on the calibration data, a bounded chunk at a time.

    A model with a fixed batch dimension is fed exactly that many samples per run.
    """
    sess = None
    if ref.activation not in feeds.arrays:
        try:
            sess = _session(model, [(ref.activation, model.graph.initializer[ref.index].data_type)])
        except Exception as e:
            raise ValueError(f"ONNX Runtime cannot load the model to calibrate it: {str(e).strip()[:300]}") from None
    n = feeds.count
    start = 0
    while start < n:
        step = feeds.batch or chunk
        batch = {k: v[start : start + step] for k, v in feeds.arrays.items()}
        start += step
        try:
            act = batch[ref.activation] if sess is None else sess.run([ref.activation], batch)[0]
        except Exception as e:  # onnxruntime's own exception types
            raise ValueError(f"running the model on the calibration data failed: {str(e).strip()[:300]}") from None
        # later runs: as many samples as keep one activation chunk near CHUNK_ELEMENTS
        per_sample = max(1, act.size // max(1, len(next(iter(batch.values())))))
        chunk = int(min(chunk, max(1, CHUNK_ELEMENTS // per_sample)))
        if ref.op != "Conv":
            yield activation_rows(act, model, ref).astype(np.float64)
            continue
        per_sample = max(1, act[0].size * int(np.prod(ref.shape[2:])))
        step = max(1, CHUNK_ELEMENTS // per_sample)  # im2col multiplies the activation by the kernel size
        for s in range(0, act.shape[0], step):
            yield activation_rows(act[s : s + step].astype(np.float64), model, ref)


def hessian(model: onnx.ModelProto, ref: WeightRef, feeds: Samples) -> tuple[np.ndarray, int]:
    """X^T X over the layer's input rows (float64) and the number of rows."""
    cols = int(np.prod(ref.shape[1:])) if ref.op == "Conv" else ref.in_channels
    h = np.zeros((cols, cols))
    rows = 0
    for x in iter_activations(model, ref, feeds):
        if x.shape[1] != cols:
            raise ValueError(f"layer {ref.name}: activation has {x.shape[1]} columns, the weight {cols}")
        h += x.T @ x
        rows += x.shape[0]
    return h, rows
