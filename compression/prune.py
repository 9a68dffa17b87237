"""PRUNE: zero weights of the linear layers, with or without calibration-data reconstruction.

Without calibration data the smallest-magnitude weights go (per layer, or under one global threshold). With
calibration data each layer is pruned SparseGPT-style (Frantar & Alistarh 2023, after OBS/OBC): the layer's
input rows X are collected on the calibration samples -- through the already-pruned earlier layers, so errors
are compensated as they arise -- ``H = X^T X + damping``, and columns are processed left to right in blocks:
weights with the lowest OBS saliency ``w^2 / [H^-1]_jj^2`` are zeroed and the remaining weights of the row
absorb the error through the OBS update ``-(w_j / [H^-1]_jj) [H^-1]_j,:``. Conv layers use im2col rows.

The 2:4 pattern keeps at most 2 non-zeros in every group of 4 consecutive input channels (NVIDIA's sparse
tensor-core layout): along K of a MatMul weight [K, N], along K of a Gemm weight (transB respected), along I
of a Conv weight [O, I, *k] at each kernel position.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import onnx

from compression import onnx_graph as og
from compression.calibration import Samples, check_feeds
from compression.fold import fold_constants

MAX_SPARSITY = 0.95
MAX_OBS_COLUMNS = 8192  # a layer with more inputs than this (H would be > 512 MiB) falls back to magnitude
BLOCK = 128  # SparseGPT's column block (a multiple of 4, so 2:4 groups never straddle blocks)
DAMPING = 0.01  # fraction of mean(diag H) added to the diagonal


@dataclass
class PruneReport:
    sparsity_target: float
    pattern: str
    layers: list[dict] = field(default_factory=list)  # name, op, shape, sparsity, reconstruction_error, method
    overall_sparsity: float = 0.0  # zeros / weights over the pruned layers
    skipped: list[dict] = field(default_factory=list)  # name, reason
    scope: str = "per_layer"
    calibration_samples: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _check_args(sparsity: float, pattern: str, scope: str) -> None:
    if pattern not in ("unstructured", "2:4"):
        raise ValueError(f"pattern must be 'unstructured' or '2:4', not {pattern!r}")
    if scope not in ("per_layer", "global"):
        raise ValueError(f"scope must be 'per_layer' or 'global', not {scope!r}")
    number = isinstance(sparsity, int | float | np.floating) and not isinstance(sparsity, bool)
    if not number or not 0.0 <= float(sparsity) <= MAX_SPARSITY:
        raise ValueError(f"sparsity must be a number in [0, {MAX_SPARSITY}], got {sparsity!r}")
    if pattern == "2:4" and float(sparsity) != 0.5:
        raise ValueError(f"the 2:4 pattern fixes sparsity at 0.5 (got {sparsity}); pass sparsity=0.5")


# --------------------------------------------------------------------------------------------- magnitude


def _count(n: int, sparsity: float) -> int:
    """How many of ``n`` weights to zero: at least the target fraction (so 70% means >= 70%)."""
    return min(n, int(np.ceil(n * sparsity - 1e-9)))


def magnitude_mask(w: np.ndarray, sparsity: float, pattern: str) -> np.ndarray:
    """Boolean mask of the weights to zero in a [outputs, inputs] matrix."""
    if pattern == "2:4":
        groups = np.abs(w).reshape(w.shape[0], -1, 4)
        drop = np.argsort(groups, axis=-1, kind="stable")[..., :2]
        mask = np.zeros(groups.shape, dtype=bool)
        np.put_along_axis(mask, drop, True, axis=-1)
        return mask.reshape(w.shape)
    k = _count(w.size, sparsity)
    mask = np.zeros(w.size, dtype=bool)
    if k:
        mask[np.argpartition(np.abs(w).ravel(), k - 1)[:k]] = True
    return mask.reshape(w.shape)


def _global_allocation(weights: list[np.ndarray], sparsity: float) -> list[float]:
    """Per-layer sparsities that one global magnitude threshold would give."""
    mags = np.concatenate([np.abs(w).ravel().astype(np.float32) for w in weights])
    k = _count(mags.size, sparsity)
    if k == 0:
        return [0.0] * len(weights)
    thr = np.partition(mags, k - 1)[k - 1]
    return [min(float((np.abs(w) <= thr).mean()), 0.99) for w in weights]


# --------------------------------------------------------------------------------------------- OBS / SparseGPT


def _inverse_cholesky(h: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U), raising damping until it factors."""
    damp = DAMPING * float(np.mean(np.diag(h)))
    for _ in range(6):
        try:
            hd = h + damp * np.eye(h.shape[0])
            return np.linalg.cholesky(np.linalg.inv(hd)).T
        except np.linalg.LinAlgError:
            damp *= 10
    raise np.linalg.LinAlgError("the layer Hessian is not positive definite even with heavy damping")


