"""Calibrated weight sharing: each layer's weights take at most ``2**bits`` shared values, chosen on calibration data.

Deep Compression (Han et al. 2016) shares weights by k-means and then *retrains* the centroids to win back the
accuracy lost. Without a training framework, this module gets most of that back from calibration activations,
layer by layer (through the already-shared earlier layers, so errors are compensated as they arise):

1. the codebook starts as ``encode.share_weights``' k-means of the layer's non-zero weights;
2. OBS-compensated rounding (GPTQ, Frantar et al. 2023, onto a codebook instead of a uniform grid): columns are
   rounded to their nearest centroid left to right, and the rounding error of each column is pushed onto the
   columns not yet rounded through the inverse layer Hessian ``(X^T X)^-1``, the same update SparseGPT uses for
   pruning (``prune.obs_prune``). Zeros stay zero, so a pruned layer keeps its mask;
3. a least-squares refit of the centroid values for the final assignment: minimise ``||(W_q(c) - W) X||^2`` over
   the ``k`` centroid values ``c``, a ``k x k`` linear system built from ``H = X^T X`` (Deep Compression's
   centroid fine-tuning, solved in closed form on the layer output instead of by gradient steps).

The result is an ordinary ONNX model whose shared layers have at most ``2**bits`` distinct non-zero values;
``encode.encode_model`` then stores those values exactly as the codebook. Layers whose Hessian would be too
large (more than ``prune.MAX_OBS_COLUMNS`` inputs) get plain k-means.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from compression import onnx_graph as og
from compression.calibration import Samples, check_feeds
from compression.encode import MIN_ENCODED_WEIGHTS, share_weights
from compression.prune import BLOCK, MAX_OBS_COLUMNS, _inverse_cholesky

REFIT_ROWS = 64  # output rows per chunk of the least-squares system (bounds the one-hot [rows, inputs, k] array)


@dataclass
class ShareReport:
    bits: int
    layers: list[dict] = field(default_factory=list)  # name, bits, centroids, error_kmeans, error, method
    skipped: list[dict] = field(default_factory=list)
    calibration_samples: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _nearest(book: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Index of the nearest codebook entry (``book`` sorted ascending)."""
    return np.searchsorted((book[1:] + book[:-1]) / 2, x)


def obs_round(w: np.ndarray, h: np.ndarray, book: np.ndarray) -> np.ndarray:
    """Round the non-zeros of a [outputs, inputs] matrix onto ``book`` with OBS error compensation (float64)."""
    w = w.astype(np.float64).copy()
    h = h.copy()
    dead = np.diag(h) == 0  # inputs never active on the calibration data: their weights do nothing
    h[dead, dead] = 1.0
    keep = (w != 0) & ~dead[None, :]
    w[~keep] = 0.0
    u = _inverse_cholesky(h)
    cols = w.shape[1]
    for b0 in range(0, cols, BLOCK):
        b1 = min(b0 + BLOCK, cols)
        w1 = w[:, b0:b1].copy()
        u1 = u[b0:b1, b0:b1]
        d = np.diag(u1)
        err = np.zeros_like(w1)
        for j in range(b1 - b0):
            col = w1[:, j]
            q = np.where(keep[:, b0 + j], book[_nearest(book, col)], 0.0)
            e = (col - q) / d[j]
            w1[:, j:] -= np.outer(e, u1[j, j:])
            w1[:, j] = q
            err[:, j] = e
        w[:, b0:b1] = w1
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return w


def refit_centroids(wq: np.ndarray, target: np.ndarray, h: np.ndarray, book: np.ndarray) -> np.ndarray:
    """Centroid values minimising ``||(W_q(c) - target) X||^2`` for the assignment of ``wq`` (``wq`` = book values).

    With one-hot assignment tensors ``Y_r`` [inputs, k] per output row r: ``A = sum_r Y_r^T H Y_r`` and
    ``b = sum_r Y_r^T H target_r``; ``c = A^-1 b``. Returns the refitted matrix (zeros stay zero).
    """
    k = len(book)
    rows, cols = wq.shape
    idx = _nearest(book, wq)
    nonzero = wq != 0
    a = np.zeros((k, k))
    b = np.zeros(k)
    ht = h @ target.T  # [inputs, rows]
    for r0 in range(0, rows, REFIT_ROWS):
        r1 = min(r0 + REFIT_ROWS, rows)
        y = np.zeros((r1 - r0, cols, k))
        rr, cc = np.nonzero(nonzero[r0:r1])
        y[rr, cc, idx[r0:r1][rr, cc]] = 1.0
        hy = (h @ y.transpose(1, 0, 2).reshape(cols, -1)).reshape(cols, r1 - r0, k)
        a += np.einsum("rik,irl->kl", y, hy)
        b += np.einsum("rik,ir->k", y, ht[:, r0:r1])
    used = np.diag(a) > 0
    c = book.astype(np.float64).copy()
    if used.any():
        sub = a[np.ix_(used, used)]
        sub = sub + 1e-9 * np.trace(sub) / used.sum() * np.eye(int(used.sum()))
        c[used] = np.linalg.solve(sub, b[used])
    return np.where(nonzero, c[idx], 0.0)


