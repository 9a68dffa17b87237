"""Models for the traffic tests: a faithful but much slower twin of ``mlp``, and ``mlp`` with corrupted weights."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from tests.onnx_models import mlp


def corrupted(model: bytes, initializer: str = "w1", scale: float = 3.0, seed: int = 1) -> bytes:
    """``model`` with Gaussian noise added to one initializer: same interface, different answers."""
    m = onnx.load_from_string(model)
    for i, t in enumerate(m.graph.initializer):
        if t.name == initializer:
            w = numpy_helper.to_array(t)
            noisy = w + np.random.default_rng(seed).normal(0.0, scale, w.shape).astype(w.dtype)
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(noisy, t.name))
            return m.SerializeToString()
    raise KeyError(initializer)


def slow_twin(seed: int = 0, tokens: int = 256, width: int = 256, depth: int = 32) -> bytes:
    """``mlp(seed)`` plus a heavy branch multiplied by zero: the same outputs (exactly) at about
    2 * tokens * width^2 * depth FLOPs more per row (~1 GFLOP by default: milliseconds, where mlp takes
    microseconds). The runtime does not fold x * 0 away, so the cost is real."""
    m = onnx.load_from_string(mlp(seed=seed))
    g = m.graph
    rng = np.random.default_rng(100 + seed)
    wa = rng.standard_normal((4, width)).astype(np.float32)
    w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    g.initializer.extend(
        [
            numpy_helper.from_array(wa, "heavy_in"),
            numpy_helper.from_array(w, "heavy_w"),
            numpy_helper.from_array(np.array([1], np.int64), "heavy_axis"),
            numpy_helper.from_array(np.array([1, tokens, 1], np.int64), "heavy_reps"),
            numpy_helper.from_array(np.array(0.0, np.float32), "heavy_zero"),
        ]
    )
    nodes = [
        helper.make_node("MatMul", ["x", "heavy_in"], ["hv0"]),
        helper.make_node("Unsqueeze", ["hv0", "heavy_axis"], ["hv1"]),
        helper.make_node("Tile", ["hv1", "heavy_reps"], ["hv_t0"]),
    ]
    prev = "hv_t0"
    for i in range(depth):
        nodes += [
            helper.make_node("MatMul", [prev, "heavy_w"], [f"hv_m{i}"]),
            helper.make_node("Tanh", [f"hv_m{i}"], [f"hv_t{i + 1}"]),
        ]
        prev = f"hv_t{i + 1}"
    nodes += [
        helper.make_node("ReduceMean", [prev], ["hv_mean"], keepdims=1),  # -> [1, 1, 1]
        helper.make_node("Mul", ["hv_mean", "heavy_zero"], ["hv_zero"]),
        helper.make_node("Squeeze", ["hv_zero", "heavy_axis"], ["hv_z2"]),  # -> [1, 1]
    ]
    # rewire: logits = l0 + b2 + 0 * heavy
    for node in g.node:
        if node.op_type == "Add" and list(node.output) == ["logits"]:
            node.output[0] = "logits_plain"
    nodes.append(helper.make_node("Add", ["logits_plain", "hv_z2"], ["logits"]))
    softmax = next(n for n in g.node if n.op_type == "Softmax")
    rest = [n for n in g.node if n is not softmax]
    del g.node[:]
    g.node.extend([*rest, *nodes, softmax])
    onnx.checker.check_model(m)
    return m.SerializeToString()
