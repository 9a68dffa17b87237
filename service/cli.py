"""The ``slimserve`` command: run the server, and talk to a running one."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(
    help="slimserve: compress ONNX models and serve them over the KServe v2 protocol.", no_args_is_help=True
)
console = Console()

ServerOpt = Annotated[str, typer.Option("--server", envvar="SLIMSERVE_URL", help="base URL of the server")]


def _client(server: str) -> httpx.Client:
    headers = {}
    token = os.environ.get("SLIMSERVE_ADMIN_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.Client(base_url=server, headers=headers, timeout=600)


def _fail(resp: httpx.Response) -> None:
    if resp.status_code >= 400:
        try:
            msg = resp.json().get("error", resp.text)
        except ValueError:
            msg = resp.text
        console.print(f"[red]error {resp.status_code}:[/red] {msg}")
        raise typer.Exit(1)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="bind address (default: SLIMSERVE_HOST or 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default: SLIMSERVE_PORT or 8000)")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="store directory (default ./data)")] = None,
) -> None:
    """Run the server: HTTP, and gRPC on SLIMSERVE_GRPC_PORT (SQLite + local directory + ONNX Runtime CPU unless
    configured otherwise)."""
    from service.app import create_app
    from service.errors import SetupError
    from service.server import serve as run_server
    from service.settings import Settings

    overrides = {k: v for k, v in {"host": host, "port": port, "data_dir": data_dir}.items() if v is not None}
    settings = Settings(**overrides)
    # slimserve's own loggers (uvicorn configures only its own): one line per event, at the configured level
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app_ = create_app(settings)
    except SetupError as e:
        console.print(f"[red]slimserve cannot start:[/red] {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(2) from None
    grpc = f"  gRPC: {settings.host}:{settings.grpc_port}" if settings.grpc_port else ""
    console.print(f"slimserve on http://{settings.host}:{settings.port}{grpc}  store: {settings.data_dir.resolve()}")
    run_server(app_, settings)


@app.command()
def upload(
    name: str,
    model: Path,
    calibration: Annotated[Path | None, typer.Option(help=".npz of calibration samples")] = None,
    config: Annotated[str | None, typer.Option(help="serving config as JSON")] = None,
    server: ServerOpt = "http://127.0.0.1:8000",
) -> None:
    """Upload an ONNX model as a new version."""
    files = {"model": (model.name, model.read_bytes(), "application/octet-stream")}
    if calibration:
        files["calibration"] = (calibration.name, calibration.read_bytes(), "application/octet-stream")
    data = {"name": name}
    if config:
        data["config"] = config
    with _client(server) as c:
        r = c.post("/v1/models", data=data, files=files)
    _fail(r)
    body = r.json()
    console.print(f"[green]uploaded[/green] {name} version {body['version']}")


@app.command(name="models")
def list_models(server: ServerOpt = "http://127.0.0.1:8000") -> None:
    """List models, versions and variants."""
    with _client(server) as c:
        r = c.get("/v1/models")
    _fail(r)
    table = Table("model", "version", "variant", "state", "size", "default")
    for m in r.json()["models"]:
        for v in m["versions"]:
            for var in v["variants"]:
                table.add_row(
                    m["name"],
                    str(v["version"]),
                    var["name"],
                    var["state"],
                    f"{var['size_bytes'] / 1024:.1f} KiB",
                    "*" if var["name"] == v["default_variant"] else "",
                )
    console.print(table)


@app.command()
def show(name: str, server: ServerOpt = "http://127.0.0.1:8000") -> None:
    """Print one model's record as JSON."""
    with _client(server) as c:
        r = c.get(f"/v1/models/{name}")
    _fail(r)
    console.print_json(json.dumps(r.json()))


