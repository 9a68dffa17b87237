"""Fixtures: a real slimserve process (uvicorn on 127.0.0.1, a free port) and HTTP clients."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

# One BLAS thread in the test process and in every process it starts (set before numpy loads): on a 2-core
# machine shared by the suite's own servers, OpenBLAS's spinning threads made a 0.5 s sklearn fit take 9 s.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

ROOT = Path(__file__).resolve().parent.parent
POSTGRES_URL = os.environ.get("SLIMSERVE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    port: int
    data_dir: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    grpc_port: int = 0  # 0: the gRPC listener is off
    extra_args: list[str] = field(default_factory=list)

    def start(self, timeout: float = 60.0) -> None:
        assert self.proc is None or self.proc.poll() is not None
        self.log = self.data_dir.parent / f"server-{self.port}.log"
        out = open(self.log, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port), "--data-dir", str(self.data_dir)],
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not become ready:\n{self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, timeout=60, headers=headers)


ServerFactory = Callable[..., Server]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that starts a server (through ``server_factory``) ``server``: the fast tier
    (``make test-fast``) is everything else."""
    for item in items:
        if "server_factory" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.server)


@pytest.fixture(scope="session")
def server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    started: list[Server] = []

    def make(start: bool = True, data_dir: Path | None = None, **env: str) -> Server:
        port = free_port()
        d = data_dir or tmp_path_factory.mktemp("slimserve")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMSERVE_")}
        full_env.update(
            {
                "SLIMSERVE_SYNC_INTERVAL_S": "0.5",
                "SLIMSERVE_JOB_WORKERS": "0",
                "PYTHONUNBUFFERED": "1",
                "SLIMSERVE_GRPC_PORT": str(free_port()),  # never the default 8001: servers run side by side
                **env,
            }
        )
        s = Server(f"http://127.0.0.1:{port}", port, d, full_env, grpc_port=int(full_env["SLIMSERVE_GRPC_PORT"]))
        started.append(s)
        if start:
            s.start()
        return s

    yield make
    for s in started:
        s.stop(signal.SIGKILL)


@pytest.fixture(scope="session")
def server(server_factory: ServerFactory) -> Server:
    """One shared server for tests that only add uniquely named models."""
    return server_factory()


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def upload(
    client: httpx.Client, name: str, model: bytes, config: str | None = None, calibration: bytes | None = None
) -> httpx.Response:
    files = {"model": ("model.onnx", model, "application/octet-stream")}
    if calibration is not None:
        files["calibration"] = ("calib.npz", calibration, "application/octet-stream")
    data = {"name": name}
    if config is not None:
        data["config"] = config
    return client.post("/v1/models", data=data, files=files)


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 90.0) -> Any:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` and the last value at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout} s (last: {last!r})")


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of the first ``name`` series in a /metrics text carrying every one of ``labels`` (None: none)."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


@functools.cache
def _postgres_problem() -> str | None:
    """Why PostgreSQL cannot be used here (None: it can), asked once per test session."""
    try:
        import psycopg  # noqa: F401
        from sqlalchemy import create_engine, text

        eng = create_engine(POSTGRES_URL)
        with eng.connect() as c:
            c.execute(text("select 1"))
        eng.dispose()
        return None
    except Exception as e:
        return f"PostgreSQL is not reachable at {POSTGRES_URL}: {type(e).__name__}: {' '.join(str(e).split())[:200]}"


@contextlib.contextmanager
def fresh_postgres_database(prefix: str = "slimserve_test") -> Iterator[str]:
    """A uniquely named PostgreSQL database (helpers and parallel runs share the server), dropped afterwards.

    Skips the calling test, with the reason, where PostgreSQL is absent. Tests use the ``postgres_url``
    fixture; module-scoped fixtures use this directly.
    """
    problem = _postgres_problem()
    if problem:
        pytest.skip(problem)
    from sqlalchemy import create_engine, text

    db = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text(f"CREATE DATABASE {db}"))
        try:
            yield POSTGRES_URL.rsplit("/", 1)[0] + f"/{db}"
        finally:
            with admin.connect() as c:
                c.execute(text(f"DROP DATABASE {db} WITH (FORCE)"))
    finally:
        admin.dispose()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """The URL of a fresh PostgreSQL database for this test (skipped where PostgreSQL is absent)."""
    with fresh_postgres_database() as url:
        yield url
