"""The dynamic-batching scheduler in-process, on a real ONNX Runtime backend built with onnx.helper.

Batches only form from requests that queue while every instance is busy, so the tests that need a batch hold
the instance on purpose: ``Gated`` wraps the real backend and blocks its next ``infer`` until the test opens
the gate. The test then queues requests, waits until the scheduler's queue holds them (an observable
condition, with a deadline), and opens the gate: which batch forms is then certain, not a matter of timing.

Runtime faults that a real ONNX Runtime cannot be made to produce on demand (an out-of-memory error, an output
without the batch dimension the config promised) come from ``Faulty``, a small test double of a backend.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import pytest

from backends import Backend, BackendError, BackendOptions, InvalidInput, TensorSpec, load_backend
from service.errors import BadRequest, InternalError, Unavailable
from service.metrics import Metrics
from service.scheduler import QueueFull, QueueTimeout, Scheduler, SchedulerConfig, Stats
from tests.onnx_models import dynamic_identity, mlp, mlp_reference, string_join

DEADLINE_S = 30.0


class Gated(Backend):
    """A real backend whose next inference waits for the test to open the gate (see the module docstring); it
    notes the rows and the thread of every inference."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self.inline_safe = inner.inline_safe
        self.inputs = inner.inputs
        self.outputs = inner.outputs
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.batches: list[int] = []
        self.threads: list[str] = []  # the thread of each inference (inline runs: the event loop's)
        self.unloaded = False

    def hold(self) -> None:
        self.entered.clear()
        self.gate.clear()

    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        self.entered.set()
        assert self.gate.wait(DEADLINE_S), "the test never opened the gate"
        self.batches.append(next(iter(inputs.values())).shape[0])
        self.threads.append(threading.current_thread().name)
        return self.inner.infer(inputs, outputs)

    def unload(self) -> None:
        self.unloaded = True
        self.inner.unload()


class Faulty(Backend):
    """Test double for runtime faults that cannot be provoked on a real runtime here."""

    name = "faulty"

    def __init__(self, fault: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]) -> None:
        self.inputs = [TensorSpec("x", "FP32", (-1, 4))]
        self.outputs = [TensorSpec("y", "FP32", (-1, 3))]
        self.fault = fault
        self.calls = 0

    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        self.calls += 1
        return self.fault(inputs)


def _mlp_backend() -> Backend:
    return load_backend("onnxruntime-cpu", mlp(), BackendOptions(intra_op_threads=1))


def _config(**overrides: Any) -> SchedulerConfig:
    base: dict[str, Any] = {
        "max_batch_size": 8,
        "batching": True,
        "max_queue_delay_ns": 0,
        "preferred_batch_sizes": (),
        "max_queue_size": 64,
        "default_timeout_ns": None,
    }
    return SchedulerConfig(**{**base, **overrides})


def _scheduler(instances: list[Backend], **overrides: Any) -> Scheduler:
    vm = Metrics().bind("m", 1, "original", instances[0].name)
    return Scheduler("m:original/1", instances, _config(**overrides), vm, Stats())


def _run(coro_fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(coro_fn(), DEADLINE_S))


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.001)


def _queued(s: Scheduler) -> int:
    return len(s._queue)


def _x(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 4)).astype(np.float32)


# -- results and batching --------------------------------------------------------------------------------


def test_a_request_runs_on_the_real_runtime_and_matches_the_reference() -> None:
    s = _scheduler([_mlp_backend()])

    async def go() -> dict[str, np.ndarray]:
        return await s.submit({"x": _x(3)}, None, 3)

    try:
        out = _run(go)
        np.testing.assert_allclose(out["probs"], mlp_reference(_x(3)), rtol=1e-5)
        assert set(out) == {"probs", "logits"}
        assert s.stats.execution_count == 1 and s.stats.inference_count == 3
    finally:
        s.stop()


