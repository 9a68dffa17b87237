"""Offline graph optimization: ONNX Runtime's transformer fusions, applied before quantization.

``onnxruntime.transformers.optimizer`` rewrites a BERT-style graph into fused contrib ops. Measured on the MiniLM
encoder with ONNX Runtime 1.32 on this 2-core AVX-512 VNNI CPU (docs/benchmarks/passes-encoder.md):

* **Attention** (Q/K/V MatMuls + the attention core in one op): fp32 1.04-1.13x faster at batch 32, and after
  dynamic int8 (``QAttention``) the fastest int8 form here. On by default.
* **BiasGelu / Gelu**: ORT fuses them at load anyway; done here so the fused graph is what gets quantized.
* **SkipLayerNormalization** (bias + residual Add + LayerNormalization): *slower* here, as a previous session found
  and this one re-checked: fp32 with Attention + SkipLayerNorm ran 1.01x where Attention alone ran 1.13x. Off by
  default. (ORT also fuses it at load when the model carries value_info for the Adds, which is why the int8
  passes drop the value_info ORT's quantizers write.)
* **EmbedLayerNormalization**: off; it fuses the embedding Gathers away from what ``compression.embeddings``
  quantizes, and measured no gain.
* **MultiHeadAttention** (Q/K/V projections left as MatMuls, so static QDQ can quantize them): slower than plain
  static int8 here (1.69x vs 2.23x over fp32 at batch 32, one thread); not offered.

The attention mask is kept as the raw 2-D mask (``AttentionMaskFormat.AttentionMask``), not ORT's default
"mask index" (a per-row length that assumes right padding and would silently change left-padded results).

ORT's pattern matchers expect the exporter's exact node sequence. ``canonicalize`` first rewrites equivalent
forms they miss: an ``Unsqueeze`` with several axes becomes a chain of one-axis Unsqueezes (PyTorch writes
``mask[:, None, None, :]`` as two nodes; a hand-written or re-exported graph may use one), which is what kept the
attention fusion from matching on the project's MiniLM graph.

Saving ORT's own ``ORT_ENABLE_EXTENDED`` / ``ALL`` graph offline (``SessionOptions.optimized_model_filepath``) is
not a pass here: ORT applies the same rewrites at every load, so the saved graph runs no faster; ``ALL`` writes
layouts specific to the CPU it ran on, and a saved graph is bound to the ORT version that wrote it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compression.onnx_graph import unique_name


@dataclass
class FusionReport:
    model_type: str
    fused: dict[str, int] = field(default_factory=dict)  # fused op type -> count
    canonicalized: int = 0  # multi-axis Unsqueezes split
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def canonicalize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Split every Unsqueeze with constant non-negative axes [a1 < a2 < ...] into one-axis Unsqueezes (a copy)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    taken = (
        {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output} | {n.name for n in graph.node}
    )
    nodes: list[onnx.NodeProto] = []
    split = 0
    for node in graph.node:
        axes = _unsqueeze_axes(node, inits)
        if axes is None or len(axes) < 2 or sorted(axes) != axes or axes[0] < 0:
            nodes.append(node)
            continue
        x = node.input[0]
        for k, axis in enumerate(axes):
            last = k == len(axes) - 1
            y = node.output[0] if last else unique_name(f"{node.output[0]}_unsqueeze{k}", taken)
            name = unique_name(f"{node.name or node.output[0]}_{k}", taken)
            a = unique_name(f"{name}_axes", taken)
            graph.initializer.append(numpy_helper.from_array(np.array([axis], np.int64), a))
            nodes.append(helper.make_node("Unsqueeze", [x, a], [y], name))
            x = y
        split += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return out, split


def fuse_transformer(
    model: onnx.ModelProto,
    model_type: str = "bert",
    attention: bool = True,
    gelu: bool = True,
    skip_layer_norm: bool = False,
    embed_layer_norm: bool = False,
) -> tuple[onnx.ModelProto, FusionReport]:
    """ORT's offline transformer fusions on a canonicalized copy of ``model``; the report lists what fused.

    Heads and hidden size are detected from the graph. A model the optimizer finds nothing to fuse in comes back
    unchanged in meaning (the report says so): the pass is safe to try on any model.
    """
    from onnxruntime.transformers.fusion_options import AttentionMaskFormat, FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    if model_type not in ("bert", "bart", "gpt2", "t5", "vit", "clip", "conformer", "phi", "sam2", "swin", "unet"):
        raise ValueError(f"model_type {model_type!r} is not one ORT's transformer optimizer knows")
    canonical, split = canonicalize(model)
    options = FusionOptions(model_type)
    options.enable_attention = attention
    options.enable_gelu = options.enable_bias_gelu = gelu
    options.enable_skip_layer_norm = options.enable_bias_skip_layer_norm = skip_layer_norm
    options.enable_embed_layer_norm = embed_layer_norm
    options.attention_mask_format = AttentionMaskFormat.AttentionMask
    before = Counter(n.op_type for n in canonical.graph.node)
    with tempfile.TemporaryDirectory(prefix="slimserve-fuse-") as tmp, _quiet():
        path = Path(tmp) / "model.onnx"
        onnx.save_model(canonical, str(path))
        optimized = optimize_model(
            str(path), model_type=model_type, num_heads=0, hidden_size=0, optimization_options=options, opt_level=0
        )
        optimized.save_model_to_file(str(Path(tmp) / "fused.onnx"))  # also declares the com.microsoft opset
        fused = onnx.load(str(Path(tmp) / "fused.onnx"))
    after = Counter(n.op_type for n in fused.graph.node)
    report = FusionReport(model_type, canonicalized=split)
    for op in ("Attention", "MultiHeadAttention", "BiasGelu", "Gelu", "FastGelu", "SkipLayerNormalization"):
        if after[op] > before[op]:
            report.fused[op] = after[op] - before[op]
    for op in ("EmbedLayerNormalization",):
        if after[op]:
            report.fused[op] = after[op]
    if not report.fused:
        report.notes.append("nothing fused: the graph matched none of ORT's transformer patterns")
    del fused.graph.value_info[:]  # shape annotations would let ORT fuse SkipLayerNormalization at load (slower here)
    return fused, report


def _unsqueeze_axes(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> list[int] | None:
    if node.op_type != "Unsqueeze" or node.domain not in ("", "ai.onnx"):
        return None
    if len(node.input) >= 2 and node.input[1] in inits:  # opset >= 13
        return [int(a) for a in numpy_helper.to_array(inits[node.input[1]]).ravel()]
    return None  # opset < 13 (axes attribute): ORT's matchers read those as they are


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The optimizer warns about the producer name and prints progress; keep logs for real problems."""
    logger = logging.getLogger("onnxruntime.transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)
