"""Everything a request handler needs, built once per app from its settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from model_store import ModelStore
from service.dataplane import DataPlane
from service.loaded import LoadedVariants
from service.metrics import Metrics
from service.promotion import Decider
from service.settings import Settings
from service.shadow import ShadowMirror, TrafficMetrics
from service.tensors import TensorLimits
from service.traffic import TrafficRouter


@dataclass
class AppContext:
    settings: Settings
    store: ModelStore
    metrics: Metrics
    loaded: LoadedVariants
    plane: DataPlane
    limits: TensorLimits
    traffic: TrafficRouter
    decider: Decider
    shutting_down: bool = False
    background: set[object] = field(default_factory=set)

    @property
    def ready(self) -> bool:
        """Serving: the first catalogue sync is done and no shutdown has begun (REST and gRPC readiness)."""
        return self.loaded.synced_once and not self.shutting_down

    @classmethod
    def build(cls, settings: Settings) -> AppContext:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = settings.open_store()
        metrics = Metrics()
        loaded = LoadedVariants(settings, store, metrics)
        traffic_metrics = TrafficMetrics(metrics.registry)
        mirror = ShadowMirror(loaded, traffic_metrics, settings.shadow_queue_size)
        traffic = TrafficRouter(loaded, mirror)
        decider = Decider(store.traffic, loaded, traffic, traffic_metrics, settings.traffic_interval_s)
        return cls(settings, store, metrics, loaded, DataPlane(loaded), settings.tensor_limits, traffic, decider)