def test_requests_queued_behind_a_busy_instance_form_one_batch_and_split_back() -> None:
    gated = Gated(_mlp_backend())
    s = _scheduler([gated])

    async def go() -> list[dict[str, np.ndarray]]:
        gated.hold()
        first = s.submit({"x": _x(1, 0)}, None, 1)
        await _until(gated.entered.is_set, "the first request to occupy the instance")
        rest = [s.submit({"x": _x(rows, seed)}, None, rows) for seed, rows in enumerate([2, 1, 3], start=1)]
        await _until(lambda: _queued(s) == 3, "three queued requests")
        gated.gate.set()
        return [await first, *[await f for f in rest]]

    try:
        outs = _run(go)
        assert gated.batches == [1, 6]  # the three queued requests (2 + 1 + 3 rows) ran as one batch
        for out, (seed, rows) in zip(outs, [(0, 1), (1, 2), (2, 1), (3, 3)], strict=True):
            np.testing.assert_allclose(out["probs"], mlp_reference(_x(rows, seed)), rtol=1e-5)
        assert s.stats.execution_count == 2 and s.stats.inference_count == 7
        assert sorted(s.stats.batch) == [1, 6]
    finally:
        s.stop()


def test_string_requests_batch_and_split_back() -> None:
    """BYTES (ONNX string) inputs are object arrays: they merge along the batch dimension and split back."""
    gated = Gated(load_backend("onnxruntime-cpu", string_join(), BackendOptions(intra_op_threads=1)))
    s = _scheduler([gated])

    def req(*words: str) -> dict[str, np.ndarray]:
        a = np.array([[w] for w in words], dtype=object)
        return {"a": a, "b": np.array([[w.upper()] for w in words], dtype=object)}

    async def go() -> list[dict[str, np.ndarray]]:
        gated.hold()
        first = s.submit(req("x"), None, 1)
        await _until(gated.entered.is_set, "the first request to occupy the instance")
        rest = [s.submit(req(*words), None, len(words)) for words in (["é", "b"], ["", "c", "dd"])]
        await _until(lambda: _queued(s) == 2, "two queued requests")
        gated.gate.set()
        return [await first, *[await f for f in rest]]

    try:
        outs = _run(go)
        assert gated.batches == [1, 5]
        for out, words in zip(outs, (["x"], ["é", "b"], ["", "c", "dd"]), strict=True):
            assert out["joined"].tolist() == [[w, w.upper()] for w in words]
    finally:
        s.stop()


def test_max_batch_size_caps_a_batch() -> None:
    gated = Gated(_mlp_backend())
    s = _scheduler([gated], max_batch_size=4)

    async def go() -> None:
        gated.hold()
        first = s.submit({"x": _x(1)}, None, 1)
        await _until(gated.entered.is_set, "the instance to be busy")
        rest = [s.submit({"x": _x(1)}, None, 1) for _ in range(6)]
        await _until(lambda: _queued(s) == 6, "six queued requests")
        gated.gate.set()
        await first
        for f in rest:
            await f

    try:
        _run(go)
        assert gated.batches == [1, 4, 2]
    finally:
        s.stop()


def test_different_shapes_or_requested_outputs_never_share_a_batch() -> None:
    inner = load_backend("onnxruntime-cpu", dynamic_identity(), BackendOptions(intra_op_threads=1))
    gated = Gated(inner)
    s = _scheduler([gated])

    async def go() -> list[dict[str, np.ndarray]]:
        gated.hold()
        first = s.submit({"x": np.ones((1, 3), np.float32)}, None, 1)
        await _until(gated.entered.is_set, "the instance to be busy")
        futures = [
            s.submit({"x": np.ones((1, 5), np.float32)}, None, 1),
            s.submit({"x": np.ones((2, 3), np.float32)}, None, 2),
            s.submit({"x": np.ones((1, 5), np.float32)}, None, 1),
        ]
        await _until(lambda: _queued(s) == 3, "three queued requests")
        gated.gate.set()
        return [await first, *[await f for f in futures]]

    try:
        outs = _run(go)
        # the two T=5 requests merged (2 rows), the T=3 request ran alone: never a mixed-shape batch
        assert sorted(gated.batches) == [1, 2, 2]
        assert [o["y"].shape for o in outs] == [(1, 3), (1, 5), (2, 3), (1, 5)]
        assert all(np.all(o["y"] == 2) for o in outs)
    finally:
        s.stop()


