"""Artifacts at rest (blobs) and their records (the catalogue): models, versions, variants, engines, jobs."""

from model_store.blobs import BlobNotFound, BlobStore, LocalBlobStore, sha256_bytes
from model_store.catalog import Catalog
from model_store.database import Database
from model_store.engines import EngineCatalog, EngineRecord
from model_store.jobs import JobQueue, QueueFull
from model_store.records import (
    JobRecord,
    ModelRecord,
    NewVariant,
    RecordConflict,
    RecordNotFound,
    VariantRecord,
    VersionRecord,
)
from model_store.store import ModelStore, open_store
from model_store.traffic import DecisionRecord, NewDecision, TrafficCatalog, TrafficPolicyRecord
from model_store.trials import Claim, TrialRecord, TrialStore

__all__ = [
    "BlobNotFound",
    "BlobStore",
    "Catalog",
    "Claim",
    "Database",
    "DecisionRecord",
    "EngineCatalog",
    "EngineRecord",
    "JobQueue",
    "JobRecord",
    "LocalBlobStore",
    "ModelRecord",
    "ModelStore",
    "NewDecision",
    "NewVariant",
    "QueueFull",
    "RecordConflict",
    "RecordNotFound",
    "TrafficCatalog",
    "TrafficPolicyRecord",
    "TrialRecord",
    "TrialStore",
    "VariantRecord",
    "VersionRecord",
    "open_store",
    "sha256_bytes",
]
