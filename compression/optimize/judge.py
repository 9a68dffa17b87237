"""How to compare a variant's outputs with the original's, decided from what the outputs are.

A model's outputs say what they are if one looks at their values, not only their rank:

* **class scores** (``top1``): a float ``[N, C]`` output whose rows are probabilities (non-negative, summing to 1)
  or log-probabilities, or a small ``C`` (<= ``SMALL_C``) whose argmax varies across the samples; a larger ``C``
  counts as class scores only when its argmax spreads over many classes (``SPREAD``). Compared by top-1 agreement
  (or top-1 accuracy against labels when the calibration data has ``labels``).
* **embeddings** (``cosine``): rows with unit L2 norm (a sentence-transformers head), a large ``[N, D]`` output
  whose argmax keeps landing on a few dimensions (a transformer's outlier features), or any ``[N, T, D]`` or
  higher-rank float output (token states, feature maps). Compared by the mean per-sample cosine.
* **regression** (``relative_error``): ``[N]`` or ``[N, 1]`` floats. Compared by mean absolute error over the mean
  absolute reference value.
* **labels** (``exact``): integer outputs (class ids, token ids): the share of samples that match exactly.

The loss of a variant is judged per output and the worst output wins. A user may override the metric. The old
rule (any 2-D ``[N, C]`` is class scores) read a ``[N, 384]`` sentence embedding as 384 classes, so every int8
node of the MiniLM encoder fell back to float (issue 11): ``compression.metrics.looks_like_classifier`` now asks
``output_kind`` here, so the ``compress`` job's ``auto`` metric follows the same judge.

numpy only: ``compression.metrics`` imports this module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

Metric = Literal["top1", "cosine", "relative_error", "exact"]
METRICS: tuple[str, ...] = ("top1", "cosine", "relative_error", "exact")
SMALL_C = 32  # up to this many columns, a float [N, C] output with a varying argmax reads as class scores
SPREAD = 0.5  # a larger C reads as class scores when argmax hits at least this share of min(N, C) classes
UNIT_NORM_TOL = 1e-3


@dataclass(frozen=True)
class Judgement:
    output: str
    metric: Metric
    why: str
    overridden: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def output_kind(values: np.ndarray) -> tuple[Metric, str]:
    """The metric an output's values call for, and why (see the module doc)."""
    shape = list(values.shape)
    if not np.issubdtype(values.dtype, np.floating):
        return "exact", f"{values.dtype} output {shape}: labels or ids, compared exactly"
    if values.ndim <= 1 or (values.ndim == 2 and values.shape[1] == 1):
        return "relative_error", f"one value per sample {shape}: regression, compared by relative error"
    if values.ndim > 2:
        return "cosine", f"rank-{values.ndim} output {shape}: per-token or spatial features, compared by cosine"
    n, c = values.shape
    rows = values.astype(np.float64)
    if n == 0:
        return "cosine", f"no samples to look at {shape}: compared by cosine"
    norms = np.linalg.norm(rows, axis=1)
    if np.all(np.abs(norms - 1.0) < UNIT_NORM_TOL):
        return "cosine", f"[N, {c}] rows with unit L2 norm: embeddings, compared by cosine"
    if np.all(rows >= -1e-6) and np.all(np.abs(rows.sum(1) - 1.0) < 1e-3):
        return "top1", f"[N, {c}] rows are probabilities (non-negative, sum 1): class scores, compared by top-1"
    if np.all(rows <= 1e-6) and np.all(np.abs(np.exp(rows).sum(1) - 1.0) < 1e-3):
        return "top1", f"[N, {c}] rows are log-probabilities: class scores, compared by top-1"
    distinct = len(np.unique(rows.argmax(1)))
    if c <= SMALL_C:
        if distinct > 1 or n == 1:
            return "top1", f"[N, {c}] scores, argmax over {distinct} classes: class scores, compared by top-1"
        return "cosine", f"[N, {c}] scores whose argmax is always {int(rows[0].argmax())}: compared by cosine"
    if distinct >= max(2, SPREAD * min(n, c)):
        return "top1", f"[N, {c}] scores, argmax spread over {distinct} classes in {n} samples: class scores"
    return "cosine", (
        f"[N, {c}] with argmax on only {distinct} dimension(s) in {n} samples: embeddings, compared by cosine"
    )


def judge_outputs(reference: dict[str, np.ndarray], override: str = "auto") -> dict[str, Judgement]:
    """One judgement per output of the reference model; ``override`` (a metric name) applies to every output."""
    if override != "auto" and override not in METRICS:
        raise ValueError(f"unknown metric {override!r}: use auto or one of {', '.join(METRICS)}")
    out = {}
    for name, values in reference.items():
        if override != "auto":
            out[name] = Judgement(name, override, f"set by the user ({override})", overridden=True)  # type: ignore[arg-type]
        else:
            metric, why = output_kind(values)
            out[name] = Judgement(name, metric, why)
    return out


def loss(judgement: Judgement, agreement: dict[str, Any]) -> float:
    """The accuracy loss (>= 0 is worse; 0 = identical) of one output under its judgement.

    ``agreement`` is a ``compression.metrics.Agreement`` dict. For ``top1`` with labels the loss is the drop in
    accuracy (negative when the variant is more accurate); without labels 1 - top-1 agreement.
    """
    m = judgement.metric
    if m == "top1":
        ref, cand = agreement.get("accuracy_reference"), agreement.get("accuracy_candidate")
        if ref is not None and cand is not None:
            return float(ref - cand)
        top1 = agreement.get("top1_agreement")
        if top1 is None:
            raise ValueError(f"metric 'top1' needs class scores ([N, C]); output {judgement.output!r} is not")
        return 1.0 - float(top1)
    if m == "cosine":
        return 1.0 - float(agreement["mean_cosine"])
    if m == "relative_error":
        return float(agreement["relative_error"])
    return 1.0 - float(agreement["exact_match"])


def worst_loss(judgements: dict[str, Judgement], agreements: dict[str, dict[str, Any]]) -> tuple[float, str]:
    """(loss, output): the worst output's loss under its judgement."""
    losses = {name: loss(j, agreements[name]) for name, j in judgements.items()}
    worst = max(losses, key=lambda k: losses[k])
    return losses[worst], worst
