"""The loaded-variant index in process: a real SQLite catalogue and blob directory, real ONNX Runtime sessions,
real Prometheus registry; no server. Covers resolve, sync (add, remove, swap, failure), the 503-while-loading
rule, the upload/sync race on metrics, server-owned backend options and the warm-up rules."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import generate_latest

from backends import BackendError, WarmupTimeout
from backends.gpu_options import GpuSettings
from model_store import ModelStore, NewVariant, VersionRecord
from service.errors import BadRequest, NotFound, Unavailable
from service.loaded import LoadedVariants
from service.metrics import Metrics
from service.model_config import ModelConfig
from service.settings import Settings
from service.variant_build import LoadedInstances, ServedVariant
from tests.hardening.helpers import slow_model
from tests.onnx_models import expand_by_input, mlp, reshape_by_input, split_by_sizes


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, sync_interval_s=2.0, intra_op_threads=1)


@pytest.fixture
def lv(settings: Settings, store: ModelStore) -> LoadedVariants:
    return LoadedVariants(settings, store, Metrics())


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def add_version(store: ModelStore, name: str, model: bytes, config: dict[str, Any] | None = None) -> VersionRecord:
    sha = store.blobs.put_bytes(model)
    return store.catalog.create_version(name, [NewVariant("original", "original", sha, len(model))], config, "original")


def add_variant(store: ModelStore, name: str, number: int, variant: str, model: bytes, replace: bool = False) -> None:
    sha = store.blobs.put_bytes(model)
    store.catalog.add_variant(name, number, NewVariant(variant, "pruned", sha, len(model)), replace=replace)


async def infer(sv: ServedVariant, x: np.ndarray) -> dict[str, np.ndarray]:
    """Through the variant's scheduler, as a request would."""
    return await sv.scheduler.submit({"x": x}, None, x.shape[0])


X = np.ones((1, 4), np.float32)


# -- resolve -------------------------------------------------------------------------------------------------


def test_resolve_default_named_variant_and_version(lv: LoadedVariants, store: ModelStore) -> None:
    async def body() -> None:
        add_version(store, "m", mlp(seed=1))
        add_version(store, "m", mlp(seed=2))
        add_variant(store, "m", 2, "alt", mlp(seed=3))
        await lv.sync()
        latest = await lv.resolve("m")
        assert (latest.version, latest.variant) == (2, "original")
        assert (await lv.resolve("m:alt")).variant == "alt"
        assert (await lv.resolve("m", "1")).version == 1
        assert (await lv.resolve("m:original", "1")).version == 1
        with pytest.raises(BadRequest, match="version must be an integer"):
            await lv.resolve("m", "one")
        with pytest.raises(NotFound, match="model 'nope' is unknown"):
            await lv.resolve("nope")
        with pytest.raises(NotFound, match=r"has no variant 'int8' \(variants: alt, original\)"):
            await lv.resolve("m:int8")
        with pytest.raises(NotFound, match=r"has no version 7 \(versions: \[1, 2\]\)"):
            await lv.resolve("m", "7")
        await lv.close()

    run(body())


def test_pinned_default_variant_is_what_the_plain_name_serves(lv: LoadedVariants, store: ModelStore) -> None:
    async def body() -> None:
        add_version(store, "p", mlp())
        add_variant(store, "p", 1, "alt", mlp(seed=3))
        store.catalog.set_default_variant("p", 1, "alt", True)
        await lv.sync()
        assert (await lv.resolve("p")).variant == "alt"
        await lv.close()

    run(body())


# -- sync ----------------------------------------------------------------------------------------------------


