"""Transport abuse against a real server over raw sockets: header caps, header deadline, keep-alive, aborts.

Each server runs with short settings (2 KiB of headers, 20 header fields, 0.5 s to send them, 0.5 s of
keep-alive) so every case ends quickly; the tests wait for what the server does (an answer, a closed socket, a
counter) with deadlines far above those settings, never for a fixed time. Both of uvicorn's parsers are
covered: httptools (installed) and h11 (the fallback, with httptools hidden by a module that fails to import).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from tests.conftest import Server, ServerFactory, upload
from tests.hardening.helpers import rss_bytes
from tests.onnx_models import mlp

MAX_HEADER_BYTES = 2048
MAX_HEADERS = 20
HEADER_TIMEOUT_S = 0.5
DEADLINE_S = 20.0  # far above every setting: only a server that never acts runs into it
LIMITS = {
    "SLIMSERVE_MAX_HEADER_BYTES": str(MAX_HEADER_BYTES),
    "SLIMSERVE_MAX_HEADERS": str(MAX_HEADERS),
    "SLIMSERVE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
    "SLIMSERVE_KEEP_ALIVE_TIMEOUT_S": "0.5",
}


@pytest.fixture(scope="module", params=["httptools", "h11"])
def edge(request: pytest.FixtureRequest, server_factory: ServerFactory, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    env = dict(LIMITS)
    if request.param == "h11":
        hide = tmp_path_factory.mktemp("no-httptools")
        (hide / "httptools").mkdir()
        (hide / "httptools" / "__init__.py").write_text("raise ImportError('httptools hidden by the test')\n")
        env["PYTHONPATH"] = str(hide)
    s = server_factory(**env)
    with s.client() as c:
        assert upload(c, "edge-mlp", mlp()).status_code == 201
    return s


def _connect(s: Server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", s.port), timeout=DEADLINE_S)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    out = b""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk
    raise AssertionError(f"the server kept the connection open for {DEADLINE_S} s; got {out[:200]!r}")


def _metrics(s: Server) -> str:
    return httpx.get(f"{s.url}/metrics", timeout=10).text


def _value(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _refused(s: Server, reason: str) -> float:
    return _value(_metrics(s), "slimserve_http_refused_total", reason=reason)


# -- header caps -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [4 * 1024, 1 << 20], ids=["4KiB", "1MiB"])
def test_an_oversized_header_is_refused_with_431(edge: Server, size: int) -> None:
    before = _refused(edge, "header_bytes")
    with _connect(edge) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n")
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"2048-byte limit" in answer
    assert _refused(edge, "header_bytes") == before + 1


def test_a_16_mib_header_is_refused_without_being_buffered(edge: Server) -> None:
    """The head is counted read by read: the server answers 431 after the first reads and drops the rest, so
    its peak memory does not grow by the header's size (it did by 15 MB before the cap)."""
    assert edge.proc is not None
    peak_before = rss_bytes(edge.proc.pid, "VmHWM")
    with _connect(edge) as sock:

        def send() -> None:
            with contextlib.suppress(OSError):  # the server may close before the last byte: that is the point
                sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (16 << 20) + b"\r\n\r\n")

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        answer = _read_until_closed(sock)
        sender.join(DEADLINE_S)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    growth = rss_bytes(edge.proc.pid, "VmHWM") - peak_before
    assert growth < 4 << 20, f"peak RSS grew by {growth >> 10} KiB"


def test_a_head_split_over_many_small_headers_counts_every_byte(edge: Server) -> None:
    lines = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 150) for i in range(15))  # 15 fields, ~2.4 KiB
    with _connect(edge) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + lines + b"\r\n")
        assert _read_until_closed(sock).startswith(b"HTTP/1.1 431 ")


def test_too_many_header_fields_are_refused_with_431(edge: Server) -> None:
    before = _refused(edge, "header_count")
    lines = b"".join(b"X-%d: 1\r\n" % i for i in range(MAX_HEADERS + 5))
    with _connect(edge) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + lines + b"\r\n")
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"more than 20 header fields" in answer
    assert _refused(edge, "header_count") == before + 1


