"""INT8 embeddings: weight-only int8, per row, for large float tables that no MatMul/Gemm/Conv quantizer touches.

A transformer's word-embedding table is read by a Gather, so weight quantization (``compression.quantize``) leaves
it in fp32: on all-MiniLM-L6-v2 it is 47 of the model's 90 MB, and the int8 model stays only 1.54x smaller.

* **Gather tables** (``Gather(table, ids)``, axis 0, table rank 2): the table becomes int8 with one float32 scale
  per row (symmetric, zero point 0: ``scale = max|row| / 127``), and the graph gathers *before* dequantizing:
  ``Gather(int8 table, ids) -> Cast(float) * Unsqueeze(Gather(scales, ids), -1)``. Only the rows looked up are
  converted. The other order, ``DequantizeLinear(axis=0)`` in front of the Gather, is what the ONNX spec's QDQ
  form would suggest, but ONNX Runtime 1.32 keeps the DequantizeLinear (its constant folding skips DQ nodes so
  QDQ fusions can see them) and dequantizes the *whole* table on every run: on the MiniLM encoder +46 MB of
  memory per run and ~6 ms at batch 1 (17 vs 10.5 ms), where gathering first costs nothing measurable
  (docs/benchmarks/passes-encoder.md).
* **Other large float initializers read by a non-weight op** (an Add of a large constant, a MatMul whose
  constant is the left operand...): with ``other_tables=True``, a per-row int8 copy with
  ``DequantizeLinear(axis=0)`` in front. ORT then dequantizes the tensor on every run (see above), so this trades
  run time for storage; it is off by default and only worth it for tensors read rarely or small next to the run.

Tables that are also read by a MatMul/Gemm/Conv (tied input/output embeddings) are left to the weight quantizer.
The result is plain ONNX (opset >= 13 for ``Unsqueeze`` with an axes input and per-axis ``DequantizeLinear``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compression.onnx_graph import unique_name

MIN_ELEMENTS = 1 << 16  # smaller tables (position / token-type embeddings of a small model) are not worth a node
WEIGHT_OPS = {"MatMul": (0, 1), "Gemm": (0, 1, 2), "Conv": (1, 2), "ConvTranspose": (1, 2)}


@dataclass
class EmbeddingsReport:
    quantized: list[dict] = field(default_factory=list)  # name, shape, form, max_abs_error, bytes_before/after
    skipped: list[dict] = field(default_factory=list)  # name, reason
    bytes_saved: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _per_row_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = w.reshape(w.shape[0], -1).astype(np.float64)
    amax = np.abs(rows).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0)
    q = np.clip(np.rint(rows / scale[:, None]), -127, 127).astype(np.int8)
    return q.reshape(w.shape), scale.astype(np.float32)


def quantize_embeddings(
    model: onnx.ModelProto, min_elements: int = MIN_ELEMENTS, other_tables: bool = False
) -> tuple[onnx.ModelProto, EmbeddingsReport]:
    """Per-row int8 for the model's large float Gather tables (and, optionally, other large float constants)."""
    if isinstance(min_elements, bool) or not isinstance(min_elements, int) or min_elements < 1:
        raise ValueError(f"min_elements must be a positive integer, got {min_elements!r}")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    report = EmbeddingsReport()
    if opset < 13:
        report.skipped.append({"name": "*", "reason": f"opset {opset} < 13 (Unsqueeze axes input, per-axis DQ)"})
        return out, report
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    users: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for i, x in enumerate(node.input):
            if x in inits:
                users.setdefault(x, []).append((node, i))
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    taken |= {i.name for i in graph.input} | {n.name for n in graph.node}
    graph_io = {i.name for i in graph.input} | {o.name for o in graph.output}
    replacements: dict[int, list[onnx.NodeProto]] = {}  # node id -> nodes that replace it
    prefix: list[onnx.NodeProto] = []  # DequantizeLinear nodes for other tables, first in the graph
    new_inits: list[onnx.TensorProto] = []
    removed: set[str] = set()
    for name, t in inits.items():
        if t.data_type != TensorProto.FLOAT or name in graph_io:
            continue
        n = int(np.prod(t.dims)) if len(t.dims) else 1
        uses = users.get(name, [])
        if n < min_elements or not uses:
            continue
        if t.data_location == TensorProto.EXTERNAL:
            report.skipped.append({"name": name, "reason": "stored as external data"})
            continue
        if any(node.op_type in WEIGHT_OPS and i in WEIGHT_OPS[node.op_type] for node, i in uses):
            report.skipped.append({"name": name, "reason": "also a MatMul/Gemm/Conv operand (the int8 quantizer's)"})
            continue
        gathers = all(node.op_type == "Gather" and i == 0 and _axis(node) == 0 and len(t.dims) == 2 for node, i in uses)
        if not gathers and not other_tables:
            ops = sorted({node.op_type for node, _ in uses})
            report.skipped.append({"name": name, "reason": f"read by {ops}, not only by Gather (other_tables off)"})
            continue
        if len(t.dims) < 2:
            report.skipped.append({"name": name, "reason": "rank < 2 (per-row scales would be per element)"})
            continue
        w = numpy_helper.to_array(t)
        q, scale = _per_row_int8(w)
        # names: never ``<tensor>_scale`` for a float tensor that a quantizer may later quantize (ORT names its
        # activation scales that way), hence the ``row_scales`` suffixes
        q_name, s_name = unique_name(f"{name}_int8", taken), unique_name(f"{name}_row_scales", taken)
        stored_q = q if gathers else q.reshape(len(scale), -1)  # DequantizeLinear(axis=0) needs [rows, ...]
        new_inits += [numpy_helper.from_array(stored_q, q_name), numpy_helper.from_array(scale, s_name)]
        removed.add(name)
        restored = (q.reshape(len(scale), -1).astype(np.float64) * scale[:, None]).reshape(w.shape)
        entry = {
            "name": name,
            "shape": list(w.shape),
            "form": "gather-then-dequantize" if gathers else "DequantizeLinear(axis=0) in front",
            "max_abs_error": float(np.abs(restored - w).max()),
            "bytes_before": int(w.nbytes),
            "bytes_after": int(q.nbytes + scale.nbytes),
        }
        report.quantized.append(entry)
        report.bytes_saved += entry["bytes_before"] - entry["bytes_after"]
        if gathers:
            axes = unique_name(f"{name}_last_axis", taken)
            new_inits.append(numpy_helper.from_array(np.array([-1], np.int64), axes))
            for node, _ in uses:
                y = node.output[0]
                tag = node.name or y
                rows_q, rows_s = unique_name(f"{y}_int8_rows", taken), unique_name(f"{y}_row_scales", taken)
                rows_f, rows_s2 = unique_name(f"{y}_int8_as_float", taken), unique_name(f"{y}_row_scales_column", taken)
                replacements[id(node)] = [
                    helper.make_node("Gather", [q_name, node.input[1]], [rows_q], unique_name(f"{tag}_int8", taken)),
                    helper.make_node("Gather", [s_name, node.input[1]], [rows_s], unique_name(f"{tag}_scale", taken)),
                    helper.make_node("Unsqueeze", [rows_s, axes], [rows_s2], unique_name(f"{tag}_unsqueeze", taken)),
                    helper.make_node(
                        "Cast", [rows_q], [rows_f], unique_name(f"{tag}_cast", taken), to=TensorProto.FLOAT
                    ),
                    helper.make_node("Mul", [rows_f, rows_s2], [y], unique_name(f"{tag}_dequantize", taken)),
                ]
        else:
            zp = unique_name(f"{name}_zero_point", taken)
            new_inits.append(numpy_helper.from_array(np.zeros(len(scale), np.int8), zp))
            rows = name if q.ndim == 2 else unique_name(f"{name}_rows", taken)
            prefix.append(helper.make_node("DequantizeLinear", [q_name, s_name, zp], [rows], f"{rows}_dq", axis=0))
            if q.ndim != 2:
                shape = unique_name(f"{name}_shape", taken)
                new_inits.append(numpy_helper.from_array(np.array(w.shape, np.int64), shape))
                prefix.append(helper.make_node("Reshape", [rows, shape], [name], unique_name(f"{name}_reshape", taken)))
    if not removed:
        return out, report
    nodes = list(prefix)
    for node in graph.node:
        nodes.extend(replacements.get(id(node), [node]))
    kept = [t for t in graph.initializer if t.name not in removed]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    del graph.node[:]
    graph.node.extend(nodes)
    # value_info of removed tensors would now describe node outputs with the old type: drop those entries only
    stale = [vi for vi in graph.value_info if vi.name in removed]
    for vi in stale:
        graph.value_info.remove(vi)
    return out, report


def _axis(node: onnx.NodeProto) -> int:
    return next((int(a.i) for a in node.attribute if a.name == "axis"), 0)