def test_sync_adds_swaps_fails_and_removes(lv: LoadedVariants, store: ModelStore) -> None:
    async def body() -> None:
        add_version(store, "s", mlp(seed=1))
        await lv.sync()
        original = await lv.resolve("s")
        # add
        add_variant(store, "s", 1, "alt", mlp(seed=2))
        await lv.sync()
        alt = await lv.resolve("s:alt")
        assert await lv.resolve("s") is original  # untouched variants are kept, not reloaded
        # swap: same name, new artifact
        add_variant(store, "s", 1, "alt", mlp(seed=4), replace=True)
        await lv.sync()
        swapped = await lv.resolve("s:alt")
        assert swapped is not alt
        ref = mlp_probs(seed=4)
        np.testing.assert_allclose((await infer(swapped, X))["probs"], ref, rtol=1e-5)
        # the swapped-in variant keeps its metric series: the retired one had the same labels
        assert lv.metrics.variant_ready.labels(*swapped.metrics.labels) is swapped.metrics.ready
        assert _sample(lv.metrics, "slimserve_variant_ready", swapped.metrics.labels) == 1.0
        # failure: a broken artifact is reported, the others keep serving
        broken = store.blobs.put_bytes(b"not onnx at all")
        store.catalog.add_variant("s", 1, NewVariant("broken", "original", broken, 15))
        await lv.sync()
        with pytest.raises(Unavailable, match="failed to load") as e:
            await lv.resolve("s:broken")
        assert e.value.status == 503
        assert lv.failure("s", 1, "broken")
        assert await lv.resolve("s") is original
        # remove
        store.catalog.delete_version("s", 1)
        await lv.sync()
        with pytest.raises(NotFound):
            await lv.resolve("s")
        assert lv.failure("s", 1, "broken") is None
        assert _sample(lv.metrics, "slimserve_variant_ready", original.metrics.labels) is None
        await lv.close()

    run(body())


def mlp_probs(seed: int) -> np.ndarray:
    from tests.onnx_models import mlp_reference

    return mlp_reference(X, seed=seed)


def _sample(metrics: Metrics, name: str, labels: tuple[str, ...], **extra: str) -> float | None:
    """One sample as /metrics exports it (the registry's collect(), what generate_latest renders)."""
    want = {**dict(zip(("model", "version", "variant", "backend"), labels, strict=True)), **extra}
    for family in metrics.registry.collect():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in want.items()):
                return float(s.value)
    return None


def test_unloaded_version_is_not_found_with_the_reason(lv: LoadedVariants, store: ModelStore) -> None:
    async def body() -> None:
        add_version(store, "u", mlp())
        add_version(store, "u", mlp(seed=2))
        await lv.sync()
        store.catalog.set_loaded("u", 2, False)
        await lv.sync()
        assert (await lv.resolve("u")).version == 1  # the latest loaded version serves the plain name
        with pytest.raises(NotFound, match="version 2 is unloaded"):
            await lv.resolve("u", "2")
        with pytest.raises(NotFound, match=r"'u' version 1 has no variant 'x'"):  # not "version 2 is unloaded"
            await lv.resolve("u:x")
        store.catalog.set_loaded("u", None, False)
        await lv.sync()
        with pytest.raises(NotFound, match="version 2 is unloaded"):
            await lv.resolve("u")
        await lv.close()

    run(body())


# -- 503 while loading ------------------------------------------------------------------------------------------