def test_requests_within_the_caps_are_served_on_one_connection(edge: Server) -> None:
    lines = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 40) for i in range(MAX_HEADERS - 1))  # 20 fields, ~1.2 KiB
    request = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + lines + b"\r\n"
    with _connect(edge) as sock:
        for _ in range(3):  # keep-alive: each head gets a fresh count
            sock.sendall(request)
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(65536)
            assert head.startswith(b"HTTP/1.1 200 "), head[:200]
            while not head.endswith(b'{"live":true}'):
                head += sock.recv(65536)
    with httpx.Client(base_url=edge.url, timeout=10) as c:  # and an ordinary client is unaffected
        r = c.post(
            "/v2/models/edge-mlp/infer",
            json={"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]},
        )
        assert r.status_code == 200, r.text


# -- header deadline and keep-alive ----------------------------------------------------------------------


def test_a_connection_that_sends_nothing_is_closed(edge: Server) -> None:
    before = _refused(edge, "header_timeout")
    with _connect(edge) as sock:
        assert _read_until_closed(sock) == b""
    assert _refused(edge, "header_timeout") == before + 1


def test_trickled_headers_get_408_and_a_closed_connection(edge: Server) -> None:
    """Several sockets each send a byte every 50 ms, forever: the deadline runs from the start of the head,
    so every one is answered 408 and closed although bytes keep arriving."""
    socks = [_connect(edge) for _ in range(5)]
    stop = threading.Event()

    def trickle(sock: socket.socket) -> None:
        data = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 10_000
        for byte in data:
            if stop.is_set():
                return
            try:
                sock.send(bytes([byte]))
            except OSError:
                return  # the server closed it
            time.sleep(0.05)

    threads = [threading.Thread(target=trickle, args=(s,), daemon=True) for s in socks]
    try:
        for t in threads:
            t.start()
        answers = [_read_until_closed(s) for s in socks]
    finally:
        stop.set()
        for s in socks:
            s.close()
    for a in answers:
        assert a.startswith(b"HTTP/1.1 408 "), a[:200]


def test_an_idle_kept_alive_connection_is_closed(edge: Server) -> None:
    with _connect(edge) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        everything = _read_until_closed(sock)  # the answer, then the close once the connection idles
    assert everything.startswith(b"HTTP/1.1 200 ") and everything.endswith(b'{"live":true}')


# -- client aborts ---------------------------------------------------------------------------------------


def _abort(edge: Server, head: bytes, body_part: bytes) -> None:
    """Send a head that declares a longer body than follows, then close: the server has parsed the head (the
    bytes arrive before the FIN), so its handler is reading the body when it learns the client is gone."""
    with _connect(edge) as sock:
        sock.sendall(head + body_part)


def _body_head(method_path: str, length: int, content_type: str) -> bytes:
    return (
        f"{method_path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def test_a_client_that_disconnects_mid_body_is_an_abort_not_an_error(edge: Server) -> None:
    routes = {
        "/v2/models/{model_name}/infer": _body_head("POST /v2/models/edge-mlp/infer", 10_000, "application/json"),
        "/v1/models": _body_head("POST /v1/models", 100_000, "multipart/form-data; boundary=xyz"),
        "/v1/models/{name}/versions/{version}/compress": _body_head(
            "POST /v1/models/edge-mlp/versions/1/compress", 10_000, "application/json"
        ),
    }
    parts = {
        "/v2/models/{model_name}/infer": b'{"inputs": [{"name": "x", "shape": [1, 4], ',
        "/v1/models": b'--xyz\r\nContent-Disposition: form-data; name="name"\r\n\r\nabc\r\n--xyz\r\n',
        "/v1/models/{name}/versions/{version}/compress": b'{"prune": {"spar',
    }
    log_before = edge.log.read_text() if edge.log else ""
    before = {r: _value(_metrics(edge), "slimserve_client_aborts_total", route=r) for r in routes}
    for route, head in routes.items():
        _abort(edge, head, parts[route])
    _wait_for(
        lambda: all(_value(_metrics(edge), "slimserve_client_aborts_total", route=r) == before[r] + 1 for r in routes),
        "one abort counted per route",
    )
    text = _metrics(edge)
    labels = {"model": "edge-mlp", "variant": "original"}
    assert _value(text, "slimserve_requests_total", outcome="server_error", **labels) == 0
    assert _value(text, "slimserve_inflight_requests", **labels) == 0
    assert edge.log is not None
    new_log = edge.log.read_text()[len(log_before) :]
    abort_lines = [line for line in new_log.splitlines() if "disconnected before sending its whole request" in line]
    assert len(abort_lines) == 3, new_log
    assert "Traceback" not in new_log and "Exception in ASGI application" not in new_log, new_log


def test_the_settings_are_validated(server_factory: ServerFactory) -> None:
    s = server_factory(start=False, SLIMSERVE_MAX_HEADERS="0")
    with pytest.raises(RuntimeError, match="max_headers"):
        s.start(timeout=30)
