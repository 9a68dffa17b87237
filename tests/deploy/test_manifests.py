"""The Helm chart (deploy/helm/slimserve), rendered offline and checked.

- every core object passes ``kubernetes-validate --strict`` (oldest and newest supported Kubernetes)
- the ServiceMonitor and PrometheusRule pass prometheus-operator's CRD schemas
- checkov finds nothing beyond the documented skips (CHECKOV_SKIPS)
- what the chart promises holds in the rendered objects: probes, GPU pools, Services, HPA metrics that
  the prometheus-adapter rules provide, NetworkPolicy, ConfigMap/Secret wiring, security context
- the chart refuses configurations that cannot work
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from service.metrics import Metrics
from service.settings import Settings
from tests.conftest import ServerFactory, free_port
from tests.deploy._tools import (
    ADAPTER_VALUES,
    CHART,
    DASHBOARD_JSON,
    NAMESPACE,
    PRODUCTION_VALUES,
    ROOT,
    RULES,
    RenderError,
    container,
    crd_validate,
    find,
    one,
    production_values,
    render,
    require,
)

FULL = "demo-slimserve"
KUBE_VERSIONS = ["1.25.0", "1.37.0"]
DIGEST = "sha256:" + "ab" * 32

# checkov checks skipped for the rendered chart, with the reason (also in docs/deployment.md).
CHECKOV_SKIPS = {
    "CKV_K8S_15": "imagePullPolicy IfNotPresent: the checkov run pins every image by digest (CKV_K8S_43 passes), "
    "so Always would only make pod starts depend on the registry",
    "CKV_K8S_35": "SLIMSERVE_INFERENCE_TOKEN and SLIMSERVE_DATABASE_URL come from Secrets as env variables: the "
    "server has a *_FILE setting only for the admin token (which the chart mounts as a file)",
}
CHECKOV_INSTALL = "python3 -m venv /opt/checkov && /opt/checkov/bin/pip install checkov"
# per-object skips are annotations on the objects (checkov.io/skipN), asserted in test_checkov:
# CKV_K8S_8 / CKV_K8S_9 on the GPU worker Deployments: `slimserve worker` serves no HTTP to probe yet.


def with_digests(values: dict[str, Any]) -> dict[str, Any]:
    v = copy.deepcopy(values)
    v.setdefault("image", {})["digest"] = DIGEST
    v.setdefault("gpuImage", {})["digest"] = DIGEST
    return v


VARIANTS = {
    "default": {},
    "production": production_values(),
    "single-port": {"ports": {"inference": 8000, "management": 8000, "metrics": 8000, "grpc": 0}},
    "grpc-probes": {"probes": {"handler": "grpc"}},
    "persistence-and-tokens": {
        "persistence": {"enabled": True},
        "auth": {"adminToken": "a" * 32, "inferenceToken": "i" * 32},
        "database": {"url": "postgresql+psycopg://slimserve@pg.db.svc:5432/slimserve"},
        "s3": {
            "bucket": "models",
            "endpointUrl": "http://minio.minio.svc:9000",
            "prefix": "slimserve/",
            "region": "eu-west-1",
        },
    },
}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(values) for name, values in VARIANTS.items()}


@pytest.fixture(scope="module")
def prod(rendered: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return rendered["production"]


def pod_labels(deploy: dict[str, Any]) -> dict[str, str]:
    return deploy["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --------------------------------------------------------------------------------------------------
# schema validation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kube", KUBE_VERSIONS)
def test_core_objects_pass_kubernetes_validate_strict(
    rendered: dict[str, list[dict[str, Any]]], variant: str, kube: str
) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    core = [o for o in rendered[variant] if not o["apiVersion"].startswith("monitoring.coreos.com/")]
    assert len(core) >= 7
    errors = []
    for obj in core:
        try:
            kv.validate(obj, kube, strict=True)
        except (kv.ValidationError, kv.SchemaNotFoundError) as e:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {e}")
    assert not errors, "\n".join(errors)


def test_kubernetes_validate_rejects_a_broken_object(prod: list[dict[str, Any]]) -> None:
    """Control: the strict validation above does catch an unknown field and a wrong type."""
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    deploy = copy.deepcopy(one(prod, "Deployment", f"{FULL}-api"))
    container(deploy)["livenessProbe"]["httpGett"] = {"path": "/"}
    with pytest.raises(kv.ValidationError):
        kv.validate(deploy, KUBE_VERSIONS[-1], strict=True)
    svc = copy.deepcopy(one(prod, "Service", f"{FULL}-inference"))
    svc["spec"]["ports"][0]["port"] = "eight thousand"
    with pytest.raises(kv.ValidationError):
        kv.validate(svc, KUBE_VERSIONS[-1], strict=True)


def test_prometheus_operator_objects_pass_crd_schemas(rendered: dict[str, list[dict[str, Any]]]) -> None:
    both = rendered["production"] + rendered["single-port"]
    objs = [o for o in both if o["apiVersion"] == "monitoring.coreos.com/v1"]
    assert {o["kind"] for o in objs} == {"ServiceMonitor", "PrometheusRule"}
    results = crd_validate(objs)
    assert [r for r in results if not r["ok"]] == []
    # control: the same validator rejects a broken ServiceMonitor and a broken PrometheusRule
    sm = copy.deepcopy(find(objs, "ServiceMonitor")[0])
    sm["spec"]["endpoints"][0]["port"] = 8000
    sm["spec"]["endpoints"][0]["interval"] = "15 seconds"
    rule = copy.deepcopy(find(objs, "PrometheusRule")[0])
    del rule["spec"]["groups"][0]["name"]
    bad = crd_validate([sm, rule])
    assert [r["ok"] for r in bad] == [False, False], bad
    assert "interval" in bad[0]["error"] or "port" in bad[0]["error"]


def test_helm_lint_strict() -> None:
    helm_python = pytest.importorskip("helm_python", reason="pip install helm-python-sdk")
    for values in ({}, production_values()):
        report = helm_python.lint(str(CHART), values, strict=True, namespace=NAMESPACE)
        problems = [m for m in report["messages"] if m["severity"] >= 2] + list(report["errors"])
        assert problems == [], problems


@pytest.mark.slow  # checkov scans the rendered chart: 4-7 s
def test_checkov(tmp_path: Path) -> None:
    checkov = require(
        "checkov", "/opt/checkov/bin/checkov", os.environ.get("SLIMSERVE_CHECKOV"), install=CHECKOV_INSTALL
    )
    for name, values in VARIANTS.items():
        with open(tmp_path / f"{name}.yaml", "w") as f:
            yaml.safe_dump_all(render(with_digests(values)), f)
    proc = subprocess.run(
        [
            checkov,
            "-d",
            str(tmp_path),
            "--framework",
            "kubernetes",
            "--output",
            "json",
            "--skip-check",
            ",".join(CHECKOV_SKIPS),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.stdout.strip(), proc.stderr
    report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [
        f"{c['check_id']} {c['check_name']} -> {c['resource']}"
        for r in reports
        for c in r.get("results", {}).get("failed_checks", [])
    ]
    assert failed == [], "\n".join(failed)
    passed = sum(r.get("summary", {}).get("passed", 0) for r in reports)
    assert passed > 100
    skipped = {(c["check_id"], c["resource"]) for r in reports for c in r.get("results", {}).get("skipped_checks", [])}
    assert {cid for cid, res in skipped if "worker" in res} == {"CKV_K8S_8", "CKV_K8S_9"}
    assert all("worker" in res for _, res in skipped)


@pytest.mark.slow
def test_checkov_catches_a_privileged_pod(tmp_path: Path) -> None:
    """Control: the checkov run fails a Deployment that runs privileged as root."""
    checkov = require(
        "checkov", "/opt/checkov/bin/checkov", os.environ.get("SLIMSERVE_CHECKOV"), install=CHECKOV_INSTALL
    )
    values = with_digests({"securityContext": {"privileged": True, "allowPrivilegeEscalation": True}})
    values["podSecurityContext"] = {"runAsUser": 0, "runAsNonRoot": False}
    with open(tmp_path / "bad.yaml", "w") as f:
        yaml.safe_dump_all(render(values), f)
    proc = subprocess.run(
        [
            checkov,
            "-d",
            str(tmp_path),
            "--framework",
            "kubernetes",
            "--output",
            "json",
            "--quiet",
            "--skip-check",
            ",".join(CHECKOV_SKIPS),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = {c["check_id"] for r in reports for c in r.get("results", {}).get("failed_checks", [])}
    assert {"CKV_K8S_16", "CKV_K8S_20"} <= failed, failed


# --------------------------------------------------------------------------------------------------
# what the chart promises
# --------------------------------------------------------------------------------------------------


def test_default_render_is_a_single_cpu_server(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered["default"]
    deploys = find(objs, "Deployment")
    assert [d["metadata"]["name"] for d in deploys] == [f"{FULL}-api"]
    api = deploys[0]
    assert api["spec"]["replicas"] == 1
    c = container(api)
    assert c["image"] == "slimserve:0.1.0-cpu"
    assert c["args"] == ["serve"]
    assert find(objs, "HorizontalPodAutoscaler") == []
    assert {s["metadata"]["name"] for s in find(objs, "Service")} == {
        f"{FULL}-inference",
        f"{FULL}-management",
        f"{FULL}-metrics",
    }


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_probes_hit_the_health_routes(rendered: dict[str, list[dict[str, Any]]], variant: str) -> None:
    serving = [d for d in find(rendered[variant], "Deployment") if "worker" not in d["metadata"]["name"]]
    assert serving
    for d in serving:
        c = container(d)
        for probe, path in [
            ("startupProbe", "/v2/health/live"),
            ("livenessProbe", "/v2/health/live"),
            ("readinessProbe", "/v2/health/ready"),
        ]:
            if variant == "grpc-probes":  # grpc.health.v1 answers as /v2/health/ready does
                assert c[probe]["grpc"] == {"port": 8002, "service": ""} and "httpGet" not in c[probe]
            else:
                assert c[probe]["httpGet"] == {"path": path, "port": "inference"}
        assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 300
        assert "inference" in {p["name"] for p in c["ports"]}
        spec = d["spec"]["template"]["spec"]
        cm = one(rendered[variant], "ConfigMap", f"{FULL}-config")["data"]
        drain = float(cm["SLIMSERVE_SHUTDOWN_TIMEOUT_S"]) + float(c["lifecycle"]["preStop"]["exec"]["command"][1])
        assert spec["terminationGracePeriodSeconds"] > drain


def test_rendered_settings_run_a_server_the_probes_and_services_fit(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """Start a real server with the chart's ConfigMap and Secret wiring (ports moved to free ones) and check
    what the chart relies on: the kubelet's tokenless probes pass, each named Service port serves its routes
    and the inference port refuses the management ones."""
    objs = render(VARIANTS["persistence-and-tokens"])
    cm = one(objs, "ConfigMap", f"{FULL}-config")["data"]
    secret = one(objs, "Secret", f"{FULL}-auth")["stringData"]
    c = container(one(objs, "Deployment", f"{FULL}-api"))
    token_file = tmp_path / "admin-token"
    token_file.write_text(secret["admin-token"])
    mgmt_port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in cm.items() if k.startswith("SLIMSERVE_")}
    # the test server binds loopback and keeps SQLite + local blobs in a temporary directory
    local = {"SLIMSERVE_HOST", "SLIMSERVE_PORT", "SLIMSERVE_DATA_DIR", "SLIMSERVE_DATABASE_URL"}
    env = {k: v for k, v in env.items() if k not in local and not k.startswith("SLIMSERVE_S3_")}
    env["SLIMSERVE_MANAGEMENT_PORT"] = str(mgmt_port)
    env["SLIMSERVE_METRICS_PORT"] = str(metrics_port)
    env["SLIMSERVE_ADMIN_TOKEN_FILE"] = str(token_file)
    env["SLIMSERVE_INFERENCE_TOKEN"] = secret["inference-token"]
    for e in c["env"]:
        if "value" in e and e["name"] not in ("HOME", "SLIMSERVE_ADMIN_TOKEN_FILE"):
            env[e["name"]] = e["value"]
    s = server_factory(**env)
    ports = {"inference": s.port, "management": mgmt_port, "metrics": metrics_port}
    base = "http://127.0.0.1:{}"
    # probes: no token, on the container port named in the probe
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = c[probe]["httpGet"]
        r = httpx.get(base.format(ports[get["port"]]) + get["path"], timeout=5)
        assert r.status_code == 200, (probe, r.text)
    admin = {"Authorization": f"Bearer {secret['admin-token']}"}
    r = httpx.get(base.format(ports["management"]) + "/v1/models", headers=admin, timeout=5)
    assert r.status_code == 200
    assert httpx.get(base.format(ports["management"]) + "/v1/models", timeout=5).status_code == 401
    assert httpx.get(base.format(ports["inference"]) + "/v1/models", headers=admin, timeout=5).status_code == 404
    r = httpx.get(base.format(ports["metrics"]) + "/metrics", timeout=5)
    assert r.status_code == 200 and "slimserve_" in r.text
    assert httpx.get(base.format(ports["inference"]) + "/v2", timeout=5).status_code == 401
    infer_auth = {"Authorization": f"Bearer {secret['inference-token']}"}
    assert httpx.get(base.format(ports["inference"]) + "/v2", headers=infer_auth, timeout=5).status_code == 200


def test_gpu_pools_one_deployment_per_product_and_role(prod: list[dict[str, Any]]) -> None:
    pv = production_values()
    deploys = {d["metadata"]["name"]: d for d in find(prod, "Deployment")}
    expected = {f"{FULL}-api"}
    for p in pv["gpu"]["products"]:
        if p["servingReplicas"]:
            expected.add(f"{FULL}-serve-{p['name']}")
        if p["workerReplicas"]:
            expected.add(f"{FULL}-worker-{p['name']}")
    assert set(deploys) == expected
    for p in pv["gpu"]["products"]:
        for role in ("serve", "worker"):
            d = deploys.get(f"{FULL}-{role}-{p['name']}")
            if d is None:
                continue
            spec = d["spec"]["template"]["spec"]
            assert spec["nodeSelector"] == {"nvidia.com/gpu.product": p["product"]}
            assert spec["runtimeClassName"] == "nvidia"
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
            c = container(d)
            assert c["image"] == "registry.example.com/ml/slimserve:0.1.0-gpu"
            assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
            assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
            if role == "worker":  # the pool claims the engine builds of its product's target (backends/targets.py)
                from backends.targets import slug

                target = f"gpu-{slug(p['product'])}-sm{p['computeCapability'].replace('.', '')}"
                assert c["command"] == ["slimserve", "worker", "--targets", target]
                assert "ports" not in c and "readinessProbe" not in c
                assert pod_labels(d).get("slimserve.io/serving") is None
            else:
                assert c["args"] == ["serve"]
                assert pod_labels(d)["slimserve.io/serving"] == "true"
    api = container(deploys[f"{FULL}-api"])
    assert "nvidia.com/gpu" not in api["resources"].get("limits", {})
    assert api["image"] == "registry.example.com/ml/slimserve:0.1.0-cpu"


def test_services_route_to_the_right_pods(prod: list[dict[str, Any]]) -> None:
    deploys = find(prod, "Deployment")
    services = {s["metadata"]["name"]: s for s in find(prod, "Service")}

    def targets(svc: str) -> set[str]:
        sel = services[svc]["spec"]["selector"]
        return {d["metadata"]["name"] for d in deploys if selects(sel, pod_labels(d))}

    serving = {f"{FULL}-api", f"{FULL}-serve-l4", f"{FULL}-serve-h100"}
    assert targets(f"{FULL}-inference") == serving
    assert targets(f"{FULL}-management") == {f"{FULL}-api"}
    assert targets(f"{FULL}-metrics") == serving
    assert targets(f"{FULL}-inference-l4") == {f"{FULL}-serve-l4"}
    for name, number in [("inference", 8000), ("management", 8001), ("metrics", 9090)]:
        port = services[f"{FULL}-{name}"]["spec"]["ports"][0]  # inference also has grpc (test_ports_flow...)
        assert port["name"] == name
        assert port["port"] == number
    # the ServiceMonitor picks the metrics Service and its named port
    (sm,) = find(prod, "ServiceMonitor")
    matched = [s for s in services.values() if selects(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
    assert [s["metadata"]["name"] for s in matched] == [f"{FULL}-metrics"]
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_ports_flow_through_everything(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered["production"]
    c = container(one(objs, "Deployment", f"{FULL}-api"))
    assert {(p["name"], p["containerPort"]) for p in c["ports"]} == {
        ("inference", 8000),
        ("management", 8001),
        ("metrics", 9090),
        ("grpc", 8002),
    }
    cm = one(objs, "ConfigMap", f"{FULL}-config")["data"]
    assert cm["SLIMSERVE_GRPC_PORT"] == "8002"
    assert (cm["SLIMSERVE_PORT"], cm["SLIMSERVE_MANAGEMENT_PORT"], cm["SLIMSERVE_METRICS_PORT"]) == (
        "8000",
        "8001",
        "9090",
    )
    svc = {s["metadata"]["name"]: s["spec"]["ports"][0] for s in find(objs, "Service")}
    assert svc[f"{FULL}-inference"]["targetPort"] == 8000
    assert svc[f"{FULL}-management"]["targetPort"] == 8001
    assert svc[f"{FULL}-metrics"]["targetPort"] == 9090
    inference = one(objs, "Service", f"{FULL}-inference")["spec"]["ports"]
    assert inference[1] == {
        "name": "grpc",
        "port": 8002,
        "targetPort": 8002,
        "protocol": "TCP",
        "appProtocol": "kubernetes.io/h2c",
    }
    (np,) = find(objs, "NetworkPolicy")
    rules = {r["ports"][0]["port"]: r.get("from") for r in np["spec"]["ingress"]}
    by_first = {r["ports"][0]["port"]: r["ports"] for r in np["spec"]["ingress"]}
    assert {"protocol": "TCP", "port": 8002} in by_first[8000]  # gRPC takes inference's rule
    assert rules[8001] == [{"podSelector": {}}]
    assert rules[9090] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert rules[8000] == [{"namespaceSelector": {"matchLabels": {"slimserve.io/inference-client": "true"}}}]


def test_single_port_mode(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered["single-port"]
    c = container(one(objs, "Deployment", f"{FULL}-api"))
    assert c["ports"] == [{"name": "inference", "containerPort": 8000, "protocol": "TCP"}]
    cm = one(objs, "ConfigMap", f"{FULL}-config")["data"]
    assert "SLIMSERVE_MANAGEMENT_PORT" not in cm and "SLIMSERVE_METRICS_PORT" not in cm
    assert {s["spec"]["ports"][0]["targetPort"] for s in find(objs, "Service")} == {8000}


def test_network_policy_selects_every_pod_and_restricts_management(prod: list[dict[str, Any]]) -> None:
    (np,) = find(prod, "NetworkPolicy")
    assert np["spec"]["policyTypes"] == ["Ingress"]
    for d in find(prod, "Deployment"):
        assert selects(np["spec"]["podSelector"]["matchLabels"], pod_labels(d))
    mgmt = [r for r in np["spec"]["ingress"] if r.get("from") == [{"podSelector": {}}]]
    assert len(mgmt) == 1 and mgmt[0]["ports"] == [{"protocol": "TCP", "port": 8001}]


def test_hpa_metrics_are_served_by_the_adapter_rules(rendered: dict[str, list[dict[str, Any]]]) -> None:
    adapter = yaml.safe_load(ADAPTER_VALUES.read_text())
    served = {r["name"]["as"]: r for r in adapter["rules"]["custom"]}
    exported = {m.name for m in Metrics().registry.collect()}
    for rule in served.values():
        # the series the adapter discovers are real slimserve metrics (histograms export _sum/_count)
        series = rule["seriesQuery"].split("{")[0]
        assert series.removesuffix("_count").removesuffix("_sum") in exported, series
    hpas = find(rendered["production"], "HorizontalPodAutoscaler")
    assert {h["metadata"]["name"] for h in hpas} == {f"{FULL}-api", f"{FULL}-serve-l4", f"{FULL}-serve-h100"}
    used = set()
    deploys = {d["metadata"]["name"] for d in find(rendered["production"], "Deployment")}
    for h in hpas:
        assert h["spec"]["scaleTargetRef"]["name"] in deploys
        for m in h["spec"]["metrics"]:
            assert m["type"] == "Pods"
            used.add(m["pods"]["metric"]["name"])
    assert used == set(served) == {"slimserve_inflight_requests_per_pod", "slimserve_queue_duration_seconds_mean"}
    # an autoscaled Deployment leaves replicas to the HPA
    assert "replicas" not in one(rendered["production"], "Deployment", f"{FULL}-api")["spec"]


def test_pdbs_cover_serving_pools(prod: list[dict[str, Any]]) -> None:
    pdbs = find(prod, "PodDisruptionBudget")
    for d in find(prod, "Deployment"):
        covering = [p for p in pdbs if selects(p["spec"]["selector"]["matchLabels"], pod_labels(d))]
        assert len(covering) == (0 if "worker" in d["metadata"]["name"] else 1), d["metadata"]["name"]


def test_config_and_secrets_wiring(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered["persistence-and-tokens"]
    cm = one(objs, "ConfigMap", f"{FULL}-config")["data"]
    assert cm["SLIMSERVE_HOST"] == "0.0.0.0"
    assert cm["SLIMSERVE_PORT"] == "8000"
    assert cm["SLIMSERVE_DATA_DIR"] == "/var/lib/slimserve"
    assert cm["SLIMSERVE_MAX_UPLOAD_BYTES"] == "536870912"
    assert cm["SLIMSERVE_DATABASE_URL"] == "postgresql+psycopg://slimserve@pg.db.svc:5432/slimserve"
    assert cm["SLIMSERVE_S3_BUCKET"] == "models"
    assert cm["SLIMSERVE_S3_ENDPOINT_URL"] == "http://minio.minio.svc:9000"
    assert cm["SLIMSERVE_S3_PREFIX"] == "slimserve/"
    assert cm["SLIMSERVE_S3_REGION"] == "eu-west-1"
    # every key is a real setting: a typo would be ignored silently by the server (extra="ignore")
    fields = {f"SLIMSERVE_{n.upper()}" for n in Settings.model_fields}
    assert set(cm) - fields == set()

    secret = one(objs, "Secret", f"{FULL}-auth")
    assert set(secret["stringData"]) == {"admin-token", "inference-token"}
    d = one(objs, "Deployment", f"{FULL}-api")
    c = container(d)
    env = {e["name"]: e for e in c["env"]}
    token_file = Path(env["SLIMSERVE_ADMIN_TOKEN_FILE"]["value"])
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == str(token_file.parent))
    vol = next(v for v in d["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert vol["secret"]["secretName"] == f"{FULL}-auth"
    assert vol["secret"]["items"] == [{"key": "admin-token", "path": token_file.name}]
    assert "SLIMSERVE_ADMIN_TOKEN" not in env
    assert env["SLIMSERVE_INFERENCE_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": f"{FULL}-auth",
        "key": "inference-token",
    }
    assert c["envFrom"][0] == {"configMapRef": {"name": f"{FULL}-config"}}
    # persistence: a PVC for the data dir, and Recreate (a RWO volume cannot be shared during a rollout)
    pvc = one(objs, "PersistentVolumeClaim", f"{FULL}-data")
    data = next(v for v in d["spec"]["template"]["spec"]["volumes"] if v["name"] == "data")
    assert data["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert d["spec"]["strategy"]["type"] == "Recreate"

    # production: the database URL (with its password) only ever comes from a Secret
    pc = container(one(rendered["production"], "Deployment", f"{FULL}-api"))
    penv = {e["name"]: e for e in pc["env"]}
    db_ref = penv["SLIMSERVE_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert db_ref == {"name": "slimserve-db", "key": "database-url"}
    assert "SLIMSERVE_DATABASE_URL" not in one(rendered["production"], "ConfigMap", f"{FULL}-config")["data"]
    assert find(rendered["production"], "Secret") == []


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_pod_is_locked_down(rendered: dict[str, list[dict[str, Any]]], variant: str) -> None:
    for d in find(rendered[variant], "Deployment"):
        spec = d["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == 10001
        assert spec["automountServiceAccountToken"] is False
        c = container(d)
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]
        assert "/var/lib/slimserve" in mounts
        assert c["resources"]["limits"]["memory"] and c["resources"]["requests"]["cpu"]


def test_monitoring_objects_carry_the_repo_rules_and_dashboard(prod: list[dict[str, Any]]) -> None:
    (rule,) = find(prod, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    dash = one(prod, "ConfigMap", f"{FULL}-dashboard")
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dash["data"]["slimserve-dashboard.json"]) == json.loads(DASHBOARD_JSON.read_text())


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"api": {"replicas": 3}}, "shared catalogue"),
        ({"api": {"autoscaling": {"enabled": True}}, "database": {"url": "postgresql+psycopg://x@y/z"}}, "s3.bucket"),
        ({"gpu": {"enabled": True}}, "shared catalogue"),
        (
            {
                "persistence": {"enabled": True},
                "api": {"replicas": 2},
                "database": {"url": "postgresql+psycopg://x@y/z"},
                "s3": {"bucket": "b"},
            },
            "ReadWriteOnce",
        ),
        (
            {
                "gpu": {
                    "enabled": True,
                    "products": [{"name": "H100_80GB", "product": "NVIDIA-H100", "servingReplicas": 1}],
                },
                "database": {"url": "postgresql+psycopg://x@y/z"},
                "s3": {"bucket": "b"},
            },
            "gpu.products[].name",
        ),
        ({"api": {"autoscaling": {"metric": "cpu"}}}, "inflight or queueTime"),
    ],
)
def test_chart_refuses_configurations_that_cannot_work(values: dict[str, Any], message: str) -> None:
    with pytest.raises(RenderError, match=message.replace("[", r"\[").replace("]", r"\]")):
        render(values)


def test_yaml_files_are_lint_clean() -> None:
    yamllint = pytest.importorskip("yamllint.linter", reason="pip install yamllint")
    from yamllint.config import YamlLintConfig

    conf = YamlLintConfig(
        "extends: default\nrules:\n  line-length: {max: 140}\n  document-start: disable\n"
        "  truthy: {check-keys: false}\n"
        "  braces: {max-spaces-inside: 1}\n"
    )
    files = [
        CHART / "Chart.yaml",
        CHART / "values.yaml",
        PRODUCTION_VALUES,
        RULES,
        ROOT / "deploy" / "prometheus" / "tests" / "slimserve.rules.test.yml",
        ADAPTER_VALUES,
        ROOT / ".hadolint.yaml",
    ]
    problems = []
    for f in files:
        for p in yamllint.run(f.read_text(), conf, str(f)):
            problems.append(f"{f.relative_to(ROOT)}:{p.line}: {p.level}: {p.message}")
    assert problems == [], "\n".join(problems)