class CountingRevision:
    """Counts catalogue revision reads (each catalogue check makes one) and can hold them on an event."""

    def __init__(self, store: ModelStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self.hold: threading.Event | None = None
        self.entered = threading.Event()
        real = store.catalog.revision

        def revision() -> int:
            self.calls += 1
            self.entered.set()
            if self.hold is not None:
                assert self.hold.wait(30)
            return real()

        monkeypatch.setattr(store.catalog, "revision", revision)


def test_a_variant_the_catalogue_knows_answers_503_until_loaded(
    lv: LoadedVariants, store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body() -> None:
        add_version(store, "w", mlp())
        await lv.sync()
        # a job's new variant, committed by another process; this one has not synced since
        add_variant(store, "w", 1, "int8", mlp(seed=5))
        with pytest.raises(Unavailable, match="is loading") as e:
            await lv.resolve("w:int8")
        assert e.value.headers["Retry-After"] == "2"
        assert lv.wake.is_set()  # the sync loop is asked to load it now
        with pytest.raises(NotFound):  # names the catalogue does not know stay 404
            await lv.resolve("w:nope")
        # while the sync loads it, requests answer 503 from memory: no catalogue query per request
        counter = CountingRevision(store, monkeypatch)
        release, loading = threading.Event(), threading.Event()
        real_load = lv._load_variant_blocking

        def slow_load(*args: Any) -> LoadedInstances:
            loading.set()
            assert release.wait(30)
            return real_load(*args)

        monkeypatch.setattr(lv, "_load_variant_blocking", slow_load)
        store.catalog.add_variant("w", 1, NewVariant("pruned", "pruned", store.blobs.put_bytes(mlp(seed=6)), 1))
        sync = asyncio.create_task(lv.sync())
        await asyncio.to_thread(loading.wait, 30)
        before = counter.calls
        for name in ("w:int8", "w:pruned"):
            for _ in range(5):
                with pytest.raises(Unavailable, match="is loading"):
                    await lv.resolve(name)
        assert counter.calls == before
        release.set()
        await sync
        assert (await lv.resolve("w:int8")).variant == "int8"
        assert (await lv.resolve("w:pruned")).variant == "pruned"
        await lv.close()

    run(body())


def test_a_new_model_answers_503_before_its_first_sync(lv: LoadedVariants, store: ModelStore) -> None:
    async def body() -> None:
        await lv.sync()
        add_version(store, "fresh", mlp())  # another replica's upload
        with pytest.raises(Unavailable, match="is loading"):
            await lv.resolve("fresh")
        with pytest.raises(Unavailable, match="is loading"):
            await lv.resolve("fresh", "1")
        await lv.sync()
        assert (await lv.resolve("fresh")).version == 1
        await lv.close()

    run(body())


def test_misses_share_one_catalogue_check_that_started_after_them(
    lv: LoadedVariants, store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body() -> None:
        await lv.sync()
        counter = CountingRevision(store, monkeypatch)
        counter.hold = threading.Event()
        # a check is in flight, held before it reads the catalogue ...
        first = asyncio.create_task(lv.resolve("late"))
        await asyncio.to_thread(counter.entered.wait, 30)
        # ... then a job commits, and 50 requests for its variant arrive
        add_version(store, "late", mlp())
        burst = [asyncio.create_task(lv.resolve("late")) for _ in range(50)]
        await asyncio.sleep(0)
        counter.hold.set()
        results = await asyncio.gather(first, *burst, return_exceptions=True)
        # the held check read the catalogue after the commit here, so every request sees the new model; the
        # burst never reuses a check that started before it asked: one more check serves all 50
        assert all(isinstance(r, Unavailable) and "is loading" in r.message for r in results), results
        assert counter.calls == 2
        await lv.close()

    run(body())


# -- the upload/sync race ------------------------------------------------------------------------------------------


def test_install_after_a_sync_loaded_the_same_version_keeps_the_live_variant(
    lv: LoadedVariants, store: ModelStore
) -> None:
    """The old race: the upload commits, the periodic sync loads the version, then the upload installs its own
    copy. The second copy replaced the first and the retired one's metrics.forget() removed the series the
    new one had bound: its requests never reached /metrics."""

    async def body() -> None:
        model = mlp()
        config = ModelConfig()
        uploaded = await asyncio.to_thread(lv.builder.build_instances, model, config)
        record = add_version(store, "race", model)  # the upload's commit
        await lv.sync()  # the periodic sync runs first and loads it
        synced = await lv.resolve("race")
        await lv.install(record, {"original": uploaded})  # then the upload installs
        served = await lv.resolve("race")
        assert served is synced  # one live variant; the upload's duplicate was unloaded
        served.metrics.by_protocol["rest"].request.observe(0.01)
        served.metrics.by_protocol["rest"].ok.inc()
        labels = ("race", "1", "original", "onnxruntime-cpu")
        assert served.metrics.labels == labels
        assert _sample(lv.metrics, "slimserve_request_duration_seconds_count", labels, protocol="rest") == 1.0
        assert _sample(lv.metrics, "slimserve_requests_total", labels, protocol="rest", outcome="success") == 1.0
        assert _sample(lv.metrics, "slimserve_variant_ready", labels) == 1.0
        assert 'model="race"' in generate_latest(lv.metrics.registry).decode()
        await lv.close()

    run(body())


def test_sync_leaves_a_version_to_the_upload_installing_it(lv: LoadedVariants, store: ModelStore) -> None:
    async def body() -> None:
        await lv.sync()
        model = mlp()
        uploaded = await asyncio.to_thread(lv.builder.build_instances, model, ModelConfig())
        async with lv.installing("inst"):
            record = add_version(store, "inst", model)
            await lv.sync()  # runs between the commit and the install
            assert not lv.is_loaded("inst", 1)  # not loaded twice
            with pytest.raises(Unavailable, match="is loading"):
                await lv.resolve("inst")
            await lv.install(record, {"original": uploaded})
        served = await lv.resolve("inst")
        await lv.sync()  # the deferred revision is synced again, and keeps the installed variant
        assert await lv.resolve("inst") is served
        assert _sample(lv.metrics, "slimserve_variant_ready", served.metrics.labels) == 1.0
        await lv.close()

    run(body())


# -- backend options: the server's values win --------------------------------------------------------------------


def test_backend_options_apply_server_values_last(lv: LoadedVariants, settings: Settings) -> None:
    config = ModelConfig.model_validate(
        {
            "max_batch_size": 16,
            "backend_options": {
                "opt_batch_size": 4,
                "sparse": True,
                "cuda_graph": False,
                "workspace_bytes": 8 << 30,  # over the server cap (checked at upload, capped at load)
                "shape_overrides": {"x": {"min": [1, 4], "opt": [4, 4], "max": [16, 4]}},
            },
        }
    )
    opts = lv.builder.backend_options(config)
    gpu = GpuSettings.from_options(opts)
    assert gpu.engine_cache_dir == settings.data_dir.resolve() / "engines"
    assert gpu.device_id == 0 and gpu.max_batch_size == 16
    assert gpu.workspace_bytes == settings.max_workspace_bytes
    assert (gpu.opt_batch_size, gpu.sparse, gpu.cuda_graph) == (4, True, False)
    assert gpu.shape_overrides == {"x": {"min": [1, 4], "opt": [4, 4], "max": [16, 4]}}
    assert opts.extra["warmup_timeout_s"] == settings.warmup_timeout_s
    loaded = lv.builder.build_instances(mlp(), ModelConfig())
    assert loaded.instances[0]._warmup_timeout_s == settings.warmup_timeout_s  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("key", "owner"),
    [
        ("warmup_timeout_s", "SLIMSERVE_WARMUP_TIMEOUT_S"),
        ("engine_cache_dir", "SLIMSERVE_DATA_DIR/engines"),
        ("max_batch_size", "top-level config field max_batch_size"),
        ("device_id", "the deployment"),
    ],
)
def test_server_owned_backend_options_are_refused(key: str, owner: str) -> None:
    with pytest.raises(ValueError, match=f"{key} is a server setting.*{owner}"):
        ModelConfig.model_validate({"backend_options": {key: 1}})


def test_workspace_over_the_server_cap_and_unknown_options_are_refused() -> None:
    cap = {"max_workspace_bytes": 1 << 30}
    with pytest.raises(ValueError, match="over the server's cap SLIMSERVE_MAX_WORKSPACE_BYTES"):
        ModelConfig.model_validate({"backend_options": {"workspace_bytes": 2 << 30}}, context=cap)
    ModelConfig.model_validate({"backend_options": {"workspace_bytes": 1 << 30}}, context=cap)
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        ModelConfig.model_validate({"backend_options": {"trt_engine_cache_path": "/etc"}})


# -- warm-up -------------------------------------------------------------------------------------------------------

SHAPE_MODELS: list[tuple[str, Callable[[], bytes], dict[str, Any], dict[str, np.ndarray]]] = [
    ("expand", expand_by_input, {"shape": {"data": [2, 3]}}, {"x": np.ones((1, 3), np.float32)}),
    ("reshape", reshape_by_input, {"shape": {"data": [1, 2, 3]}}, {"x": np.ones((1, 6), np.float32)}),
    ("split", split_by_sizes, {"split": {"data": [2, 4]}}, {"x": np.ones((1, 6), np.float32)}),
]


@pytest.mark.parametrize(("name", "build", "given", "x"), SHAPE_MODELS, ids=[m[0] for m in SHAPE_MODELS])
def test_warmup_rules_for_models_whose_inputs_are_shapes(
    lv: LoadedVariants, name: str, build: Callable[[], bytes], given: dict[str, Any], x: dict[str, np.ndarray]
) -> None:
    model = build()
    # made-up zeros fail at run time: accepted, not warmed, with the reason
    plain = lv.builder.build_instances(model, ModelConfig(), strict=True)
    assert not plain.warmup.warmed
    assert "zero for" in plain.warmup.inputs and "failed" in (plain.warmup.reason or "")
    # explicit samples for the shape input (x stays made-up): warmed
    config = ModelConfig.model_validate({"warmup": {"inputs": given}})
    warmed = lv.builder.build_instances(model, config, strict=True)
    assert warmed.warmup.warmed, warmed.warmup
    assert "config for" in warmed.warmup.inputs
    # every input given, and wrong: the user's own samples fail, the upload is refused
    bad = {k: {"data": [0] * len(v["data"])} for k, v in given.items()}
    bad.update({k: {"data": v.tolist()} for k, v in x.items()})
    with pytest.raises(BackendError, match="fails on its warm-up samples"):
        lv.builder.build_instances(model, ModelConfig.model_validate({"warmup": {"inputs": bad}}), strict=True)
    # ... but a sync load (not strict) of the same never refuses a runnable model
    assert not lv.builder.build_instances(model, ModelConfig.model_validate({"warmup": {"inputs": bad}})).warmup.warmed


def test_warmup_uses_the_first_calibration_sample(lv: LoadedVariants) -> None:
    import io

    buf = io.BytesIO()
    # samples on axis 0; `shape` has a fixed first dimension (3), so its "first sample" is all of it
    np.savez(buf, x=np.arange(18, dtype=np.float32).reshape(3, 6), shape=np.array([1, 2, 3], np.int64))
    loaded = lv.builder.build_instances(reshape_by_input(), ModelConfig(), buf.getvalue(), strict=True)
    assert loaded.warmup.warmed, loaded.warmup
    assert loaded.warmup.inputs == "calibration for ['shape', 'x']"


def test_warmup_past_its_deadline_is_always_refused(tmp_path: Path, store: ModelStore) -> None:
    fast = Settings(data_dir=tmp_path, warmup_timeout_s=0.05, intra_op_threads=1)
    lv = LoadedVariants(fast, store, Metrics())
    with pytest.raises(WarmupTimeout, match=r"did not finish within 0\.05 s"):
        lv.builder.build_instances(slow_model(tokens=4096, depth=512), ModelConfig())


def test_warmup_config_that_does_not_fit_the_model_is_refused(lv: LoadedVariants) -> None:
    from service.warmup import WarmupConfigError

    cases = [
        ({"nope": {"data": [1]}}, "the model's inputs are"),
        ({"shape": {"data": [1.5, 2.0]}}, "holds float64, the input is INT64"),
        ({"shape": {"data": [1, 2, 3]}}, r"has shape \[3\]; the input is \[2\]"),
        ({"shape": {"data": [1, 2, 3, 4], "shape": [2, 2]}}, "has shape"),
        ({"x": {"fill": "random", "shape": [1, 4]}}, r"does not fit the input's \[-1, 3\]"),
        ({"shape": {"data": [[1], [2, 3]]}}, "not a regular array"),
    ]
    for given, match in cases:
        with pytest.raises(WarmupConfigError, match=match):
            lv.builder.build_instances(
                expand_by_input(), ModelConfig.model_validate({"warmup": {"inputs": given}}), strict=True
            )
