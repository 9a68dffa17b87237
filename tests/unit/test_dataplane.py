"""The data plane in-process: resolution, accounting and error classification over a real loaded variant.

The variant is loaded the way a server loads it (a SQLite catalogue and a blob directory in tmp_path, the
loaded-variant index syncing from them, a real ONNX Runtime session); no server, no socket.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from model_store import ModelStore, NewVariant
from service.dataplane import DataPlane
from service.errors import ApiError, BadRequest, InternalError, NotFound, Unavailable
from service.loaded import LoadedVariants
from service.metrics import Metrics
from service.scheduler import QueueFull, QueueTimeout
from service.settings import Settings
from service.triton_views import describe, model_metadata, triton_config
from service.variant_build import ServedVariant
from tests.onnx_models import mlp, mlp_reference


class Served:
    def __init__(self, tmp: Path) -> None:
        self.settings = Settings(data_dir=tmp, intra_op_threads=1, job_workers=0)
        self.store: ModelStore = self.settings.open_store()
        self.metrics = Metrics()
        self.loaded = LoadedVariants(self.settings, self.store, self.metrics)
        self.plane = DataPlane(self.loaded)
        self.loop = asyncio.new_event_loop()

    def add(self, name: str, model: bytes) -> None:
        sha = self.store.blobs.put_bytes(model)
        variant = NewVariant("original", "original", sha, len(model), details={})
        self.store.catalog.create_version(name, [variant], {}, "original", None)
        self.loop.run_until_complete(self.loaded.sync(force=True))

    def resolve(self, name: str, version: str | None) -> ServedVariant:
        return self.loop.run_until_complete(self.plane.resolve(name, version))

    def sample(self, metric: str, sv: ServedVariant, **labels: str) -> float:
        base = dict(zip(("model", "version", "variant", "backend"), sv.metrics.labels, strict=True))
        base["protocol"] = "rest"  # the request series carry the front end's protocol
        value = self.metrics.registry.get_sample_value(metric, {**base, **labels})
        return value or 0.0

    def close(self) -> None:
        self.loop.run_until_complete(self.loaded.close())
        self.loop.close()
        self.store.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path)
    s.add("mlp", mlp())
    yield s
    s.close()


def _infer(s: Served, sv: ServedVariant, x: np.ndarray) -> dict[str, np.ndarray]:
    """One request through the plane as a front end drives it (begin, submit, succeed / fail)."""

    async def go() -> dict[str, np.ndarray]:
        t0 = s.plane.begin(sv, "rest")
        try:
            out = await s.plane.submit(sv, {"x": x}, None, x.shape[0], None)
        except BaseException as e:
            raise s.plane.fail(sv, "rest", t0, e) from None
        s.plane.succeed(sv, "rest", t0)
        return out

    return s.loop.run_until_complete(go())


def test_resolve_finds_the_default_a_named_variant_and_a_version(served: Served) -> None:
    sv = served.resolve("mlp", None)
    assert (sv.model, sv.version, sv.variant) == ("mlp", 1, "original")
    assert served.resolve("mlp:original", "1") is sv


@pytest.mark.parametrize(
    ("name", "version", "error", "message"),
    [
        ("nope", None, NotFound, "'nope'"),
        ("mlp", "7", NotFound, "version 7"),
        ("mlp:int8", None, NotFound, "no variant 'int8'"),
        ("mlp", "one", BadRequest, "integer"),
    ],
)
def test_resolve_errors(served: Served, name: str, version: str | None, error: type[ApiError], message: str) -> None:
    with pytest.raises(error) as e:
        served.resolve(name, version)
    assert message in e.value.message


def test_a_variant_that_failed_to_load_is_503_not_404(served: Served) -> None:
    served.add("broken", b"these bytes are not an ONNX model")
    with pytest.raises(Unavailable) as e:
        served.resolve("broken", None)
    assert e.value.status == 503 and "failed to load" in e.value.message


def test_a_successful_request_is_counted_once(served: Served) -> None:
    sv = served.resolve("mlp", None)
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    out = _infer(served, sv, x)
    np.testing.assert_allclose(out["probs"], mlp_reference(x), rtol=1e-5)
    assert served.sample("slimserve_requests_total", sv, outcome="success") == 1
    assert served.sample("slimserve_request_duration_seconds_count", sv) == 1
    assert served.sample("slimserve_inflight_requests", sv) == 0
    stats = sv.stats.to_dict()
    assert stats["inference_stats"]["success"]["count"] == 1 and stats["inference_stats"]["fail"]["count"] == 0


@pytest.mark.parametrize(
    ("raised", "status", "outcome"),
    [
        (BadRequest("input 'x' has shape [1, 5]"), 400, "client_error"),
        (NotFound("no output"), 404, "client_error"),
        (QueueFull("the queue is full", retry_after=1), 503, "rejected"),
        (Unavailable("the model is being unloaded", retry_after=1), 503, "rejected"),
        (QueueTimeout("the request timed out in the queue", retry_after=1), 503, "timeout"),
        (InternalError("inference failed: CUDA error"), 500, "server_error"),
        (ValueError("an encoder bug"), 500, "server_error"),
    ],
    ids=["bad-request", "not-found", "queue-full", "unloading", "timeout", "internal", "unexpected"],
)
def test_failures_are_classified_and_counted_once(
    served: Served, caplog: pytest.LogCaptureFixture, raised: Exception, status: int, outcome: str
) -> None:
    sv = served.resolve("mlp", None)
    t0 = served.plane.begin(sv, "rest")
    with caplog.at_level(logging.INFO, logger="slimserve.inference"):
        err = served.plane.fail(sv, "rest", t0, raised)
    assert isinstance(err, ApiError) and err.status == status
    outcomes = ("success", "client_error", "server_error", "rejected", "timeout")
    counts = {o: served.sample("slimserve_requests_total", sv, outcome=o) for o in outcomes}
    assert counts == {o: (1.0 if o == outcome else 0.0) for o in outcomes}
    assert served.sample("slimserve_inflight_requests", sv) == 0
    assert served.sample("slimserve_request_duration_seconds_count", sv) == 1
    assert sv.stats.to_dict()["inference_stats"]["fail"]["count"] == 1
    server_lines = [r for r in caplog.records if r.name == "slimserve.inference"]
    if outcome == "server_error":  # one line naming the variant, no traceback
        assert len(server_lines) == 1 and "mlp:original version 1" in server_lines[0].getMessage()
        assert server_lines[0].exc_info is None
    else:
        assert server_lines == []


def test_an_unexpected_exception_becomes_a_one_line_500(served: Served) -> None:
    sv = served.resolve("mlp", None)
    err = served.plane.fail(sv, "rest", served.plane.begin(sv, "rest"), KeyError("probs"))
    assert isinstance(err, InternalError) and err.message == "internal error: KeyError: 'probs'"


def test_cancellation_passes_through_uncounted(served: Served) -> None:
    sv = served.resolve("mlp", None)
    cancel = asyncio.CancelledError()
    assert served.plane.fail(sv, "rest", served.plane.begin(sv, "rest"), cancel) is cancel
    assert served.sample("slimserve_inflight_requests", sv) == 0
    assert served.sample("slimserve_request_duration_seconds_count", sv) == 0


def test_an_abandoned_request_releases_inflight_without_an_outcome(served: Served) -> None:
    sv = served.resolve("mlp", None)
    served.plane.begin(sv, "rest")
    assert served.sample("slimserve_inflight_requests", sv) == 1
    served.plane.abandon(sv, "rest")
    assert served.sample("slimserve_inflight_requests", sv) == 0
    assert sum(served.sample("slimserve_requests_total", sv, outcome=o) for o in ("success", "client_error")) == 0


def test_the_runtime_refusing_input_through_the_plane_is_a_client_error(served: Served) -> None:
    sv = served.resolve("mlp", None)
    with pytest.raises(BadRequest):
        _infer(served, sv, np.ones((1, 4), np.float64))  # ONNX Runtime refuses FP64 for the FP32 input
    assert served.sample("slimserve_requests_total", sv, outcome="client_error") == 1
    assert served.sample("slimserve_requests_total", sv, outcome="server_error") == 0


def test_views_of_a_real_loaded_cpu_variant(served: Served) -> None:
    sv = served.resolve("mlp", None)
    d = describe(sv)
    assert (d.backend, d.precision, d.device_id, d.instances) == ("onnxruntime-cpu", "fp32", None, 1)
    cfg = triton_config(d, "mlp")
    assert cfg["platform"] == "onnxruntime_onnx" and cfg["instance_group"][0]["kind"] == "KIND_CPU"
    assert [t["name"] for t in cfg["output"]] == ["probs", "logits"] and cfg["input"][0]["dims"] == [4]
    assert model_metadata(d, "mlp", [1])["platform"] == "onnxruntime_onnx"