def obs_prune(w: np.ndarray, h: np.ndarray, sparsity: float, pattern: str) -> np.ndarray:
    """SparseGPT on a [outputs, inputs] float64 matrix with input Hessian ``h``; returns the pruned matrix."""
    w = w.astype(np.float64).copy()
    h = h.copy()
    dead = np.diag(h) == 0  # inputs never active on the calibration data: their weights do nothing
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    u = _inverse_cholesky(h)
    rows, cols = w.shape
    for b0 in range(0, cols, BLOCK):
        b1 = min(b0 + BLOCK, cols)
        w1 = w[:, b0:b1].copy()
        u1 = u[b0:b1, b0:b1]
        d = np.diag(u1)
        err = np.zeros_like(w1)
        if pattern == "unstructured":
            mask = np.zeros(w1.shape, dtype=bool)
            k = _count(rows * b1, sparsity) - _count(rows * b0, sparsity)  # exact over the whole layer
            if k:
                score = (w1**2 / d[None, :] ** 2).ravel()
                mask.ravel()[np.argpartition(score, k - 1)[:k]] = True
        else:
            mask = np.zeros(w1.shape, dtype=bool)
        for j in range(b1 - b0):
            if pattern == "2:4" and j % 4 == 0:
                score = w1[:, j : j + 4] ** 2 / d[None, j : j + 4] ** 2
                drop = np.argsort(score, axis=1, kind="stable")[:, :2]
                np.put_along_axis(mask[:, j : j + 4], drop, True, axis=1)
            col = w1[:, j]
            q = np.where(mask[:, j], 0.0, col)
            e = (col - q) / d[j]
            w1[:, j:] -= np.outer(e, u1[j, j:])
            w1[:, j] = q
            err[:, j] = e
        w[:, b0:b1] = w1
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return w


def _relative_error(w: np.ndarray, pruned: np.ndarray, h: np.ndarray | None) -> float:
    """||(W - W') X|| / ||W X|| from H = X^T X; the plain weight-space ratio without calibration data."""
    delta = w.astype(np.float64) - pruned
    if h is None:
        den = float(np.linalg.norm(w))
        return float(np.linalg.norm(delta) / den) if den else 0.0
    num = float(((delta @ h) * delta).sum())
    den = float(((w @ h) * w).sum())
    return float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0


# --------------------------------------------------------------------------------------------- entry point


