"""JSON views of catalogue records, with this process's load state."""

from __future__ import annotations

from typing import Any

from model_store import ModelRecord, VariantRecord, VersionRecord
from service.loaded import LoadedVariants


def variant_view(v: VariantRecord, version: VersionRecord, loaded: LoadedVariants) -> dict[str, Any]:
    served = loaded.served(version.model, version.number, v.name)
    failed = loaded.load_failure(version.model, version.number, v.name)
    failure = failed.reason if failed else None
    if served:
        state = "ready"
    elif failed:
        state = "waiting" if failed.waiting else "failed"  # waiting: for its engine (a GPU variant, no fallback)
    else:
        state = "unloaded" if not version.loaded else "loading"
    out: dict[str, Any] = {
        "name": v.name,
        "kind": v.kind,
        "sha256": v.sha256,
        "size_bytes": v.size_bytes,
        "state": state,
        "backend": served.backend if served else None,
        "details": v.details,
        "created_at": v.created_at.isoformat(),
    }
    if served:
        out["warmed"] = served.warmed
        out["warmup"] = served.warmup.inputs
        if not served.warmed and served.warmup.reason:
            out["warmup_error"] = served.warmup.reason
    if failure:
        out["error"] = failure
    engine = served.engine if served else (failed.engine if failed else None)
    if engine is not None:
        out["engine"] = engine.view()
    return out


def version_view(version: VersionRecord, loaded: LoadedVariants) -> dict[str, Any]:
    variants = [variant_view(v, version, loaded) for v in version.variants]
    states = {v["state"] for v in variants}
    state = (
        "ready"
        if "ready" in states
        else ("unloaded" if not version.loaded else ("failed" if states == {"failed"} else "loading"))
    )
    return {
        "version": version.number,
        "state": state,
        "default_variant": version.default_variant,
        "default_pinned": version.pinned_default,
        "config": version.config,
        "has_calibration": version.calibration_sha256 is not None,
        "created_at": version.created_at.isoformat(),
        "variants": variants,
    }


def model_view(model: ModelRecord, loaded: LoadedVariants) -> dict[str, Any]:
    return {
        "name": model.name,
        "created_at": model.created_at.isoformat(),
        "versions": [version_view(v, loaded) for v in model.versions],
    }
