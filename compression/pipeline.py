"""prune -> quantize -> encode -> evaluate: turns one model into measured, servable variants.

Stages chain the way Deep Compression does: quantization and encoding start from the pruned model when
pruning was asked for. Every variant is evaluated against the original on held-out samples, and the
default variant is chosen by a stated policy: the fastest variant whose accuracy loss is within the
spec's tolerance (the original when nothing qualifies, or when there is no data to measure accuracy).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from compression.spec import CompressionSpec

Progress = Callable[[str, float], None]


class NeedsData(ValueError):
    """The spec asks for something that calibration data is needed for, and there is none."""


@dataclass
class CompressionData:
    calibration: dict[str, np.ndarray] | None
    evaluation: dict[str, np.ndarray] | None
    labels: np.ndarray | None  # labels of the evaluation samples, when the .npz carried a `labels` array

    @property
    def has_data(self) -> bool:
        return self.calibration is not None


def load_data(npz: bytes | None, input_names: list[str], holdout_fraction: float, seed: int = 0) -> CompressionData:
    """Split an .npz (arrays named after the inputs, optional `labels`) into calibration and held-out parts."""
    if npz is None:
        return CompressionData(None, None, None)
    try:
        with np.load(io.BytesIO(npz), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"calibration data is not a readable .npz: {e}") from None
    labels = arrays.pop("labels", None)
    missing = sorted(set(input_names) - set(arrays))
    if missing:
        raise ValueError(f"calibration data lacks arrays for inputs {missing}")
    n = next(iter(arrays.values())).shape[0]
    if n < 2:
        raise ValueError("calibration data needs at least 2 samples (some are held out for evaluation)")
    order = np.random.default_rng(seed).permutation(n)
    n_eval = min(n - 1, max(1, round(n * holdout_fraction)))
    ev, cal = order[:n_eval], order[n_eval:]
    return CompressionData(
        calibration={k: v[cal] for k, v in arrays.items() if k in input_names},
        evaluation={k: v[ev] for k, v in arrays.items() if k in input_names},
        labels=labels[ev] if labels is not None and labels.shape[0] == n else None,
    )


@dataclass
class ProducedVariant:
    name: str
    kind: str
    stored: bytes  # the artifact kept in the store (the encoded form for `encoded`)
    runnable: bytes  # the ONNX model the backends run
    details: dict[str, Any] = field(default_factory=dict)


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
    model = onnx.load_from_string(original)
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
        from compression.quantize import quantize_model

        q = spec.quantize
        if not data.has_data or data.calibration is None:
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
        details = {"quantize": _plain(qreport), "base": base_name}
        qdq = forms["qdq"].SerializeToString()
        produced.append(ProducedVariant("int8", "int8-qdq", qdq, qdq, details))
        if "cpu" in forms:
            cpu = forms["cpu"].SerializeToString()
            produced.append(ProducedVariant("int8-cpu", "int8-cpu", cpu, cpu, details))

    if spec.encode is not None:
        from compression.encode import decode_model, encode_model

        progress("encode", 0.0)
        blob, ereport = encode_model(base, spec.encode.bits, progress=_sub(progress, "encode"))
        runnable = decode_model(blob).SerializeToString()
        produced.append(
            ProducedVariant("encoded", "encoded", blob, runnable, {"encode": _plain(ereport), "base": base_name})
        )

    table = evaluate_all(original, produced, data, spec, progress, notes)
    default = choose_default(table, spec.tolerance)
    return PipelineResult(produced, default, table, notes)


def evaluate_all(
    original: bytes,
    produced: list[ProducedVariant],
    data: CompressionData,
    spec: CompressionSpec,
    progress: Progress,
    notes: list[str],
) -> list[dict[str, Any]]:
    from compression.evaluate import evaluate_variant, measure_latency, model_sparsity

    progress("evaluate", 0.0)
    sample = _latency_sample(original, data)
    rows: list[dict[str, Any]] = []
    candidates = [
        ("original", "original", original, original, {}),
        *[(v.name, v.kind, v.stored, v.runnable, v.details) for v in produced],
    ]
    if data.evaluation is None:
        notes.append("no held-out data: accuracy was not measured; the original stays the default")
    for i, (name, kind, stored, runnable, details) in enumerate(candidates):
        row: dict[str, Any] = {
            "variant": name,
            "kind": kind,
            "size_bytes": len(stored),
            "compression_ratio": round(len(original) / max(1, len(stored)), 3),
            "sparsity": round(model_sparsity(onnx.load_from_string(runnable)), 4),
        }
        if data.evaluation is not None and name != "original":
            ev = evaluate_variant(original, runnable, data.evaluation, data.labels)
            row["accuracy"] = ev.get("primary")
            row["accuracy_delta"] = accuracy_delta(ev.get("primary") or {}, spec.metric)
        elif name == "original":
            row["accuracy_delta"] = 0.0
        row["latency"] = measure_latency(runnable, sample, batch_size=1, runs=spec.latency_runs)
        if "encode" in details:
            row["bits_per_weight"] = details["encode"].get("bits_per_weight_overall")
        details["evaluation"] = {k: v for k, v in row.items() if k not in ("variant", "kind")}
        if isinstance(row.get("accuracy_delta"), int | float):
            details["accuracy_delta"] = row["accuracy_delta"]
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


def choose_default(table: list[dict[str, Any]], tolerance: float) -> str:
    """The fastest variant (p50 at batch 1) whose accuracy loss is within ``tolerance``."""
    best, best_p50 = "original", None
    for row in table:
        delta = row.get("accuracy_delta")
        if not isinstance(delta, int | float) or -delta > tolerance + 1e-12:
            continue
        p50 = (row.get("latency") or {}).get("p50_ms")
        if p50 is not None and (best_p50 is None or p50 < best_p50):
            best, best_p50 = row["variant"], p50
    return best


def _latency_sample(original: bytes, data: CompressionData) -> dict[str, np.ndarray]:
    source = data.evaluation or data.calibration
    if source is not None:
        return {k: v[:1] for k, v in source.items()}
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