def prune_model(
    model: onnx.ModelProto,
    sparsity: float,
    pattern: Literal["unstructured", "2:4"] = "unstructured",
    calibration: dict[str, np.ndarray] | Samples | None = None,
    scope: Literal["per_layer", "global"] = "per_layer",
    progress: Callable[[float], None] | None = None,
    layer_sparsity: Mapping[str, float] | None = None,
) -> tuple[onnx.ModelProto, PruneReport]:
    """Prune the MatMul/Gemm/Conv weights of ``model`` to ``sparsity``; the input model is not modified.

    With ``calibration`` (model input name -> array, samples on axis 0) layers are pruned and reconstructed
    one after another on the partially pruned model's activations; ``scope="global"`` then sets each layer's
    sparsity from one global magnitude threshold. Without it, plain magnitude pruning. ``layer_sparsity``
    (weight initializer name -> sparsity) sets chosen layers' sparsity (a sensitivity-based allocation, see
    ``compression.allocation``); the others get ``sparsity`` (or the global allocation). Weights computed by
    constant subgraphs are folded into initializers first (``compression.fold``).
    """
    _check_args(sparsity, pattern, scope)
    sparsity = float(sparsity)
    if layer_sparsity:
        if pattern != "unstructured":
            raise ValueError("layer_sparsity needs the unstructured pattern (2:4 fixes every layer at 0.5)")
        for value in layer_sparsity.values():
            _check_args(value, "unstructured", scope)
    samples = check_feeds(model, calibration) if calibration is not None else None
    folded, note = fold_constants(model)
    out = onnx.ModelProto()
    out.CopyFrom(folded)
    refs, skipped = og.linear_weights(out)
    unknown = sorted(set(layer_sparsity or {}) - {r.name for r in refs})
    if unknown:
        raise ValueError(f"layer_sparsity names {unknown}, which are not prunable layers of the model")
    if pattern == "2:4":
        keep = []
        for r in refs:
            if r.in_channels % 4:
                skipped.append({"name": r.name, "reason": f"2:4 needs input channels divisible by 4 ({r.in_channels})"})
            else:
                keep.append(r)
        refs = keep
    n_calib = samples.count if samples is not None else 0
    report = PruneReport(sparsity, pattern, scope=scope, skipped=skipped, calibration_samples=n_calib)
    if note:
        report.notes.append(note)
    nothing = sparsity == 0.0 and not any((layer_sparsity or {}).values())
    if not refs or (nothing and pattern == "unstructured"):
        report.overall_sparsity = _zeros_fraction([og.get_weight(out, r) for r in refs])
        if progress:
            progress(1.0)
        return out, report

    originals = [og.to_rows(og.get_weight(out, r), r) for r in refs]
    targets = [sparsity] * len(refs)
    if scope == "global" and pattern == "unstructured":
        targets = _global_allocation(originals, sparsity)
    if layer_sparsity:
        targets = [float(layer_sparsity.get(r.name, t)) for r, t in zip(refs, targets, strict=True)]
    zeros = total = 0
    for i, (ref, w, target) in enumerate(zip(refs, originals, targets, strict=True)):
        h = None
        method = "magnitude"
        if samples is not None and w.shape[1] <= MAX_OBS_COLUMNS:
            h, _ = og.hessian(out, ref, samples)
            try:
                if not np.isfinite(h).all():
                    raise np.linalg.LinAlgError("non-finite activations")
                pruned = obs_prune(w, h, target, pattern)
                method = "obs"
            except np.linalg.LinAlgError as e:
                method = f"magnitude (OBS failed: {e})"
                h = None if not np.isfinite(h).all() else h
        elif samples is not None:
            method = f"magnitude (more than {MAX_OBS_COLUMNS} inputs for OBS)"
        if not method.startswith("obs"):
            pruned = np.where(magnitude_mask(w, target, pattern), 0.0, w.astype(np.float64))
        og.set_weight(out, ref, og.from_rows(pruned, ref))
        stored = og.to_rows(og.get_weight(out, ref), ref)  # after the cast back to the tensor's dtype
        layer_zeros = int(np.count_nonzero(stored == 0))
        zeros, total = zeros + layer_zeros, total + stored.size
        report.layers.append(
            {
                "name": ref.name,
                "op": ref.op,
                "shape": list(ref.shape),
                "sparsity": layer_zeros / stored.size,
                "reconstruction_error": _relative_error(w, stored.astype(np.float64), h),
                "method": method,
            }
        )
        if progress:
            progress((i + 1) / len(refs))
    report.overall_sparsity = zeros / total if total else 0.0
    return out, report


def _zeros_fraction(weights: list[np.ndarray]) -> float:
    total = sum(w.size for w in weights)
    return sum(int(np.count_nonzero(w == 0)) for w in weights) / total if total else 0.0


def check_2_4(model: onnx.ModelProto, names: list[str] | None = None) -> list[str]:
    """Names of linear weights (all, or those named) that break the 2:4 pattern; [] when all hold."""
    refs, _ = og.linear_weights(model, min_weights=0)
    bad = []
    for r in refs:
        if names is not None and r.name not in names:
            continue
        w = og.to_rows(og.get_weight(model, r), r)
        if r.in_channels % 4 or (np.count_nonzero(w.reshape(w.shape[0], -1, 4), axis=-1) > 2).any():
            bad.append(r.name)
    return bad


# --------------------------------------------------------------------------------------------- dead channels

# Ops between two linear layers that keep channel c in channel c (elementwise on channels, or pooling over space).
_CHANNEL_PRESERVING = {
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Gelu", "Elu", "Selu", "HardSigmoid", "HardSwish", "Clip",
    "Identity", "Dropout", "Softplus", "Mish", "Erf", "MaxPool", "AveragePool", "BatchNormalization", "Add", "Mul",
}  # fmt: skip


