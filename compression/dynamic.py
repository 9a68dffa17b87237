"""Dynamic INT8 for transformers on CPU: SmoothQuant + per-channel weights, through ``quantize_dynamic``.

Dynamic quantization computes each activation's int8 range at run time, so it needs no calibrated activation
ranges; ORT CPU runs it as ``DynamicQuantizeMatMul`` (bias fused) and, after ``graph_opt.fuse_transformer``,
``QAttention``. On the MiniLM encoder it was measured at mean cosine **0.964** with ORT's defaults (per-tensor
weights, no smoothing) -- out for a 0.01 tolerance -- but the loss comes from two fixable things:

* per-tensor weight scales: ``per_channel=True`` alone gives 0.993;
* activation outlier channels (the residual stream's few huge channels): SmoothQuant (``quantize_graph.smooth``)
  moves them into the weight rows before quantization; alpha 0.75 gives **0.998**, as good as static int8.

With Attention fused and int8 embeddings it is as fast as static QDQ U8S8 or a little faster: at batch 32 with
2 threads 2.11x / 1.96x fp32 against 1.89x / 2.02x in the same runs, 2.3x on one thread (CPU time) for both
(docs/benchmarks/passes-encoder.md). It is a CPU form: TensorRT takes the static QDQ form from ``compression.quantize``.

SmoothQuant's alpha is chosen on the evaluation samples (the calibration samples only provide the per-channel
activation maxima), exactly as ``compression.quantize`` does for the static form.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from compression.calibration import Samples, check_feeds
from compression.metrics import compare, looks_like_classifier
from compression.quantize_graph import WeightNode, add_outputs, name_nodes, smooth, weight_nodes

SMOOTH_ALPHAS = (0.5, 0.75, 0.9)  # "auto" also tries no smoothing
BATCH = 16
OP_TYPES = ("MatMul", "Attention")  # ORT's dynamic int8 kernels; Conv (ConvInteger) is slower than fp32 on CPU


@dataclass
class DynamicReport:
    nodes_quantized: int
    smooth_alpha: float | None
    quality: float  # top-1 agreement or mean cosine against the float model on the evaluation samples
    metric: str  # "top1_agreement" or "mean_cosine"
    mean_cosine: float
    sweep: dict[str, float] = field(default_factory=dict)  # alpha ("none", "0.5", ...) -> quality
    embeddings: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def quantize_dynamic_int8(
    model: onnx.ModelProto,
    calibration: dict[str, np.ndarray] | Samples,
    evaluation: dict[str, np.ndarray] | Samples,
    smooth_alpha: float | Literal["auto"] | None = "auto",
    embeddings: bool = True,
    metric: Literal["auto", "top1", "cosine"] = "auto",
    progress: Callable[[float], None] | None = None,
) -> tuple[onnx.ModelProto, DynamicReport]:
    """Dynamic int8 (per-channel weights) of the MatMul / fused Attention weights, SmoothQuant first.

    ``evaluation`` must be samples the calibration did not see; the quality reported is measured on it against
    ``model`` (the float model, embeddings in float). ``embeddings`` also stores large Gather tables as per-row
    int8 (``compression.embeddings``).
    """
    if smooth_alpha not in ("auto", None) and (
        isinstance(smooth_alpha, bool) or not isinstance(smooth_alpha, int | float) or not 0 < smooth_alpha <= 1
    ):
        raise ValueError(f"smooth_alpha must be 'auto', None or in (0, 1], got {smooth_alpha!r}")
    if metric not in ("auto", "top1", "cosine"):
        raise ValueError(f"unknown metric {metric!r}: use auto, top1 or cosine")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise ValueError(f"dynamic per-channel int8 needs opset >= 13, the model has {opset}")
    calibration = check_feeds(model, calibration, "calibration")
    evaluation = check_feeds(model, evaluation, "evaluation")
    base = onnx.ModelProto()
    base.CopyFrom(model)
    name_nodes(base)
    targets = _targets(base)
    if not targets:
        raise ValueError("nothing to quantize: no MatMul or Attention with a constant float weight")
    reference = _run(base, evaluation)
    use_top1 = metric == "top1" or (metric == "auto" and looks_like_classifier(reference))
    report = DynamicReport(len(targets), None, 0.0, "top1_agreement" if use_top1 else "mean_cosine", 0.0)
    table_report = None
    if embeddings:
        from compression.embeddings import quantize_embeddings

        base, tables = quantize_embeddings(base)
        table_report = tables.to_dict()
        report.notes.append(f"{len(tables.quantized)} embedding table(s) stored as per-row int8")
    smoothable = [t for t in targets if t.smoothable]
    if smooth_alpha is None or not smoothable:
        alphas: list[float | None] = [None]
    elif smooth_alpha == "auto":
        alphas = [None, *SMOOTH_ALPHAS]
    else:
        alphas = [float(smooth_alpha)]
    amax = _channel_amax(base, smoothable, calibration) if alphas != [None] else {}
    best: tuple[float, float, float | None, onnx.ModelProto] | None = None
    for i, alpha in enumerate(alphas):
        candidate = onnx.ModelProto()
        candidate.CopyFrom(base)
        if alpha is not None:
            smooth(candidate, smoothable, amax, alpha)
        quantized = _quantize(candidate)
        agreement = compare(reference, _run(quantized, evaluation))
        quality = agreement.mean_cosine
        if use_top1 and agreement.top1_agreement is not None:
            quality = agreement.top1_agreement
        report.sweep["none" if alpha is None else f"{alpha:g}"] = quality
        if best is None or (quality, agreement.mean_cosine) > (best[0], best[1]):  # a tie keeps less smoothing
            best = (quality, agreement.mean_cosine, alpha, quantized)
        if progress:
            progress((i + 1) / len(alphas))
    assert best is not None
    report.quality, report.mean_cosine, report.smooth_alpha = best[0], best[1], best[2]
    report.embeddings = table_report
    return best[3], report


def _targets(model: onnx.ModelProto) -> list[WeightNode]:
    """MatMul weights (2-D, constant) and fused Attention QKV weights: what quantize_dynamic turns into int8."""
    inits = {t.name: t for t in model.graph.initializer}
    out = [t for t in weight_nodes(model) if t.op_type == "MatMul"]
    for n in model.graph.node:
        w = inits.get(n.input[1]) if n.op_type == "Attention" and len(n.input) > 1 else None
        if w is not None and w.data_type == onnx.TensorProto.FLOAT and len(w.dims) == 2:
            out.append(WeightNode(n.name, n.op_type, n.input[0], n.input[1], True))  # weight [hidden, 3 * hidden]
    return out


def _quantize(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from compression.quantize import _quiet

    kept = {vi.name for vi in model.graph.value_info}
    with tempfile.TemporaryDirectory(prefix="slimserve-dyn-") as tmp, _quiet():
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save_model(model, str(src))
        quantize_dynamic(
            str(src),
            str(dst),
            per_channel=True,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(OP_TYPES),
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True},
        )
        out = onnx.load(str(dst))
    # the quantizer's shape inference lands in value_info; with it ORT fuses SkipLayerNormalization (slower here)
    annotations = [vi for vi in out.graph.value_info if vi.name in kept]
    del out.graph.value_info[:]
    out.graph.value_info.extend(annotations)
    return out


def _run(model: onnx.ModelProto, data: Samples) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    first = session.get_outputs()[0].name
    return np.concatenate([session.run([first], b)[0] for b in data.batches(BATCH)])


def _channel_amax(model: onnx.ModelProto, nodes: list[WeightNode], data: Samples) -> dict[str, np.ndarray]:
    """max |x| per last-axis channel of every smoothable activation, over the calibration samples."""
    import onnxruntime as ort

    tensors = sorted({t.activation for t in nodes})
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        add_outputs(model, tensors).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    amax: dict[str, np.ndarray] = {}
    for batch in data.batches(BATCH):
        for name, value in zip(tensors, session.run(tensors, batch), strict=True):
            a = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
            amax[name] = np.maximum(amax[name], a) if name in amax else a
    return amax
