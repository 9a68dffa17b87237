"""Shared helpers for the serving benchmarks: servers as child processes, load generators, result tables.

Every server a script starts runs in its own process group and is killed (SIGTERM, then SIGKILL) when the
script leaves, on an exception, on Ctrl-C and on SIGTERM. Load only ever goes to 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / ".bench"
VENV_BIN = Path(sys.executable).parent
HOST = "127.0.0.1"

_children: list[subprocess.Popen[bytes]] = []


def _kill_group(p: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    if p.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGTERM)
    try:
        p.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(5)


def _on_signal(signum: int, _frame: Any) -> None:
    for p in list(_children):
        _kill_group(p, 2.0)
    raise SystemExit(128 + signum)


def install_signal_handlers() -> None:
    """Ctrl-C raises KeyboardInterrupt (even where SIGINT was ignored, as for background jobs), which unwinds
    through the context managers that stop the servers; SIGTERM and SIGHUP kill the servers and exit."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)


def run_main(main: Callable[[], None]) -> None:
    """Run a benchmark's main(): Ctrl-C stops it (and its servers) with exit status 130, no traceback."""
    install_signal_handlers()
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted: servers stopped", file=sys.stderr)
        sys.exit(130)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def cores() -> int:
    return len(os.sched_getaffinity(0))


def pin(cpus: str | None) -> list[str]:
    """A taskset prefix for ``cpus`` (e.g. "0" or "0,1"), or nothing when cpus is None or taskset is missing."""
    if not cpus or shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", cpus]


class ServerExited(RuntimeError):
    """The server exited before it was ready (a port taken in the meantime, or a broken tree)."""


T = TypeVar("T")


#: the served config every bench server uploads: dynamic batching, no queue delay, one instance
MODEL_CONFIG = {"max_batch_size": 64, "instances": 1, "batching": {"enabled": True, "max_queue_delay_us": 0}}


def rotated(items: Sequence[T], k: int) -> list[T]:
    """``items`` starting at position ``k`` (mod its length): round k of an interleaved comparison runs them in
    this order, so no server always goes first or last."""
    k %= len(items)
    return [*items[k:], *items[:k]]


