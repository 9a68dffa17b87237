"""The job worker processes that a server starts for itself (the embedded default).

Jobs run in separate processes, not in the server: a compression job is CPU-heavy numpy work that would
hold the GIL against the event loop, and a job that crashes or runs out of memory must not take the
serving process down with it. Each child gets the server's store settings through the environment and
exits by itself if the server dies (it watches its parent pid).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

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
        }
    )
    for key in ("s3_bucket", "s3_prefix", "s3_endpoint_url", "s3_region"):
        value = getattr(settings, key)
        if value:
            env[f"SLIMSERVE_{key.upper()}"] = str(value)
    return env


def start_workers(settings: Settings) -> list[subprocess.Popen[bytes]]:
    procs = []
    for _ in range(settings.job_workers):
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "service.cli", "worker", "--parent-pid", str(os.getpid())],
                env=worker_env(settings),
            )
        )
    return procs


def stop_workers(procs: list[subprocess.Popen[bytes]], timeout: float = 20.0) -> None:
    """SIGTERM: a worker puts its running job back in the queue (resumable) and exits."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("worker %s did not stop in %ss; killing it", p.pid, timeout)
            p.kill()
            p.wait()
