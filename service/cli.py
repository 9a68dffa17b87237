"""The ``slimserve`` command: run the server, and talk to a running one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.console import Console
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
    """Run the HTTP server (SQLite + local directory + ONNX Runtime CPU unless configured otherwise)."""
    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    overrides = {k: v for k, v in {"host": host, "port": port, "data_dir": data_dir}.items() if v is not None}
    settings = Settings(**overrides)
    console.print(f"slimserve on http://{settings.host}:{settings.port}  store: {settings.data_dir.resolve()}")
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False
    )


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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