def test_a_preferred_batch_size_ends_the_wait_early() -> None:
    # The delay is far longer than the test's deadline: only the preferred size can end the wait.
    s = _scheduler([_mlp_backend()], max_queue_delay_ns=int(3600e9), preferred_batch_sizes=(4,))

    async def go() -> None:
        futures = [s.submit({"x": _x(1, i)}, None, 1) for i in range(4)]
        for f in futures:
            await f

    try:
        _run(go)
        assert s.stats.batch.keys() == {4} and s.stats.execution_count == 1
    finally:
        s.stop()


def test_without_batching_every_request_runs_alone() -> None:
    gated = Gated(_mlp_backend())
    s = _scheduler([gated], batching=False)

    async def go() -> None:
        gated.hold()
        first = s.submit({"x": _x(1)}, None, 1)
        await _until(gated.entered.is_set, "the instance to be busy")
        rest = [s.submit({"x": _x(1)}, None, 1) for _ in range(3)]
        await _until(lambda: _queued(s) == 3, "three queued requests")
        gated.gate.set()
        await first
        for f in rest:
            await f

    try:
        _run(go)
        assert gated.batches == [1, 1, 1, 1]
    finally:
        s.stop()


def test_instances_serve_in_parallel() -> None:
    a, b = Gated(_mlp_backend()), Gated(_mlp_backend())
    s = _scheduler([a, b], batching=False)

    async def go() -> None:
        a.hold()
        b.hold()
        f1 = s.submit({"x": _x(1)}, None, 1)
        f2 = s.submit({"x": _x(1)}, None, 1)
        # both instances are inside infer at once: one request each
        await _until(lambda: a.entered.is_set() and b.entered.is_set(), "both instances to be busy")
        a.gate.set()
        b.gate.set()
        await f1
        await f2

    try:
        _run(go)
        assert a.batches == [1] and b.batches == [1]
    finally:
        s.stop()


# -- load shedding and timeouts --------------------------------------------------------------------------


def test_a_full_queue_refuses_at_once() -> None:
    gated = Gated(_mlp_backend())
    s = _scheduler([gated], max_queue_size=2)

    async def go() -> None:
        gated.hold()
        first = s.submit({"x": _x(1)}, None, 1)
        await _until(gated.entered.is_set, "the instance to be busy")
        queued = [s.submit({"x": _x(1)}, None, 1) for _ in range(2)]
        with pytest.raises(QueueFull) as e:
            s.submit({"x": _x(1)}, None, 1)
        assert e.value.status == 503 and e.value.headers["Retry-After"] == "1" and "full" in e.value.message
        gated.gate.set()
        await first
        for f in queued:
            await f

    try:
        _run(go)
    finally:
        s.stop()


def test_a_request_whose_deadline_passed_in_the_queue_times_out_and_others_run() -> None:
    gated = Gated(_mlp_backend())
    s = _scheduler([gated])

    async def go() -> None:
        gated.hold()
        first = s.submit({"x": _x(1)}, None, 1)
        await _until(gated.entered.is_set, "the instance to be busy")
        expiring = s.submit({"x": _x(1)}, None, 1, timeout_ns=1_000)  # 1 us: expired by the time it runs
        patient = s.submit({"x": _x(1)}, None, 1)
        await _until(lambda: _queued(s) == 2, "two queued requests")
        await asyncio.sleep(0.002)  # past the 1 us deadline for certain (it only has to be later, not exact)
        gated.gate.set()
        await first
        with pytest.raises(QueueTimeout) as e:
            await expiring
        assert e.value.status == 503
        await patient

    try:
        _run(go)
        assert gated.batches == [1, 1]  # the expired request never reached the runtime
    finally:
        s.stop()


def test_the_default_timeout_applies_when_the_request_sets_none() -> None:
    gated = Gated(_mlp_backend())
    s = _scheduler([gated], default_timeout_ns=1_000)

    async def go() -> None:
        gated.hold()
        first = s.submit({"x": _x(1)}, None, 1, timeout_ns=int(60e9))  # its own timeout: not the default
        await _until(gated.entered.is_set, "the instance to be busy")
        late = s.submit({"x": _x(1)}, None, 1)
        await _until(lambda: _queued(s) == 1, "a queued request")
        await asyncio.sleep(0.002)
        gated.gate.set()
        await first
        with pytest.raises(QueueTimeout):
            await late

    try:
        _run(go)
    finally:
        s.stop()


