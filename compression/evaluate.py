"""EVALUATE: a variant against the original on held-out samples -- agreement, size, sparsity, latency.

Models run on ONNX Runtime's CPU provider through ``backends`` (the same runtime the server uses). A candidate
may be an ENCODE artifact: it is decoded to run, and its size is the artifact's.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
from onnx import TensorProto

from backends import BackendOptions, load_backend
from backends.onnx_model import parse_model
from compression import onnx_graph as og
from compression.calibration import Samples, check_feeds
from compression.encode import decode_model, is_encoded
from compression.fold import fold_constants
from compression.metrics import compare
from compression.timing import Comparison, compare_timings

BACKEND = "onnxruntime-cpu"


def _as_onnx_bytes(model_bytes: bytes) -> bytes:
    return decode_model(model_bytes).SerializeToString() if is_encoded(model_bytes) else model_bytes


def run_model(
    model_bytes: bytes, inputs: dict[str, np.ndarray] | Samples, batch_size: int = 64
) -> dict[str, np.ndarray]:
    """All outputs of the model on ``inputs`` (samples on axis 0), run in batches and concatenated.

    A model with a fixed batch dimension is run that many samples at a time, whatever ``batch_size`` says.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    data = _as_onnx_bytes(model_bytes)
    samples = check_feeds(parse_model(data), inputs, what="input")
    backend = load_backend(BACKEND, data, BackendOptions())
    try:
        parts: dict[str, list[np.ndarray]] = {}
        for feed in samples.batches(batch_size):
            out = backend.infer(feed)
            for k, v in out.items():
                parts.setdefault(k, []).append(v)
        return {k: np.concatenate(v, axis=0) for k, v in parts.items()}
    finally:
        backend.unload()


def model_sparsity(model: onnx.ModelProto) -> float:
    """Fraction of exact zeros among the prunable weights (the linear layers ``prune_model`` would touch)."""
    model, _ = fold_constants(model)  # weights computed from constants count, as prune_model sees them
    refs, _ = og.linear_weights(model)
    total = zeros = 0
    for r in refs:
        w = og.get_weight(model, r)
        total += w.size
        zeros += int(np.count_nonzero(w == 0))
    return zeros / total if total else 0.0


def int8_weight_share(model: onnx.ModelProto) -> float:
    """The share of weight bytes (initializers of 1024+ elements) stored as 8-bit or packed integers."""
    small = {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4, TensorProto.UINT4}
    total = narrow = 0
    for t in model.graph.initializer:
        n = int(np.prod(t.dims)) if len(t.dims) else 1
        if n < 1024:
            continue
        size = n * (1 if t.data_type in small else onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize)
        total += size
        if t.data_type in small:
            narrow += size
    return narrow / total if total else 0.0


def _parameters(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) if len(t.dims) else 1 for t in model.graph.initializer)


def evaluate_variant(
    reference: bytes, candidate: bytes, inputs: dict[str, np.ndarray] | Samples, labels: np.ndarray | None = None
) -> dict:
    """Compare every output of ``candidate`` with ``reference`` on the same inputs.

    Returns ``outputs`` (name -> Agreement dict), ``primary`` (the first output's), ``size_bytes`` (of the
    candidate as given: an ENCODE artifact counts at its stored size), ``reference_bytes``, ``size_ratio``,
    ``sparsity`` and ``bits_per_weight`` (stored bits per parameter of the reference).
    """
    ref_out = run_model(reference, inputs)
    cand_bytes = _as_onnx_bytes(candidate)
    cand_out = run_model(cand_bytes, inputs)
    names = [o.name for o in parse_model(reference).graph.output]
    missing = [n for n in names if n not in cand_out]
    if missing:
        raise ValueError(f"the candidate lacks output(s) {missing} of the reference")
    if labels is not None and len(labels) != len(next(iter(ref_out.values()))):
        raise ValueError("labels and inputs have different sample counts")
    outputs = {n: compare(ref_out[n], cand_out[n], labels).to_dict() for n in names}
    params = _parameters(parse_model(reference))
    return {
        "outputs": outputs,
        "primary": outputs[names[0]],
        "size_bytes": len(candidate),
        "reference_bytes": len(reference),
        "size_ratio": len(reference) / len(candidate),
        "sparsity": model_sparsity(parse_model(cand_bytes)),
        "bits_per_weight": 8 * len(candidate) / params if params else None,
    }


def measure_latency(
    model_bytes: bytes,
    inputs: dict[str, np.ndarray] | Samples,
    batch_size: int = 1,
    runs: int = 50,
    warmup: int = 5,
    threads: int = 0,
) -> dict:
    """Wall-clock latency of one inference of ``batch_size`` samples (taken from ``inputs``, repeated if short).

    A model with a fixed batch dimension is timed at that batch size (the only one it runs).
    """
    if batch_size < 1 or runs < 1 or warmup < 0 or threads < 0:
        raise ValueError("batch_size and runs must be >= 1, warmup and threads >= 0")
    data = _as_onnx_bytes(model_bytes)
    samples = check_feeds(parse_model(data), inputs, what="input")
    batch_size = samples.batch or batch_size
    backend = load_backend(BACKEND, data, BackendOptions(intra_op_threads=threads))
    try:
        feeds = {}
        for k, v in samples.arrays.items():
            reps = -(-batch_size // len(v))
            feeds[k] = np.concatenate([v] * reps, axis=0)[:batch_size] if reps > 1 else v[:batch_size]
        for _ in range(warmup):
            backend.infer(feeds)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            backend.infer(feeds)
            times.append((time.perf_counter() - t0) * 1000.0)
    finally:
        backend.unload()
    t = np.asarray(times)
    return {
        "p50_ms": float(np.percentile(t, 50)),
        "p99_ms": float(np.percentile(t, 99)),
        "mean_ms": float(t.mean()),
        "runs": runs,
        "batch_size": batch_size,
        "threads": threads,
        "backend": BACKEND,
    }


def compare_latency(
    a: bytes, b: bytes, inputs: dict[str, np.ndarray] | Samples, rounds: int = 30, threads: int = 0, batch: int = 1
) -> Comparison:
    """Time model ``a`` against model ``b`` interleaved on the same feed (``compression.timing``).

    The feed is one batch: ``batch`` samples (fewer when there are fewer), or the model's fixed batch size. The
    ratio is t_a / t_b.
    """
    data_a, data_b = _as_onnx_bytes(a), _as_onnx_bytes(b)
    samples = check_feeds(parse_model(data_a), inputs, what="input")
    feed = next(samples.batches(batch))
    options = BackendOptions(intra_op_threads=threads)
    backend_a = load_backend(BACKEND, data_a, options)
    try:
        backend_b = load_backend(BACKEND, data_b, options)
        try:
            return compare_timings(lambda: backend_a.infer(feed), lambda: backend_b.infer(feed), rounds=rounds)
        finally:
            backend_b.unload()
    finally:
        backend_a.unload()