def proc_cpu(pid: int | str) -> tuple[int, float]:
    """A process's parent pid and its user + system CPU seconds (all its threads), from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def retrying(factory: Callable[[], contextlib.AbstractContextManager[Any]], attempts: int = 3) -> Iterator[Any]:
    """Enter ``factory()``, again (with new free ports) when the server exited during start-up."""
    for attempt in range(attempts):
        cm = factory()
        try:
            value = cm.__enter__()
        except ServerExited as e:
            if attempt == attempts - 1:
                raise
            print(f"warning: {e}; retrying", file=sys.stderr, flush=True)
            continue
        with contextlib.ExitStack() as stack:
            stack.push(cm)
            yield value
        return


@contextlib.contextmanager
def process(
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    ready_url: str | None = None,
    timeout: float = 120.0,
    log_name: str = "server",
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` in its own process group; wait until ``ready_url`` answers 200; kill the group on exit."""
    logs = BENCH_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{log_name}.log"
    with open(log_path, "wb") as log:
        p = subprocess.Popen(list(argv), env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    _children.append(p)
    try:
        if ready_url:
            deadline = time.monotonic() + timeout
            while True:
                if p.poll() is not None:
                    raise ServerExited(f"{argv[0]} exited with {p.returncode}; see {log_path}:\n{_tail(log_path)}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(ready_url, timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{ready_url} not ready after {timeout:.0f}s; see {log_path}")
                time.sleep(0.25)
        yield p
    finally:
        _kill_group(p)
        _children.remove(p)


def _tail(path: Path, n: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def slimserve(
    *, cpus: str | None, intra_op_threads: int | None = None, log_name: str = "slimserve"
) -> contextlib.AbstractContextManager[str]:
    """A fresh slimserve on a free port with an empty store in a temporary directory; yields its base URL."""
    return retrying(lambda: _slimserve(cpus=cpus, intra_op_threads=intra_op_threads, log_name=log_name))


#: base URL of each slimserve a script started -> its gRPC address (host:port)
GRPC_ADDRESSES: dict[str, str] = {}


def grpc_address(url: str) -> str:
    """The gRPC listener of the slimserve at ``url`` (started by ``slimserve``)."""
    return GRPC_ADDRESSES[url]


@contextlib.contextmanager
def _slimserve(*, cpus: str | None, intra_op_threads: int | None, log_name: str) -> Iterator[str]:
    port = free_port()
    grpc_port = free_port()
    env = dict(os.environ)
    env.update(
        {"SLIMSERVE_LOG_LEVEL": "warning", "SLIMSERVE_SYNC_INTERVAL_S": "60", "SLIMSERVE_GRPC_PORT": str(grpc_port)}
    )
    if intra_op_threads:
        env["SLIMSERVE_INTRA_OP_THREADS"] = str(intra_op_threads)
    for k in ("SLIMSERVE_ADMIN_TOKEN", "SLIMSERVE_INFERENCE_TOKEN", "SLIMSERVE_DATABASE_URL", "SLIMSERVE_BLOB_DIR"):
        env.pop(k, None)
    with tempfile.TemporaryDirectory(prefix="slimserve-bench-", dir=BENCH_DIR) as data:
        argv = [
            *pin(cpus),
            str(VENV_BIN / "slimserve"),
            "serve",
            "--host",
            HOST,
            "--port",
            str(port),
            "--data-dir",
            data,
        ]
        url = f"http://{HOST}:{port}"
        GRPC_ADDRESSES[url] = f"{HOST}:{grpc_port}"
        with process(argv, env=env, cwd=REPO, ready_url=f"{url}/v2/health/ready", log_name=log_name):
            yield url


def upload(url: str, name: str, model: Path, config: dict[str, Any]) -> None:
    with open(model, "rb") as f:
        r = httpx.post(
            f"{url}/v1/models",
            data={"name": name, "config": json.dumps(config)},
            files={"model": (model.name, f, "application/octet-stream")},
            timeout=120,
        )
    if r.status_code != 201:
        raise RuntimeError(f"upload of {name} failed: {r.status_code} {r.text[:500]}")


# -- request bodies ---------------------------------------------------------------------------------


def v2_json_body(inputs: dict[str, Any]) -> bytes:
    """A plain v2 JSON request (no extensions): what every v2 server accepts."""
    items = [
        {"name": n, "shape": list(a.shape), "datatype": _v2_type(a.dtype), "data": a.reshape(-1).tolist()}
        for n, a in inputs.items()
    ]
    return json.dumps({"id": "bench", "inputs": items}, separators=(",", ":")).encode()


def v2_binary_body(inputs: dict[str, Any], outputs: Sequence[str]) -> tuple[bytes, int]:
    """A request in Triton's binary tensor extension (binary inputs and outputs); returns (body, json length)."""
    items = [
        {
            "name": n,
            "shape": list(a.shape),
            "datatype": _v2_type(a.dtype),
            "parameters": {"binary_data_size": int(a.nbytes)},
        }
        for n, a in inputs.items()
    ]
    header = json.dumps(
        {
            "id": "bench",
            "inputs": items,
            "outputs": [{"name": o, "parameters": {"binary_data": True}} for o in outputs],
        },
        separators=(",", ":"),
    ).encode()
    return header + b"".join(a.tobytes() for a in inputs.values()), len(header)


def _v2_type(dtype: Any) -> str:
    return {"float32": "FP32", "int64": "INT64", "int32": "INT32", "float64": "FP64"}[str(dtype)]


# -- results ----------------------------------------------------------------------------------------


@dataclass
class Result:
    target: str  # what was measured: "in-process", "slimserve", "kserve", ...
    tool: str  # load generator: "in-process", "wrk", "perf_analyzer"
    mode: str  # request format: "binary", "json", "-"
    concurrency: int
    throughput: float  # requests per second
    p50_ms: float
    p99_ms: float
    requests: int = 0
    errors: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return (
            f"{self.target} {self.tool} {self.mode} c={self.concurrency}: {self.throughput:,.0f} req/s, "
            f"p50 {self.p50_ms:.3f} ms, p99 {self.p99_ms:.3f} ms, errors {self.errors}"
        )

    def row(self) -> list[str]:
        return [
            self.target,
            self.tool,
            self.mode,
            str(self.concurrency),
            f"{self.throughput:,.0f}",
            f"{self.p50_ms:.3f}",
            f"{self.p99_ms:.3f}",
            str(self.errors),
        ]


HEADER = ["target", "load generator", "format", "conc.", "req/s", "p50 ms", "p99 ms", "errors"]


def table(rows: Sequence[Sequence[str]], header: Sequence[str] = HEADER) -> str:
    """A Markdown table (also readable on a terminal)."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    lines = [
        "| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return "\n".join(lines)


def save(name: str, payload: dict[str, Any]) -> Path:
    out = BENCH_DIR / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(_plain(payload), indent=2))
    return path


def _plain(x: Any) -> Any:
    if isinstance(x, Result):
        return asdict(x)
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


def machine_notes() -> dict[str, Any]:
    load = os.getloadavg()
    return {
        "cores": os.cpu_count(),
        "loadavg_1m_5m_15m": [round(v, 2) for v in load],
        "python": sys.version.split()[0],
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "git": git_state(),
    }


def git_state() -> str:
    """HEAD, and whether the served code (service/, backends/) differs from it: numbers belong to a tree."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "service", "backends"], cwd=REPO, capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    return head.stdout.strip() + (" + uncommitted changes in service/ or backends/" if dirty.stdout.strip() else "")


# -- load generators --------------------------------------------------------------------------------

_WRK_LUA = """
wrk.method = "POST"
local f = assert(io.open("{body}", "rb"))
wrk.body = f:read("*a")
f:close()
{headers}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {{\\"requests\\":%d,\\"duration_us\\":%d,\\"connect\\":%d,\\"read\\":%d,\\"write\\":%d,"
    .. "\\"status\\":%d,\\"timeout\\":%d,\\"p50_us\\":%d,\\"p90_us\\":%d,\\"p99_us\\":%d,\\"mean_us\\":%.1f,"
    .. "\\"max_us\\":%d}}\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
"""


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def need_tool(name: str, package: str) -> str:
    """The path of a load generator, or exit saying which Debian package has it."""
    exe = shutil.which(name)
    if exe is None:
        raise SystemExit(f"{name} is not installed: apt-get install -y {package} (Debian package)")
    return exe


def need_wrk() -> str:
    return need_tool("wrk", "wrk")


def wrk(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    concurrency: int,
    seconds: float,
    warmup: float = 2.0,
    cpus: str | None = None,
    target: str = "",
    mode: str = "",
) -> Result:
    """Closed-loop load: ``concurrency`` connections on one wrk thread, each POSTing ``body`` back to back."""
    exe = need_wrk()
    work = BENCH_DIR / "wrk"
    work.mkdir(parents=True, exist_ok=True)
    body_path = work / f"body-{os.getpid()}-{abs(hash(body)) % 10**8}.bin"
    body_path.write_bytes(body)
    hdrs = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
    script = work / f"post-{os.getpid()}.lua"
    script.write_text(_WRK_LUA.format(body=body_path, headers=hdrs))
    threads = 1 if concurrency < 16 else 2
    base = [*pin(cpus), exe, "-t", str(threads), "-c", str(concurrency), "-s", str(script), "--timeout", "10s"]
    if warmup > 0:
        subprocess.run([*base, "-d", f"{warmup:.0f}s", url], capture_output=True, check=True, timeout=warmup + 30)
    out = subprocess.run([*base, "-d", f"{seconds:.0f}s", url], capture_output=True, text=True, timeout=seconds + 60)
    line = next((x for x in out.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout[-1000:]} {out.stderr[-1000:]}")
    d = json.loads(line.removeprefix("WRKJSON "))
    errors = d["connect"] + d["read"] + d["write"] + d["status"] + d["timeout"]
    return Result(
        target,
        "wrk",
        mode,
        concurrency,
        throughput=d["requests"] / (d["duration_us"] / 1e6),
        p50_ms=d["p50_us"] / 1e3,
        p99_ms=d["p99_us"] / 1e3,
        requests=d["requests"],
        errors=errors,
        extra={"p90_ms": d["p90_us"] / 1e3, "mean_ms": d["mean_us"] / 1e3, "max_ms": d["max_us"] / 1e3},
    )


def perf_analyzer_cmd() -> tuple[list[str], dict[str, str]] | None:
    """tritonclient 2.41.0's perf_analyzer and the environment it needs (libcudart from nvidia-cuda-runtime-cu12)."""
    exe = VENV_BIN / "perf_analyzer"
    if not exe.exists():
        return None
    env = dict(os.environ)
    with contextlib.suppress(ImportError):
        import nvidia.cuda_runtime as cr  # type: ignore[import-not-found]

        libdir = str(Path(next(iter(cr.__path__))) / "lib")
        env["LD_LIBRARY_PATH"] = libdir + os.pathsep + env.get("LD_LIBRARY_PATH", "")
    probe = subprocess.run([str(exe), "--version"], env=env, capture_output=True, text=True)
    if "error while loading shared libraries" in probe.stderr:
        return None
    return [str(exe)], env


def perf_analyzer(
    url: str,
    model: str,
    *,
    concurrency: int,
    json_mode: bool = False,
    interval_ms: int = 3000,
    cpus: str | None = None,
    target: str = "slimserve",
    extra_args: Sequence[str] = (),
    protocol: str = "http",
) -> Result:
    """perf_analyzer in sync mode at one concurrency, random input data; ``protocol`` http or grpc (``url`` is
    then the gRPC host:port).

    It first stabilises on p99 (3 windows within 20% of each other); on a machine too noisy for that it
    falls back to stabilising on the average latency within 50%. ``extra["criterion"]`` says which held.
    """
    found = perf_analyzer_cmd()
    if found is None:
        raise RuntimeError("perf_analyzer cannot run (needs tritonclient==2.41.0, nvidia-cuda-runtime-cu12, libb64-0d)")
    cmd, env = found
    csv = BENCH_DIR / "perf_analyzer" / f"pa-{os.getpid()}-{concurrency}.csv"
    csv.parent.mkdir(parents=True, exist_ok=True)
    base = [
        *pin(cpus),
        *cmd,
        "-m",
        model,
        "-u",
        url.removeprefix("http://"),
        "-i",
        protocol,
        "--concurrency-range",
        f"{concurrency}:{concurrency}",
        "-p",
        str(interval_ms),
        "-r",
        "6",
        "--input-data",
        "random",
        "-f",
        str(csv),
        *extra_args,
    ]
    if json_mode:
        base += ["--input-tensor-format=json", "--output-tensor-format=json"]
    attempts = [("p99 within 20%", ["--percentile=99", "-s", "20"]), ("avg within 50%", ["-s", "50"])]
    failures = []
    for criterion, stab in attempts:
        csv.unlink(missing_ok=True)
        out = subprocess.run([*base, *stab], env=env, capture_output=True, text=True, timeout=300)
        if out.returncode == 0 and csv.exists():
            break
        failures.append(f"{criterion}: rc={out.returncode} {out.stdout.strip().splitlines()[-1:]}")
    else:
        raise RuntimeError("perf_analyzer found no stable measurement: " + "; ".join(failures))
    lines = csv.read_text().splitlines()
    row = dict(zip(lines[0].split(","), lines[1].split(","), strict=True))
    csv.unlink()
    return Result(
        target,
        "perf_analyzer",
        "json" if json_mode else "binary",
        concurrency,
        throughput=float(row["Inferences/Second"]),
        p50_ms=float(row["p50 latency"]) / 1e3,
        p99_ms=float(row["p99 latency"]) / 1e3,
        extra={
            "criterion": criterion,
            "p90_ms": float(row["p90 latency"]) / 1e3,
            "server_queue_us": float(row.get("Server Queue", "nan")),
            "server_compute_infer_us": float(row.get("Server Compute Infer", "nan")),
        },
    )
