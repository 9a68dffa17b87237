"""ONNX models for the serving benchmarks, written with onnx.helper (no downloads, random weights).

- ``mlp()``: the small model of the overhead and peer benchmarks, x[N,64] -> 256 -> 256 -> probs[N,10].
- ``encoder()``: a BERT-style encoder for the batching benchmark. It has the graph a Hugging Face ``BertModel``
  export has at opset 17 (token + position embeddings, LayerNormalization, per layer Q/K/V MatMul+Add,
  scaled dot-product attention with an additive mask, output projection, residual + LayerNorm, erf GELU
  FFN, residual + LayerNorm), then masked mean pooling. Inputs ``input_ids`` and ``attention_mask``
  (INT64 [N,S]); output ``pooled`` (FP32 [N,H]). The weights are random: this measures speed, not accuracy.

``python bench/models.py`` writes both to .bench/models/ and times batch-1 and batch-32 in-process.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]

MLP_IN = 64
MLP_OUT = 10
MLP_INPUT = "x"
MLP_OUTPUT = "probs"

#: the encoder used by bench/batching.py: ~2.5 ms per batch-1 inference on one core of the bench machine
ENCODER = {"layers": 4, "hidden": 256, "heads": 4, "ffn": 1024, "seq": 64, "vocab": 8192}
ENCODER_INPUTS = ("input_ids", "attention_mask")
ENCODER_OUTPUT = "pooled"


def _finish(graph: onnx.GraphProto, producer: str) -> bytes:
    m = helper.make_model(graph, opset_imports=OPSET, producer_name=producer)
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m.SerializeToString()


def mlp(in_dim: int = MLP_IN, hidden: tuple[int, ...] = (256, 256), out_dim: int = MLP_OUT, seed: int = 0) -> bytes:
    """x[N,in] -> (MatMul, Add, Relu) per hidden layer -> MatMul, Add -> Softmax -> probs[N,out]."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    prev, width = MLP_INPUT, in_dim
    for i, h in enumerate([*hidden, out_dim]):
        w = (rng.standard_normal((width, h)) / math.sqrt(width)).astype(np.float32)
        b = (rng.standard_normal(h) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [
            helper.make_node("MatMul", [prev, f"w{i}"], [f"mm{i}"]),
            helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"z{i}"]),
        ]
        if i < len(hidden):
            nodes.append(helper.make_node("Relu", [f"z{i}"], [f"a{i}"]))
            prev = f"a{i}"
        else:
            prev = f"z{i}"
        width = h
    nodes.append(helper.make_node("Softmax", [prev], [MLP_OUTPUT], axis=-1))
    graph = helper.make_graph(
        nodes,
        "bench_mlp",
        [helper.make_tensor_value_info(MLP_INPUT, TensorProto.FLOAT, ["N", in_dim])],
        [helper.make_tensor_value_info(MLP_OUTPUT, TensorProto.FLOAT, ["N", out_dim])],
        inits,
    )
    return _finish(graph, "slimserve-bench")


def mlp_input(batch: int = 1, seed: int = 1) -> dict[str, np.ndarray]:
    return {MLP_INPUT: np.random.default_rng(seed).standard_normal((batch, MLP_IN)).astype(np.float32)}


class _Graph:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, hint: str, value: np.ndarray) -> str:
        n = self.name(hint)
        self.inits.append(numpy_helper.from_array(value, n))
        return n

    def weight(self, hint: str, shape: tuple[int, ...], scale: float = 0.02) -> str:
        return self.const(hint, (self.rng.standard_normal(shape) * scale).astype(np.float32))

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, **attrs: object) -> str:
        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def linear(self, x: str, d_in: int, d_out: int, hint: str) -> str:
        w = self.weight(f"{hint}_w", (d_in, d_out))
        b = self.const(f"{hint}_b", np.zeros(d_out, np.float32))
        return self.op("Add", [self.op("MatMul", [x, w]), b], hint)

    def layer_norm(self, x: str, d: int, hint: str) -> str:
        g = self.const(f"{hint}_g", np.ones(d, np.float32))
        b = self.const(f"{hint}_b", np.zeros(d, np.float32))
        return self.op("LayerNormalization", [x, g, b], hint, axis=-1, epsilon=1e-12)


