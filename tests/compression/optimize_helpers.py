"""Helpers for the optimize tests: a store holding one uploaded version, and a job context to run a job in."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from backends.onnx_model import model_interface
from compression.job_context import JobContext
from model_store import JobRecord, ModelStore, NewVariant, open_store


def npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def store_with(tmp: Path, name: str, model: bytes, calibration: dict[str, np.ndarray]) -> ModelStore:
    """A SQLite store with ``name`` version 1: the model and its calibration samples, as an upload records them."""
    store = open_store(f"sqlite:///{tmp / 'catalog.db'}", tmp / "blobs")
    inputs, outputs = model_interface(onnx.load_from_string(model))
    sha = store.blobs.put_bytes(model)
    cal = store.blobs.put_bytes(npz(calibration))
    details = {"inputs": [t.to_dict() for t in inputs], "outputs": [t.to_dict() for t in outputs]}
    store.catalog.create_version(
        name, [NewVariant("original", "original", sha, len(model), details=details)], None, "original", cal
    )
    return store


def context(store: ModelStore, job: JobRecord) -> JobContext:
    stop = threading.Event()

    def check() -> None:
        if stop.is_set():
            raise RuntimeError("stopped")

    return JobContext(store, job, check)


def run_job(store: ModelStore, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    from compression.optimize.job import run_optimize_job

    job = store.jobs.create("optimize", name, 1, spec)
    return run_optimize_job(context(store, job))
