"""Job workers: claim queued jobs, run them, publish what they make.

Jobs are claimed under a lease that a heartbeat thread extends while the job runs. A worker that dies
stops renewing its lease, and when the lease expires another worker (or the restarted server's own)
claims the job again, up to ``max_attempts`` times, after which it is failed with a reason. A job whose
lease cannot be renewed (cancelled, or taken over after a stall) is abandoned at once, so a job never
runs twice at the same time. Jobs publish idempotently (variant rows are written with ``replace=True``),
so a resumed job that had published part of its work before it died publishes it again without conflict.

Each job kind has a runner (``RUNNERS``): a function of a ``JobContext`` that returns the job's result.

A worker advertises the build targets its hardware has (``backends.targets``) and claims only the builds for
them. A build it claims but cannot run (its runtime versions differ from the engine key's) goes back to the
queue untried, and this worker leaves it alone for ``SKIP_S`` so that a worker with that runtime takes it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from typing import Any

from compression.compress_job import run_compress_job
from compression.engine_build import run_build_job
from compression.job_context import JobAborted, JobContext, NotForThisWorker
from compression.optimize.job import run_optimize_job
from compression.pipeline import NeedsData
from model_store import JobRecord, ModelStore

log = logging.getLogger(__name__)


JobRunner = Callable[[JobContext], dict[str, Any]]
RUNNERS: dict[str, JobRunner] = {"compress": run_compress_job, "build": run_build_job, "optimize": run_optimize_job}
#: how long a worker leaves a job it gave back (NotForThisWorker) to other workers before it looks at it again
SKIP_S = 60.0


class JobWorker:
    def __init__(
        self,
        store: ModelStore,
        owner: str | None = None,
        lease_s: float = 30.0,
        heartbeat_s: float = 3.0,
        poll_s: float = 0.5,
        max_attempts: int = 3,
        runners: dict[str, JobRunner] | None = None,
        targets: tuple[str, ...] = (),
    ) -> None:
        self.store = store
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.lease_s = lease_s
        # Renew well before the lease runs out: a heartbeat delayed by a busy machine must not lose it.
        self.heartbeat_s = min(heartbeat_s, lease_s / 3)
        self.poll_s = poll_s
        self.max_attempts = max_attempts
        self.runners = dict(RUNNERS if runners is None else runners)
        self.targets = tuple(targets)
        self._skip: dict[str, float] = {}  # job id -> monotonic time until which this worker leaves it

    def run_forever(self, stop: threading.Event, parent_pid: int | None = None) -> None:
        log.info(
            "worker %s polling for %s jobs; build targets: %s",
            self.owner,
            ", ".join(self.runners),
            ", ".join(self.targets) or "none",
        )
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
        jobs = self.store.jobs
        jobs.fail_abandoned(self.max_attempts)
        now = time.monotonic()
        self._skip = {k: t for k, t in self._skip.items() if t > now}
        job = jobs.claim(self.owner, self.lease_s, tuple(self.runners), self.targets, tuple(self._skip))
        if job is None:
            return False
        if job.attempts > self.max_attempts:
            jobs.finish(job.id, self.owner, "failed", error=f"gave up after {job.attempts - 1} attempts")
            return True
        self._execute(job, stop or threading.Event())
        return True

    # -- one job ------------------------------------------------------------------------------------

    def _execute(self, job: JobRecord, stop: threading.Event) -> None:
        jobs = self.store.jobs
        lost = threading.Event()
        done = threading.Event()

        def check() -> None:
            if lost.is_set():
                raise JobAborted("cancelled or lease lost")
            if stop.is_set():
                raise JobAborted("worker stopping")

        ctx = JobContext(self.store, job, check)

        def heartbeat() -> None:
            while not done.wait(self.heartbeat_s):
                if not jobs.heartbeat(job.id, self.owner, self.lease_s, ctx.stage, ctx.fraction):
                    lost.set()
                    return

        hb = threading.Thread(target=heartbeat, name=f"heartbeat-{job.id[:8]}", daemon=True)
        hb.start()
        try:
            jobs.heartbeat(job.id, self.owner, self.lease_s, "load", 0.0)
            result = self.runners[job.kind](ctx)
        except NotForThisWorker as e:
            done.set()
            jobs.release(job.id, self.owner)
            self._skip[job.id] = time.monotonic() + SKIP_S
            log.info("job %s given back: %s", job.id, e)
            return
        except JobAborted as e:
            done.set()
            if jobs.get(job.id).cancel_requested:
                jobs.finish(job.id, self.owner, "cancelled", error="cancelled by request")
            elif stop.is_set():
                jobs.finish(job.id, self.owner, "queued")  # resumable by the next worker
            log.info("job %s aborted: %s", job.id, e)
            return
        except (ValueError, NeedsData) as e:
            done.set()
            jobs.finish(job.id, self.owner, "failed", error=str(e))
            return
        except Exception as e:
            done.set()
            log.error("job %s failed:\n%s", job.id, traceback.format_exc())
            jobs.finish(job.id, self.owner, "failed", error=f"{type(e).__name__}: {e}")
            return
        done.set()
        hb.join(timeout=5)
        if not jobs.finish(job.id, self.owner, "succeeded", result=result):
            log.warning("job %s finished but its lease had moved on", job.id)
