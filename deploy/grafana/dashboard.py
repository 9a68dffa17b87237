"""Generate the slimserve Grafana dashboard (deploy/grafana/slimserve-dashboard.json).

    python deploy/grafana/dashboard.py            # rewrite the JSON next to this file
    python deploy/grafana/dashboard.py --check    # exit 1 if the JSON is out of date

The panels read the metrics defined in service/metrics.py (the shadow ones: service/shadow.py). Every query is
filtered by the dashboard's ``$model`` and ``$variant`` variables and aggregated by (model, variant), so replicas
add up and each served variant is one line (shadow panels: by model, primary and candidate; ``$variant`` selects
the primary). tests/deploy/test_observability.py runs every query against a real
Prometheus scraping a real server and requires data back, so a renamed metric or label fails there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("slimserve-dashboard.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'model=~"$model", variant=~"$variant"'
RATE = "$__rate_interval"


#: shadow metrics name the pair (primary, candidate): the variant filter selects the primary, the one that served
SHADOW = 'model=~"$model", primary=~"$variant"'
PAIR_BY = "le, model, primary, candidate"
PAIR_LEGEND = "{{model}}: {{candidate}} vs {{primary}}"


def _quantile(q: float, metric: str, by: str = "le, model, variant", sel: str = SEL) -> str:
    return f"histogram_quantile({q}, sum by ({by}) (rate({metric}_bucket{{{sel}}}[{RATE}])))"


def _pair_rate(metric: str) -> str:
    return f"sum by (model, primary, candidate) (rate({metric}{{{SHADOW}}}[{RATE}]))"


def _pair_mean(metric: str) -> str:
    return (
        f"sum by (model, primary, candidate) (rate({metric}_sum{{{SHADOW}}}[{RATE}]))"
        f" / sum by (model, primary, candidate) (rate({metric}_count{{{SHADOW}}}[{RATE}]))"
    )


def _mean(metric: str) -> str:
    return (
        f"sum by (model, variant) (rate({metric}_sum{{{SEL}}}[{RATE}]))"
        f" / sum by (model, variant) (rate({metric}_count{{{SEL}}}[{RATE}]))"
    )


def _target(expr: str, legend: str, ref: str, instant: bool = False) -> dict[str, Any]:
    t: dict[str, Any] = {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref}
    if instant:
        t.update({"instant": True, "range": False, "format": "table"})
    else:
        t.update({"instant": False, "range": True})
    return t


def _panel(
    pid: int,
    title: str,
    targets: list[dict[str, Any]],
    grid: tuple[int, int, int, int],
    unit: str = "short",
    kind: str = "timeseries",
    description: str = "",
    decimals: int | None = None,
) -> dict[str, Any]:
    x, y, w, h = grid
    defaults: dict[str, Any] = {"unit": unit}
    if decimals is not None:
        defaults["decimals"] = decimals
    p: dict[str, Any] = {
        "id": pid,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "targets": targets,
    }
    if kind == "timeseries":
        p["options"] = {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max", "lastNotNull"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    elif kind == "bargauge":
        p["options"] = {
            "orientation": "horizontal",
            "displayMode": "basic",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        }
    return p


def _row(pid: int, title: str, y: int) -> dict[str, Any]:
    return {
        "id": pid,
        "type": "row",
        "title": title,
        "collapsed": False,
        "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
        "panels": [],
    }


def _variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": f"{name}-values"},
        "definition": query,
        "refresh": 2,
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
        "regex": "",
        "hide": 0,
        "options": [],
    }


def _compare_variants(pid: int, grid: tuple[int, int, int, int]) -> dict[str, Any]:
    """One panel per model (repeated over ``$model``): its variants side by side, live p99 against the accuracy
    change an optimize or compress job measured, the table an operator reads to trust the default."""
    one = 'model=~"$model", variant=~"$variant"'
    p99 = (
        "histogram_quantile(0.99, sum by (le, model, variant) "
        f"(rate(slimserve_request_duration_seconds_bucket{{{one}}}[{RATE}])))"
    )
    panel = _panel(
        pid,
        "Variants of $model: live p99 vs measured accuracy delta",
        [
            _target(p99, "{{variant}} p99", "A", instant=True),
            _target(
                f"max by (model, variant) (slimserve_variant_accuracy_delta{{{one}}})", "{{variant}} delta", "B", True
            ),
        ],
        grid,
        kind="table",
        description="Each variant of the model: its p99 request latency now (across replicas) next to the accuracy "
        "change measured against the original when it was made (negative: a loss). Repeated per model.",
    )
    panel["repeat"] = "model"
    panel["repeatDirection"] = "v"
    panel["transformations"] = [
        {"id": "merge", "options": {}},
        {
            "id": "organize",
            "options": {
                "excludeByName": {"Time": True},
                "renameByName": {"Value #A": "p99 (s)", "Value #B": "accuracy delta"},
            },
        },
    ]
    return panel


def build() -> dict[str, Any]:
    err = 'outcome=~"server_error|timeout"'
    by = "le, model, variant, protocol"
    legend = "{{model}}:{{variant}} {{protocol}}"
    panels = [
        _row(1, "Latency", 0),
        _panel(
            2,
            "Request latency p50 / p95 / p99 by variant and protocol",
            [
                _target(_quantile(q, "slimserve_request_duration_seconds", by), f"{legend} p{int(q * 100)}", ref)
                for q, ref in ((0.5, "A"), (0.95, "B"), (0.99, "C"))
            ],
            (0, 1, 24, 9),
            unit="s",
            description="Time inside the server from body received to response built, across replicas; REST and gRPC "
            "apart (the protocol label).",
        ),
        _panel(
            3,
            "Queue vs compute time (p95)",
            [
                _target(_quantile(0.95, "slimserve_queue_duration_seconds"), "{{model}}:{{variant}} queue", "A"),
                _target(_quantile(0.95, "slimserve_compute_duration_seconds"), "{{model}}:{{variant}} compute", "B"),
            ],
            (0, 10, 12, 8),
            unit="s",
            description="Queue: waiting for a batch slot (too few instances or replicas). Compute: running the batch.",
        ),
        _panel(
            4,
            "Queue vs compute time (mean)",
            [
                _target(_mean("slimserve_queue_duration_seconds"), "{{model}}:{{variant}} queue", "A"),
                _target(_mean("slimserve_compute_duration_seconds"), "{{model}}:{{variant}} compute", "B"),
            ],
            (12, 10, 12, 8),
            unit="s",
        ),
        _row(5, "Traffic and errors", 18),
        _panel(
            6,
            "Throughput by variant and protocol",
            [
                _target(
                    f"sum by (model, variant, protocol) (rate(slimserve_requests_total{{{SEL}}}[{RATE}]))",
                    legend,
                    "A",
                )
            ],
            (0, 19, 8, 8),
            unit="reqps",
            description="Inference requests per second, every outcome, REST and gRPC apart.",
        ),
        _panel(
            7,
            "Error rate (server errors + timeouts)",
            [
                _target(
                    f"sum by (model, variant) (rate(slimserve_requests_total{{{SEL}, {err}}}[{RATE}]))"
                    f" / sum by (model, variant) (rate(slimserve_requests_total{{{SEL}}}[{RATE}]))",
                    "{{model}}:{{variant}}",
                    "A",
                )
            ],
            (8, 19, 8, 8),
            unit="percentunit",
            description="Share of requests that failed on the server side (the SlimserveHighErrorRate alert).",
        ),
        _panel(
            8,
            "Requests by outcome",
            [
                _target(
                    f"sum by (outcome) (rate(slimserve_requests_total{{{SEL}}}[{RATE}]))",
                    "{{outcome}}",
                    "A",
                )
            ],
            (16, 19, 8, 8),
            unit="reqps",
            description="success, client_error (bad requests), server_error, rejected (queue full), timeout.",
        ),
        _row(9, "Batching and concurrency", 27),
        _panel(
            10,
            "Batch size",
            [
                _target(_mean("slimserve_batch_size"), "{{model}}:{{variant}} mean", "A"),
                _target(_quantile(0.95, "slimserve_batch_size"), "{{model}}:{{variant}} p95", "B"),
            ],
            (0, 28, 8, 8),
            description="Requests merged into one backend execution.",
        ),
        _panel(
            11,
            "In-flight requests",
            [
                _target(
                    f"sum by (model, variant) (slimserve_inflight_requests{{{SEL}}})",
                    "{{model}}:{{variant}}",
                    "A",
                )
            ],
            (8, 28, 8, 8),
            description="Requests being handled now, summed over replicas (the HPA's in-flight metric).",
        ),
        _panel(
            12,
            "Queue depth",
            [
                _target(
                    f"sum by (model, variant) (slimserve_queue_depth{{{SEL}}})",
                    "{{model}}:{{variant}}",
                    "A",
                )
            ],
            (16, 28, 8, 8),
        ),
        _row(13, "Variants", 36),
        _panel(
            14,
            "Variant size",
            [
                _target(
                    f"max by (model, version, variant) (slimserve_variant_size_bytes{{{SEL}}})",
                    "{{model}} v{{version}} {{variant}}",
                    "A",
                    instant=True,
                )
            ],
            (0, 37, 8, 9),
            unit="bytes",
            kind="bargauge",
        ),
        _panel(
            15,
            "Accuracy delta vs original",
            [
                _target(
                    f"max by (model, version, variant) (slimserve_variant_accuracy_delta{{{SEL}}})",
                    "{{model}} v{{version}} {{variant}}",
                    "A",
                    instant=True,
                )
            ],
            (8, 37, 8, 9),
            kind="bargauge",
            decimals=4,
            description="Measured accuracy change of each variant against the original (negative: a loss).",
        ),
        _panel(
            16,
            "Replicas serving each variant",
            [
                _target(
                    f"sum by (model, version, variant) (slimserve_variant_ready{{{SEL}}})",
                    "{{model}} v{{version}} {{variant}}",
                    "A",
                )
            ],
            (16, 37, 8, 9),
            description="Replicas on which the variant is loaded and serving.",
        ),
        _panel(
            17,
            "Model load time (mean per load)",
            [
                _target(
                    f"max by (model, version, variant) (slimserve_model_load_duration_seconds_sum{{{SEL}}}"
                    f" / slimserve_model_load_duration_seconds_count{{{SEL}}})",
                    "{{model}} v{{version}} {{variant}}",
                    "A",
                    instant=True,
                )
            ],
            (0, 46, 24, 7),
            unit="s",
            kind="bargauge",
            description="Load and warm-up time of a variant on one backend (the slowest replica).",
        ),
        _row(18, "Shadow traffic: candidates compared with the variant that served", 53),
        _panel(
            19,
            "Shadow top-1 agreement",
            [
                _target(
                    _pair_rate("slimserve_shadow_top1_agree_total")
                    + " / "
                    + _pair_rate("slimserve_shadow_top1_rows_total"),
                    PAIR_LEGEND,
                    "A",
                )
            ],
            (0, 54, 8, 8),
            unit="percentunit",
            decimals=4,
            description="Share of mirrored rows whose top-1 class matches the primary's (classifier outputs), live.",
        ),
        _panel(
            20,
            "Shadow mean cosine",
            [_target(_pair_mean("slimserve_shadow_cosine"), PAIR_LEGEND, "A")],
            (8, 54, 8, 8),
            decimals=5,
            description="Cosine similarity of the candidate's outputs with the primary's, averaged per request.",
        ),
        _panel(
            21,
            "Shadow max abs error (p99 per request)",
            [_target(_quantile(0.99, "slimserve_shadow_max_abs_error", PAIR_BY, SHADOW), PAIR_LEGEND, "A")],
            (16, 54, 8, 8),
            description="Largest absolute output difference from the primary, 99th percentile over requests.",
        ),
        _panel(
            22,
            "Candidate latency on shadow requests (p50 / p99)",
            [
                _target(
                    _quantile(0.5, "slimserve_shadow_candidate_duration_seconds", PAIR_BY, SHADOW),
                    PAIR_LEGEND + " p50",
                    "A",
                ),
                _target(
                    _quantile(0.99, "slimserve_shadow_candidate_duration_seconds", PAIR_BY, SHADOW),
                    PAIR_LEGEND + " p99",
                    "B",
                ),
            ],
            (0, 62, 12, 8),
            unit="s",
            description="Submit to answer at the candidate, one shadow request at a time (no queueing behind others).",
        ),
        _panel(
            23,
            "Shadow requests: compared, failed, dropped",
            [
                _target(
                    f"sum by (model, candidate, outcome) (rate(slimserve_shadow_requests_total{{{SHADOW}}}[{RATE}]))",
                    "{{model}}:{{candidate}} {{outcome}}",
                    "A",
                ),
                _target(
                    f"sum by (model, candidate) (rate(slimserve_shadow_dropped_total{{{SHADOW}}}[{RATE}]))",
                    "{{model}}:{{candidate}} dropped",
                    "B",
                ),
            ],
            (12, 62, 12, 8),
            unit="reqps",
            description="Dropped: the shadow queue was full (SLIMSERVE_SHADOW_QUEUE_SIZE) or the candidate not loaded.",
        ),
        _compare_variants(24, (0, 70, 24, 8)),
    ]
    return {
        "uid": "slimserve",
        "title": "slimserve",
        "description": "slimserve inference: per-variant latency, queueing, throughput, errors and variant facts.",
        "tags": ["slimserve", "inference"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "regex": "",
                    "options": [],
                },
                _variable("model", "Model", "label_values(slimserve_variant_ready, model)"),
                _variable("variant", "Variant", 'label_values(slimserve_variant_ready{model=~"$model"}, variant)'),
            ]
        },
        "annotations": {"list": []},
        "links": [],
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if the JSON file is out of date")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is out of date: run python deploy/grafana/dashboard.py", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