def encoder(
    layers: int = ENCODER["layers"],
    hidden: int = ENCODER["hidden"],
    heads: int = ENCODER["heads"],
    ffn: int = ENCODER["ffn"],
    seq: int = ENCODER["seq"],
    vocab: int = ENCODER["vocab"],
    seed: int = 0,
) -> bytes:
    """A BERT-style encoder: input_ids, attention_mask INT64 [N,S] -> pooled FP32 [N,hidden]."""
    if hidden % heads:
        raise ValueError("hidden must be a multiple of heads")
    dh = hidden // heads
    g = _Graph(seed)
    ids, mask = ENCODER_INPUTS
    word = g.weight("word_emb", (vocab, hidden))
    pos = g.weight("pos_emb", (seq, hidden))
    x = g.op("Add", [g.op("Gather", [word, ids], "tok"), pos], "emb")  # pos [S,H] broadcasts over N
    x = g.layer_norm(x, hidden, "emb_ln")
    # additive mask [N,1,1,S]: 0 where attended, -10000 where padded
    maskf = g.op("Cast", [mask], "maskf", to=TensorProto.FLOAT)
    neg = g.op(
        "Mul",
        [g.op("Sub", [g.const("one", np.array(1.0, np.float32)), maskf]), g.const("big", np.array(-1e4, np.float32))],
    )
    bias = g.op("Unsqueeze", [neg, g.const("axes", np.array([1, 2], np.int64))], "mask_bias")
    split = g.const("split_shape", np.array([0, 0, heads, dh], np.int64))
    merge = g.const("merge_shape", np.array([0, 0, hidden], np.int64))
    scale = g.const("scale", np.array(math.sqrt(dh), np.float32))
    half = g.const("half", np.array(0.5, np.float32))
    one = g.const("one_f", np.array(1.0, np.float32))
    sqrt2 = g.const("sqrt2", np.array(math.sqrt(2.0), np.float32))
    for i in range(layers):
        q = g.op("Transpose", [g.op("Reshape", [g.linear(x, hidden, hidden, f"l{i}_q"), split])], perm=[0, 2, 1, 3])
        k = g.op("Transpose", [g.op("Reshape", [g.linear(x, hidden, hidden, f"l{i}_k"), split])], perm=[0, 2, 3, 1])
        v = g.op("Transpose", [g.op("Reshape", [g.linear(x, hidden, hidden, f"l{i}_v"), split])], perm=[0, 2, 1, 3])
        scores = g.op("Add", [g.op("Div", [g.op("MatMul", [q, k]), scale]), bias])
        probs = g.op("Softmax", [scores], axis=-1)
        ctx = g.op("Reshape", [g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3]), merge])
        attn = g.linear(ctx, hidden, hidden, f"l{i}_o")
        x = g.layer_norm(g.op("Add", [attn, x]), hidden, f"l{i}_ln1")
        h = g.linear(x, hidden, ffn, f"l{i}_ffn1")
        gelu = g.op("Mul", [g.op("Mul", [h, g.op("Add", [g.op("Erf", [g.op("Div", [h, sqrt2])]), one])]), half])
        x = g.layer_norm(g.op("Add", [g.linear(gelu, ffn, hidden, f"l{i}_ffn2"), x]), hidden, f"l{i}_ln2")
    # masked mean pooling over the sequence
    m3 = g.op("Unsqueeze", [maskf, g.const("ax2", np.array([2], np.int64))])
    axis1 = g.const("ax1", np.array([1], np.int64))
    summed = g.op("ReduceSum", [g.op("Mul", [x, m3]), axis1], keepdims=0)
    count = g.op("Max", [g.op("ReduceSum", [m3, axis1], keepdims=0), g.const("eps", np.array(1e-9, np.float32))])
    g.nodes.append(helper.make_node("Div", [summed, count], [ENCODER_OUTPUT]))
    graph = helper.make_graph(
        g.nodes,
        "bench_encoder",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["N", seq]) for n in ENCODER_INPUTS],
        [helper.make_tensor_value_info(ENCODER_OUTPUT, TensorProto.FLOAT, ["N", hidden])],
        g.inits,
    )
    return _finish(graph, "slimserve-bench")


def encoder_input(batch: int = 1, seq: int = ENCODER["seq"], vocab: int = ENCODER["vocab"], seed: int = 1):
    """Token ids with a realistic amount of padding (the last quarter of each row is masked out)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), np.int64)
    mask[:, seq - seq // 4 :] = 0
    ids[mask == 0] = 0
    return {ENCODER_INPUTS[0]: ids, ENCODER_INPUTS[1]: mask}


def write(directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, data in (("mlp", mlp()), ("encoder", encoder())):
        p = directory / f"{name}.onnx"
        if not p.exists() or p.read_bytes() != data:
            p.write_bytes(data)
        out[name] = p
    return out


def time_run(session, feeds: dict[str, np.ndarray], seconds: float = 2.0) -> float:
    """Seconds per ``session.run`` over ``seconds`` of back-to-back runs (after 5 warm-up runs)."""
    for _ in range(5):
        session.run(None, feeds)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        session.run(None, feeds)
        n += 1
    return (time.perf_counter() - t0) / n


def main() -> None:
    import onnxruntime as ort
    from common import BENCH_DIR

    paths = write(BENCH_DIR / "models")
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    for name, make in (("mlp", mlp_input), ("encoder", encoder_input)):
        s = ort.InferenceSession(str(paths[name]), so, providers=["CPUExecutionProvider"])
        for batch in (1, 8, 32):
            t = time_run(s, make(batch))
            print(f"{name:8s} threads={threads} batch={batch:3d}: {t * 1e3:8.3f} ms/run  {batch / t:9.0f} rows/s")


if __name__ == "__main__":
    main()
