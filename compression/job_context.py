"""What a job runner gets (``JobContext``) and the exceptions it may raise to its worker.

Kept apart from ``compression.worker`` so runners (``compress_job``, ``engine_build``, ...) can raise them without
importing the worker that imports them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from model_store import JobRecord, ModelStore


class JobAborted(Exception):
    """The job was cancelled, or this worker lost its lease, or the worker is stopping."""


class NotForThisWorker(Exception):
    """This worker cannot run the job, though it claimed it (an engine build for a runtime version it does not
    have): the worker gives it back to the queue untried and leaves it to another worker."""


@dataclass
class JobContext:
    """What a job runner gets: the store, its job, and ``progress`` to report (and to be stopped at)."""

    store: ModelStore
    job: JobRecord
    _check: Callable[[], None]
    stages: list[str] = field(default_factory=list)
    stage: str | None = None
    fraction: float = 0.0

    def progress(self, stage: str, fraction: float) -> None:
        """Record progress within ``stage`` (0..1); raises JobAborted when the job must stop."""
        self._check()
        if stage not in self.stages:
            self.stages.append(stage)
        idx = self.stages.index(stage)
        self.stage = stage
        self.fraction = min(1.0, (idx + max(0.0, min(1.0, fraction))) / max(1, len(self.stages)))
