"""prune -> quantize -> encode -> evaluate: turns one model into measured, servable variants.

Stages chain the way Deep Compression does: quantization and encoding start from the pruned model when
pruning was asked for. Every variant is evaluated against the original on held-out samples, and the
default variant is chosen by a stated policy: the fastest variant whose accuracy loss is within the
spec's tolerance (the original when nothing qualifies, or when there is no data to measure accuracy).

The default must be honest and beyond noise: a variant that is not smaller than the original, or an int8 one with
most of its weight bytes still float, is reported ``honest: false`` with the reason and never becomes the default;
and the fastest candidate is timed against the original (interleaved rounds, ``compression.timing``) and becomes
the default only when faster by more than ``SPEED_MARGIN`` beyond the noise. These bars are the optimize job's
(``compression.optimize.frontier``), defined there once.

Quantization makes two int8 forms. ``int8`` (QDQ, symmetric) is always published: it is the form TensorRT
consumes. ``int8-cpu`` (the form ONNX Runtime's CPU kernels run fastest) is published only when it is timed
faster than ``int8`` by more than ``CPU_FORM_MARGIN`` beyond the noise (``compression.timing``), unless the
spec says ``cpu_form: always`` or ``never``. Each variant carries its own details and its own evaluation.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from compression.calibration import Samples
from compression.fold import fold_constants
from compression.optimize.frontier import MAX_TIMED, SPEED_MARGIN, int8_verdict
from compression.spec import CompressionSpec

Progress = Callable[[str, float], None]
CPU_FORM_MARGIN = 0.05  # int8-cpu is published when it is faster than int8 by more than this, beyond noise
CPU_FORM_ROUNDS = 30  # interleaved rounds of the int8-cpu / int8 timing (at least compression.timing.MIN_ROUNDS)
# The forms differ in their kernels, and one intra-op thread times kernels reproducibly on a shared machine: with
# two threads on two busy cores the digits CNN's interval moved between runs from 0.767-0.789 to 0.728-1.054,
# with one it stayed within 0.74-0.79 (bench/int8_forms.py, docs/benchmarks.md).
CPU_FORM_THREADS = 1


class NeedsData(ValueError):
    """The spec asks for something that calibration data is needed for, and there is none."""


@dataclass(frozen=True)
class CompressionData:
    """The calibration samples the stages use and the held-out samples every variant is evaluated on."""

    calibration: Samples | None = None
    evaluation: Samples | None = None

    @classmethod
    def split(cls, samples: Samples | None, holdout_fraction: float, seed: int = 0) -> CompressionData:
        if samples is None:
            return cls()
        calibration, evaluation = samples.split(holdout_fraction, seed)
        return cls(calibration, evaluation)

    @property
    def has_data(self) -> bool:
        return self.calibration is not None


@dataclass(frozen=True)
class ProducedVariant:
    name: str
    kind: str
    stored: bytes  # the artifact kept in the store (the encoded form for `encoded`)
    runnable: bytes  # the ONNX model the backends run
    details: dict[str, Any] = field(default_factory=dict)  # this variant's own: never shared with another


@dataclass
class PipelineResult:
    variants: list[ProducedVariant]
    default_variant: str
    table: list[dict[str, Any]]
    notes: list[str]


def _sub(progress: Progress, stage: str) -> Callable[[float], None]:
    return lambda f: progress(stage, f)


def run_pipeline(original: bytes, spec: CompressionSpec, data: CompressionData, progress: Progress) -> PipelineResult:
    notes: list[str] = []
    # Fold constant subgraphs once, so every stage sees weights computed from constants as initializers.
    model, note = fold_constants(onnx.load_from_string(original))
    if note:
        notes.append(note)
    produced: list[ProducedVariant] = []
    base, base_name = model, "original"

    if spec.prune is not None:
        from compression.prune import prune_model

        p = spec.prune
        if not data.has_data:
            notes.append("no calibration data: pruning is magnitude-only (no layer reconstruction)")
        progress("prune", 0.0)
        pruned, report = prune_model(
            model, p.sparsity, p.pattern, calibration=data.calibration, scope=p.scope, progress=_sub(progress, "prune")
        )
        name = "sparse24" if p.pattern == "2:4" else "pruned"
        blob = pruned.SerializeToString()
        produced.append(ProducedVariant(name, "pruned", blob, blob, {"prune": _plain(report)}))
        base, base_name = pruned, name

    if spec.quantize is not None:
        produced += _quantize(base, base_name, spec, data, progress, notes)

    if spec.encode is not None:
        from compression.encode import decode_model, encode_model

        progress("encode", 0.0)
        blob, ereport = encode_model(base, spec.encode.bits, progress=_sub(progress, "encode"))
        runnable = decode_model(blob).SerializeToString()
        produced.append(
            ProducedVariant("encoded", "encoded", blob, runnable, {"encode": _plain(ereport), "base": base_name})
        )

    table = evaluate_all(original, produced, data, spec, progress, notes)
    variants = [_with_evaluation(v, row) for v, row in zip(produced, table[1:], strict=True)]
    runnable = {v.name: v.runnable for v in produced}
    sample = data.evaluation or data.calibration

    def faster(name: str) -> bool:
        """The variant is faster than the original beyond the noise (interleaved rounds, 95 % interval)."""
        from compression.evaluate import compare_latency

        assert sample is not None
        timing = compare_latency(runnable[name], original, sample, rounds=CPU_FORM_ROUNDS, threads=CPU_FORM_THREADS)
        ok = timing.faster(SPEED_MARGIN)
        notes.append(
            f"{name} {'is' if ok else 'is not'} faster than the original beyond noise: time ratio {timing.ratio:.3f} "
            f"(95% interval {timing.low:.3f}-{timing.high:.3f}, {timing.rounds} rounds; below "
            f"{1 - SPEED_MARGIN:.2f} needed to become the default)"
        )
        return ok

    default = choose_default(table, spec.tolerance, faster if sample is not None else None)
    return PipelineResult(variants, default, table, notes)


def _quantize(
    base: onnx.ModelProto,
    base_name: str,
    spec: CompressionSpec,
    data: CompressionData,
    progress: Progress,
    notes: list[str],
) -> list[ProducedVariant]:
    """``int8`` (QDQ, what TensorRT consumes) and, when it earns its place, ``int8-cpu`` (ORT CPU's fast form)."""
    from compression.evaluate import compare_latency
    from compression.quantize import quantize_model

    q = spec.quantize
    assert q is not None
    if data.calibration is None:
        raise NeedsData(
            "int8 calibration needs data: upload the version with a `calibration` .npz, or give one with the job"
        )
    progress("quantize", 0.0)
    forms, qreport = quantize_model(
        base,
        data.calibration,
        method=q.calibration,
        tolerance=q.tolerance,
        evaluation=data.evaluation,
        progress=_sub(progress, "quantize"),
        metric=spec.metric,
    )
    stage = {"quantize": _plain(qreport), "base": base_name}
    qdq = forms["qdq"].SerializeToString()
    cpu = forms["cpu"].SerializeToString() if "cpu" in forms and q.cpu_form != "never" else None
    decision: dict[str, Any] | None = None
    if cpu is not None:
        decision = {"policy": q.cpu_form, "margin": CPU_FORM_MARGIN, "published": True}
        if q.cpu_form == "auto":
            # int8-cpu is a second int8 variant to store and load: it is kept only when it is measurably faster.
            sample = data.evaluation or data.calibration
            rounds = max(CPU_FORM_ROUNDS, spec.latency_runs)
            timing = compare_latency(cpu, qdq, sample, rounds=rounds, threads=CPU_FORM_THREADS)
            decision.update(timing.to_dict(), threads=CPU_FORM_THREADS, published=timing.faster(CPU_FORM_MARGIN))
            notes.append(
                f"int8-cpu {'published' if decision['published'] else 'not published'}: its latency is "
                f"{timing.ratio:.3f}x int8's (95% interval {timing.low:.3f}-{timing.high:.3f}, {timing.rounds} "
                f"interleaved rounds); it must be below {1 - CPU_FORM_MARGIN:.2f}"
            )
    extra = {} if decision is None else {"int8_cpu": decision}
    out = [ProducedVariant("int8", "int8-qdq", qdq, qdq, copy.deepcopy({**stage, "form": "qdq", **extra}))]
    if cpu is not None and decision is not None and decision["published"]:
        out.append(ProducedVariant("int8-cpu", "int8-cpu", cpu, cpu, copy.deepcopy({**stage, "form": "cpu", **extra})))
    return out


def _with_evaluation(variant: ProducedVariant, row: dict[str, Any]) -> ProducedVariant:
    """The variant with its own evaluation row added to a copy of its details."""
    details = copy.deepcopy(variant.details)
    details["evaluation"] = {k: copy.deepcopy(v) for k, v in row.items() if k not in ("variant", "kind")}
    if isinstance(row.get("accuracy_delta"), int | float):
        details["accuracy_delta"] = row["accuracy_delta"]
    if "honest" in row:
        details["honest"], details["why"] = row["honest"], row["why"]
    return ProducedVariant(variant.name, variant.kind, variant.stored, variant.runnable, details)


def evaluate_all(
    original: bytes,
    produced: list[ProducedVariant],
    data: CompressionData,
    spec: CompressionSpec,
    progress: Progress,
    notes: list[str],
) -> list[dict[str, Any]]:
    """One row per candidate, the original first: size, ratio, sparsity, accuracy against it, latency."""
    from compression.evaluate import evaluate_variant, measure_latency, model_sparsity

    progress("evaluate", 0.0)
    sample = _latency_sample(original, data)
    rows: list[dict[str, Any]] = []
    candidates = [
        ("original", "original", original, original),
        *[(v.name, v.kind, v.stored, v.runnable) for v in produced],
    ]
    evaluation = data.evaluation
    if evaluation is None:
        notes.append("no held-out data: accuracy was not measured; the original stays the default")
    for i, (name, kind, stored, runnable) in enumerate(candidates):
        row: dict[str, Any] = {
            "variant": name,
            "kind": kind,
            "size_bytes": len(stored),
            "compression_ratio": round(len(original) / max(1, len(stored)), 3),
            "sparsity": round(model_sparsity(onnx.load_from_string(runnable)), 4),
        }
        if evaluation is not None and name != "original":
            ev = evaluate_variant(original, runnable, evaluation, evaluation.labels)
            row["accuracy"] = _jsonable(ev.get("primary"))
            row["accuracy_delta"] = accuracy_delta(ev.get("primary") or {}, spec.metric)
        elif name == "original":
            row["accuracy_delta"] = 0.0
        row["latency"] = measure_latency(runnable, sample, batch_size=1, runs=spec.latency_runs)
        if name != "original":
            row["honest"], row["why"] = honesty(kind, len(stored), len(original), runnable)
        if kind == "encoded":
            row["bits_per_weight"] = (
                next(v for v in produced if v.name == name).details["encode"].get("bits_per_weight_overall")
            )
        rows.append(row)
        progress("evaluate", (i + 1) / len(candidates))
    return rows


def accuracy_delta(primary: dict[str, Any], metric: str) -> float | None:
    """The change the default policy weighs: accuracy (or top-1 agreement) for classifiers, cosine otherwise."""
    if metric == "cosine":
        cos = primary.get("mean_cosine")
        return None if cos is None else cos - 1.0
    if metric == "top1" and primary.get("top1_agreement") is None:
        raise ValueError("metric 'top1' needs a classifier output ([N, C] scores)")
    return primary.get("accuracy_delta")


def choose_default(table: list[dict[str, Any]], tolerance: float, faster: Callable[[str], bool] | None = None) -> str:
    """The fastest honest variant (p50 at batch 1) whose accuracy loss is within ``tolerance`` and, with
    ``faster``, that is timed faster than the original beyond the noise (the first ``MAX_TIMED``
    candidates are timed, fastest first); the original when none is."""
    ranked = []
    for row in table:
        delta = row.get("accuracy_delta")
        if row["variant"] == "original" or row.get("honest") is False:
            continue
        if not isinstance(delta, int | float) or -delta > tolerance + 1e-12:
            continue
        p50 = (row.get("latency") or {}).get("p50_ms")
        if p50 is not None:
            ranked.append((p50, row["variant"]))
    for _, name in sorted(ranked)[:MAX_TIMED]:
        if faster is None or faster(name):
            return name
    return "original"


def honesty(kind: str, size_bytes: int, original_bytes: int, runnable: bytes) -> tuple[bool, str]:
    """(honest, why): an int8 variant holds most weight bytes in int8; every variant is smaller than the original
    (the latency half of "smaller or faster" is ``choose_default``'s timing)."""
    from compression.evaluate import int8_weight_share

    if kind.startswith("int8"):
        mostly_float = int8_verdict(int8_weight_share(onnx.load_from_string(runnable)))
        if mostly_float is not None:
            return False, mostly_float
    if size_bytes >= original_bytes:
        return False, f"not smaller than the original ({size_bytes:,} vs {original_bytes:,} bytes)"
    return True, f"{original_bytes / size_bytes:.2f}x smaller than the original"


def _latency_sample(original: bytes, data: CompressionData) -> dict[str, np.ndarray]:
    """One batch to time: a held-out sample (the model's fixed batch size of them), or zeros without data."""
    source = data.evaluation or data.calibration
    if source is not None:
        return next(source.batches(1))
    from backends.datatypes import numpy_dtype
    from backends.onnx_model import model_interface

    inputs, _ = model_interface(onnx.load_from_string(original))
    return {t.name: np.zeros([1 if d < 0 else d for d in t.shape], dtype=numpy_dtype(t.datatype)) for t in inputs}


def _plain(report: Any) -> dict[str, Any]:
    """A report dataclass as JSON-ready data (numpy scalars become Python numbers)."""
    from dataclasses import asdict, is_dataclass

    raw = asdict(report) if is_dataclass(report) else dict(report)
    return _jsonable(raw)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x
