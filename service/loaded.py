"""The loaded-variant index: which model versions and variants this process has loaded, and how to reach them.

The catalogue holds the desired state (which versions exist, which are marked loaded, their variants and
default variant); ``LoadedVariants.sync`` makes this process match it. Uploads install their freshly loaded
backends directly; every other change (compression adding a variant, another replica's upload, the
repository API) arrives through ``sync``, which the app runs at start and then every
``sync_interval_s`` seconds when the catalogue's revision counter moves, or at once when a request found
the catalogue ahead of this process.

A name the catalogue knows but this process has not loaded yet answers 503 "loading" with Retry-After;
only a name the catalogue does not know answers 404 (``resolve``).

Variants whose backend serves a prebuilt engine go through ``service.engine_loader``: a GPU variant waits for its
engine (503 "waiting for its engine") unless its config names a fallback; a CPU one serves its plain model until
the engine is ready. The engine's state change moves the catalogue revision, and the sync swaps the engine in.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from backends import TensorSpec
from backends.onnx_model import model_interface, parse_model
from model_store import EngineRecord, ModelRecord, ModelStore, VariantRecord, VersionRecord
from service.engine_loader import EngineLoader, EngineNotReady, EngineStatus
from service.errors import ApiError, BadRequest, NotFound, Unavailable
from service.metrics import Metrics
from service.model_config import ModelConfig, for_variant
from service.settings import Settings
from service.variant_build import LoadedInstances, ServedVariant, VariantBuilder

log = logging.getLogger(__name__)


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
    engine: EngineStatus | None = None  # an engine-built variant: its engine's state when it failed
    waiting: bool = False  # not a failure: the engine is being built (no fallback configured)


@dataclass(frozen=True)
class KnownVersion:
    """What the catalogue says about one version: enough to tell "loading" (503) from "unknown" (404)."""

    loaded: bool
    variants: frozenset[str]
    default_variant: str | None


class LoadedVariants:
    def __init__(self, settings: Settings, store: ModelStore, metrics: Metrics) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.engines = EngineLoader(settings, store)
        self.builder = VariantBuilder(settings, metrics)
        self._versions: dict[tuple[str, int], ServedVersion] = {}
        #: model -> its highest loaded version, kept by _index() so resolve() does no scan per request
        self._latest: dict[str, int] = {}
        self._failures: dict[tuple[str, int, str], LoadFailure] = {}
        self._lock = asyncio.Lock()
        self._revision = -1
        self.synced_once = False
        #: the catalogue's versions and variant names at ``_known_revision`` (recorded before loading them)
        self._known: dict[tuple[str, int], KnownVersion] = {}
        self._known_latest: dict[str, int] = {}
        self._known_revision = -1
        self._check_task: asyncio.Future[None] | None = None
        self._checks_started = 0
        self._checks_done = 0
        #: models with an upload between its catalogue commit and its install: sync leaves their new versions
        self._installing: dict[str, int] = {}
        #: set when a request found the catalogue ahead of this process: the sync loop runs now
        self.wake = asyncio.Event()

    # -- lookups (event loop) -----------------------------------------------------------------------

    async def resolve(self, name: str, version: str | None = None) -> ServedVariant:
        """``name`` is a model name, or ``model:variant``; ``version`` a number, or None for the latest.

        A loaded variant is two dict lookups. A miss is classified: known to the catalogue and desired
        (still loading) is 503 with Retry-After; failed to load is 503 with the reason; unknown is 404.
        When this process's view of the catalogue cannot tell, one catalogue check runs, shared by every
        request that misses at the same time (``_check_catalogue``).
        """
        model, _, variant = name.partition(":")
        number = _version_number(version)
        served = self._lookup(model, number, variant)
        if served is not None:
            return served
        unavailable = self._unavailable(model, number, variant)
        if unavailable is None:
            try:
                await self._check_catalogue()
            except Exception as e:
                log.warning("catalogue check for %r failed: %s", name, e)
                raise Unavailable(f"cannot check the catalogue for {name!r} now", self._retry_after()) from None
            served = self._lookup(model, number, variant)
            if served is not None:
                return served
            unavailable = self._unavailable(model, number, variant)
        if unavailable is not None:
            raise unavailable
        raise self._not_found(model, number, variant)

    def _lookup(self, model: str, number: int | None, variant: str) -> ServedVariant | None:
        if number is None:
            number = self._latest.get(model)
            if number is None:
                return None
        sv = self._versions.get((model, number))
        if sv is None:
            return None
        return sv.variants.get(variant or sv.default_variant)

    def _candidates(self, model: str, number: int | None) -> list[int]:
        """The versions a request may mean: the one it names, else the latest known and the latest loaded."""
        if number is not None:
            return [number]
        return sorted({n for n in (self._known_latest.get(model), self._latest.get(model)) if n is not None})[::-1]

    def _unavailable(self, model: str, number: int | None, variant: str) -> ApiError | None:
        """503 for a variant the catalogue wants served that is loading or failed to load; None otherwise."""
        for n in self._candidates(model, number):
            known = self._known.get((model, n))
            served = self._versions.get((model, n))
            key = variant or (served.default_variant if served else None) or (known.default_variant if known else None)
            if not key:
                continue
            failure = self._failures.get((model, n, key))
            if failure and failure.waiting:
                return Unavailable(
                    f"variant {key!r} of {model} version {n} is {failure.reason}; it serves once the engine is built",
                    self._retry_after(),
                )
            if failure:
                return Unavailable(f"variant {key!r} of {model} version {n} failed to load: {failure.reason}")
            if known is not None and known.loaded and key in known.variants:
                return Unavailable(
                    f"variant {key!r} of {model} version {n} is loading; retry, or poll "
                    f"GET /v2/models/{model}:{key}/versions/{n}/ready until it answers 200",
                    self._retry_after(),
                )
        return None

    def _not_found(self, model: str, number: int | None, variant: str) -> NotFound:
        numbers = sorted(n for (m, n) in self._known if m == model)
        if not numbers:
            return NotFound(f"model {model!r} is unknown")
        if number is not None and (model, number) not in self._known:
            return NotFound(f"model {model!r} has no version {number} (versions: {numbers})")
        n = number if number is not None else self._known_latest.get(model, max(numbers))
        known = self._known[(model, n)]
        if not known.loaded:
            return NotFound(f"model {model!r} version {n} is unloaded (POST /v2/repository/models/{model}/load)")
        return NotFound(
            f"model {model!r} version {n} has no variant {variant!r} "
            f"(variants: {', '.join(sorted(known.variants)) or 'none'})"
        )

    def _retry_after(self) -> float:
        return max(1.0, self.settings.sync_interval_s)

    async def _check_catalogue(self) -> None:
        """Bring the known names up to the catalogue's revision.

        Every caller waits for a check that started after it asked: one already running may have read the
        catalogue before the change the caller is asking about (a job that just succeeded). Callers that miss
        at the same time share a check, so a burst of misses costs one catalogue query at a time.
        """
        target = self._checks_started + 1
        while self._checks_done < target:
            if self._check_task is None:
                self._checks_started += 1
                self._check_task = asyncio.ensure_future(self._run_check())
            await asyncio.shield(self._check_task)

    async def _run_check(self) -> None:
        try:
            revision = await asyncio.to_thread(self.store.catalog.revision)
            if revision != self._known_revision:
                models = await asyncio.to_thread(self.store.catalog.list_models)
                self._learn(models, revision)
                self.wake.set()  # this process is behind the catalogue: sync now, not at the next tick
        finally:
            self._checks_done += 1
            self._check_task = None

    def _learn(self, models: list[ModelRecord], revision: int) -> None:
        if revision < self._known_revision:
            return  # an older read finished last: keep the newer one
        self._known = {
            (m.name, v.number): KnownVersion(v.loaded, frozenset(x.name for x in v.variants), v.default_variant)
            for m in models
            for v in m.versions
        }
        latest: dict[str, int] = {}
        for (model, number), kv in self._known.items():
            if kv.loaded and number > latest.get(model, 0):
                latest[model] = number
        self._known_latest = latest
        self._known_revision = revision

    @property
    def revision(self) -> int:
        """The catalogue revision this process last synced to."""
        return self._revision

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

    def load_failure(self, model: str, number: int, variant: str) -> LoadFailure | None:
        return self._failures.get((model, number, variant))

    @contextlib.asynccontextmanager
    async def installing(self, model: str) -> AsyncIterator[None]:
        """Held by an upload from before its catalogue commit until its install: ``sync`` leaves the model's
        new versions to the upload instead of loading them a second time."""
        self._installing[model] = self._installing.get(model, 0) + 1
        try:
            yield
        finally:
            self._installing[model] -= 1
            if not self._installing[model]:
                del self._installing[model]

    async def install(self, record: VersionRecord, loaded: dict[str, LoadedInstances]) -> None:
        """Serve a version whose variants the caller loaded (an upload), without loading them again.

        A variant that this process already serves with the same artifact (a sync got there first) is kept,
        and the caller's copy is unloaded: replacing it would drop the live variant's metric series.
        """
        async with self._lock:
            config = ModelConfig.model_validate(record.config or {})
            current = self._versions.get((record.model, record.number))
            variants = dict(current.variants) if current else {}
            for v in record.variants:
                if v.name not in loaded or not loaded[v.name].instances:
                    continue  # not loaded by the upload (an engine-built GPU backend): the sync loads it
                have = variants.get(v.name)
                if have is not None and have.record.runnable_sha256 == v.runnable_sha256:
                    loaded[v.name].unload()
                    continue
                variants[v.name] = self.builder.serve(record, v, loaded[v.name], for_variant(config, v.details))
            self._put(record, variants)

    def _put(self, record: VersionRecord, variants: dict[str, ServedVariant]) -> None:
        key = (record.model, record.number)
        old = self._versions.get(key)
        default = record.default_variant or next(iter(variants), "")
        self._versions[key] = ServedVersion(record.model, record.number, default, variants)
        self._index()
        if (
            old is None
            or old.variants.keys() != variants.keys()
            or any(old.variants[k] is not sv for k, sv in variants.items())
        ):
            settle_heap()  # a variant was loaded or replaced
        if old:
            for name, sv in old.variants.items():
                if variants.get(name) is not sv:
                    self._retire(sv)

    def _retire(self, sv: ServedVariant) -> None:
        # Series are keyed by labels (model, version, variant, backend): a replacement with the same labels
        # shares them, so they are dropped only when no live variant uses them.
        live = {x.metrics.labels for ver in self._versions.values() for x in ver.variants.values()}
        if sv.metrics.labels not in live:
            sv.metrics.ready.set(0)
            self.metrics.forget(sv.metrics)
        # Stop in a thread: joining workers that are finishing a batch must not block the loop.
        asyncio.get_running_loop().run_in_executor(None, sv.scheduler.stop)

    def _load_variant_blocking(
        self, variant: VariantRecord, config: ModelConfig, record: VersionRecord
    ) -> LoadedInstances:
        data = self.store.blobs.get_bytes(variant.runnable_sha256)
        samples = None
        calibration = record.calibration_sha256
        if calibration is not None:
            try:
                samples = self.store.blobs.local_path(calibration)
            except Exception as e:  # warm-up then uses made-up inputs; the variant still loads
                log.warning("calibration blob %s unreadable for warm-up: %s", calibration, e)
        engine_builder = self.engines.builder_for(config)
        if engine_builder is None:
            return self.builder.build_instances(data, config, samples)
        opts = self.builder.backend_options(config)
        inputs = _inputs_of(variant, record, data)
        engine = self.engines.request(
            engine_builder, variant.runnable_sha256, inputs, opts, record.model, record.number
        )
        loaded = self.engines.load(
            engine, config, lambda c, d: self.builder.build_instances(data, c, samples, engine_dir=d)
        )
        loaded.engine = engine
        return loaded

    async def _engine_swap_due(
        self, sv: ServedVariant, config: ModelConfig, record: VersionRecord, states: dict[str, EngineRecord]
    ) -> bool:
        """True when a served variant should be loaded again to serve its engine, which is ready now."""
        engine_builder = self.engines.builder_for(config)
        engine = sv.engine
        if engine_builder is None or (engine is not None and engine.used):
            return False
        if engine is None:  # served without asking for its engine (an upload installs the plain model first)
            opts = self.builder.backend_options(config)
            args = (engine_builder, sv.record.runnable_sha256, sv.inputs, opts, record.model, record.number)
            try:
                sv.engine = engine = await asyncio.to_thread(self.engines.request, *args)
            except Exception as e:  # no engine here (a database hiccup): it keeps serving, and the next sync asks
                log.warning("could not ask for the engine of %s:%s/%s: %s", sv.model, sv.variant, sv.version, e)
                return False
            engine.fallback = "plain model"
            sv.metrics.engine_fallback.set(1)
            return engine.state == "ready"
        rec = states.get(engine.digest)
        if rec is None or rec.state == engine.state:
            return False
        engine.update(rec)
        return rec.state == "ready"

    def _pending_engines(self) -> list[str]:
        """Digests whose state changes matter to this process: engines it serves without, or waits for."""
        out = [
            sv.engine.digest
            for ver in self._versions.values()
            for sv in ver.variants.values()
            if sv.engine is not None and not sv.engine.used
        ]
        return out + [f.engine.digest for f in self._failures.values() if f.engine is not None]

    async def sync(self, force: bool = False) -> None:
        """Make the loaded set match the catalogue's desired state."""
        async with self._lock:
            revision = await asyncio.to_thread(self.store.catalog.revision)
            if revision == self._revision and not force:
                return
            models = await asyncio.to_thread(self.store.catalog.list_models)
            self._learn(models, revision)  # before loading: what is about to load answers 503, not 404
            desired = {(m.name, v.number): v for m in models for v in m.versions if v.loaded}
            pending = self._pending_engines()
            states = await asyncio.to_thread(self.engines.states, pending) if pending else {}
            removed = [k for k in self._versions if k not in desired]
            for key in removed:
                for sv in self._versions.pop(key).variants.values():
                    self._retire(sv)
                self._index()
            if removed or not self.synced_once:  # unpacked engines of deleted variants go with them
                await asyncio.to_thread(self.engines.prune_local)
            deferred = False
            for key, record in desired.items():
                if record.model in self._installing and key not in self._versions:
                    deferred = True  # its upload installs it; if that fails, the next sync loads it
                    continue
                await self._sync_version(record, states)
            for k in [k for k in self._failures if (k[0], k[1]) not in desired]:
                f = self._failures.pop(k)
                self.metrics.forget_failed(k[0], k[1], k[2], f.backend)
            if not deferred:
                self._revision = revision
            self.synced_once = True

    async def _sync_version(self, record: VersionRecord, states: dict[str, EngineRecord]) -> None:
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
            vconfig = for_variant(config, v.details)  # an optimize job's tuned serving config, under the user's
            sv = have.get(v.name)
            if sv is not None and sv.record.runnable_sha256 == v.runnable_sha256:
                if not await self._engine_swap_due(sv, vconfig, record, states):
                    variants[v.name] = sv
                    continue
                # its engine is ready: load the variant with it below; sv serves until the swap
            else:
                sv = None
            fkey = (record.model, record.number, v.name)
            failed = self._failures.get(fkey)
            if failed and failed.sha256 == v.runnable_sha256:
                rec = states.get(failed.engine.digest) if failed.engine is not None else None
                if rec is None or failed.engine is None or rec.state == failed.engine.state:
                    continue  # it failed before and nothing it depends on has changed: don't retry on every sync
                if failed.waiting and rec.state in ("queued", "building"):
                    failed.engine.update(rec)  # still waiting: no reason to read the model again
                    failed.reason = str(EngineNotReady(failed.engine))
                    continue
            try:
                loaded = await asyncio.to_thread(self._load_variant_blocking, v, vconfig, record)
            except Exception as e:  # a broken artifact must not stop the others from loading
                if sv is not None:  # a swap that failed: the variant keeps serving as it did
                    log.error("could not swap in the engine of %s:%s/%s: %s", record.model, v.name, record.number, e)
                    variants[v.name] = sv
                    continue
                engine = e.engine if isinstance(e, EngineNotReady) else None
                waiting = isinstance(e, EngineNotReady) and e.waiting
                (log.info if waiting else log.error)("%s:%s version %s: %s", record.model, v.name, record.number, e)
                self._failures[fkey] = LoadFailure(v.runnable_sha256, str(e)[:500], config.backend, engine, waiting)
                self.metrics.mark_failed(record.model, record.number, v.name, config.backend, waiting)
                continue
            if fkey in self._failures:
                self.metrics.forget_failed(record.model, record.number, v.name, self._failures.pop(fkey).backend)
            variants[v.name] = self.builder.serve(record, v, loaded, vconfig)
        if variants or current:
            self._put(record, variants)

    async def close(self) -> None:
        async with self._lock:
            scheds = [sv.scheduler for ver in self._versions.values() for sv in ver.variants.values()]
            self._versions.clear()
            self._latest.clear()
        for s in scheds:
            await asyncio.to_thread(s.stop)


