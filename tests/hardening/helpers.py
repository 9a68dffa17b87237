"""Helpers for the hardening tests: store snapshots, process memory, bounded servers."""

from __future__ import annotations

import contextlib
import resource
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import Server

TOKEN = "hardening-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: address-space cap for servers that are fed hostile models: if a defence ever regresses, the server
#: fails an allocation instead of taking the shared machine down. A test server maps about 0.6 GiB of
#: address space after an upload and an inference (measured), so 4 GiB leaves room for real work.
SERVER_ADDRESS_SPACE = 4 << 30


@dataclass(frozen=True)
class StoreState:
    blobs: frozenset[str]
    temporaries: tuple[str, ...]
    models: int
    versions: int
    variants: int
    referenced: frozenset[str]
    model_names: tuple[str, ...]

    def rows(self) -> tuple[int, int, int]:
        return (self.models, self.versions, self.variants)


def store_state(data_dir: Path) -> StoreState:
    """Blob files and catalogue rows of a server's local store (SQLite), read directly from disk."""
    blob_root = data_dir / "blobs"
    blobs = frozenset(p.name for p in (blob_root / "sha256").rglob("*") if p.is_file())
    tmp_dir = blob_root / "tmp"
    temporaries = tuple(sorted(p.name for p in tmp_dir.iterdir())) if tmp_dir.exists() else ()
    db = data_dir / "catalog.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        models = con.execute("select count(*) from models").fetchone()[0]
        versions = con.execute("select count(*) from versions").fetchone()[0]
        variants = con.execute("select count(*) from variants").fetchone()[0]
        referenced = {r[0] for r in con.execute("select sha256 from variants")}
        referenced |= {r[0] for r in con.execute("select runnable_sha256 from variants") if r[0]}
        referenced |= {r[0] for r in con.execute("select calibration_sha256 from versions") if r[0]}
        names = tuple(r[0] for r in con.execute("select name from models order by name"))
    finally:
        con.close()
    return StoreState(blobs, temporaries, models, versions, variants, frozenset(referenced), names)


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """Resident set size of a process (VmHWM: its peak so far), from /proc (no psutil needed)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (Linux /proc)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def cmdline(pid: int) -> str:
    with contextlib.suppress(FileNotFoundError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return ""


@contextlib.contextmanager
def child_address_space(limit: int) -> Iterator[None]:
    """Processes started inside this block inherit an address-space (RLIMIT_AS) soft limit.

    Only the soft limit is lowered, and only while the block runs, so this process gets it back.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    new = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (new, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def start_bounded(server: Server, limit: int = SERVER_ADDRESS_SPACE) -> None:
    with child_address_space(limit):
        server.start()


def wait_ready(url: str, timeout: float = 30.0) -> float:
    """Poll /v2/health/ready until 200; returns the seconds it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"{url} not ready after {timeout}s")


def infer_body(rows: int = 1, dim: int = 4, value: float = 0.5) -> dict[str, object]:
    return {"inputs": [{"name": "x", "shape": [rows, dim], "datatype": "FP32", "data": [value] * (rows * dim)}]}


def slow_model(dim: int = 256, tokens: int = 384, depth: int = 32, seed: int = 0) -> bytes:
    """x[N, dim] -> tiled to [N, tokens, dim] -> (tanh(. W))^depth -> mean over tokens -> y[N, dim].

    A deliberately slow model with a small interface: requests carry ``dim`` floats while each one costs
    2 * tokens * dim^2 * depth FLOPs (1.6 GFLOP by default: about 11 ms on one core here). One shared
    weight keeps the file small.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = (np.random.default_rng(seed).standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32)
    nodes = [
        helper.make_node("Unsqueeze", ["x", "axis1"], ["x3"]),
        helper.make_node("Tile", ["x3", "reps"], ["h0"]),
    ]
    prev = "h0"
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [prev, "w"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"h{i + 1}"]))
        prev = f"h{i + 1}"
    nodes.append(helper.make_node("ReduceMean", [prev, "axis1"], ["y"], keepdims=0))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", dim])],
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
            numpy_helper.from_array(np.array([1, tokens, 1], np.int64), "reps"),
        ],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m.SerializeToString()
