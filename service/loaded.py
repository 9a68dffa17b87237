"""The loaded-variant index: which model versions and variants this process has loaded, and how to reach them.

The catalogue holds the desired state (which versions exist, which are marked loaded, their variants and
default variant); ``LoadedVariants.sync`` makes this process match it. Uploads install their freshly loaded
backends directly; every other change (compression adding a variant, another replica's upload, the
repository API) arrives through ``sync``, which the app runs at start and then every
``sync_interval_s`` seconds when the catalogue's revision counter moves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from backends import Backend, BackendError, BackendOptions, TensorSpec, is_batchable, load_backend
from model_store import ModelStore, VariantRecord, VersionRecord
from service.errors import BadRequest, NotFound, Unavailable
from service.metrics import Metrics, VariantMetrics
from service.model_config import ModelConfig
from service.scheduler import Scheduler, SchedulerConfig, Stats
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class ServedVariant:
    model: str
    version: int
    variant: str
    backend: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    input_index: dict[str, TensorSpec]
    output_names: frozenset[str]
    max_batch_size: int
    instances: int
    scheduler: Scheduler
    metrics: VariantMetrics
    stats: Stats
    record: VariantRecord
    config: ModelConfig
    backend_info: dict[str, Any] = field(default_factory=dict)


@dataclass
class ServedVersion:
    model: str
    number: int
    default_variant: str
    variants: dict[str, ServedVariant]


@dataclass
class LoadFailure:
    sha256: str
    reason: str
    backend: str = ""


class LoadedVariants:
    def __init__(self, settings: Settings, store: ModelStore, metrics: Metrics) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self._versions: dict[tuple[str, int], ServedVersion] = {}
        #: model -> its highest loaded version, kept by _index() so resolve() does no scan per request
        self._latest: dict[str, int] = {}
        self._failures: dict[tuple[str, int, str], LoadFailure] = {}
        self._lock = asyncio.Lock()
        self._revision = -1
        self.synced_once = False

    # -- lookups (event loop, no I/O) ---------------------------------------------------------------

    def resolve(self, name: str, version: str | None = None) -> ServedVariant:
        """``name`` is a model name, or ``model:variant``; ``version`` a number, or None for the latest."""
        model, _, variant = name.partition(":")
        if version is not None:
            try:
                number = int(version)
            except ValueError:
                raise BadRequest(f"version must be an integer, not {version!r}") from None
            sv = self._versions.get((model, number))
            if sv is None:
                raise self._missing(model, number)
        else:
            latest = self._latest.get(model)
            if latest is None:
                raise self._missing(model, None)
            sv = self._versions[(model, latest)]
        key = variant or sv.default_variant
        served = sv.variants.get(key)
        if served is None:
            failure = self._failures.get((model, sv.number, key))
            if failure:
                raise Unavailable(f"variant {key!r} of {model} version {sv.number} failed to load: {failure.reason}")
            raise NotFound(
                f"model {model!r} version {sv.number} has no variant {key!r} "
                f"(variants: {', '.join(sorted(sv.variants)) or 'none loaded'})"
            )
        return served

    def _missing(self, model: str, number: int | None) -> NotFound | Unavailable:
        what = f"model {model!r}" + (f" version {number}" if number is not None else "")
        failed = [(k, f) for k, f in self._failures.items() if k[0] == model and number in (None, k[1])]
        if failed:  # known, but none of its variants loaded: the server's state, not an unknown name
            (_, n, variant), f = max(failed, key=lambda kf: kf[0][1])
            return Unavailable(f"{what} failed to load (variant {variant!r} of version {n}: {f.reason})")
        return NotFound(f"{what} is not loaded (unknown, unloaded or still loading)")

    def versions_of(self, model: str) -> list[int]:
        return sorted(n for (m, n) in self._versions if m == model)

    def served_versions(self) -> list[ServedVersion]:
        return [self._versions[k] for k in sorted(self._versions)]

    def served(self, model: str, number: int, variant: str) -> ServedVariant | None:
        version = self._versions.get((model, number))
        return version.variants.get(variant) if version else None

    def _index(self) -> None:
        self._latest = {}
        for model, number in self._versions:
            if number > self._latest.get(model, 0):
                self._latest[model] = number

    def is_loaded(self, model: str, number: int) -> bool:
        return (model, number) in self._versions

    def failure(self, model: str, number: int, variant: str) -> str | None:
        f = self._failures.get((model, number, variant))
        return f.reason if f else None

    # -- loading ------------------------------------------------------------------------------------

    def build_instances(self, model_bytes: bytes, config: ModelConfig) -> list[Backend]:
        """Create and warm up the backend instances for one variant (blocking: call off the loop)."""
        instances = config.instances or self.settings.default_instances
        threads = config.intra_op_threads or self.settings.threads_per_instance(instances)
        opts = BackendOptions(
            intra_op_threads=threads,
            precision=config.precision,
            extra={
                "max_batch_size": config.max_batch_size or self.settings.default_max_batch_size,
                "engine_cache_dir": str(self.settings.data_dir.resolve() / "engines"),
                "warmup_timeout_s": self.settings.warmup_timeout_s,
                **config.backend_options,
            },
        )
        out: list[Backend] = []
        try:
            for _ in range(instances):
                b = load_backend(config.backend, model_bytes, opts)
                b.warmup(1)
                out.append(b)
        except BackendError:
            for b in out:
                b.unload()
            raise
        return out

    def _serve(
        self,
        record: VersionRecord,
        variant: VariantRecord,
        instances: list[Backend],
        config: ModelConfig,
        load_seconds: float,
    ) -> ServedVariant:
        b0 = instances[0]
        batchable = is_batchable(b0.inputs, b0.outputs)
        mbs = config.max_batch_size
        if mbs is None:
            mbs = self.settings.default_max_batch_size if batchable else 0
        elif mbs > 0 and not batchable:
            mbs = 0  # the model has no dynamic first dimension: nothing to batch along
        bcfg = config.batching
        vm = self.metrics.bind(record.model, record.number, variant.name, b0.name)
        vm.load.observe(load_seconds)
        vm.size.set(variant.size_bytes)
        # The original is the reference (0 by definition); other variants export only a measured delta.
        delta = (
            0.0 if variant.kind == "original" and variant.name == "original" else variant.details.get("accuracy_delta")
        )
        if isinstance(delta, int | float):
            self.metrics.set_accuracy_delta(vm.labels, delta)
        stats = Stats()
        sched = Scheduler(
            f"{record.model}:{variant.name}/{record.number}",
            instances,
            SchedulerConfig(
                max_batch_size=mbs,
                batching=bcfg.enabled,
                max_queue_delay_ns=bcfg.max_queue_delay_us * 1000,
                preferred_batch_sizes=tuple(bcfg.preferred_batch_sizes),
                max_queue_size=bcfg.max_queue_size or self.settings.default_max_queue_size,
                default_timeout_ns=bcfg.default_timeout_us * 1000 if bcfg.default_timeout_us else None,
            ),
            vm,
            stats,
        )
        vm.ready.set(1)
        return ServedVariant(
            model=record.model,
            version=record.number,
            variant=variant.name,
            backend=b0.name,
            inputs=b0.inputs,
            outputs=b0.outputs,
            input_index={t.name: t for t in b0.inputs},
            output_names=frozenset(t.name for t in b0.outputs),
            max_batch_size=mbs,
            instances=len(instances),
            scheduler=sched,
            metrics=vm,
            stats=stats,
            record=variant,
            config=config,
            backend_info=b0.describe(),
        )

    async def install(
        self,
        record: VersionRecord,
        loaded: dict[str, tuple[list[Backend], float]],
    ) -> None:
        """Serve a version whose variants the caller loaded (an upload), without loading them again."""
        async with self._lock:
            config = ModelConfig.model_validate(record.config or {})
            variants = {}
            for v in record.variants:
                if v.name in loaded:
                    instances, secs = loaded[v.name]
                    variants[v.name] = self._serve(record, v, instances, config, secs)
            self._put(record, variants)

    def _put(self, record: VersionRecord, variants: dict[str, ServedVariant]) -> None:
        key = (record.model, record.number)
        old = self._versions.get(key)
        default = record.default_variant or next(iter(variants), "")
        self._versions[key] = ServedVersion(record.model, record.number, default, variants)
        self._index()
        if old:
            for name, sv in old.variants.items():
                if variants.get(name) is not sv:
                    self._retire(sv)

    def _retire(self, sv: ServedVariant) -> None:
        # A replacement with the same labels (an upload installing what a sync loaded a moment before) shares
        # the metric series: they are its now, not to be zeroed or removed.
        labels = sv.metrics.labels
        if not any(o.metrics.labels == labels for ver in self._versions.values() for o in ver.variants.values()):
            sv.metrics.ready.set(0)
            self.metrics.forget(sv.metrics)
        # Stop in a thread: joining workers that are finishing a batch must not block the loop.
        asyncio.get_running_loop().run_in_executor(None, sv.scheduler.stop)

    def _load_variant_blocking(self, variant: VariantRecord, config: ModelConfig) -> tuple[list[Backend], float]:
        t0 = time.perf_counter()
        data = self.store.blobs.get_bytes(variant.runnable_sha256)
        instances = self.build_instances(data, config)
        return instances, time.perf_counter() - t0

    async def sync(self, force: bool = False) -> None:
        """Make the loaded set match the catalogue's desired state."""
        async with self._lock:
            revision = await asyncio.to_thread(self.store.catalog.revision)
            if revision == self._revision and not force:
                return
            models = await asyncio.to_thread(self.store.catalog.list_models)
            desired = {(m.name, v.number): v for m in models for v in m.versions if v.loaded}
            for key in [k for k in self._versions if k not in desired]:
                for sv in self._versions.pop(key).variants.values():
                    self._retire(sv)
                self._index()
            for record in desired.values():
                await self._sync_version(record)
            for k in [k for k in self._failures if (k[0], k[1]) not in desired]:
                f = self._failures.pop(k)
                self.metrics.forget_failed(k[0], k[1], k[2], f.backend)
            self._revision = revision
            self.synced_once = True

    async def _sync_version(self, record: VersionRecord) -> None:
        key = (record.model, record.number)
        current = self._versions.get(key)
        have = current.variants if current else {}
        try:
            config = ModelConfig.model_validate(record.config or {})
        except ValueError as e:
            for v in record.variants:
                self._failures[(record.model, record.number, v.name)] = LoadFailure(v.sha256, str(e))
            return
        variants: dict[str, ServedVariant] = {}
        for v in record.variants:
            sv = have.get(v.name)
            if sv is not None and sv.record.runnable_sha256 == v.runnable_sha256:
                variants[v.name] = sv
                continue
            fkey = (record.model, record.number, v.name)
            failed = self._failures.get(fkey)
            if failed and failed.sha256 == v.runnable_sha256:
                continue  # it failed before and has not changed: don't retry on every sync
            try:
                instances, secs = await asyncio.to_thread(self._load_variant_blocking, v, config)
            except Exception as e:  # a broken artifact must not stop the others from loading
                log.error("could not load %s:%s version %s: %s", record.model, v.name, record.number, e)
                self._failures[fkey] = LoadFailure(v.runnable_sha256, str(e)[:500], config.backend)
                self.metrics.mark_failed(record.model, record.number, v.name, config.backend)
                continue
            if fkey in self._failures:
                self.metrics.forget_failed(record.model, record.number, v.name, self._failures.pop(fkey).backend)
            variants[v.name] = self._serve(record, v, instances, config, secs)
        if variants or current:
            self._put(record, variants)

    async def close(self) -> None:
        async with self._lock:
            scheds = [sv.scheduler for ver in self._versions.values() for sv in ver.variants.values()]
            self._versions.clear()
            self._latest.clear()
        for s in scheds:
            await asyncio.to_thread(s.stop)