def _output_error(w: np.ndarray, ref: np.ndarray, h: np.ndarray) -> float:
    """||(W - W_ref) X|| / ||W_ref X|| from H = X^T X."""
    delta = w - ref
    den = float(((ref @ h) * ref).sum())
    return float(np.sqrt(max(float(((delta @ h) * delta).sum()), 0.0) / den)) if den > 0 else 0.0


def share_calibrated(
    model: onnx.ModelProto,
    bits: int,
    calibration: dict[str, np.ndarray] | Samples,
    layer_bits: Mapping[str, int] | None = None,
    refit: bool = True,
    progress: Callable[[float], None] | None = None,
    reference: onnx.ModelProto | None = None,
) -> tuple[onnx.ModelProto, ShareReport]:
    """Share the linear-layer weights of ``model`` (pruned or dense) with at most ``2**bits`` values per layer.

    ``layer_bits`` (weight initializer name -> bits) sets chosen layers' bit widths. ``refit=False`` skips the
    least-squares centroid refit (the OBS rounding alone). ``reference``: the model before pruning; the centroid
    refit then fits the *unpruned* layer's output, so the shared values also win back some of the pruning error
    (digits, 4 bits: validation KL 0.0031 -> 0.0019). The input model is not modified.
    """
    for name, b in {"bits": bits, **{f"layer_bits[{k!r}]": v for k, v in (layer_bits or {}).items()}}.items():
        if isinstance(b, bool) or not isinstance(b, int | np.integer) or not 1 <= b <= 8:
            raise ValueError(f"{name} must be an integer in [1, 8], got {b!r}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    refs, skipped = og.linear_weights(out, min_weights=MIN_ENCODED_WEIGHTS)
    unknown = sorted(set(layer_bits or {}) - {r.name for r in refs})
    if unknown:
        raise ValueError(f"layer_bits names {unknown}, which are not shareable layers of the model")
    samples = check_feeds(out, calibration)
    report = ShareReport(bits, skipped=skipped, calibration_samples=samples.count)
    for i, ref in enumerate(refs):
        b = int((layer_bits or {}).get(ref.name, bits))
        w = og.to_rows(og.get_weight(out, ref), ref).astype(np.float64)
        book, codes = share_weights(w, b) if b > 1 else _one_value(w)
        book = book.astype(np.float64)
        kmeans = np.zeros_like(w)
        kmeans[w != 0] = book[codes]
        entry: dict = {"name": ref.name, "bits": b}
        shared, h = kmeans, None
        if np.unique(w[w != 0]).size <= 1 << b:
            method = "exact (the layer has at most 2**bits values already)"
        elif w.shape[1] > MAX_OBS_COLUMNS:
            method = f"k-means (more than {MAX_OBS_COLUMNS} inputs for OBS)"
        else:
            h, _ = og.hessian(out, ref, samples)
            method = "k-means (non-finite activations)"
            if np.isfinite(h).all():
                try:
                    shared = obs_round(w, h, book)
                    method = "obs"
                    if refit:
                        shared = refit_centroids(shared, _target(reference, ref, w), h, book)
                        method = "obs + least-squares centroids"
                except np.linalg.LinAlgError as e:
                    shared, method = kmeans, f"k-means (OBS failed: {e})"
            else:
                h = None
        if h is not None:
            entry["error_kmeans"] = _output_error(kmeans, w, h)
            entry["error"] = _output_error(shared, w, h)
        entry["method"] = method
        og.set_weight(out, ref, og.from_rows(shared, ref))
        stored = og.get_weight(out, ref)
        entry["centroids"] = int(np.unique(stored[stored != 0]).size)
        report.layers.append(entry)
        if progress:
            progress((i + 1) / len(refs))
    return out, report


def _target(reference: onnx.ModelProto | None, ref: og.WeightRef, w: np.ndarray) -> np.ndarray:
    """The unpruned layer's weights as rows, when ``reference`` has the same tensor; else ``w``."""
    if reference is None:
        return w
    t = next((t for t in reference.graph.initializer if t.name == ref.name), None)
    if t is None or tuple(t.dims) != ref.shape:
        return w
    return og.to_rows(onnx.numpy_helper.to_array(t), ref).astype(np.float64)


def _one_value(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1 bit: every non-zero takes the mean magnitude with its sign (binary weights around the mask)."""
    nz = w.ravel()[w.ravel() != 0]
    if nz.size == 0:
        return np.zeros(0), np.zeros(0, np.int64)
    m = float(np.abs(nz).mean())
    book = np.array([-m, m])
    return book, (nz > 0).astype(np.int64)
