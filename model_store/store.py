"""The model store: blobs (artifacts at rest) plus the catalogue (what they are)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from model_store.blobs import BlobStore, LocalBlobStore
from model_store.catalog import Catalog
from model_store.engines import EngineCatalog
from model_store.jobs import JobQueue
from model_store.traffic import TrafficCatalog
from model_store.trials import TrialStore

log = logging.getLogger(__name__)


@dataclass
class GcReport:
    temporaries: int
    orphans: int
    missing: list[str]


class ModelStore:
    """Blobs are written before the catalogue rows that name them, and removed only after those rows
    are gone, so the catalogue never names a missing blob. A crash can leave an unreferenced blob
    behind; ``collect`` removes those once they are older than a grace period (a concurrent upload may
    have just written one that its transaction has not committed yet)."""

    def __init__(self, blobs: BlobStore, catalog: Catalog) -> None:
        self.blobs = blobs
        self.catalog = catalog
        self.jobs = JobQueue(catalog.db)
        self.engines = EngineCatalog(catalog.db)
        self.traffic = TrafficCatalog(catalog.db)
        self.trials = TrialStore(catalog.db)

    def collect(self, grace_seconds: float = 300.0) -> GcReport:
        temporaries = self.blobs.cleanup_temporaries() if grace_seconds <= 0 else 0
        self.engines.prune()  # engines of variants deleted by an earlier release (deletes prune their own)
        referenced = (
            self.catalog.referenced_digests() | self.engines.referenced_digests() | self.trials.referenced_digests()
        )
        cutoff = time.time() - grace_seconds
        orphans = 0
        present: set[str] = set()
        for digest, mtime in list(self.blobs.list_digests()):
            present.add(digest)
            if digest not in referenced and mtime < cutoff:
                self.blobs.delete(digest)
                orphans += 1
        missing = sorted(referenced - present)
        if missing:
            log.error("catalogue names %d blobs that are missing: %s", len(missing), missing[:5])
        return GcReport(temporaries, orphans, missing)

    def startup_check(self, grace_seconds: float = 300.0) -> GcReport:
        """Run once before serving: drop temporaries whose writer is gone, and orphans older than the grace."""
        temporaries = self.blobs.cleanup_temporaries()
        report = self.collect(grace_seconds)
        report.temporaries = temporaries
        return report

    def close(self) -> None:
        self.catalog.close()


def open_store(
    database_url: str,
    blob_dir: Path,
    s3_bucket: str | None = None,
    s3_prefix: str = "",
    s3_endpoint_url: str | None = None,
    s3_region: str | None = None,
) -> ModelStore:
    """The store a deployment configures: a local directory by default, S3 when a bucket is named
    (``blob_dir`` is then the local read cache)."""
    blobs: BlobStore
    if s3_bucket:
        from model_store.s3 import S3BlobStore

        blobs = S3BlobStore(s3_bucket, blob_dir, s3_prefix, s3_endpoint_url, s3_region)
    else:
        blobs = LocalBlobStore(blob_dir)
    return ModelStore(blobs, Catalog(database_url))
