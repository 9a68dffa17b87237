"""Job workers: claim queued jobs from the catalogue, run them, publish the variants they make.

Jobs are claimed under a lease that a heartbeat thread extends while the job runs. A worker that dies
stops renewing its lease, and when the lease expires another worker (or the restarted server's own)
claims the job again, up to ``max_attempts`` times, after which it is failed with a reason. A job whose
lease cannot be renewed (cancelled, or taken over after a stall) is abandoned at once, so a job never
runs twice at the same time. Variant rows are written with ``replace=True``, so a resumed job that had
published some variants before it died publishes them again without conflict.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Any

from compression.pipeline import NeedsData, load_data, run_pipeline
from compression.spec import CompressionSpec
from model_store import JobRecord, ModelStore, NewVariant

log = logging.getLogger(__name__)
KINDS = ("compress",)


class JobAborted(Exception):
    """The job was cancelled, or this worker lost its lease."""


@dataclass
class _Progress:
    stage: str | None = None
    fraction: float = 0.0


class JobWorker:
    def __init__(
        self,
        store: ModelStore,
        owner: str | None = None,
        lease_s: float = 30.0,
        heartbeat_s: float = 3.0,
        poll_s: float = 0.5,
        max_attempts: int = 3,
    ) -> None:
        self.store = store
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.lease_s = lease_s
        # Renew well before the lease runs out: a heartbeat delayed by a busy machine must not lose it.
        self.heartbeat_s = min(heartbeat_s, lease_s / 3)
        self.poll_s = poll_s
        self.max_attempts = max_attempts

    def run_forever(self, stop: threading.Event, parent_pid: int | None = None) -> None:
        log.info("worker %s polling for jobs", self.owner)
        while not stop.is_set():
            if parent_pid is not None and os.getppid() != parent_pid:
                log.warning("parent process %s is gone; worker exits", parent_pid)
                return
            try:
                ran = self.run_one(stop)
            except Exception:
                log.exception("job loop error; retrying")
                ran = False
            if not ran:
                stop.wait(self.poll_s)

    def run_one(self, stop: threading.Event | None = None) -> bool:
        catalog = self.store.catalog
        catalog.fail_abandoned_jobs(self.max_attempts)
        job = catalog.claim_job(self.owner, self.lease_s, KINDS)
        if job is None:
            return False
        if job.attempts > self.max_attempts:
            catalog.finish_job(job.id, self.owner, "failed", error=f"gave up after {job.attempts - 1} attempts")
            return True
        self._execute(job, stop or threading.Event())
        return True

    # -- one job ------------------------------------------------------------------------------------

    def _execute(self, job: JobRecord, stop: threading.Event) -> None:
        catalog = self.store.catalog
        state = _Progress()
        lost = threading.Event()
        done = threading.Event()

        def heartbeat() -> None:
            while not done.wait(self.heartbeat_s):
                if not catalog.heartbeat_job(job.id, self.owner, self.lease_s, state.stage, state.fraction):
                    lost.set()
                    return

        hb = threading.Thread(target=heartbeat, name=f"heartbeat-{job.id[:8]}", daemon=True)
        hb.start()

        stages: list[str] = []

        def progress(stage: str, fraction: float) -> None:
            if lost.is_set():
                raise JobAborted("cancelled or lease lost")
            if stop.is_set():
                raise JobAborted("worker stopping")
            if stage not in stages:
                stages.append(stage)
            total = max(1, len(expected))
            idx = expected.index(stage) if stage in expected else len(expected) - 1
            state.stage = stage
            state.fraction = min(1.0, (idx + max(0.0, min(1.0, fraction))) / total)

        expected: list[str] = []
        try:
            spec = CompressionSpec.model_validate({k: v for k, v in job.spec.items() if k != "calibration_sha256"})
            expected = spec.stages
            catalog.heartbeat_job(job.id, self.owner, self.lease_s, "load", 0.0)
            result = self._compress(job, spec, progress)
        except JobAborted as e:
            done.set()
            current = catalog.get_job(job.id)
            if current.cancel_requested:
                catalog.finish_job(job.id, self.owner, "cancelled", error="cancelled by request")
            elif stop.is_set():
                catalog.finish_job(job.id, self.owner, "queued")  # resumable by the next worker
            log.info("job %s aborted: %s", job.id, e)
            return
        except (ValueError, NeedsData) as e:
            done.set()
            catalog.finish_job(job.id, self.owner, "failed", error=str(e))
            return
        except Exception as e:
            done.set()
            log.error("job %s failed:\n%s", job.id, traceback.format_exc())
            catalog.finish_job(job.id, self.owner, "failed", error=f"{type(e).__name__}: {e}")
            return
        done.set()
        hb.join(timeout=5)
        if not catalog.finish_job(job.id, self.owner, "succeeded", result=result):
            log.warning("job %s finished but its lease had moved on", job.id)

    def _compress(self, job: JobRecord, spec: CompressionSpec, progress: Any) -> dict[str, Any]:
        store = self.store
        version = store.catalog.get_version(job.model, job.version)
        original = version.variant("original")
        if original is None:
            raise ValueError(f"{job.model} version {job.version} has no original variant")
        model_bytes = store.blobs.get_bytes(original.runnable_sha256)
        cal_sha = job.spec.get("calibration_sha256") or version.calibration_sha256
        npz = store.blobs.get_bytes(cal_sha) if cal_sha else None
        inputs = [t["name"] for t in original.details.get("inputs", [])]
        data = load_data(npz, inputs, spec.holdout_fraction)
        t0 = time.perf_counter()
        result = run_pipeline(model_bytes, spec, data, progress)
        progress("evaluate", 1.0)
        # Blobs first, then the rows that name them.
        for v in result.variants:
            stored = store.blobs.put_bytes(v.stored)
            runnable = store.blobs.put_bytes(v.runnable) if v.runnable is not v.stored else stored
            v.details.setdefault("job", job.id)
            store.catalog.add_variant(
                job.model,
                job.version,
                NewVariant(v.name, v.kind, stored, len(v.stored), runnable, v.details),
                replace=True,
            )
        store.catalog.set_default_variant(job.model, job.version, result.default_variant, pinned=False)
        return {
            "variants": [v.name for v in result.variants],
            "default_variant": result.default_variant,
            "table": result.table,
            "notes": result.notes,
            "seconds": round(time.perf_counter() - t0, 3),
        }
