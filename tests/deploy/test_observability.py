"""Prometheus rules, the Grafana dashboard and the prometheus-adapter rules, checked statically and live.

- ``promtool check rules`` and ``promtool test rules`` (with a control: a weakened rule fails the tests)
- the dashboard JSON is what deploy/grafana/dashboard.py generates, every panel is templated by
  ``$model`` / ``$variant``, and every metric a rule, panel or adapter rule names is one the server exports
- live (slow): a real Prometheus scrapes a real slimserve under a short loopback load; every dashboard
  panel query, template variable query, recording rule and adapter metricsQuery returns data
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from service.metrics import Metrics
from service.shadow import TrafficMetrics
from tests.conftest import ServerFactory, free_port, upload
from tests.deploy._tools import ADAPTER_VALUES, DASHBOARD_JSON, DASHBOARD_PY, RULES, RULES_TEST, require
from tests.onnx_models import mlp

PROMETHEUS_INSTALL = "apt-get install prometheus"
METRIC_RE = re.compile(r"\b(slimserve_[a-z_]+)\b")


def exported_metric_names() -> set[str]:
    """Every sample name the server can export (histograms: _bucket, _sum, _count; counters: _total)."""
    names: set[str] = set()
    metrics = Metrics()
    TrafficMetrics(metrics.registry)
    for fam in metrics.registry.collect():
        if fam.type == "histogram":
            names |= {f"{fam.name}_bucket", f"{fam.name}_sum", f"{fam.name}_count"}
        elif fam.type == "counter":
            names |= {f"{fam.name}_total", f"{fam.name}_created"}
        else:
            names.add(fam.name)
    return names


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_JSON.read_text())


def panel_targets(dash: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(p["title"], t) for p in dash["panels"] if p["type"] != "row" for t in p["targets"]]


def adapter_rules() -> list[dict[str, Any]]:
    return yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]


# --------------------------------------------------------------------------------------------------
# static
# --------------------------------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    promtool = require("promtool", install=PROMETHEUS_INSTALL)
    proc = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 17 rules found" in proc.stdout + proc.stderr


def test_promtool_unit_tests(tmp_path: Path) -> None:
    promtool = require("promtool", install=PROMETHEUS_INSTALL)
    proc = subprocess.run([promtool, "test", "rules", str(RULES_TEST)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # control: with the error-rate threshold raised to 50% the unit tests must notice the alert is gone
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    weakened = RULES.read_text().replace(
        "slimserve:request_errors:ratio_rate5m > 0.05", "slimserve:request_errors:ratio_rate5m > 0.5"
    )
    assert weakened != RULES.read_text()
    (tmp_path / "rules" / RULES.name).write_text(weakened)
    shutil.copy(RULES_TEST, tmp_path / "tests" / RULES_TEST.name)
    proc = subprocess.run(
        [promtool, "test", "rules", str(tmp_path / "tests" / RULES_TEST.name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "SlimserveHighErrorRate" in proc.stdout + proc.stderr


def test_dashboard_json_is_generated_from_dashboard_py() -> None:
    proc = subprocess.run([sys.executable, str(DASHBOARD_PY), "--check"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_dashboard_panels_are_templated_and_laid_out() -> None:
    dash = dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["model"]["includeAll"] and variables["variant"]["includeAll"]
    assert "$model" in variables["variant"]["query"]["query"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
    targets = panel_targets(dash)
    assert len(targets) >= 15
    for title, t in targets:
        assert '$model"' in t["expr"] and '$variant"' in t["expr"], title
        assert t["datasource"]["uid"] == "${datasource}"
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for topic in (
        "p50 / p95 / p99",
        "queue vs compute",
        "throughput",
        "error rate",
        "batch size",
        "in-flight",
        "variant size",
        "accuracy delta",
    ):
        assert topic in titles, topic


def test_every_named_metric_is_exported_by_the_server() -> None:
    exported = exported_metric_names()
    sources = {
        "rules": RULES.read_text(),
        "dashboard": "\n".join(t["expr"] for _, t in panel_targets(dashboard()))
        + json.dumps(dashboard()["templating"]),
        # what the adapter reads (its `name.as` outputs are new names, served to the HPA)
        "adapter": json.dumps([[r["seriesQuery"], r["metricsQuery"], r["name"]["matches"]] for r in adapter_rules()]),
    }
    for name, text in sources.items():
        used = set(METRIC_RE.findall(text))
        assert used, name
        assert used <= exported, f"{name} names unknown metrics: {sorted(used - exported)}"


# --------------------------------------------------------------------------------------------------
# live: a real Prometheus scraping a real server
# --------------------------------------------------------------------------------------------------

RATE_WINDOW = "30s"
SCRAPE_LABELS = {"namespace": "ml", "pod": "slimserve-0"}


class Prometheus:
    def __init__(self, binary: str, workdir: Path, target: str, rules: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
            "rule_files": [str(rules)],
            "scrape_configs": [
                {
                    "job_name": "slimserve",
                    "static_configs": [{"targets": [target], "labels": SCRAPE_LABELS}],
                }
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.workdir = workdir

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def wait_until(self, expr: str, timeout: float = 20) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError((self.workdir / "prometheus.log").read_text()[-3000:])
            try:
                result = self.query(expr)
                if result:
                    return result
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"no data for {expr} within {timeout}s")
            time.sleep(0.25)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def substitute(expr: str, model: str, variant: str) -> str:
    return expr.replace("$__rate_interval", RATE_WINDOW).replace("$model", model).replace("$variant", variant)


def assert_finite(expr: str, result: list[dict[str, Any]]) -> None:
    assert result, f"no data: {expr}"
    for sample in result:
        value = float(sample["value"][1])
        assert math.isfinite(value), f"{expr} -> {sample}"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_live_prometheus_answers_every_dashboard_query(server_factory: ServerFactory, tmp_path: Path) -> None:
    binary = require("prometheus", install=PROMETHEUS_INSTALL)
    t_start = time.monotonic()
    server = server_factory()
    models = {"dash-mlp": mlp(seed=1), "dash-mlp-wide": mlp(hidden=32, seed=2)}
    with server.client() as c:
        for name, onnx in models.items():
            r = upload(c, name, onnx)
            assert r.status_code in (200, 201), r.text
        # a variant with a measured accuracy delta, as a compression job publishes it (only measured deltas
        # are exported, so the accuracy panel needs one)
        from model_store import Catalog, LocalBlobStore, NewVariant

        variant_bytes = mlp(seed=7)
        blobs = LocalBlobStore(server.data_dir / "blobs")
        catalog = Catalog(f"sqlite:///{server.data_dir / 'catalog.db'}")
        catalog.add_variant(
            "dash-mlp",
            1,
            NewVariant(
                "int8",
                "int8-qdq",
                blobs.put_bytes(variant_bytes),
                len(variant_bytes),
                details={"accuracy_delta": -0.004},
            ),
        )
        catalog.close()
        deadline = time.monotonic() + 20
        while c.get("/v2/models/dash-mlp:int8/ready").status_code != 200:
            assert time.monotonic() < deadline, "the int8 variant did not load"
            time.sleep(0.1)
        # shadow traffic for the shadow panels: every dash-mlp request is mirrored to int8
        policy = {"split": {"original": 1.0}, "shadow": {"int8": 1.0}}
        assert c.put("/v1/models/dash-mlp/versions/1/traffic", json=policy).status_code == 200

    # the recording group evaluates every 30 s in production; every second here
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    prom = Prometheus(binary, tmp_path, f"127.0.0.1:{server.port}", tmp_path / "rules.yml")
    try:
        prom.wait_until('up{job="slimserve"} == 1')
        prom.wait_until("slimserve_variant_ready")

        # bounded load on loopback: 400 good requests from 8 threads, 20 malformed ones (client errors)
        def infer(i: int) -> int:
            rng = np.random.default_rng(i)
            name = list(models)[i % len(models)]
            rows = int(rng.integers(1, 4))
            x = rng.standard_normal((rows, 4)).astype(np.float32)
            shape = [rows, 4] if i >= 20 else [rows, 5]  # the first 20 are malformed
            data = x.ravel().tolist() if i >= 20 else [*x.ravel().tolist(), *([0.0] * rows)]
            if i >= 20 and (i // 2) % 2:  # half the good ones (of each model) over gRPC: panels split by protocol
                return grpc_infer(name, x)
            body = {"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": data}]}
            with httpx.Client(base_url=server.url, timeout=30) as client:
                return client.post(f"/v2/models/{name}/infer", json=body).status_code

        def grpc_infer(name: str, x: np.ndarray) -> int:
            import tritonclient.grpc as grpcclient

            with grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}") as client:
                inp = grpcclient.InferInput("x", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                client.infer(name, [inp])
            return 200

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(infer, range(420)))
        assert codes.count(200) == 400, codes
        with httpx.Client(base_url=server.url, timeout=30) as client:  # some traffic for the int8 variant too
            body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.5, 1, 1.5, 2]}]}
            assert all(client.post("/v2/models/dash-mlp:int8/infer", json=body).status_code == 200 for _ in range(20))
        for _ in range(20):
            grpc_infer("dash-mlp:int8", np.ones((1, 4), np.float32))  # raises on an error
        assert all(400 <= code < 500 for code in codes[:20]), codes[:20]

        # wait until Prometheus has scraped the last requests and evaluated the rules on them
        total = 'sum(slimserve_requests_total{model=~"dash-.*"})'
        prom.wait_until(f"{total} >= 460")
        prom.wait_until('sum(slimserve:requests:rate5m{model=~"dash-.*", outcome="client_error"}) > 0')
        prom.wait_until('sum(slimserve_shadow_rows_total{model="dash-mlp"}) > 0')

        dash = dashboard()
        checked = 0
        for title, target in panel_targets(dash):
            for model, variant in [(".*", ".*"), ("dash-mlp", "original"), ("dash-mlp|dash-mlp-wide", ".*")]:
                expr = substitute(target["expr"], model, variant)
                result = prom.query(expr)
                assert_finite(f"[{title}] {expr}", result)
                for sample in result:
                    if "model" in sample["metric"]:
                        assert re.fullmatch(model, sample["metric"]["model"]), (title, sample)
                checked += 1
        assert checked == 3 * len(panel_targets(dash))

        # the data behind the panels is the load we sent
        ok = prom.query(f'sum by (model) (increase(slimserve_requests_total{{outcome="success"}}[{RATE_WINDOW}]))')
        assert {s["metric"]["model"] for s in ok} == set(models)
        bad = prom.query('sum(slimserve_requests_total{outcome="client_error"})')
        assert float(bad[0]["value"][1]) == 20

        # template variables: label_values(slimserve_variant_ready, model) and the variant one
        for var in dash["templating"]["list"]:
            if var["type"] != "query":
                continue
            m = re.fullmatch(r"label_values\((.*), (\w+)\)", var["query"]["query"])
            assert m, var["query"]["query"]
            selector, label = substitute(m.group(1), ".*", ".*"), m.group(2)
            r = httpx.get(f"{prom.url}/api/v1/label/{label}/values", params={"match[]": selector}, timeout=10)
            values = set(r.json()["data"])
            assert (set(models) if label == "model" else {"original"}) <= values, (label, values)

        # every recording rule has data
        for group in rules["groups"]:
            for rule in group["rules"]:
                if "record" in rule:
                    assert_finite(rule["record"], prom.query(rule["record"] + '{model=~"dash-.*"}'))

        # the prometheus-adapter rules, as the adapter expands them for the HPA of pod slimserve-0
        for rule in adapter_rules():
            series = rule["seriesQuery"].split("{")[0]
            assert prom.query(rule["seriesQuery"]), rule["seriesQuery"]
            expr = (
                rule["metricsQuery"]
                .replace("<<.Series>>", series)
                .replace("<<.LabelMatchers>>", 'namespace="ml",pod=~"slimserve-0"')
                .replace("<<.GroupBy>>", "pod")
            )
            result = prom.query(expr)
            assert_finite(expr, result)
            assert [s["metric"] for s in result] == [{"pod": "slimserve-0"}], result
            assert float(result[0]["value"][1]) >= 0
    finally:
        prom.stop()
    assert time.monotonic() - t_start < 90
