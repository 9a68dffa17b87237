"""Run one chain of passes (``compression.passes``) on a model: the artifact to store and the model that runs.

A chain is a list of ``(pass name, knobs)``. Runs reuse what a job already computed (``ChainCache``): the
output of every chain prefix (so the transformer fusion runs once for all the int8 trials after it) and the
allocation's per-layer sensitivity measurements (the expensive part of the size recipe, independent of the
budget the search bisects).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from compression.calibration import Samples
from compression.passes import check_chain

Chain = list[tuple[str, dict[str, Any]]]
#: quantize/dynamic take these metrics; the judge's others fall back to their own ``auto`` (the same judge)
_PASS_METRIC = {"top1": "top1", "cosine": "cosine"}


def trial_key(chain: Chain) -> str:
    """A stable hash of the chain and its knobs: the trial's identity within a job."""
    canonical = json.dumps([[name, knobs] for name, knobs in chain], sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


@dataclass
class ChainCache:
    """What trials of one job share: chain prefix outputs and the allocation's sensitivity measurements."""

    prefixes: dict[str, onnx.ModelProto] = field(default_factory=dict)
    allocation_options: Any = None
    limit: int = 4  # prefix models kept (each is a whole model in memory)


@dataclass
class Built:
    stored: bytes
    runnable: bytes
    details: dict[str, Any]


def build_chain(
    model: onnx.ModelProto,
    chain: Chain,
    calibration: Samples,
    evaluation: Samples,
    metric: str,
    cache: ChainCache,
    progress: Callable[[float], None] | None = None,
) -> Built:
    """Apply ``chain`` to ``model`` (the fp32 original, constants folded)."""
    knobs_of = dict(chain)  # check_chain refuses a pass named twice
    steps: Chain = [(name, knobs_of[name]) for name in check_chain(name for name, _ in chain)]
    details: dict[str, Any] = {}
    current = model
    artifact: bytes | None = None
    start = 0
    for i in range(len(steps), 0, -1):  # the longest prefix already built (none ends in a pass with an artifact)
        hit = cache.prefixes.get(trial_key(steps[:i]))
        if hit is not None:
            current, start = hit, i
            details["reused_prefix"] = [s[0] for s in steps[:i]]
            break
    for i in range(start, len(steps)):
        name, knobs = steps[i]
        current, artifact, report = _apply(name, knobs, current, calibration, evaluation, metric, cache)
        details[name] = report
        if artifact is None and i < len(steps) - 1:
            if len(cache.prefixes) >= cache.limit:
                cache.prefixes.pop(next(iter(cache.prefixes)))
            cache.prefixes[trial_key(steps[: i + 1])] = current
        if progress is not None:
            progress((i + 1) / len(steps))
    runnable = current.SerializeToString()
    return Built(artifact if artifact is not None else runnable, runnable, _plain(details))


def _apply(
    name: str,
    knobs: dict[str, Any],
    model: onnx.ModelProto,
    calibration: Samples,
    evaluation: Samples,
    metric: str,
    cache: ChainCache,
) -> tuple[onnx.ModelProto, bytes | None, Any]:
    """One pass: (the model after it, the stored artifact if the pass makes one, its report)."""
    pass_metric = _PASS_METRIC.get(metric, "auto")
    if name == "fuse_transformer":
        from compression.graph_opt import fuse_transformer

        out, report = fuse_transformer(model, attention=bool(knobs.get("attention", True)))
        return out, None, report
    if name == "dead_channels":
        from compression.prune import zero_dead_channels

        out, dead = zero_dead_channels(model, calibration)
        return out, None, {"channels": dead}
    if name == "prune":
        from compression.prune import prune_model

        out, report = prune_model(
            model,
            float(knobs.get("sparsity", 0.7)),
            knobs.get("pattern", "unstructured"),
            calibration=calibration,
            scope=knobs.get("scope", "per_layer"),
        )
        return out, None, report
    if name == "allocate":
        # The whole size recipe (dead channels -> allocate -> prune -> share -> encode) in one call, so that the
        # allocation prices the layers it really makes; the sensitivity is measured once per job.
        from compression.allocation import compress_to_budget
        from compression.encode import decode_model

        result, cache.allocation_options = compress_to_budget(
            model, calibration, evaluation, float(knobs["target_ratio"]), options=cache.allocation_options
        )
        report = {"allocation": result.allocation.to_dict() | {"options": None}, "encode": result.encode}
        return decode_model(result.artifact), result.artifact, report
    if name == "int8_dynamic":
        from compression.dynamic import quantize_dynamic_int8

        out, report = quantize_dynamic_int8(
            model,
            calibration,
            evaluation,
            smooth_alpha=knobs.get("smooth_alpha", "auto"),
            embeddings=bool(knobs.get("embeddings", True)),
            metric=pass_metric,  # type: ignore[arg-type]
        )
        return out, None, report
    if name == "int8_static":
        from compression.quantize import quantize_model

        forms, report = quantize_model(
            model,
            calibration,
            method=knobs.get("calibration", "minmax"),
            tolerance=knobs.get("tolerance"),
            evaluation=evaluation,
            metric=pass_metric,  # type: ignore[arg-type]
            smooth_alpha=knobs.get("smooth_alpha", "auto"),
            embeddings=bool(knobs.get("embeddings", True)),
        )
        return forms.get(knobs.get("form", "cpu")) or forms["qdq"], None, report
    if name == "weight_only":
        from compression.weight_only import quantize_weight_only

        out, report = quantize_weight_only(
            model,
            bits=int(knobs.get("bits", 4)),
            block_size=int(knobs.get("block_size", 32)),
            accuracy_level=int(knobs.get("accuracy_level", 4)),
        )
        return out, None, report
    if name == "share":
        from compression.codebook import share_calibrated

        out, report = share_calibrated(model, int(knobs.get("bits", 4)), calibration, refit=knobs.get("refit", True))
        return out, None, report
    if name == "encode":
        from compression.encode import decode_model, encode_model

        blob, report = encode_model(model, int(knobs.get("bits", 4)))
        return decode_model(blob), blob, report
    raise ValueError(f"pass {name!r} has no runner")


def _plain(x: Any) -> Any:
    """Reports as JSON-ready data (dataclasses as dicts, numpy scalars as numbers, arrays dropped to shapes)."""
    from dataclasses import asdict, is_dataclass

    if is_dataclass(x) and not isinstance(x, type):
        return _plain(asdict(x))
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return {"shape": list(x.shape)}
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x