def zero_dead_channels(
    model: onnx.ModelProto, calibration: dict[str, np.ndarray] | Samples | None = None
) -> tuple[onnx.ModelProto, list[dict]]:
    """Zero the weights of output channels that no later layer reads; exact, so free to apply after pruning.

    When pruning removes every weight of a layer's input channel j (e.g. fc2 drops hidden unit j), the producing
    layer still computes channel j for nothing: its row j is stored and coded but has no effect on any output.
    Such rows are zeroed here. A channel counts as dead only when the producer's output reaches one linear
    consumer alone, through single-consumer channel-preserving ops (activations, pooling, a per-channel Add/Mul
    with a constant) and at most one Flatten (a Conv output read by a Gemm/MatMul as C x H x W features). Repeats
    until nothing changes, since zeroed rows can make earlier channels dead too.

    With ``calibration``, a consumer's input channel that is exactly zero on every calibration sample (a ReLU
    unit that never fires) first gets its consumer weights zeroed, as OBS pruning does for such inputs: exact on
    the calibration samples, and the producer's row then goes too. Returns the model (a copy) and one entry per
    producer: producer, consumer, channels zeroed, weights zeroed (producer and consumer).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    refs, _ = og.linear_weights(out, min_weights=0)
    by_activation = {r.activation: r for r in refs}
    nodes = out.graph.node
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for x in n.input:
            consumers.setdefault(x, []).append(i)
    outputs = {o.name for o in out.graph.output}
    inits = {t.name for t in out.graph.initializer}
    pairs: list[tuple[og.WeightRef, og.WeightRef, bool]] = []  # (producer, consumer, through a Flatten)
    for r in refs:
        tensor, flattened = nodes[r.node_index].output[0], False
        while True:
            users = consumers.get(tensor, [])
            if tensor in outputs or len(users) != 1:
                break
            user = nodes[users[0]]
            if tensor in by_activation and by_activation[tensor].node_index == users[0]:
                if not by_activation[tensor].trans_a:  # a transposed activation has its channels on axis 0
                    pairs.append((r, by_activation[tensor], flattened))
                break
            others = [x for x in user.input[1:] if x]
            if user.op_type == "Flatten" and not flattened and r.op == "Conv":
                flattened = True
            else:
                # a second input that is not a constant would mix other channels in
                local = user.op_type in _CHANNEL_PRESERVING and user.input[0] == tensor
                if not local or any(x not in inits for x in others):
                    break
            tensor = user.output[0]
    report: dict[str, dict] = {}
    if calibration is not None:
        samples = check_feeds(out, calibration)
        for producer, consumer, _ in pairs:
            peak = None
            for rows in og.iter_activations(model, consumer, samples):
                m = np.abs(rows).max(axis=0)
                peak = m if peak is None else np.maximum(peak, m)
            cw = og.to_rows(og.get_weight(out, consumer), consumer)
            if peak is None or peak.shape[0] != cw.shape[1]:
                continue
            quiet = (peak == 0) & (cw != 0).any(axis=0)
            if quiet.any():
                entry = report.setdefault(
                    producer.name, {"producer": producer.name, "consumer": consumer.name, "channels": 0, "weights": 0}
                )
                entry["weights"] += int(np.count_nonzero(cw[:, quiet]))
                og.set_weight(out, consumer, og.from_rows(np.where(quiet[None, :], 0, cw), consumer))
    changed = True
    while changed:
        changed = False
        for producer, consumer, flattened in pairs:
            pw = og.to_rows(og.get_weight(out, producer), producer)
            cw = og.to_rows(og.get_weight(out, consumer), consumer)
            channels = pw.shape[0]
            if consumer.op == "Conv":
                if consumer.in_channels != channels:
                    continue
                used = (cw != 0).reshape(cw.shape[0], -1, channels).any(axis=(0, 1))
            else:
                if cw.shape[1] % channels or (cw.shape[1] != channels and not flattened):
                    continue
                used = (cw != 0).any(axis=0).reshape(channels, -1).any(axis=1)
            dead = ~used & (pw != 0).any(axis=1)
            if not dead.any():
                continue
            entry = report.setdefault(
                producer.name, {"producer": producer.name, "consumer": consumer.name, "channels": 0, "weights": 0}
            )
            entry["channels"] += int(dead.sum())
            entry["weights"] += int(np.count_nonzero(pw[dead]))
            pw = pw.copy()
            pw[dead] = 0
            og.set_weight(out, producer, og.from_rows(pw, producer))
            changed = True
    return out, list(report.values())
