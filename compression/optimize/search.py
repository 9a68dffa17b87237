"""The search: trials of pass chains, bisected along monotone knobs, against a tolerance and a budget.

Plans start from the measured recipes (``compression.passes.RECIPES``) that match the model's family, detected
from its graph (attention/LayerNormalization -> transformer, Conv -> CNN, else a plain MLP). Each plan is a
*ladder*: chains ordered by a knob whose loss grows along it (``Knob.loss_grows``: int8 embeddings off -> on,
allocation budget 10x -> 60x, 8 -> 4 bits), with the recipe's rung tried first. The search bisects each ladder for
the most aggressive rung within the tolerance, so a ladder of n rungs costs about log2(n) trials, and it stops at
``max_trials`` or ``max_minutes`` with the best found so far.

Every trial is a row in the catalogue (``model_store.trials``), keyed by a hash of its chain: a resumed job (its
worker was killed) and a second worker on the same search reuse finished trials instead of building them again.
Reference outputs, chain prefixes and the allocation's sensitivity measurements are computed once per job
(``ChainCache``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import onnx

from compression.calibration import Samples
from compression.evaluate import int8_weight_share, measure_latency, run_model
from compression.job_context import JobAborted
from compression.metrics import compare
from compression.optimize.chains import Chain, ChainCache, build_chain, trial_key
from compression.optimize.judge import Judgement, judge_outputs, worst_loss
from compression.optimize.spec import OptimizeSpec
from compression.passes import PASSES, RECIPES
from model_store import BlobStore, TrialRecord, TrialStore
from model_store.blobs import crash_point

log = logging.getLogger(__name__)
Progress = Callable[[str, float], None]
LATENCY_RUNS = 20  # batch-1 runs per trial (p50/p99)
THROUGHPUT_BATCH = 32
THROUGHPUT_RUNS = 5
TRIAL_LEASE_S = 30.0  # a trial whose lease (renewed every third of it while it builds) lapses was abandoned


@dataclass(frozen=True)
class Ladder:
    """Chains ordered by growing loss (one monotone knob), and the rung to try first (the recipe's)."""

    name: str
    rungs: list[Chain]
    start: int
    why: str
    only_if_needed: bool = False  # skipped when an earlier ladder already found a trial within tolerance


def model_family(model: onnx.ModelProto) -> str:
    ops = {n.op_type for n in model.graph.node}
    if ops & {"Attention", "MultiHeadAttention", "LayerNormalization", "SkipLayerNormalization"} and "MatMul" in ops:
        return "transformer"
    if "Conv" in ops:
        return "cnn"
    return "mlp"


def _allowed(name: str, targets: list[str]) -> bool:
    return set(targets) <= set(PASSES[name].targets)


def _recipe(name: str) -> dict[str, dict[str, Any]]:
    """A recipe's passes and their knobs (copies: a plan's chains do not share the recipe's dicts)."""
    return {step: dict(knobs) for step, knobs in RECIPES[name]}


def plan(family: str, spec: OptimizeSpec) -> list[Ladder]:
    """The ladders to bisect for this model family, objective and targets, best first (see module doc)."""
    ladders: list[Ladder] = []
    latency = _recipe("transformer-latency-cpu")
    fuse: Chain = (
        [("fuse_transformer", latency["fuse_transformer"])]
        if family == "transformer" and _allowed("fuse_transformer", spec.targets)
        else []
    )
    # int8 embeddings off -> on; the recipe's rung first
    embeddings = (False, True)
    dynamic: list[Chain] = [[*fuse, ("int8_dynamic", {**latency["int8_dynamic"], "embeddings": e})] for e in embeddings]
    dynamic_start = embeddings.index(latency["int8_dynamic"]["embeddings"])
    if spec.objective in ("latency", "throughput"):
        if _allowed("int8_dynamic", spec.targets) and family != "cnn":
            ladders.append(
                Ladder(
                    "int8_dynamic",
                    dynamic,
                    dynamic_start,
                    "recipe transformer-latency-cpu: dynamic int8 with SmoothQuant; int8 embeddings tried first",
                )
            )
        if _allowed("int8_static", spec.targets):
            # QDQ is the form TensorRT consumes; ORT's CPU kernels run the U8S8 form faster (compression.quantize)
            form = "cpu" if set(spec.targets) == {"cpu"} else "qdq"
            static = {"calibration": "minmax", "tolerance": spec.tolerance, "form": form}
            ladders.append(
                Ladder(
                    "int8_static",
                    [
                        [
                            *fuse,
                            ("int8_static", {**static, "embeddings": e}),
                        ]
                        for e in (False, True)
                    ],
                    1,
                    "static QDQ int8 with op-wise fallback to the tolerance (the form TensorRT consumes)",
                    # on CPU alone dynamic int8 is the faster int8 path (passes.py) and static QDQ the slowest trial
                    # to build (minutes on MiniLM): tried only when dynamic int8 misses the tolerance
                    only_if_needed=set(spec.targets) == {"cpu"} and family != "cnn",
                )
            )
        if fuse:
            ladders.append(Ladder("fused", [fuse], 0, "fp32 with fused attention: lossless"))
    else:  # size
        if family == "cnn" or not _allowed("int8_dynamic", spec.targets):
            ratios = PASSES["allocate"].knob("target_ratio").values
            if _allowed("allocate", spec.targets):
                ladders.append(
                    Ladder(
                        "allocate",
                        [[("allocate", {"target_ratio": r})] for r in ratios],
                        ratios.index(_recipe("cnn-size")["allocate"]["target_ratio"]),
                        "recipe cnn-size: per-layer sparsity and bits to a byte budget, shared and encoded",
                    )
                )
        if _allowed("weight_only", spec.targets) and family != "cnn":
            ladders.append(
                Ladder(
                    "weight_only",
                    [[("weight_only", {"bits": b, "block_size": 32})] for b in (8, 4)],
                    1,
                    "MatMulNBits weight-only: the smallest transformer form",
                )
            )
        if _allowed("int8_dynamic", spec.targets) and family != "cnn":
            ladders.append(
                Ladder(
                    "int8_dynamic", dynamic, dynamic_start, "dynamic int8 with int8 embeddings: 3.9x smaller and faster"
                )
            )
        if family != "cnn" and _allowed("encode", spec.targets):
            bits = (8, 6, 5, 4)
            ladders.append(
                Ladder("encode", [[("encode", {"bits": b})] for b in bits], 2, "weight sharing + entropy coding")
            )
    return ladders


@dataclass
class SearchResult:
    trials: list[dict[str, Any]]  # every trial, the original first
    judgements: dict[str, Judgement]
    stopped: str  # why the search ended
    seconds: float
    reused: int  # trials finished by an earlier attempt or another worker
    skipped: list[str] = field(default_factory=list)  # ladders left out: an earlier one met the tolerance


class Search:
    """One optimize job's search (see the module doc)."""

    def __init__(
        self,
        job_id: str,
        original: bytes,
        spec: OptimizeSpec,
        calibration: Samples,
        evaluation: Samples,
        trials: TrialStore,
        blobs: BlobStore,
        progress: Progress,
        owner: str | None = None,
    ) -> None:
        self.job_id = job_id
        self.original = original
        self.model = onnx.load_from_string(original)
        self.spec = spec
        self.calibration = calibration
        self.evaluation = evaluation
        self.trials = trials
        self.blobs = blobs
        self.progress = progress
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.cache = ChainCache()
        self.family = model_family(self.model)
        self.reference = run_model(original, evaluation)
        self.judgements = judge_outputs(self.reference, spec.metric)
        self.results: dict[str, dict[str, Any]] = {}
        self.reused = 0
        self.built = 0
        self.cut_short = False
        self.skipped: list[str] = []  # ladders left out because an earlier one already met the tolerance

    # -- the loop ---------------------------------------------------------------------------------------

    def run(self) -> SearchResult:
        t0 = time.monotonic()
        deadline = t0 + 60.0 * self.spec.max_minutes
        self._trial("original", [], "the fp32 original: the reference")
        for ladder in plan(self.family, self.spec):
            if self._out_of_budget(deadline):
                self.cut_short = True
                break
            if ladder.only_if_needed and any(r.get("within_tolerance") for r in list(self.results.values())[1:]):
                self.skipped.append(ladder.name)
                continue
            self._bisect(ladder, deadline)
        stopped = self._budget_reason(deadline) if self.cut_short else "every ladder bisected"
        self.progress("search", 1.0)
        return SearchResult(
            list(self.results.values()), self.judgements, stopped, time.monotonic() - t0, self.reused, self.skipped
        )

    def _budget_reason(self, deadline: float) -> str:
        if time.monotonic() >= deadline:
            return f"max_minutes ({self.spec.max_minutes:g}) reached: best found so far"
        return f"max_trials ({self.spec.max_trials}) reached: best found so far"

    def _out_of_budget(self, deadline: float) -> bool:
        searched = len(self.results) - 1  # the original does not count
        return searched >= self.spec.max_trials or time.monotonic() >= deadline

    def _bisect(self, ladder: Ladder, deadline: float) -> None:
        """The most aggressive rung within tolerance: the recipe's rung first, then binary search."""
        lo, hi = -1, len(ladder.rungs)  # lo: highest rung known within tolerance; hi: lowest known outside
        probe = ladder.start
        while hi - lo > 1:
            if self._out_of_budget(deadline):
                self.cut_short = True
                return
            row = self._trial(ladder.name, ladder.rungs[probe], ladder.why)
            if row.get("within_tolerance"):
                lo = probe
            else:
                hi = probe
            probe = (lo + hi) // 2  # strictly between lo and hi while hi - lo > 1

    # -- one trial --------------------------------------------------------------------------------------

    def _trial(self, ladder: str, chain: Chain, why: str) -> dict[str, Any]:
        key = trial_key(chain)
        if key in self.results:
            return self.results[key]
        record = self._claim(key, chain)
        if record is not None:
            row = {**record.metrics, "reused": True}
            self.reused += 1
        else:
            row = self._build(key, ladder, chain, why)
            self.built += 1
            crash_point(f"optimize-trial-{self.built}-done")  # tests: a SIGKILL lands here, after a trial
        self.results[key] = row
        self.progress("search", self._fraction())
        return row

    def _claim(self, key: str, chain: Chain) -> TrialRecord | None:
        """The finished trial's record when another attempt or worker made it; None when this one must build it."""
        plain = [[n, k] for n, k in chain]
        while True:
            claim = self.trials.claim(self.job_id, key, plain, self.owner, TRIAL_LEASE_S)
            if claim.outcome == "mine":
                return None
            if claim.outcome == "done":
                return claim.record
            self.progress("search", self._fraction())  # also where a cancelled job stops
            time.sleep(0.5)  # another worker is building it: wait for its result

    def _fraction(self) -> float:
        return min(1.0, (len(self.results) - 1) / self.spec.max_trials)

    def _build(self, key: str, ladder: str, chain: Chain, why: str) -> dict[str, Any]:
        row: dict[str, Any] = {
            "key": key,
            "ladder": ladder,
            "chain": [[n, k] for n, k in chain],
            "why": why,
            "owner": self.owner,
        }
        t0 = time.perf_counter()
        building = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(key, building), daemon=True)
        renewer.start()
        try:
            return self._build_and_record(key, row, chain, t0)
        finally:
            building.set()

    def _build_and_record(self, key: str, row: dict[str, Any], chain: Chain, t0: float) -> dict[str, Any]:
        try:
            if chain:
                built = build_chain(self.model, chain, self.calibration, self.evaluation, self.spec.metric, self.cache)
                stored, runnable, details = built.stored, built.runnable, built.details
            else:
                stored = runnable = self.original
                details = {}
            row.update(self._measure(stored, runnable))
            row["details"] = details
        except JobAborted:
            raise
        except Exception as e:  # a pass that cannot run on this model is a failed trial, not a failed search
            log.info("trial %s (%s) failed: %s", key, row["ladder"], e)
            row.update(state="failed", error=f"{type(e).__name__}: {e}", within_tolerance=False)
            row["build_seconds"] = round(time.perf_counter() - t0, 3)
            self.trials.finish(self.job_id, key, self.owner, row, error=row["error"])
            return row
        row["state"] = "done"
        row["build_seconds"] = round(time.perf_counter() - t0, 3)
        artifact = self.blobs.put_bytes(stored)  # blobs first, then the row that names them
        runnable_sha = self.blobs.put_bytes(runnable) if runnable is not stored else artifact
        self.trials.finish(self.job_id, key, self.owner, row, artifact, runnable_sha)
        return row

    def _renew(self, key: str, building: threading.Event) -> None:
        while not building.wait(TRIAL_LEASE_S / 3):
            self.trials.renew(self.job_id, key, self.owner, TRIAL_LEASE_S)

    def _measure(self, stored: bytes, runnable: bytes) -> dict[str, Any]:
        outputs = run_model(runnable, self.evaluation)
        labels = self.evaluation.labels
        agreements = {n: compare(self.reference[n], outputs[n], labels).to_dict() for n in self.reference}
        loss, worst = worst_loss(self.judgements, agreements)
        b1 = measure_latency(runnable, self.evaluation, batch_size=1, runs=LATENCY_RUNS)
        b32 = measure_latency(runnable, self.evaluation, batch_size=THROUGHPUT_BATCH, runs=THROUGHPUT_RUNS, warmup=1)
        return {
            "loss": round(float(loss), 6),
            "accuracy_delta": round(-float(loss), 6),
            "worst_output": worst,
            "within_tolerance": bool(loss <= self.spec.tolerance + 1e-12),
            "size_bytes": len(stored),
            "compression_ratio": round(len(self.original) / max(1, len(stored)), 3),
            "p50_ms": round(b1["p50_ms"], 4),
            "p99_ms": round(b1["p99_ms"], 4),
            "throughput": round(b32["batch_size"] / max(b32["p50_ms"], 1e-9) * 1000.0, 2),
            "throughput_batch": b32["batch_size"],
            "outputs": {
                n: {k: a[k] for k in ("mean_cosine", "top1_agreement", "relative_error")} for n, a in agreements.items()
            },
            "int8_weight_share": round(int8_weight_share(onnx.load_from_string(runnable)), 4),
        }
