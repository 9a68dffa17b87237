"""The job worker processes that a server starts for itself (the embedded default), supervised.

Jobs run in separate processes, not in the server: a compression job is CPU-heavy numpy work that would
hold the GIL against the event loop, and a job that crashes or runs out of memory must not take the
serving process down with it. Each child gets the server's store settings through the environment and
exits by itself if the server dies (it watches its parent pid). A child that dies is replaced, with
exponential backoff if it keeps dying; the replacement resumes the dead child's job once its lease
expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time

from service.settings import Settings

log = logging.getLogger(__name__)


def worker_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "SLIMSERVE_DATA_DIR": str(settings.data_dir.resolve()),
            "SLIMSERVE_DATABASE_URL": settings.resolved_database_url,
            "SLIMSERVE_BLOB_DIR": str(settings.resolved_blob_dir),
            "SLIMSERVE_JOB_LEASE_S": str(settings.job_lease_s),
            "SLIMSERVE_JOB_MAX_ATTEMPTS": str(settings.job_max_attempts),
            "SLIMSERVE_WORKER_TARGETS": settings.worker_targets,
        }
    )
    for key in ("s3_bucket", "s3_prefix", "s3_endpoint_url", "s3_region"):
        value = getattr(settings, key)
        if value:
            env[f"SLIMSERVE_{key.upper()}"] = str(value)
    return env


class JobProcessPool:
    """``settings.job_workers`` worker processes, kept alive until ``stop``."""

    MAX_BACKOFF_S = 30.0
    HEALTHY_AFTER_S = 60.0  # a child that lived this long resets its slot's backoff

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * settings.job_workers
        self._started_at = [0.0] * settings.job_workers
        self._backoff = [0.0] * settings.job_workers
        self._next_start = [0.0] * settings.job_workers
        self._task: asyncio.Task[None] | None = None
        self._env = worker_env(settings)
        self.restarts = 0

    def _spawn(self, slot: int) -> None:
        self.procs[slot] = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker", "--parent-pid", str(os.getpid())], env=self._env
        )
        self._started_at[slot] = time.monotonic()

    def start(self) -> None:
        for slot in range(len(self.procs)):
            self._spawn(slot)
        if self.procs:
            self._task = asyncio.get_running_loop().create_task(self._supervise())

    async def _supervise(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for slot, proc in enumerate(self.procs):
                if proc is None or proc.poll() is None:
                    continue
                if self._next_start[slot] == 0.0:
                    lived = now - self._started_at[slot]
                    healthy = lived >= self.HEALTHY_AFTER_S
                    self._backoff[slot] = 1.0 if healthy else min(self.MAX_BACKOFF_S, max(1.0, self._backoff[slot] * 2))
                    self._next_start[slot] = now + self._backoff[slot]
                    log.warning(
                        "job worker %s exited with %s after %.0fs; restarting in %.0fs",
                        proc.pid,
                        proc.returncode,
                        lived,
                        self._backoff[slot],
                    )
                if now >= self._next_start[slot]:
                    self._next_start[slot] = 0.0
                    self._spawn(slot)
                    self.restarts += 1

    async def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM: a worker puts its running job back in the queue (resumable) and exits."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        live = [p for p in self.procs if p is not None and p.poll() is None]
        for p in live:
            p.send_signal(signal.SIGTERM)
        await asyncio.to_thread(_wait_all, live, timeout)


def _wait_all(procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("worker %s did not stop in %ss; killing it", p.pid, timeout)
            p.kill()
            p.wait()