@app.command()
def worker(
    parent_pid: Annotated[int | None, typer.Option(help="exit when this process is gone")] = None,
    targets: Annotated[
        str | None,
        typer.Option(
            help="engine build targets to claim builds for: auto (this machine's CPU and GPUs), none, or a "
            "comma-separated list of this machine's targets (default: SLIMSERVE_WORKER_TARGETS or auto)"
        ),
    ] = None,
) -> None:
    """Run jobs from the catalogue: compression, and engine builds for this machine's targets (several workers
    may share one catalogue safely)."""
    import signal
    import threading
    from functools import partial

    from backends import BackendUnavailable, require_onnxruntime
    from backends.targets import resolve_targets
    from compression.optimize.job import run_optimize_job
    from compression.worker import RUNNERS, JobWorker
    from service.settings import Settings
    from service.tuning import tune

    try:
        require_onnxruntime()
    except BackendUnavailable as e:
        console.print(f"[red]slimserve worker cannot start:[/red] {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(2) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    settings = Settings()
    try:
        advertised = resolve_targets(targets if targets is not None else settings.worker_targets)
    except ValueError as e:
        console.print(f"[red]slimserve worker cannot start:[/red] --targets: {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(2) from None
    store = settings.open_store()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    JobWorker(
        store,
        # the optimize job's serving-config tuner measures service's scheduler: injected here (layering)
        runners={**RUNNERS, "optimize": partial(run_optimize_job, tuner=tune)},
        lease_s=settings.job_lease_s,
        max_attempts=settings.job_max_attempts,
        targets=tuple(t.id for t in advertised),
    ).run_forever(stop, parent_pid)
    store.close()


@app.command()
def compress(
    name: str,
    version: int,
    prune: Annotated[float | None, typer.Option(help="target sparsity 0..0.95")] = None,
    pattern: Annotated[str, typer.Option(help="unstructured or 2:4")] = "unstructured",
    quantize: Annotated[str | None, typer.Option(help="int8 calibration: minmax, entropy or percentile")] = None,
    tolerance: Annotated[float | None, typer.Option(help="max accuracy loss for int8 fallback")] = None,
    encode_bits: Annotated[int | None, typer.Option(help="weight-sharing bits 2..8 (Deep Compression)")] = None,
    calibration: Annotated[Path | None, typer.Option(help=".npz for this job")] = None,
    watch: Annotated[bool, typer.Option(help="show a live progress bar until the job ends")] = True,
    server: ServerOpt = "http://127.0.0.1:8000",
) -> None:
    """Start a compression job for one version and (by default) watch it to the end."""
    spec: dict[str, object] = {}
    if prune is not None or pattern == "2:4":
        spec["prune"] = {"pattern": pattern, **({"sparsity": prune} if prune is not None else {})}
    if quantize:
        spec["quantize"] = {"calibration": quantize, **({"tolerance": tolerance} if tolerance is not None else {})}
    if encode_bits:
        spec["encode"] = {"bits": encode_bits}
    with _client(server) as c:
        job = _start_job(c, f"/v1/models/{name}/versions/{version}/compress", spec, calibration)
        if not watch:
            return
        job = _watch(c, job)
        table = Table("variant", "size", "ratio", "sparsity", "accuracy delta", "p50 ms")
        for row in job["result"]["table"]:
            lat = row.get("latency") or {}
            delta = row.get("accuracy_delta")
            table.add_row(
                row["variant"],
                f"{row['size_bytes'] / 1024:.1f} KiB",
                f"{row['compression_ratio']:.1f}x",
                f"{row.get('sparsity') or 0:.2f}",
                "-" if delta is None else f"{delta:+.4f}",
                f"{lat.get('p50_ms', float('nan')):.3f}",
            )
        console.print(table)
        console.print(f"default variant: [bold]{job['result']['default_variant']}[/bold]")


traffic_app = typer.Typer(
    help="Traffic policies: canary splits, shadow traffic, promotion rules.", no_args_is_help=True
)
app.add_typer(traffic_app, name="traffic")


def _weights(text: str, what: str) -> dict[str, float]:
    """``a=0.9,b=0.1`` -> {"a": 0.9, "b": 0.1} (the server validates the numbers)."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise typer.BadParameter(f"{what}: expected variant=number, got {part!r}")
    return out


@traffic_app.command(name="set")
def traffic_set(
    name: str,
    version: int,
    split: Annotated[str, typer.Option(help="weights of the plain name's traffic: original=0.9,int8=0.1")],
    shadow: Annotated[str, typer.Option(help="fractions mirrored to candidates: int8=1.0")] = "",
    sticky: Annotated[str | None, typer.Option(help="header to hash for sticky routing, or request-id")] = None,
    rules: Annotated[str | None, typer.Option(help='promotion rules as JSON: {"min_samples": 500, ...}')] = None,
    dry_run: Annotated[bool, typer.Option(help="record what the rules would do, change nothing")] = False,
    server: ServerOpt = "http://127.0.0.1:8000",
) -> None:
    """Set a version's traffic policy."""
    policy: dict[str, object] = {"split": _weights(split, "--split"), "shadow": _weights(shadow, "--shadow")}
    if sticky:
        policy["sticky"] = sticky
    if rules or dry_run:
        try:
            parsed = json.loads(rules) if rules else {}
        except json.JSONDecodeError as e:
            raise typer.BadParameter(f"--rules is not JSON: {e}") from None
        policy["rules"] = {**parsed, **({"dry_run": True} if dry_run else {})}
    with _client(server) as c:
        r = c.put(f"/v1/models/{name}/versions/{version}/traffic", json=policy)
    _fail(r)
    console.print_json(json.dumps(r.json()))


@traffic_app.command(name="show")
def traffic_show(name: str, version: int, server: ServerOpt = "http://127.0.0.1:8000") -> None:
    """Print a version's traffic policy and this replica's live counters."""
    with _client(server) as c:
        r = c.get(f"/v1/models/{name}/versions/{version}/traffic")
    _fail(r)
    console.print_json(json.dumps(r.json()))


@traffic_app.command(name="clear")
def traffic_clear(name: str, version: int, server: ServerOpt = "http://127.0.0.1:8000") -> None:
    """Remove a version's traffic policy (its default variant serves every request)."""
    with _client(server) as c:
        r = c.delete(f"/v1/models/{name}/versions/{version}/traffic")
    _fail(r)
    console.print(f"traffic policy of {name} version {version} removed")


@traffic_app.command(name="decisions")
def traffic_decisions(name: str, version: int, server: ServerOpt = "http://127.0.0.1:8000") -> None:
    """Promotions and rollbacks taken by the rules, newest first."""
    with _client(server) as c:
        r = c.get(f"/v1/models/{name}/versions/{version}/traffic/decisions")
    _fail(r)
    table = Table("when", "action", "variant", "primary", "reason", "replica")
    for d in r.json()["decisions"]:
        table.add_row(d["created_at"], d["action"], d["variant"], d["primary"], escape(d["reason"]), d["replica"])
    console.print(table)


def _start_job(c: httpx.Client, url: str, spec: dict[str, object], calibration: Path | None) -> dict:
    """POST a job (JSON, or multipart with a calibration .npz) and return it."""
    if calibration:
        r = c.post(url, data={"spec": json.dumps(spec)}, files={"calibration": calibration.read_bytes()})
    else:
        r = c.post(url, json=spec)
    _fail(r)
    job = r.json()
    console.print(f"job {job['id']} queued")
    return job


def _watch(c: httpx.Client, job: dict) -> dict:
    """Poll a job to its end behind a live progress bar; exit 1 unless it succeeded."""
    import time

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("queued", total=1.0)
        while job["state"] in ("queued", "running"):
            time.sleep(0.5)
            r = c.get(f"/v1/jobs/{job['id']}")
            _fail(r)
            job = r.json()
            bar.update(task, completed=job["progress"], description=f"{job['state']}: {job['stage'] or ''}")
    if job["state"] != "succeeded":
        console.print(f"[red]job {job['state']}[/red]: {job.get('error') or ''}")
        raise typer.Exit(1)
    return job


@app.command()
def optimize(
    name: str,
    version: int,
    objective: Annotated[str, typer.Option(help="latency, throughput or size")] = "latency",
    tolerance: Annotated[float, typer.Option(help="max accuracy loss (0.01: one point top-1, or cosine 0.99)")] = 0.01,
    latency_budget_ms: Annotated[float | None, typer.Option(help="p99 budget at --concurrency")] = None,
    concurrency: Annotated[int | None, typer.Option(help="concurrent requests the budget holds at")] = None,
    targets: Annotated[str | None, typer.Option(help="comma-separated: cpu, tensorrt, cuda")] = None,
    max_trials: Annotated[int | None, typer.Option(help="most trials to run")] = None,
    max_minutes: Annotated[float | None, typer.Option(help="most minutes to search")] = None,
    metric: Annotated[str | None, typer.Option(help="override the judge: top1, cosine, relative_error, exact")] = None,
    calibration: Annotated[Path | None, typer.Option(help=".npz for this job")] = None,
    watch: Annotated[bool, typer.Option(help="show a live progress bar until the job ends")] = True,
    server: ServerOpt = "http://127.0.0.1:8000",
) -> None:
    """Search for the best variant within a tolerance (goals, not knobs) and print every trial."""
    spec: dict[str, object] = {"objective": objective, "tolerance": tolerance}
    optional = {
        "latency_budget_ms": latency_budget_ms,
        "concurrency": concurrency,
        "targets": targets.split(",") if targets else None,
        "max_trials": max_trials,
        "max_minutes": max_minutes,
        "metric": metric,
    }
    spec.update({k: v for k, v in optional.items() if v is not None})
    with _client(server) as c:
        job = _start_job(c, f"/v1/models/{name}/versions/{version}/optimize", spec, calibration)
        if not watch:
            return
        result = _watch(c, job)["result"]
    print_trials(result)


def print_trials(result: dict) -> None:
    """The optimize result as a table: every trial, the frontier (*) and the choice (>)."""
    table = Table("", "trial", "loss", "size", "ratio", "p50 ms", "p99 ms", "samples/s", "honest")
    for row in result["trials"]:
        chain = " -> ".join(name for name, _ in row.get("chain") or []) or "original"
        mark = (">" if row.get("chosen") else "") + ("*" if row.get("on_frontier") else "")
        if row.get("state") != "done":
            table.add_row(mark, chain, "failed", escape(str(row.get("error", ""))[:60]), *[""] * 5)
            continue
        table.add_row(
            mark,
            escape(chain),
            f"{row['loss']:.4f}",
            f"{row['size_bytes'] / 1024:.1f} KiB",
            f"{row['compression_ratio']:.1f}x",
            f"{row['p50_ms']:.3f}",
            f"{row['p99_ms']:.3f}",
            f"{row['throughput']:.0f}",
            {True: "yes", False: "no"}.get(row.get("honest"), ""),  # type: ignore[arg-type]
        )
    console.print(table)
    for output, j in (result.get("judgements") or {}).items():
        console.print(f"metric for {output}: [bold]{j['metric']}[/bold] ({escape(j['why'])})")
    console.print(escape(result.get("message", "")))
    if result.get("serving_config"):
        console.print(f"serving config: {json.dumps(result['serving_config'].get('config'))}")
    if result.get("plot"):
        console.print(f"plot: {result['plot']}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
