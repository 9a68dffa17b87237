"""Building one served variant: its backend instances, loaded and warmed up (``LoadedInstances``), and the
scheduler, metrics and Triton statistics around them (``ServedVariant``). The loaded-variant index
(service/loaded.py) decides what to load and when; this module knows how.

The server's settings are applied last to every variant's backend options, so that nothing in a model's config
overrides them (``model_config.SERVER_OWNED``). A warm-up is refused only when it runs past its deadline or out of
memory, or, at upload (``strict``), when it fails on the user's own samples; otherwise the variant serves and its
first request warms it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backends import Backend, BackendError, BackendOptions, TensorSpec, WarmupTimeout, is_batchable, load_backend
from backends.gpu_options import DEFAULT_WORKSPACE_BYTES
from model_store import VariantRecord, VersionRecord
from service.engine_loader import EngineStatus
from service.metrics import Metrics, VariantMetrics
from service.model_config import ModelConfig
from service.scheduler import Scheduler, SchedulerConfig, Stats
from service.settings import Settings
from service.warmup import WarmupConfigError, WarmupReport, first_calibration_sample, plan_warmup

if TYPE_CHECKING:
    from service.traffic import Tap

log = logging.getLogger(__name__)

#: ONNX Runtime's and the allocators' words for an allocation that could not be met
_OUT_OF_MEMORY = ("failed to allocate", "bad_alloc", "out of memory", "memoryerror")


@dataclass
class ServedVariant:
    model: str
    version: int
    variant: str
    backend: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_batch_size: int
    instances: int
    scheduler: Scheduler
    metrics: VariantMetrics
    stats: Stats
    record: VariantRecord
    config: ModelConfig
    warmup: WarmupReport
    backend_info: dict[str, Any] = field(default_factory=dict)
    engine: EngineStatus | None = None  # its engine's state here, for variants whose backend has a builder
    #: set by ``service.traffic.TrafficRouter`` when the version has a traffic policy (split, shadow, live counters)
    tap: Tap | None = None
    # derived from inputs and outputs once, at load: the codecs read them on every request
    input_index: dict[str, TensorSpec] = field(init=False)
    output_names: frozenset[str] = field(init=False)
    output_order: tuple[str, ...] = field(init=False)  # the model's outputs in order: what a request naming none gets

    def __post_init__(self) -> None:
        self.input_index = {t.name: t for t in self.inputs}
        self.output_names = frozenset(t.name for t in self.outputs)
        self.output_order = tuple(t.name for t in self.outputs)

    @property
    def warmed(self) -> bool:
        """Warmed at load, or since by its first request (a variant whose made-up warm-up failed)."""
        return self.warmup.warmed or self.stats.execution_count > 0


@dataclass
class LoadedInstances:
    """The backend instances of one variant, loaded and warmed up, not yet serving."""

    instances: list[Backend]
    seconds: float
    warmup: WarmupReport
    engine: EngineStatus | None = None

    def unload(self) -> None:
        for b in self.instances:
            b.unload()


class VariantBuilder:
    """Builds what serves one variant, from the server's settings: its backend instances, loaded and warmed up
    (``build_instances``, blocking), then the scheduler, metrics and statistics around them (``serve``)."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics

    def backend_options(self, config: ModelConfig) -> BackendOptions:
        """The options a variant's backends get: the model's typed tuning, then the server's own values, last,
        so that nothing in a model's config overrides them (``model_config.SERVER_OWNED``)."""
        s = self.settings
        instances = config.instances or s.default_instances
        tuning = config.backend_options.model_dump(exclude_none=True)
        workspace = tuning.pop("workspace_bytes", DEFAULT_WORKSPACE_BYTES)
        server = {
            "max_batch_size": config.max_batch_size or s.default_max_batch_size,
            "engine_cache_dir": str(s.data_dir.resolve() / "engines"),
            "warmup_timeout_s": s.warmup_timeout_s,
            "device_id": 0,
            "workspace_bytes": min(workspace, s.max_workspace_bytes),
        }
        return BackendOptions(
            intra_op_threads=config.intra_op_threads or s.threads_per_instance(instances),
            allow_spinning=config.allow_spinning,
            precision=config.precision,
            extra={**tuning, **server},
        )

    def build_instances(
        self,
        model_bytes: bytes,
        config: ModelConfig,
        calibration: bytes | Path | None = None,
        *,
        strict: bool = False,
        engine_dir: Path | None = None,
    ) -> LoadedInstances:
        """Create and warm up the backend instances for one variant (blocking: call off the loop).

        ``calibration`` is the version's calibration .npz (its first sample is a warm-up sample). ``strict``
        (uploads): a warm-up that fails on the user's own samples refuses the model; otherwise only a
        warm-up past its deadline or out of memory does (``_warm``). ``engine_dir``: the variant's prebuilt
        engine, unpacked (``service.engine_loader``).
        """
        t0 = time.perf_counter()
        opts = self.backend_options(config)
        if engine_dir is not None:
            opts.extra["engine_dir"] = str(engine_dir)
        out: list[Backend] = []
        try:
            for _ in range(config.instances or self.settings.default_instances):
                out.append(load_backend(config.backend, model_bytes, opts))
            report = self._warm(out, config, calibration, strict)
        except BaseException:
            for b in out:
                b.unload()
            raise
        return LoadedInstances(out, time.perf_counter() - t0, report)

    def _warm(
        self, instances: list[Backend], config: ModelConfig, calibration: bytes | Path | None, strict: bool
    ) -> WarmupReport:
        inputs = instances[0].inputs
        sample = _calibration_sample(calibration, inputs) if calibration is not None else None
        try:
            plan = plan_warmup(inputs, config.warmup, sample)
        except WarmupConfigError:
            if strict:
                raise
            plan = plan_warmup(inputs, type(config.warmup)(), sample)  # checked at upload; a variant may differ
        try:
            for b in instances:
                b.warmup(plan.feeds)
        except WarmupTimeout:
            raise
        except BackendError as e:
            if any(w in str(e).lower() for w in _OUT_OF_MEMORY):
                raise
            if strict and plan.all_samples:
                raise BackendError(f"it fails on its warm-up samples ({plan.describe()}): {e}") from None
            reason = f"warm-up on {plan.describe()} failed ({e}); the first request warms it"
            log.info("%s", reason)
            return WarmupReport(False, plan.describe(), reason)
        return WarmupReport(True, plan.describe())

    def serve(
        self,
        record: VersionRecord,
        variant: VariantRecord,
        loaded: LoadedInstances,
        config: ModelConfig,
    ) -> ServedVariant:
        instances = loaded.instances
        b0 = instances[0]
        batchable = is_batchable(b0.inputs, b0.outputs)
        mbs = config.max_batch_size
        if mbs is None:
            mbs = self.settings.default_max_batch_size if batchable else 0
        elif mbs > 0 and not batchable:
            mbs = 0  # the model has no dynamic first dimension: nothing to batch along
        bcfg = config.batching
        vm = self.metrics.bind(record.model, record.number, variant.name, b0.name)
        vm.load.observe(loaded.seconds)
        vm.size.set(variant.size_bytes)
        vm.engine_fallback.set(1 if loaded.engine is not None and not loaded.engine.used else 0)
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
                inline_max_ns=self.settings.inline_max_us * 1000,
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
            max_batch_size=mbs,
            instances=len(instances),
            scheduler=sched,
            metrics=vm,
            stats=stats,
            record=variant,
            config=config,
            warmup=loaded.warmup,
            backend_info=b0.describe(),
            engine=loaded.engine,
        )


def _calibration_sample(source: bytes | Path, inputs: list[TensorSpec]) -> dict[str, Any] | None:
    try:
        return first_calibration_sample(source, inputs)
    except Exception as e:  # checked at upload; an unreadable one only costs the warm-up its real samples
        log.warning("calibration data unreadable for warm-up: %s", e)
        return None
