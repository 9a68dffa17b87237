"""Artifacts at rest (blobs) and their metadata (the catalogue)."""

from model_store.blobs import BlobNotFound, BlobStore, LocalBlobStore, sha256_bytes
from model_store.catalog import (
    Catalog,
    Conflict,
    JobRecord,
    ModelRecord,
    NewVariant,
    NotFound,
    VariantRecord,
    VersionRecord,
)
from model_store.store import ModelStore, open_store

__all__ = [
    "BlobNotFound",
    "BlobStore",
    "Catalog",
    "Conflict",
    "JobRecord",
    "LocalBlobStore",
    "ModelRecord",
    "ModelStore",
    "NewVariant",
    "NotFound",
    "VariantRecord",
    "VersionRecord",
    "open_store",
    "sha256_bytes",
]
