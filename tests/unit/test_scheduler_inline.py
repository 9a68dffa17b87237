"""Inline runs: a cheap lone request runs on the event loop instead of an instance thread (service/scheduler.py).

Which thread ran an inference is observable: ``Gated`` (its gate left open) wraps a real ONNX Runtime backend and
notes the thread of every call, and an inline run's future is already resolved when ``submit`` returns. An instance
thread frees its instance before it hands the answer back, so the request after an awaited one finds it idle: no
race. Every test learns the model's cost the way the server does, from single-request executions on the instance
thread, so nothing here depends on how fast this machine is: limits are set far above (or below) what was measured.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from backends import Backend
from service.errors import BadRequest
from service.scheduler import _INLINE_MIN_SAMPLES, Scheduler
from tests.onnx_models import mlp_reference
from tests.unit.test_scheduler import Gated, _mlp_backend, _queued, _run, _scheduler, _until, _x

LOOSE_NS = 10**9  # a limit no MLP request comes near: every request past the learning phase may run inline


def _learned(backend: Backend, **overrides: Any) -> Scheduler:
    """A scheduler that has measured enough single-request executions to decide on inline runs."""
    s = _scheduler([backend], **overrides)

    async def learn() -> None:
        for seed in range(_INLINE_MIN_SAMPLES):
            await s.submit({"x": _x(1, seed)}, None, 1)

    _run(learn)
    return s


def test_a_lone_cheap_request_runs_on_the_event_loop_with_its_accounting() -> None:
    rec = Gated(_mlp_backend())
    s = _learned(rec, inline_max_ns=LOOSE_NS)
    loop_thread = threading.current_thread().name

    async def go() -> dict[str, np.ndarray]:
        fut = s.submit({"x": _x(2, 99)}, None, 2)
        assert fut.done(), "an inline run resolves the future before submit returns"
        return await fut

    try:
        learning = rec.threads[:_INLINE_MIN_SAMPLES]
        assert all(name.startswith("slimserve-") for name in learning), "the first requests use the thread"
        out = _run(go)
        np.testing.assert_allclose(out["probs"], mlp_reference(_x(2, 99)), rtol=1e-5)
        assert (rec.threads[-1], rec.batches[-1]) == (loop_thread, 2)
        st = s.stats
        assert st.execution_count == _INLINE_MIN_SAMPLES + 1 and st.inference_count == _INLINE_MIN_SAMPLES + 2
        assert st.queue.count == _INLINE_MIN_SAMPLES + 1 and sorted(st.batch) == [1, 2]
        assert s.metrics.queue_depth._value.get() == 0
        assert s.metrics.inline._value.get() == 1
        assert s._busy == [False]
    finally:
        s.stop()


def test_nothing_runs_inline_while_learning_or_with_the_limit_off() -> None:
    rec = Gated(_mlp_backend())
    s = _learned(rec, inline_max_ns=0)

    async def go() -> None:
        for seed in range(4):
            await s.submit({"x": _x(1, seed)}, None, 1)

    try:
        _run(go)
        assert len(rec.threads) == _INLINE_MIN_SAMPLES + 4
        assert all(name.startswith("slimserve-") for name in rec.threads)
    finally:
        s.stop()


def test_a_request_predicted_over_the_limit_goes_to_the_instance_thread() -> None:
    """The prediction scales with the request's elements: a large request is never predicted cheap."""
    rec = Gated(_mlp_backend())
    s = _learned(rec, inline_max_ns=LOOSE_NS)
    # rows whose predicted cost is twice the limit, from the cost the scheduler measured
    rows = int(2 * LOOSE_NS / (s._ns_per_element * 4)) + 1
    small_rows = 1

    async def go() -> None:
        await s.submit({"x": _x(small_rows)}, None, small_rows)
        big = np.zeros((rows, 4), np.float32)
        await s.submit({"x": big}, None, rows)

    try:
        if rows > 5_000_000:
            pytest.skip(f"this runtime measured {s._ns_per_element:.3g} ns per element: no test input is big enough")
        _run(go)
        loop_thread = threading.current_thread().name
        assert (rec.threads[-2], rec.batches[-2]) == (loop_thread, small_rows)
        assert rec.threads[-1].startswith("slimserve-") and rec.batches[-1] == rows
    finally:
        s.stop()


def test_a_busy_instance_or_a_queue_sends_requests_to_the_thread_and_they_batch() -> None:
    gated = Gated(_mlp_backend())
    s = _learned(gated, inline_max_ns=LOOSE_NS)
    gated.batches.clear()
    learned = s._ns_per_element

    async def go() -> list[dict[str, np.ndarray]]:
        gated.hold()
        s._ns_per_element = float(LOOSE_NS)  # the first request must take the thread (inline, it would block)
        first = s.submit({"x": _x(1, 0)}, None, 1)
        assert not first.done()
        await _until(gated.entered.is_set, "the first request to occupy the instance")
        s._ns_per_element = learned  # cheap again: only the busy instance keeps the next ones off the loop
        rest = [s.submit({"x": _x(1, seed)}, None, 1) for seed in (1, 2)]
        assert _queued(s) == 2 and not any(f.done() for f in rest)
        gated.gate.set()
        return [await first, *[await f for f in rest]]

    try:
        outs = _run(go)
        assert gated.batches == [1, 2]
        for out, seed in zip(outs, (0, 1, 2), strict=True):
            np.testing.assert_allclose(out["probs"], mlp_reference(_x(1, seed)), rtol=1e-5)
    finally:
        s.stop()


def test_a_config_with_a_queue_delay_never_runs_inline() -> None:
    rec = Gated(_mlp_backend())
    s = _learned(rec, inline_max_ns=LOOSE_NS, max_queue_delay_ns=1_000)

    async def go() -> None:
        await s.submit({"x": _x(1)}, None, 1)

    try:
        _run(go)
        assert all(name.startswith("slimserve-") for name in rec.threads)
    finally:
        s.stop()


def test_an_inline_run_the_runtime_refuses_is_a_400_and_the_instance_is_returned() -> None:
    s = _learned(_mlp_backend(), inline_max_ns=LOOSE_NS)

    async def go() -> None:
        fut = s.submit({"x": np.zeros((1, 3), np.float32)}, None, 1)  # the model takes 4 features
        assert fut.done()
        with pytest.raises(BadRequest):
            await fut
        out = await s.submit({"x": _x(1, 5)}, None, 1)
        np.testing.assert_allclose(out["probs"], mlp_reference(_x(1, 5)), rtol=1e-5)

    try:
        _run(go)
        assert s._busy == [False]
    finally:
        s.stop()
