"""Helpers for the optimize tests (and npz for every test that sends calibration data): a store holding one uploaded
version, the MLP the searches run on, and running a job in process."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from backends.onnx_model import model_interface
from compression.job_context import JobContext
from model_store import ModelStore, NewVariant, open_store
from tests import onnx_models


def npz(**arrays: np.ndarray) -> bytes:
    """The arrays as an .npz file, as a calibration upload carries them."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def search_mlp() -> tuple[bytes, dict[str, np.ndarray]]:
    """The MLP the optimize searches run on (32 -> 256 -> 10) and 96 seeded calibration samples for it."""
    x = np.random.default_rng(0).standard_normal((96, 32)).astype(np.float32)
    return onnx_models.mlp(in_dim=32, hidden=256, out_dim=10), {"x": x}


def store_with(tmp: Path, name: str, model: bytes, calibration: dict[str, np.ndarray]) -> ModelStore:
    """A SQLite store with ``name`` version 1: the model and its calibration samples, as an upload records them."""
    store = open_store(f"sqlite:///{tmp / 'catalog.db'}", tmp / "blobs")
    inputs, outputs = model_interface(onnx.load_from_string(model))
    sha = store.blobs.put_bytes(model)
    cal = store.blobs.put_bytes(npz(**calibration))
    details = {"inputs": [t.to_dict() for t in inputs], "outputs": [t.to_dict() for t in outputs]}
    store.catalog.create_version(
        name, [NewVariant("original", "original", sha, len(model), details=details)], None, "original", cal
    )
    return store


def run_job(store: ModelStore, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    from compression.optimize.job import run_optimize_job

    job = store.jobs.create("optimize", name, 1, spec)
    return run_optimize_job(JobContext(store, job, lambda: None))
