"""INT8 post-training static quantization (QDQ), accuracy-aware, built on ``onnxruntime.quantization``.

Pipeline (``quantize_model``):

1. Only the weight ops are quantized: MatMul / Gemm / Conv whose weight is a float initializer. Add, LayerNorm,
   Softmax, GELU and activation x activation MatMuls (attention scores) stay float; their outliers are what makes
   transformers collapse under ORT's static defaults. MatMul/Gemm outputs are not re-quantized: ORT CPU runs
   DQ -> MatMul as MatMulIntegerToFloat with a float output.
2. SmoothQuant (optional; ``smooth_alpha="auto"`` picks alpha on the evaluation set): per-channel activation
   outliers feeding MatMul/Gemm move into the weight rows (``compression.quantize_graph.smooth``).
3. Calibration runs once per candidate model with ORT's own calibrator (MinMax, Entropy or Percentile), fed in
   chunks so memory stays bounded; its ranges go to a cache file that every later ``quantize_static`` call reuses.
4. Forms: ``qdq`` = QDQ, symmetric int8 activations (zero point 0) and per-channel symmetric int8 weights, Q/DQ on
   the inputs of quantized ops only (what TensorRT consumes); ``cpu`` = the same with asymmetric uint8 activations
   (U8S8, ORT's fastest int8 kernels on x86) and Conv outputs quantized so ORT fuses QLinearConv. After ORT
   has written a form, consumers that are not quantized read the float tensor again (residual stream stays float),
   and the value_info annotations ORT's shape inference added are dropped (see ``_Job._build``).
5. With a ``tolerance``, nodes are ranked by how much falling each back to float alone recovers (Intel Neural
   Compressor's op-wise fallback) and fallen back greedily, most damaging first, until the loss is within it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import platform
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from compression.calibration import Samples, check_feeds
from compression.fold import fold_constants
from compression.metrics import compare, looks_like_classifier
from compression.quantize_graph import (
    WeightNode,
    add_outputs,
    float_for_unquantized_consumers,
    name_nodes,
    smooth,
    weight_nodes,
)

Method = Literal["minmax", "entropy", "percentile"]
MetricName = Literal["auto", "top1", "cosine"]
METHODS = ("minmax", "entropy", "percentile")
SMOOTH_ALPHAS = (0.5, 0.75, 0.9)  # "auto" also tries no smoothing
CALIBRATION_BATCH = 16
EVAL_BATCH = 32
MAX_HELD_OUT = 256
MIN_OPSET = 13
EPS = 1e-6  # float noise: a model with every node in float still differs from fp32 in the last bits
log = logging.getLogger(__name__)


@dataclass
class QuantReport:
    method: str
    per_channel: bool
    symmetric: bool
    nodes_quantized: int
    fallback_nodes: list[str]  # kept in float by the accuracy search, most damaging first
    metric_before_fallback: float  # quality of the qdq form (top-1 agreement or mean cosine; 1.0 = fp32)
    metric_after: float
    tolerance: float | None
    forms: dict[str, str]
    notes: list[str]
    metric: str = "mean_cosine"  # what metric_* measure: "top1_agreement" or "mean_cosine"
    form_metrics: dict[str, float] = field(default_factory=dict)  # form -> quality after fallback
    smooth_alpha: float | None = None  # SmoothQuant migration strength used (None: not applied)
    tolerance_met: bool | None = None
    embeddings: dict[str, Any] | None = None  # compression.embeddings report when embeddings were quantized

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Form:
    activation_signed: bool  # int8 symmetric (True) or uint8 asymmetric (False)
    quantize_conv_output: bool


_Key = tuple[str, _Form, tuple[str, ...]]  # (model file, form, excluded nodes)
QDQ_FORM = _Form(activation_signed=True, quantize_conv_output=False)
# ORT's own guidance: U8S8 on x86-64 (with or without VNNI), S8S8 on ARM.
CPU_FORM = _Form(activation_signed=platform.machine().lower() in ("arm64", "aarch64"), quantize_conv_output=True)


def quantize_model(
    model: onnx.ModelProto,
    calibration: dict[str, np.ndarray] | Samples,
    method: Method = "minmax",
    tolerance: float | None = None,
    evaluation: dict[str, np.ndarray] | Samples | None = None,
    progress: Callable[[float], None] | None = None,
    *,
    metric: MetricName = "auto",
    smooth_alpha: float | Literal["auto"] | None = "auto",
    embeddings: bool = False,
) -> tuple[dict[str, onnx.ModelProto], QuantReport]:
    """Quantize ``model`` to int8 with static QDQ; return ``{"qdq": ..., "cpu": ...}`` and a report.

    ``tolerance`` is the accuracy loss allowed on ``evaluation`` (held-out samples; without them a fifth of
    ``calibration`` is held out): 1 - top-1 agreement with fp32 for a classifier ([N, C] first output), else
    1 - mean cosine of the first output; ``metric`` forces either ("top1" / "cosine"), e.g. for an embedding
    model whose [N, D] output is not class scores. Nodes are fallen back to float until the loss is within it.
    Weights computed by constant subgraphs are folded into initializers first (``compression.fold``), and a
    model with a fixed batch dimension is calibrated and scored that many samples at a time.
    ``embeddings=True`` also stores large Gather tables (word embeddings) as per-row int8
    (``compression.embeddings``) before calibration, so every measured quality includes them.
    """
    from onnxruntime.quantization import quantize_static

    if "calibration_cache_path" not in _signature_params(quantize_static):
        raise RuntimeError("compression.quantize needs onnxruntime >= 1.27 (quantize_static calibration_cache_path)")
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}: use one of {', '.join(METHODS)}")
    if tolerance is not None and (
        isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not 0.0 <= tolerance <= 1.0
    ):
        raise ValueError(f"tolerance must be a fraction between 0 and 1 (accuracy loss allowed), got {tolerance!r}")
    if metric not in ("auto", "top1", "cosine"):
        raise ValueError(f"unknown metric {metric!r}: use auto, top1 or cosine")
    if smooth_alpha not in ("auto", None) and (
        isinstance(smooth_alpha, bool) or not isinstance(smooth_alpha, int | float) or not 0 < smooth_alpha <= 1
    ):
        raise ValueError(f"smooth_alpha must be 'auto', None or in (0, 1], got {smooth_alpha!r}")
    if not isinstance(model, onnx.ModelProto):
        raise ValueError("model must be an onnx.ModelProto")
    calibration = check_feeds(model, calibration, "calibration")
    notes: list[str] = []
    if evaluation is None:
        calibration, evaluation, note = _hold_out(calibration)
        notes.append(note)
    else:
        evaluation = check_feeds(model, evaluation, "evaluation")
    folded, note = fold_constants(model)
    if note:
        notes.append(note)
    base = onnx.ModelProto()
    base.CopyFrom(folded)
    opset = next((o.version for o in base.opset_import if o.domain in ("", "ai.onnx")), MIN_OPSET)
    if opset < MIN_OPSET:  # per-channel QuantizeLinear/DequantizeLinear (the axis attribute) arrived in opset 13
        try:
            base = onnx.version_converter.convert_version(base, MIN_OPSET)
        except Exception as e:
            raise ValueError(f"per-channel int8 needs opset >= {MIN_OPSET}; converting from {opset} failed: {e}") from e
        notes.append(f"converted from opset {opset} to {MIN_OPSET} (per-channel Q/DQ)")
    embedding_report = None
    reference = base  # quality is measured against the float model, embeddings included
    if embeddings:
        from compression.embeddings import quantize_embeddings

        base, table_report = quantize_embeddings(base)
        embedding_report = table_report.to_dict()
        notes.append(f"{len(table_report.quantized)} embedding table(s) stored as per-row int8")
    name_nodes(base)
    targets = weight_nodes(base)
    if not targets:
        raise ValueError("nothing to quantize: the model has no MatMul, Gemm or Conv with a constant float weight")
    with tempfile.TemporaryDirectory(prefix="slimserve-quant-") as tmp:
        job = _Job(
            base, targets, calibration, evaluation, method, metric, Path(tmp), _Progress(progress), notes, reference
        )
        models, report = job.run(tolerance, smooth_alpha)
    report.embeddings = embedding_report
    return models, report


class _Job:
    def __init__(
        self,
        base: onnx.ModelProto,
        targets: list[WeightNode],
        calibration: Samples,
        evaluation: Samples,
        method: Method,
        metric: MetricName,
        tmp: Path,
        progress: _Progress,
        notes: list[str],
        reference: onnx.ModelProto | None = None,
    ) -> None:
        self.base, self.targets, self.method, self.tmp, self.progress, self.notes = (
            base,
            targets,
            method,
            tmp,
            progress,
            notes,
        )
        self.calibration, self.evaluation = calibration, evaluation
        self.value_info = {vi.name for vi in base.graph.value_info}
        self.large = base.ByteSize() > 1_800_000_000  # protobuf's 2 GB limit: weights go to external data
        self.reference = self._outputs(base if reference is None else reference, evaluation)
        if metric == "auto":
            metric = "top1" if looks_like_classifier(self.reference) else "cosine"
        self.metric = metric
        self.builds = 0
        self.memo: dict[_Key, tuple[float, float]] = {}
        self.latest: dict[_Form, tuple[_Key, Path]] = {}

    # --- the steps ------------------------------------------------------------------------------------------

    def run(
        self, tolerance: float | None, smooth_alpha: float | str | None
    ) -> tuple[dict[str, onnx.ModelProto], QuantReport]:
        alpha, model_path, cache = self._choose_smoothing(smooth_alpha)
        names = [t.name for t in self.targets]
        self.progress(0.45)
        before, _ = self._score(model_path, cache, QDQ_FORM, [])
        fallback: list[str] = []
        has_conv = any(t.op_type == "Conv" for t in self.targets)
        cpu_differs = CPU_FORM.activation_signed != QDQ_FORM.activation_signed or has_conv
        forms_to_check = [QDQ_FORM] + ([CPU_FORM] if cpu_differs else [])
        if tolerance is not None and 1.0 - before > tolerance + EPS:
            ranking = self._rank(model_path, cache, names, before, start=0.45, end=0.8)
            for form in forms_to_check:  # the qdq form first; the cpu form only adds nodes if it needs more
                fallback = self._fall_back(model_path, cache, form, ranking, fallback, tolerance)
            log.info("quantize: %d node(s) fall back to float: %s", len(fallback), fallback)
        self.progress(0.9)
        models: dict[str, onnx.ModelProto] = {}
        qualities: dict[str, float] = {}
        for form in forms_to_check:
            key = "qdq" if form == QDQ_FORM else "cpu"
            qualities[key], _ = self._score(model_path, cache, form, fallback)
            models[key] = self._final(model_path, cache, form, fallback)
        self.progress(1.0)
        met = None if tolerance is None else all(1.0 - q <= tolerance + EPS for q in qualities.values())
        if met is False:
            self.notes.append(f"tolerance {tolerance} not met even with {len(fallback)} node(s) in float")
        forms = {
            "qdq": "QDQ, int8 symmetric activations (zero point 0), per-channel symmetric int8 weights, "
            "Q/DQ on quantized op inputs: the explicit-quantization form TensorRT consumes"
        }
        if "cpu" in models:
            forms["cpu"] = (
                "QDQ, uint8 asymmetric activations, per-channel symmetric int8 weights (U8S8), Conv "
                "outputs quantized: ONNX Runtime CPU fuses it into MatMulIntegerToFloat / QLinearConv"
            )
        self.notes.append(
            f"{self.calibration.count} calibration / {self.evaluation.count} evaluation samples; "
            f"{self.builds} quantized models built"
        )
        return models, QuantReport(
            method=self.method,
            per_channel=True,
            symmetric=True,
            nodes_quantized=len(names) - len(fallback),
            fallback_nodes=fallback,
            metric_before_fallback=before,
            metric_after=qualities["qdq"],
            tolerance=tolerance,
            forms=forms,
            notes=self.notes,
            metric="top1_agreement" if self.metric == "top1" else "mean_cosine",
            form_metrics=qualities,
            smooth_alpha=alpha,
            tolerance_met=met,
        )

    def _choose_smoothing(self, smooth_alpha: float | str | None) -> tuple[float | None, Path, Path]:
        """Calibrate the model (smoothed or not) and return (alpha, model path, calibration cache)."""
        smoothable = [t for t in self.targets if t.smoothable]
        if smooth_alpha is None or not smoothable:
            candidates: list[float | None] = [None]
        elif smooth_alpha == "auto":
            candidates = [None, *SMOOTH_ALPHAS]
        else:
            candidates = [float(smooth_alpha)]
        amax = self._channel_amax(smoothable) if candidates != [None] else {}
        results = []
        smoothed: dict[float, int] = {}
        for i, alpha in enumerate(candidates):
            model = onnx.ModelProto()
            model.CopyFrom(self.base)
            if alpha is not None:
                smoothed[alpha] = smooth(model, smoothable, amax, alpha)
            tag = "plain" if alpha is None else f"sq{alpha:g}"
            path = self._save(model, f"{tag}.onnx")
            span = 0.4 / len(candidates)
            cache = self._calibrate(path, self.tmp / f"{tag}.calib.json", 0.05 + span * i, 0.05 + span * (i + 1))
            score = self._score(path, cache, QDQ_FORM, []) if len(candidates) > 1 else (0.0, 0.0)
            results.append((score, alpha, path, cache))
        _, alpha, path, cache = max(results, key=lambda r: r[0])  # the first (least smoothing) wins a tie
        if len(candidates) > 1:
            tried = ", ".join(f"{'none' if a is None else a}: {s[0]:.5f}" for s, a, _, _ in results)
            self.notes.append(f"SmoothQuant alpha chosen on the evaluation set ({self._metric_label()}: {tried})")
            log.info("quantize: SmoothQuant alpha %s (%s)", alpha, tried)
        if alpha is not None:
            self.notes.append(
                f"SmoothQuant alpha {alpha}: {smoothed[alpha]} activation(s) rescaled by a Mul in front of their "
                "quantized MatMul/Gemm consumers, whose weights carry the inverse scale"
            )
        return alpha, path, cache

    def _rank(
        self, model_path: Path, cache: Path, names: list[str], base_quality: float, start: float, end: float
    ) -> list[str]:
        """Nodes by how much falling back each one alone recovers, most first (cosine breaks top-1 ties)."""
        gains = []
        for i, name in enumerate(names):
            quality, cosine = self._score(model_path, cache, QDQ_FORM, [name])
            gains.append((quality - base_quality, cosine, name))
            self.progress(start + (end - start) * (i + 1) / len(names))
        gains.sort(key=lambda g: (-g[0], -g[1]))
        return [g[2] for g in gains]

    def _fall_back(
        self, model_path: Path, cache: Path, form: _Form, ranking: list[str], fallback: list[str], tolerance: float
    ) -> list[str]:
        """Add nodes to ``fallback`` in ranking order until ``form`` is within ``tolerance``."""
        fallback = list(fallback)
        quality, _ = self._score(model_path, cache, form, fallback)
        for name in ranking:
            if 1.0 - quality <= tolerance + EPS:
                break
            if name in fallback:
                continue
            fallback.append(name)
            quality, _ = self._score(model_path, cache, form, fallback)
        return fallback

    # --- ONNX Runtime ---------------------------------------------------------------------------------------

    def _calibrate(self, model_path: Path, cache: Path, start: float, end: float) -> Path:
        from onnxruntime.quantization import CalibrationDataReader, create_calibrator, save_tensors_data

        class Reader(CalibrationDataReader):
            def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
                self.batches = iter(batches)

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self.batches, None)

        options: dict[str, Any] = {}
        if self.method == "entropy":  # ORT's quantize_static default (128 bins) leaves entropy no choice: MinMax
            options = {"num_bins": 2048, "num_quantized_bins": 255}
        elif self.method == "percentile":
            options = {"num_bins": 2048, "percentile": 99.999, "symmetric": False}
        calibrator = create_calibrator(
            model_path,
            sorted({t.op_type for t in self.targets}),
            augmented_model_path=str(self.tmp / "augmented.onnx"),
            calibrate_method=_calibration_method(self.method),
            providers=["CPUExecutionProvider"],
            extra_options=options,
        )
        # Only the tensors that get Q/DQ need ranges (ORT would also histogram every MatMul output).
        model = onnx.load(str(model_path), load_external_data=False)
        names = {t.name for t in self.targets}
        wanted = {n.input[0] for n in model.graph.node if n.name in names}
        wanted |= {n.output[0] for n in model.graph.node if n.op_type == "Conv" and n.name in names}
        if isinstance(getattr(calibrator, "tensors_to_calibrate", None), set | list | dict):
            calibrator.tensors_to_calibrate = {t for t in calibrator.tensors_to_calibrate if t in wanted}
        batches = list(self.calibration.batches(CALIBRATION_BATCH))
        with _quiet():
            for i, batch in enumerate(batches):  # one batch per call: histogram calibrators hold a call's outputs
                calibrator.collect_data(Reader([batch]))
                self.progress(start + (end - start) * 0.9 * (i + 1) / len(batches))
            save_tensors_data(calibrator.compute_data(), cache)
        del calibrator
        (self.tmp / "augmented.onnx").unlink(missing_ok=True)
        return cache

    def _build(self, model_path: Path, cache: Path, form: _Form, exclude: list[str]) -> Path:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        out = self.tmp / "ort-output.onnx"
        quantized = {t.name for t in self.targets} - set(exclude)
        self.builds += 1
        if not quantized:  # everything in float
            return model_path
        excluded_output_ops = ["MatMul", "Gemm"] + ([] if form.quantize_conv_output else ["Conv"])
        with _quiet():
            quantize_static(
                str(model_path),
                str(out),
                calibration_data_reader=None,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=sorted({t.op_type for t in self.targets}),
                nodes_to_quantize=sorted(quantized) or None,
                nodes_to_exclude=sorted(exclude) or None,
                per_channel=True,
                activation_type=QuantType.QInt8 if form.activation_signed else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=_calibration_method(self.method),
                calibration_cache_path=str(cache),
                use_external_data_format=self.large,
                extra_options={
                    "ActivationSymmetric": form.activation_signed,
                    "WeightSymmetric": True,
                    "OpTypesToExcludeOutputQuantization": excluded_output_ops,
                },
            )
        model = onnx.load(str(out))
        float_for_unquantized_consumers(model, quantized)
        # quantize_static writes the value_info of its shape inference into the model; with it, ORT (1.32) fuses
        # bias Add + residual Add + LayerNormalization into SkipLayerNormalization, whose CPU kernel made the
        # int8 encoder ~30% slower than Add + LayerNormalization. Keep only the annotations the model came with.
        kept = [vi for vi in model.graph.value_info if vi.name in self.value_info]
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept)
        out.unlink()
        Path(f"{out}.data").unlink(missing_ok=True)
        return self._save(model, f"candidate-{self.builds}.onnx")

    def _outputs(self, model: onnx.ModelProto | Path, data: Samples) -> np.ndarray:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        source = str(model) if isinstance(model, Path) else model.SerializeToString()
        session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        first = session.get_outputs()[0].name
        return np.concatenate([session.run([first], b)[0] for b in data.batches(EVAL_BATCH)])

    def _channel_amax(self, nodes: list[WeightNode]) -> dict[str, np.ndarray]:
        """max |x| per last-axis channel of every smoothable activation, over the calibration set."""
        import onnxruntime as ort

        tensors = sorted({t.activation for t in nodes})
        model = add_outputs(self.base, tensors)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        amax: dict[str, np.ndarray] = {}
        for batch in self.calibration.batches(CALIBRATION_BATCH):
            for name, value in zip(tensors, session.run(tensors, batch), strict=True):
                a = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
                amax[name] = np.maximum(amax[name], a) if name in amax else a
        return amax

    # --- helpers --------------------------------------------------------------------------------------------

    def _score(self, model_path: Path, cache: Path, form: _Form, exclude: list[str]) -> tuple[float, float]:
        """(quality, mean cosine) of one quantized candidate on the evaluation set; memoized.

        The latest candidate file of each form is kept (the final model is usually the last one scored);
        older ones are deleted so a long fallback search does not fill the disk.
        """
        key = (str(model_path), form, tuple(sorted(exclude)))
        if key not in self.memo:
            path = self._build(model_path, cache, form, exclude)
            agreement = compare(self.reference, self._outputs(path, self.evaluation))
            quality = agreement.mean_cosine
            if self.metric == "top1" and agreement.top1_agreement is not None:
                quality = agreement.top1_agreement
            self.memo[key] = (quality, agreement.mean_cosine)
            previous = self.latest.get(form)
            if previous is not None and previous[1].name.startswith("candidate-"):
                previous[1].unlink(missing_ok=True)
                Path(f"{previous[1]}.data").unlink(missing_ok=True)
            self.latest[form] = (key, path)
        return self.memo[key]

    def _final(self, model_path: Path, cache: Path, form: _Form, exclude: list[str]) -> onnx.ModelProto:
        key = (str(model_path), form, tuple(sorted(exclude)))
        latest = self.latest.get(form)
        path = latest[1] if latest is not None and latest[0] == key else self._build(model_path, cache, form, exclude)
        return onnx.load(str(path))

    def _metric_label(self) -> str:
        return "top-1 agreement" if self.metric == "top1" else "mean cosine"

    def _save(self, model: onnx.ModelProto, name: str) -> Path:
        path = self.tmp / name
        onnx.save_model(model, str(path), save_as_external_data=self.large, location=f"{name}.data")
        return path


class _Progress:
    def __init__(self, callback: Callable[[float], None] | None) -> None:
        self.callback, self.last = callback, 0.0

    def __call__(self, fraction: float) -> None:
        fraction = min(max(fraction, self.last), 1.0)
        self.last = fraction
        if self.callback is not None:
            self.callback(fraction)


def _hold_out(data: Samples) -> tuple[Samples, Samples, str]:
    """A fifth of the calibration batches (at most MAX_HELD_OUT samples) held out to measure accuracy."""
    b = data.batch or 1
    groups = data.count // b
    if groups < 2:
        return data, data, "one calibration batch: evaluated on the calibration samples themselves"
    k = b * max(1, min(groups // 5, MAX_HELD_OUT // b))  # whole batches: a fixed batch size still divides
    idx = np.random.default_rng(0).permutation(data.count)
    return (
        data.take(np.sort(idx[k:])),
        data.take(np.sort(idx[:k])),
        f"no evaluation set given: held out {k} of {data.count} calibration samples to measure accuracy",
    )


def _calibration_method(method: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]


def _signature_params(fn: Callable[..., Any]) -> set[str]:
    import inspect

    return set(inspect.signature(fn).parameters)


class _DropPreProcessHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ORT's calibrators print() progress and quantize_static logs a pre-processing hint on every call."""
    hint = _DropPreProcessHint()
    root = logging.getLogger()
    root.addFilter(hint)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.removeFilter(hint)
