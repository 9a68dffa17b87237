"""The ``optimize`` job: search, choose honestly, publish the choice as the ``optimized`` variant, tune serving.

The runner is registered in ``compression.worker.RUNNERS``. The serving-config tuner measures the real scheduler,
which lives in ``service``; compression must not import service, so the service's worker passes it in
(``run_optimize_job(ctx, tuner=service.tuning.tune)``) and a worker without it publishes no serving config.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from compression.compress_job import job_inputs, job_spec
from compression.evaluate import compare_latency
from compression.optimize import frontier
from compression.optimize.search import THROUGHPUT_BATCH, Search
from compression.optimize.spec import OptimizeSpec
from model_store import NewVariant

if TYPE_CHECKING:
    from compression.calibration import Samples
    from compression.job_context import JobContext

VARIANT = "optimized"
NEEDS_DATA = "optimize measures accuracy on samples: upload the version (or send the job) with a calibration .npz"
HONESTY_ROUNDS = 20  # interleaved rounds of the candidate against the original
#: (runnable model, samples, spec, progress) -> the measured serving config
Tuner = Callable[[bytes, "Samples", OptimizeSpec, Callable[[float], None]], dict[str, Any]]


def run_optimize_job(ctx: JobContext, tuner: Tuner | None = None) -> dict[str, Any]:
    job, store = ctx.job, ctx.store
    spec = job_spec(job, OptimizeSpec)
    ctx.stages[:] = ["search", "choose", *(["tune"] if tuner and spec.tune_serving else []), "publish"]
    inputs = job_inputs(ctx, spec.holdout_fraction, needs_data=NEEDS_DATA)
    version, model_bytes, data = inputs.version, inputs.model_bytes, inputs.data
    assert data.calibration is not None and data.evaluation is not None
    t0 = time.perf_counter()
    search = Search(
        job.id, model_bytes, spec, data.calibration, data.evaluation, store.trials, store.blobs, ctx.progress
    )
    found = search.run()
    rows = found.trials
    original_row = rows[0]
    front = frontier.pareto(rows, spec.objective)
    result: dict[str, Any] = {
        "objective": spec.objective,
        "tolerance": spec.tolerance,
        "family": search.family,
        "judgements": {k: j.to_dict() for k, j in found.judgements.items()},
        "stopped": found.stopped,
        "reused_trials": found.reused,
        "skipped_ladders": found.skipped,
        "frontier": sorted(front),
    }
    ctx.progress("choose", 0.0)

    def runnable_of(key: str) -> bytes:
        trial = store.trials.get(job.id, key)
        assert trial is not None and trial.runnable_sha256
        return store.blobs.get_bytes(trial.runnable_sha256)

    choice, honest, why, timed = _choose(rows, original_row, spec, runnable_of, data.evaluation, model_bytes)
    for r in rows:
        r["on_frontier"] = r["key"] in front
        r["chosen"] = choice is not None and r["key"] == choice["key"]
        if r["key"] in timed:
            r["timing"], r["honest"], r["honest_why"] = timed[r["key"]]
    result["trials"] = rows
    if choice is None:
        near = frontier.closest(rows)
        result.update(choice=None, variant=None, default_variant=version.default_variant)
        within = [r for r in rows[1:] if r.get("within_tolerance")]
        if within:
            result["message"] = (
                f"no variant within tolerance measured better than the original on {spec.objective} "
                f"({len(within)} within tolerance); the original stays"
            )
        else:
            result["message"] = "no variant within tolerance" + (
                f"; the closest was {frontier.describe(near)} with loss {near['loss']:.4g} "
                f"(tolerance {spec.tolerance:g})"
                if near
                else "; no trial finished"
            )
        result["seconds"] = round(time.perf_counter() - t0, 3)
        return result
    trial = store.trials.get(job.id, choice["key"])
    assert trial is not None and trial.artifact_sha256 and trial.runnable_sha256
    serving: dict[str, Any] | None = None
    if tuner is not None and spec.tune_serving:
        ctx.progress("tune", 0.0)
        serving = tuner(runnable_of(choice["key"]), data.evaluation, spec, lambda f: ctx.progress("tune", f))
    ctx.progress("publish", 0.0)
    details = {
        "job": job.id,
        "trial": choice["key"],
        "chain": choice["chain"],
        "honest": honest,
        "why": why,
        "accuracy_delta": choice["accuracy_delta"],
        "evaluation": {
            "metric": {k: j.metric for k, j in found.judgements.items()},
            "latency": {"p50_ms": choice["p50_ms"], "p99_ms": choice["p99_ms"], "batch_size": 1},
            "throughput": choice["throughput"],
            "accuracy": choice.get("outputs"),
        },
        **({"serving_config": serving} if serving else {}),
    }
    size = choice["size_bytes"]
    store.catalog.add_variant(
        job.model,
        job.version,
        NewVariant(VARIANT, _kind(choice["chain"]), trial.artifact_sha256, size, trial.runnable_sha256, details),
        replace=True,
    )
    default = version.default_variant
    if honest:
        store.catalog.set_default_variant(job.model, job.version, VARIANT, pinned=False)
        default = store.catalog.get_version(job.model, job.version).default_variant
    result.update(
        choice=choice["key"],
        variant=VARIANT,
        honest=honest,
        why=why,
        default_variant=default,
        serving_config=serving,
        message=f"{VARIANT}: {frontier.describe(choice)}, loss {choice['loss']:.4g}, "
        f"{choice['compression_ratio']:.2f}x smaller; " + ("the default" if honest else f"not the default: {why}"),
        seconds=round(time.perf_counter() - t0, 3),
    )
    return result


def _choose(
    rows: list[dict[str, Any]],
    original: dict[str, Any],
    spec: OptimizeSpec,
    runnable: Callable[[str], bytes],
    evaluation: Samples,
    model_bytes: bytes,
) -> tuple[dict[str, Any] | None, bool, str, dict[str, tuple[Any, bool, str]]]:
    """(choice, honest, why, per checked trial (timing, honest, why)): the cheapest honest candidate within
    tolerance, or the cheapest candidate (not honest, with the reason) when none of the first
    ``frontier.MAX_TIMED`` is."""
    cands = frontier.candidates(rows, spec.objective)
    checked: dict[str, tuple[Any, bool, str]] = {}
    first: tuple[dict[str, Any], str] | None = None  # the cheapest candidate, and why it is not honest
    for row in cands if spec.objective == "size" else cands[: frontier.MAX_TIMED]:
        timing, shown = None, None
        if spec.objective != "size":
            batch = THROUGHPUT_BATCH if spec.objective == "throughput" else 1
            timing = compare_latency(runnable(row["key"]), model_bytes, evaluation, rounds=HONESTY_ROUNDS, batch=batch)
            shown = {**timing.to_dict(), "batch": batch}
        honest, why = frontier.honesty(row, original, spec.objective, timing)
        checked[row["key"]] = (shown, honest, why)
        if honest:
            return row, True, why, checked
        if first is None:
            first = (row, why)
    if first is None:
        return None, False, "", checked
    return first[0], False, first[1], checked


def _kind(chain: list[Any]) -> str:
    """The variant kind its chain makes (what the catalogue and the report show)."""
    names = [name for name, _ in chain]
    for name, kind in (
        ("allocate", "encoded"),
        ("encode", "encoded"),
        ("int8_dynamic", "int8-dynamic"),
        ("int8_static", "int8-qdq"),
        ("weight_only", "weight-only"),
        ("prune", "pruned"),
    ):
        if name in names:
            return kind
    return "optimized"
