"""Sensitivity-based allocation: a sparsity and a bit width per layer that fit a size budget at the least loss.

One sparsity for every layer wastes bytes: on the digits CNN, fc1 holds 92 % of the weights and tolerates 90 %
sparsity, while conv2 and fc2 lose accuracy past 70-80 %. This module measures each layer alone and then chooses:

1. **Sensitivity** (``measure``): for every prunable layer and every (sparsity, bits) pair, the layer alone is
   pruned (OBS, ``prune.obs_prune``) and shared (``codebook.obs_round`` + centroid refit) on the *dense* model's
   calibration activations, the rest of the model staying fp32; the model's output loss on held-out validation
   samples is recorded (KL divergence of the softmax for class scores, 1 - mean cosine otherwise), with the bytes
   ENCODE would spend on that layer (``encode.estimate_bytes``). Each layer's Hessian is computed once and reused
   for all its options.
2. **Allocation** (``allocate``): the per-layer losses are taken as additive and a multiple-choice knapsack is
   solved by Lagrangian relaxation: for a price ``lam`` on bytes every layer independently picks the option with
   the least ``loss + lam * bytes``; sweeping ``lam`` traces the loss/size frontier, and the least-loss point that
   fits the budget is returned.

The budget is the knob a search bisects (more compression -> more loss, monotone up to the additive model's
error); the real loss of the allocated model is measured afterwards, never assumed. Interactions the additive
model ignores (e.g. ``prune.zero_dead_channels`` freeing fc1 rows once fc2 drops hidden units) make the real
artifact smaller than predicted, not larger.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from compression import onnx_graph as og
from compression.calibration import Samples, check_feeds
from compression.codebook import obs_round, refit_centroids
from compression.encode import encode_model, estimate_bytes, share_weights
from compression.metrics import looks_like_classifier
from compression.prune import MAX_OBS_COLUMNS, obs_prune

SPARSITIES = (0.0, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95)
BITS = (2, 3, 4, 5)
LAMBDAS = 400  # points of the Lagrangian sweep


@dataclass(frozen=True)
class LayerOption:
    layer: str
    sparsity: float
    bits: int
    loss: float  # output loss on the validation samples with only this layer compressed
    bytes: float  # estimated ENCODE bytes of this layer


@dataclass
class Allocation:
    layer_sparsity: dict[str, float]
    layer_bits: dict[str, int]
    budget_bytes: float
    predicted_bytes: float  # fixed bytes + the chosen options' bytes
    predicted_loss: float  # sum of the chosen options' losses (additive model)
    feasible: bool  # False: even the smallest options miss the budget; the smallest allocation is returned
    fixed_bytes: float  # what the layers outside the allocation cost (skeleton, biases, small layers)
    loss: str  # "kl" or "1-cosine"
    options: list[LayerOption] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _loss_fn(reference: np.ndarray) -> tuple[str, Callable[[np.ndarray], float]]:
    if looks_like_classifier(reference):

        def log_softmax(z: np.ndarray) -> np.ndarray:
            z = z.astype(np.float64) - z.max(axis=1, keepdims=True)
            return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

        ref = log_softmax(reference)
        return "kl", lambda out: float((np.exp(ref) * (ref - log_softmax(out))).sum(axis=1).mean())
    flat = reference.reshape(len(reference), -1).astype(np.float64)
    norm = np.linalg.norm(flat, axis=1)

    def one_minus_cosine(out: np.ndarray) -> float:
        o = out.reshape(len(out), -1).astype(np.float64)
        den = np.maximum(norm * np.linalg.norm(o, axis=1), 1e-300)
        return float(1.0 - ((flat * o).sum(axis=1) / den).mean())

    return "1-cosine", one_minus_cosine


def _first_output(model: onnx.ModelProto, feeds: Samples) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    first = session.get_outputs()[0].name
    return np.concatenate([session.run([first], batch)[0] for batch in feeds.batches(256)])


def measure(
    model: onnx.ModelProto,
    calibration: dict[str, np.ndarray] | Samples,
    validation: dict[str, np.ndarray] | Samples,
    sparsities: Sequence[float] = SPARSITIES,
    bits: Sequence[int] = BITS,
    progress: Callable[[float], None] | None = None,
) -> tuple[list[LayerOption], float, str]:
    """Every (layer, sparsity, bits) option's validation loss and bytes; also the fixed bytes and the loss name.

    ``validation`` must be samples the calibration did not see (the loss of a layer reconstructed on its own
    calibration samples is close to zero there, whatever the sparsity).
    """
    calibration = check_feeds(model, calibration)
    validation = check_feeds(model, validation, what="validation")
    bad_sparsity = any(not 0.0 <= s <= 0.95 for s in sparsities)
    if not sparsities or not bits or bad_sparsity or any(not 2 <= b <= 8 for b in bits):
        raise ValueError("sparsities must be in [0, 0.95] and bits in [2, 8], neither empty")
    refs, _ = og.linear_weights(model)
    refs = [r for r in refs if int(np.prod(r.shape[1:])) <= MAX_OBS_COLUMNS]
    if not refs:
        raise ValueError("no prunable MatMul/Gemm/Conv layer to allocate")
    loss_name, loss = _loss_fn(_first_output(model, validation))
    work = onnx.ModelProto()
    work.CopyFrom(model)
    options: list[LayerOption] = []
    steps, done = len(refs) * len(sparsities) * len(bits), 0
    for ref in refs:
        original = og.get_weight(work, ref)
        w = og.to_rows(original, ref).astype(np.float64)
        h, _ = og.hessian(model, ref, calibration)
        for s in sparsities:
            pruned = obs_prune(w, h, s, "unstructured") if s > 0 else w
            for b in bits:
                book, _ = share_weights(pruned, b)
                shared = refit_centroids(obs_round(pruned, h, book.astype(np.float64)), w, h, book)
                tensor = og.from_rows(shared, ref).astype(original.dtype)
                og.set_weight(work, ref, tensor)
                value = loss(_first_output(work, validation))
                options.append(LayerOption(ref.name, float(s), int(b), value, estimate_bytes(tensor, b)))
                done += 1
                if progress:
                    progress(done / steps)
        og.set_weight(work, ref, original)
    # the rest: every allocated layer zeroed (its streams cost nothing), the others encoded as they are
    rest = onnx.ModelProto()
    rest.CopyFrom(model)
    for ref in refs:
        og.set_weight(rest, ref, np.zeros(ref.shape, dtype=og.get_weight(rest, ref).dtype))
    fixed, _ = encode_model(rest, max(bits))
    return options, float(len(fixed)), loss_name


def allocate(
    options: Sequence[LayerOption], budget_bytes: float, fixed_bytes: float = 0.0, loss: str = "kl"
) -> Allocation:
    """The least-loss choice of one option per layer whose bytes (plus ``fixed_bytes``) fit ``budget_bytes``."""
    layers: dict[str, list[LayerOption]] = {}
    for o in options:
        layers.setdefault(o.layer, []).append(o)
    if not layers:
        raise ValueError("no options to allocate")
    spread = max(o.loss for o in options) - min(o.loss for o in options)
    size = max(o.bytes for o in options)
    lambdas = [0.0, *np.geomspace(1e-9 * max(spread, 1e-12) / size, 1e3 * max(spread, 1e-12) / 1, LAMBDAS)]
    best: tuple[float, float, dict[str, LayerOption]] | None = None
    smallest = {name: min(opts, key=lambda o: (o.bytes, o.loss)) for name, opts in layers.items()}
    for lam in lambdas:
        chosen = {n: min(opts, key=lambda o, lam=lam: (o.loss + lam * o.bytes, o.bytes)) for n, opts in layers.items()}
        total = fixed_bytes + sum(o.bytes for o in chosen.values())
        value = sum(o.loss for o in chosen.values())
        if total <= budget_bytes and (best is None or value < best[1] or (value == best[1] and total < best[0])):
            best = (total, value, chosen)
    feasible = best is not None
    if best is None:
        chosen = smallest
        best = (fixed_bytes + sum(o.bytes for o in chosen.values()), sum(o.loss for o in chosen.values()), chosen)
    total, value, chosen = best
    return Allocation(
        layer_sparsity={n: o.sparsity for n, o in chosen.items()},
        layer_bits={n: o.bits for n, o in chosen.items()},
        budget_bytes=float(budget_bytes),
        predicted_bytes=float(total),
        predicted_loss=float(value),
        feasible=feasible,
        fixed_bytes=float(fixed_bytes),
        loss=loss,
        options=list(options),
    )


@dataclass
class BudgetResult:
    artifact: bytes  # the ENCODE artifact (decode with encode.decode_model)
    allocation: Allocation
    dead_channels: list[dict]
    share: dict
    encode: dict

    @property
    def size_bytes(self) -> int:
        return len(self.artifact)


def compress_to_budget(
    model: onnx.ModelProto,
    calibration: dict[str, np.ndarray] | Samples,
    validation: dict[str, np.ndarray] | Samples,
    target_ratio: float,
    default_bits: int = 4,
    options: tuple[list[LayerOption], float, str] | None = None,
    progress: Callable[[float], None] | None = None,
) -> tuple[BudgetResult, tuple[list[LayerOption], float, str]]:
    """The size recipe: dead channels -> allocate -> prune -> dead channels -> share -> encode.

    ``target_ratio`` is original bytes / artifact bytes to aim for. Returns the result and the measured options,
    which a search passes back in (``options``) to try another ratio without measuring again: the sensitivity
    depends on the model and data only, not on the budget.
    """
    from compression.codebook import share_calibrated
    from compression.prune import prune_model, zero_dead_channels

    if isinstance(target_ratio, bool) or not isinstance(target_ratio, int | float) or target_ratio <= 1:
        raise ValueError(f"target_ratio must be a number > 1, got {target_ratio!r}")
    original = len(model.SerializeToString())
    calibration = check_feeds(model, calibration)
    validation = check_feeds(model, validation, what="validation")
    base, dead = zero_dead_channels(model, calibration)
    if options is None:
        options = measure(base, calibration, validation, progress=progress)
    layer_options, fixed, loss_name = options
    plan = allocate(layer_options, original / target_ratio, fixed, loss_name)
    pruned, _ = prune_model(base, 0.0, calibration=calibration, layer_sparsity=plan.layer_sparsity)
    pruned, more = zero_dead_channels(pruned)
    shared, share_report = share_calibrated(
        pruned, default_bits, calibration, layer_bits=plan.layer_bits, reference=base
    )
    bits = {layer["name"]: max(2, int(layer["bits"])) for layer in share_report.layers}
    artifact, encode_report = encode_model(shared, max(2, default_bits), layer_bits=bits)
    result = BudgetResult(artifact, plan, dead + more, share_report.to_dict(), encode_report.to_dict())
    return result, options
