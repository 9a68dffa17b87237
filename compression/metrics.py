"""Comparing a variant's outputs with the original's: numpy only, shared by every compression stage."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from compression.optimize.judge import output_kind


@dataclass(frozen=True)
class Agreement:
    """How closely a candidate's outputs follow the reference's on the same inputs."""

    samples: int
    top1_agreement: float | None  # classifiers: share of samples whose argmax matches
    accuracy_reference: float | None  # with labels: the reference's top-1 accuracy
    accuracy_candidate: float | None
    mean_cosine: float  # per-sample cosine similarity of the flattened outputs, averaged
    min_cosine: float
    max_abs_error: float
    relative_error: float = 0.0  # mean |candidate - reference| / mean |reference|
    exact_match: float = 1.0  # share of samples whose outputs are identical
    kind: str = "cosine"  # what the reference's values are judged to be (compression.optimize.judge)
    kind_why: str = ""

    @property
    def accuracy_delta(self) -> float | None:
        """The change under the judged metric (negative is a loss): accuracy (or top-1 agreement - 1) for class
        scores, mean cosine - 1 for embeddings, minus the relative error for regression, exact match - 1 for ids."""
        if self.kind == "top1":
            if self.accuracy_candidate is not None and self.accuracy_reference is not None:
                return self.accuracy_candidate - self.accuracy_reference
            if self.top1_agreement is not None:
                return self.top1_agreement - 1.0
        if self.kind == "relative_error":
            return -self.relative_error
        if self.kind == "exact":
            return self.exact_match - 1.0
        return self.mean_cosine - 1.0

    def to_dict(self) -> dict[str, float | int | None]:
        d = asdict(self)
        d["accuracy_delta"] = self.accuracy_delta
        return d


def looks_like_classifier(output: np.ndarray) -> bool:
    """Class scores, as the output judge reads the values (not any [N, C]: a [N, 384] embedding is not 384
    classes)."""
    return output_kind(output)[0] == "top1"


def compare(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None = None) -> Agreement:
    """Compare one output tensor (samples on axis 0) of the reference and candidate models."""
    if reference.shape != candidate.shape:
        raise ValueError(f"output shapes differ: {reference.shape} vs {candidate.shape}")
    n = reference.shape[0]
    ref = reference.reshape(n, -1).astype(np.float64)
    cand = candidate.reshape(n, -1).astype(np.float64)
    num = (ref * cand).sum(1)
    den = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    cos = np.where(den > 0, num / np.maximum(den, 1e-300), np.where(np.abs(ref - cand).max(1) == 0, 1.0, 0.0))
    kind, why = output_kind(reference)
    top1 = acc_ref = acc_cand = None
    if reference.ndim == 2 and reference.shape[1] > 1 and np.issubdtype(reference.dtype, np.floating):
        r, c = reference.argmax(1), candidate.argmax(1)
        top1 = float((r == c).mean())
        if labels is not None:
            acc_ref = float((r == labels).mean())
            acc_cand = float((c == labels).mean())
    return Agreement(
        samples=n,
        top1_agreement=top1,
        accuracy_reference=acc_ref,
        accuracy_candidate=acc_cand,
        mean_cosine=float(cos.mean()),
        min_cosine=float(cos.min()),
        max_abs_error=float(np.abs(ref - cand).max()) if ref.size else 0.0,
        relative_error=float(np.abs(ref - cand).mean() / max(np.abs(ref).mean(), 1e-30)) if ref.size else 0.0,
        exact_match=float((ref == cand).all(1).mean()) if n else 1.0,
        kind=kind,
        kind_why=why,
    )