def settle_heap() -> None:
    """Collect, then move every object alive now out of the cyclic collector's reach (``gc.freeze``).

    The server's long-lived heap (imported modules, FastAPI, pydantic, SQLAlchemy, ONNX, the loaded variants:
    ~150k objects) is otherwise traversed by every full collection, which the request path's allocations
    trigger every few seconds under load: each one stopped the event loop and the instance threads for 100-200
    ms on one core, and was the p99 at concurrency 32 (docs/benchmarks/tail.md). Frozen objects are still freed
    by reference counting; only cyclic garbage among them would stay, and the collect before the freeze leaves
    none. Called at start and whenever a version's served variants change (``_put``); after the first call the
    collect traverses only what is new."""
    gc.collect()
    gc.freeze()


def _version_number(version: str | None) -> int | None:
    if version is None:
        return None
    try:
        return int(version)
    except ValueError:
        raise BadRequest(f"version must be an integer, not {version!r}") from None


def _inputs_of(variant: VariantRecord, record: VersionRecord, data: bytes) -> list[TensorSpec]:
    """A variant's inputs as the upload recorded them (compression keeps the original's interface), so that the
    engine key costs no second parse of a large model; parsed from ``data`` when nothing was recorded."""
    original = record.variant("original")
    for details in (variant.details, original.details if original is not None else {}):
        recorded = details.get("inputs")
        if isinstance(recorded, list) and recorded:
            return [TensorSpec.from_dict(t) for t in recorded]
    return model_interface(parse_model(data))[0]
