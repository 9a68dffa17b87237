"""Engines for the variants this replica serves: which engine a variant needs here, asking for it, loading it.

A replica never builds an engine. When it loads a variant whose backend has a builder (``ENGINE_BUILDER``: always
for ``onnxruntime-tensorrt`` and ``tensorrt``; for ``onnxruntime-cpu`` when CPU engines are on), it computes its
own target and the engine key (``backends.engines.engine_key_for``) and asks the catalogue for that engine; the
first replica to ask queues its build job (one per key). Then:

* the engine is ready: its artifact is fetched (a blob), unpacked once under ``<data dir>/engines`` and loaded;
* it is not (queued, building, or failed): a CPU variant serves its plain ONNX model meanwhile, and a GPU
  variant serves on its configured fallback (``engine_fallback``, e.g. ``onnxruntime-cuda``) or, without one,
  stays not ready: ``EngineNotReady``, "waiting for its engine" (or failed, with the build's reason).

When the engine turns ready its row's change moves the catalogue revision, and the next sync loads the variant
with it and swaps it in (``LoadedVariants._sync_version``); requests in flight finish on the old instances.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from backends import BackendError, BackendOptions, BackendUnavailable, TensorSpec
from backends.engine_artifacts import install
from backends.engines import ENGINE_BUILDER, GPU_BUILDERS, RuntimeVersions, engine_key_for
from backends.targets import Target, cpu_target, gpu_targets
from model_store import EngineRecord, ModelStore
from service.model_config import ModelConfig
from service.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class EngineStatus:
    """What this replica knows of one variant's engine."""

    builder: str
    target: str
    digest: str
    state: str  # queued | building | ready | failed
    job_id: str | None = None
    reason: str | None = None  # why it failed to build, or why a ready one could not be loaded here
    used: bool = False  # this replica serves the engine
    fallback: str | None = None  # what serves meanwhile: "plain model" (CPU) or the fallback backend (GPU)

    @property
    def is_gpu(self) -> bool:
        return self.builder in GPU_BUILDERS

    def update(self, rec: EngineRecord) -> None:
        self.state, self.reason, self.job_id = rec.state, rec.error, rec.job_id

    def view(self) -> dict[str, Any]:
        return {
            "builder": self.builder,
            "target": self.target,
            "digest": self.digest,
            "state": self.state,
            "job": self.job_id,
            "reason": self.reason,
            "used": self.used,
            "fallback": self.fallback,
        }

    def describe(self) -> str:
        return f"{self.builder} engine for {self.target} (build job {self.job_id}: {self.state})"


class EngineNotReady(BackendError):
    """A GPU variant without a fallback cannot serve: its engine is being built (``waiting``) or failed."""

    def __init__(self, engine: EngineStatus) -> None:
        self.engine = engine
        self.waiting = engine.state in ("queued", "building")
        if self.waiting:
            message = f"waiting for its {engine.describe()}"
        else:
            message = (
                f"its {engine.describe()} is unusable: {engine.reason or 'no reason recorded'}; retry the build "
                "with POST .../engines/retry, or let the model serve meanwhile with config engine_fallback"
            )
        super().__init__(message)


class EngineLoader:
    def __init__(self, settings: Settings, store: ModelStore) -> None:
        self.settings = settings
        self.store = store
        self.root = settings.data_dir.resolve() / "engines"

    def builder_for(self, config: ModelConfig) -> str | None:
        """The builder whose engine ``config``'s backend serves, or None (no engine)."""
        builder = ENGINE_BUILDER.get(config.backend)
        if builder == "onnxruntime-cpu":
            wanted = self.settings.cpu_engines if config.cpu_engine is None else config.cpu_engine
            return builder if wanted else None
        return builder

    def target_for(self, builder: str) -> Target:
        if builder not in GPU_BUILDERS:
            return cpu_target()
        gpus = gpu_targets()
        if not gpus:
            raise BackendUnavailable(f"{builder}: nvidia-smi shows no GPU here, so there is no GPU target to serve on")
        return gpus[0]  # each process serves on its device 0 (the deployment picks it: CUDA_VISIBLE_DEVICES)

    def request(
        self,
        builder: str,
        variant_sha256: str,
        inputs: list[TensorSpec],
        options: BackendOptions,
        model: str,
        number: int,
    ) -> EngineStatus:
        """This replica's engine for a variant: its state, its build job queued if nobody asked before (blocking)."""
        target = self.target_for(builder)
        runtime = RuntimeVersions.detect(target.gpu)
        try:
            key = engine_key_for(builder, variant_sha256, inputs, options, target, runtime)
        except ValueError as e:
            if "TensorRT" in str(e):
                raise BackendUnavailable(str(e)) from None
            raise BackendError(f"no engine key for this variant: {e}") from None
        rec = self.store.engines.request(key.to_dict(), key.digest, model, number)
        status = EngineStatus(builder, target.id, key.digest, rec.state)
        status.update(rec)
        return status

    def states(self, digests: list[str]) -> dict[str, EngineRecord]:
        return self.store.engines.states(digests)

    def fetch(self, engine: EngineStatus) -> Path:
        """The unpacked artifact of a ready engine (fetched and unpacked once per replica)."""
        folder = self.root / engine.builder / engine.digest
        if not (folder / "manifest.json").is_file():
            rec = self.store.engines.get(engine.digest)
            if rec.blob_sha256 is None:
                raise BackendError(f"engine {engine.digest} has no artifact (state {rec.state})")
            install(self.store.blobs.local_path(rec.blob_sha256), folder)
        return folder

    def prune_local(self) -> int:
        """Remove the unpacked engines whose engine the catalogue no longer has (their variants were deleted);
        blocking. Sessions hold what they loaded in memory, so a folder can go once its engine row is gone."""
        folders = [d for d in self.root.glob("*/*") if d.is_dir() and len(d.name) == 64 and not d.name.startswith(".")]
        if not folders:
            return 0
        alive = self.store.engines.states([d.name for d in folders])
        gone = [d for d in folders if d.name not in alive]
        for d in gone:
            shutil.rmtree(d, ignore_errors=True)
        return len(gone)

    def load(self, engine: EngineStatus, config: ModelConfig, build: Callable[[ModelConfig, Path | None], T]) -> T:
        """Load a variant per the rules above: ``build(config, engine_dir)`` makes the instances."""
        if engine.state == "ready":
            try:
                loaded = build(config, self.fetch(engine))
                engine.used, engine.fallback, engine.reason = True, None, None
                return loaded
            except Exception as e:  # a replica must not stop serving because an artifact is bad: say so
                engine.reason = f"the engine could not be loaded here: {e}"
                log.warning("%s: %s", engine.describe(), engine.reason)
        if engine.is_gpu:
            if config.engine_fallback is None:
                raise EngineNotReady(engine)
            engine.fallback = config.engine_fallback
            return build(config.model_copy(update={"backend": config.engine_fallback}), None)
        engine.fallback = "plain model"
        return build(config, None)
