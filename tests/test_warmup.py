"""Warm-up through the real server: models whose inputs are shapes or sizes are accepted without samples (not
warmed, then warmed by their first request), warm up on config.warmup samples or the first calibration
sample, keep that across a restart; a warm-up past its deadline is still refused. Also the backend options
a model's config may not set."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import Server, ServerFactory, upload
from tests.hardening.helpers import slow_model
from tests.onnx_models import expand_by_input, mlp, reshape_by_input, split_by_sizes


def _tensor(name: str, arr: np.ndarray) -> dict[str, Any]:
    datatype = {"float32": "FP32", "int64": "INT64"}[str(arr.dtype)]
    return {"name": name, "shape": list(arr.shape), "datatype": datatype, "data": arr.ravel().tolist()}


X3 = np.array([[1.0, 2.0, 3.0]], np.float32)
X6 = np.arange(6, dtype=np.float32).reshape(1, 6)
# name, model, the shape-like input and a real value for it, x, the expected output
CASES: list[tuple[str, Callable[[], bytes], str, list[int], np.ndarray, np.ndarray]] = [
    ("expand", expand_by_input, "shape", [2, 3], X3, np.broadcast_to(X3, (2, 3))),
    ("reshape", reshape_by_input, "shape", [1, 2, 3], X6, X6.reshape(1, 2, 3)),
    ("split", split_by_sizes, "split", [2, 4], X6, X6[:, :2]),
]


def _variant(c: httpx.Client, name: str) -> dict[str, Any]:
    (v,) = c.get(f"/v1/models/{name}").json()["versions"][-1]["variants"]
    return v  # type: ignore[no-any-return]


def _infer_ok(c: httpx.Client, name: str, arg: str, value: list[int], x: np.ndarray, expected: np.ndarray) -> None:
    body = {"inputs": [_tensor("x", x), _tensor(arg, np.array(value, np.int64))]}
    r = c.post(f"/v2/models/{name}/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    np.testing.assert_array_equal(np.array(out["data"], np.float32).reshape(out["shape"]), expected)


@pytest.mark.parametrize(("case", "build", "arg", "value", "x", "expected"), CASES, ids=[c[0] for c in CASES])
def test_shape_input_models_upload_without_samples_and_warm_on_first_use(
    client: httpx.Client,
    case: str,
    build: Callable[[], bytes],
    arg: str,
    value: list[int],
    x: np.ndarray,
    expected: np.ndarray,
) -> None:
    name = f"warm-none-{case}"
    r = upload(client, name, build())
    assert r.status_code == 201, r.text
    (v,) = r.json()["versions"][0]["variants"]
    assert v["state"] == "ready" and v["warmed"] is False, v
    assert "failed" in v["warmup_error"] and "first request warms it" in v["warmup_error"]
    _infer_ok(client, name, arg, value, x, expected)
    after = _variant(client, name)
    assert after["warmed"] is True and "warmup_error" not in after


@pytest.mark.parametrize(("case", "build", "arg", "value", "x", "expected"), CASES, ids=[c[0] for c in CASES])
def test_shape_input_models_warm_up_on_config_samples(
    client: httpx.Client,
    case: str,
    build: Callable[[], bytes],
    arg: str,
    value: list[int],
    x: np.ndarray,
    expected: np.ndarray,
) -> None:
    name = f"warm-config-{case}"
    config = {"warmup": {"inputs": {arg: {"data": value}, "x": {"fill": "random"}}}}
    r = upload(client, name, build(), config=json.dumps(config))
    assert r.status_code == 201, r.text
    (v,) = r.json()["versions"][0]["variants"]
    assert v["warmed"] is True, v
    assert v["warmup"] == f"config for ['{arg}'], random for ['x']"
    _infer_ok(client, name, arg, value, x, expected)


def test_warm_up_on_the_first_calibration_sample(client: httpx.Client) -> None:
    buf = io.BytesIO()
    # samples on axis 0; `shape` has a fixed first dimension (3), so its first sample is the whole vector
    np.savez(buf, x=np.arange(18, dtype=np.float32).reshape(3, 6), shape=np.array([1, 2, 3], np.int64))
    r = upload(client, "warm-calibration", reshape_by_input(), calibration=buf.getvalue())
    assert r.status_code == 201, r.text
    (v,) = r.json()["versions"][0]["variants"]
    assert v["warmed"] is True and v["warmup"] == "calibration for ['shape', 'x']", v
    _infer_ok(client, "warm-calibration", "shape", [1, 2, 3], X6, X6.reshape(1, 2, 3))


@pytest.mark.parametrize(
    ("warmup", "message"),
    [
        ({"inputs": {"nope": {"data": [1]}}}, "warmup.inputs names ['nope']; the model's inputs are"),
        ({"inputs": {"shape": {"data": [1, 2, 3]}}}, "warmup.inputs.shape has shape [3]; the input is [2]"),
        ({"inputs": {"shape": {"data": [2.5, 3]}}}, "holds float64, the input is INT64"),
        ({"inputs": {"shape": {"fill": "ones"}}}, "warmup.inputs.shape.fill"),
        ({"inputs": {"x": {"shape": [1 << 20, 1 << 10]}}}, "at most 16777216 elements"),
    ],
)
def test_warmup_config_that_does_not_fit_is_422(client: httpx.Client, warmup: dict[str, Any], message: str) -> None:
    r = upload(client, "warm-bad", expand_by_input(), config=json.dumps({"warmup": warmup}))
    assert r.status_code == 422, r.text
    assert message in r.json()["error"], r.json()
    assert client.get("/v1/models/warm-bad").status_code == 404


def test_wrong_samples_for_every_input_are_refused_with_the_reason(client: httpx.Client) -> None:
    config = {"warmup": {"inputs": {"shape": {"data": [5, 5]}, "x": {"data": [[1, 2, 3]]}}}}
    r = upload(client, "warm-wrong", expand_by_input(), config=json.dumps(config))
    assert r.status_code == 400, r.text
    assert "fails on its warm-up samples (config for ['shape', 'x'])" in r.json()["error"]
    assert "invalid expand shape" in r.json()["error"]


def test_warmup_samples_and_state_survive_a_restart(server_factory: ServerFactory) -> None:
    s = server_factory()
    with s.client() as c:
        config = {"warmup": {"inputs": {"split": {"data": [3, 3]}}}}
        assert upload(c, "kept-config", split_by_sizes(), config=json.dumps(config)).status_code == 201
        assert upload(c, "kept-none", split_by_sizes()).status_code == 201
    s.stop()
    s.start()  # every variant is now loaded by the startup sync, from the catalogue
    with s.client() as c:
        assert _variant(c, "kept-config")["warmed"] is True
        v = _variant(c, "kept-none")
        assert v["state"] == "ready" and v["warmed"] is False and "zero for ['split', 'x']" in v["warmup_error"]
        _infer_ok(c, "kept-none", "split", [2, 4], X6, X6[:, :2])
        _infer_ok(c, "kept-config", "split", [1, 5], X6, X6[:, :1])


def test_warmup_past_its_deadline_is_refused(server_factory: ServerFactory) -> None:
    s = server_factory(SLIMSERVE_WARMUP_TIMEOUT_S="0.2")
    with s.client() as c:
        r = upload(c, "bomb", slow_model(tokens=4096, depth=512))  # about 2 s of compute per inference
        assert r.status_code == 400, r.text
        assert "warm-up did not finish within 0.2 s" in r.json()["error"]
        assert c.get("/v1/models/bomb").status_code == 404


# -- backend options ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"warmup_timeout_s": 1e9},
            "warmup_timeout_s is a server setting, not a model's: it is set by the server "
            "setting SLIMSERVE_WARMUP_TIMEOUT_S",
        ),
        ({"engine_cache_dir": "/etc"}, "engine_cache_dir is a server setting"),
        ({"device_id": 3}, "device_id is a server setting"),
        ({"max_batch_size": 4}, "it is set by the top-level config field max_batch_size"),
        ({"workspace_bytes": 1 << 40}, "over the server's cap SLIMSERVE_MAX_WORKSPACE_BYTES = 4294967296"),
        ({"trt_engine_cache_path": "/tmp"}, "backend_options.trt_engine_cache_path: Extra inputs are not permitted"),
        ({"opt_batch_size": 0}, "backend_options.opt_batch_size"),
    ],
)
def test_server_owned_backend_options_are_422(client: httpx.Client, options: dict[str, Any], message: str) -> None:
    r = upload(client, "opts", mlp(), config=json.dumps({"backend_options": options}))
    assert r.status_code == 422, r.text
    assert message in r.json()["error"], r.json()
    assert client.get("/v1/models/opts").status_code == 404


def test_model_backend_options_are_accepted_and_kept(client: httpx.Client, server: Server) -> None:
    options = {"opt_batch_size": 4, "sparse": True, "workspace_bytes": 1 << 30}
    r = upload(client, "opts-ok", mlp(), config=json.dumps({"backend_options": options}))
    assert r.status_code == 201, r.text
    assert r.json()["versions"][0]["config"]["backend_options"] == options