# -- who is blamed ---------------------------------------------------------------------------------------


def test_the_runtime_refusing_the_callers_values_is_a_400() -> None:
    # ONNX Runtime itself refuses FP64 for an FP32 input (INVALID_ARGUMENT): the caller's fault
    s = _scheduler([_mlp_backend()])

    async def go() -> None:
        with pytest.raises(BadRequest) as e:
            await s.submit({"x": np.ones((1, 4), np.float64)}, None, 1)
        assert e.value.status == 400 and "refused the input" in e.value.message

    try:
        _run(go)
    finally:
        s.stop()


def _raise(exc: BaseException) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    def fault(_: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise exc

    return fault


@pytest.mark.parametrize(
    ("fault", "status", "message"),
    [
        (_raise(InvalidInput("index 9 is out of bounds")), 400, "refused the input: index 9"),
        (_raise(BackendError("CUDA error: out of memory")), 500, "inference failed: CUDA error: out of memory"),
        (_raise(MemoryError()), 500, "inference failed: MemoryError"),
        (_raise(RuntimeError("first line\ntraceback-ish second line")), 500, "inference failed: first line"),
    ],
    ids=["invalid-input", "backend-error", "memory-error", "unexpected"],
)
def test_runtime_failures_are_blamed_on_the_server_unless_the_input_was_refused(
    fault: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], status: int, message: str
) -> None:
    backend = Faulty(fault)
    s = _scheduler([backend])

    async def go() -> None:
        with pytest.raises((BadRequest, InternalError)) as e:
            await s.submit({"x": _x(1)}, None, 1)
        assert e.value.status == status and message in e.value.message
        assert "\n" not in e.value.message and "Traceback" not in e.value.message
        # the instance thread survived: the next request reaches the backend again
        with pytest.raises((BadRequest, InternalError)):
            await s.submit({"x": _x(1)}, None, 1)

    try:
        _run(go)
        assert backend.calls == 2
    finally:
        s.stop()


def test_outputs_without_the_promised_batch_dimension_are_a_server_error() -> None:
    backend = Faulty(lambda feeds: {"y": np.zeros(3, np.float32)})  # one row for a merged batch of two
    gated = Gated(backend)
    s = _scheduler([gated])

    async def go() -> None:
        gated.hold()
        first = s.submit({"x": _x(1)}, None, 1)
        await _until(gated.entered.is_set, "the instance to be busy")
        merged = [s.submit({"x": _x(1)}, None, 1) for _ in range(2)]
        await _until(lambda: _queued(s) == 2, "two queued requests")
        gated.gate.set()
        await first  # alone: nothing to split
        for f in merged:
            with pytest.raises(InternalError) as e:
                await f
            assert e.value.status == 500 and "one row per input row" in e.value.message

    try:
        _run(go)
    finally:
        s.stop()


# -- stop ------------------------------------------------------------------------------------------------


def test_stop_fails_queued_requests_unloads_instances_and_refuses_new_ones() -> None:
    gated = Gated(_mlp_backend())
    s = _scheduler([gated])
    stopper: list[threading.Thread] = []

    async def go() -> None:
        gated.hold()
        running = s.submit({"x": _x(1)}, None, 1)
        await _until(gated.entered.is_set, "the instance to be busy")
        queued = s.submit({"x": _x(1)}, None, 1)
        await _until(lambda: _queued(s) == 1, "a queued request")
        t = threading.Thread(target=s.stop)  # stop joins the instance threads: not on the event loop
        stopper.append(t)
        t.start()
        with pytest.raises(Unavailable) as e:
            await queued
        assert e.value.status == 503 and "unloaded" in e.value.message
        gated.gate.set()
        await running  # the batch in progress finishes
        with pytest.raises(Unavailable):
            s.submit({"x": _x(1)}, None, 1)

    _run(go)
    stopper[0].join(DEADLINE_S)
    assert not stopper[0].is_alive() and gated.unloaded
    assert not any(t.is_alive() for t in s._threads)


def test_a_scheduler_needs_an_instance() -> None:
    with pytest.raises(ValueError, match="at least one instance"):
        Scheduler("m", [], _config(), Metrics().bind("m", 1, "v", "b"), Stats())
