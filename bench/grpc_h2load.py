"""Issue 13's gRPC bars with a native load generator: h2load (nghttp2's C HTTP/2 client) drives both servers.

A gRPC unary call is an HTTP/2 POST to ``/inference.GRPCInferenceService/ModelInfer`` whose body is the
length-prefixed message (1 byte flag 0, 4-byte big-endian length, the serialized ``ModelInferRequest``), with
``content-type: application/grpc`` and ``te: trailers``. h2load sends exactly those bytes, the same for both
servers, so neither client costs Python time (bench/grpc_load.py, the grpc.aio client, spent ~1 ms of CPU per call
on the shared core and compressed the ratio). h2load sees only the HTTP status (200 even for a failed call: the
grpc-status is in the trailers), so before each run one ``tritonclient.grpc`` call checks grpc-status 0 and the
answer against in-process ONNX Runtime, and after it the server's own success counter must have moved by at least
the number of 2xx responses h2load counted (slimserve: ``slimserve_requests_total{protocol="grpc",
outcome="success"}``; MLServer: ``model_infer_request_success_total``). Latency percentiles come from h2load's
``--log-file`` (one line per request, in microseconds).

Servers on core 0, h2load (1 thread) on core 1 (``taskset``). Parts (all by default):

- ``peers``: MLP 64-256-256-10 (bench/models.py), batch 1, raw tensor contents, concurrency 8 (``-c 8 -m 1``:
  eight connections, one call in flight on each), slimserve and MLServer interleaved for ``--rounds`` rounds.
  Bar: slimserve >= 1.5x MLServer's throughput (both the ratio of the medians and the median of the per-round
  ratios) with a lower median p99.
- ``c1``: slimserve REST vs gRPC at concurrency 1, against in-process ``InferenceSession.run``, by two client
  pairs in rotating order each round: perf_analyzer -i http (binary tensors) / -i grpc, and h2load over REST
  (``--h1``, binary tensor body) / gRPC; with the server's CPU per call and its data-plane time per request
  (Triton statistics). Bar: gRPC adds no more than REST (the per-round difference of the p50s, median and range).
  Each round also times the grpc.aio floor at c=1: the floor plus the data plane against REST's whole path says
  whether any grpc.aio server could meet the bar.
- ``loop`` and ``inline`` (not in the default parts): two slimserve servers that differ in one setting, gRPC at
  c=8, interleaved rounds: SLIMSERVE_EVENT_LOOP=auto (uvloop) against asyncio, SLIMSERVE_INLINE_MAX_US=100 (inline
  runs of a cheap lone request, the default) against 0 (every request through an instance thread).
- ``tail``: the digits CNN (bench/tail.py's config), batch 1, gRPC at concurrency 32 with h2load. Bar: p99 <= 3x
  p50.

    apt-get install -y nghttp2-client    # h2load
    flock /tmp/slimserve-bench.lock .venv/bin/python bench/grpc_h2load.py [--parts peers,c1,tail] [--rounds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common
import grpc_load
import httpx
import models
import numpy as np
import overhead
import peers
import tail
from common import Result

sys.path.insert(0, str(common.REPO))

HERE = Path(__file__).resolve().parent
PATH = "/inference.GRPCInferenceService/ModelInfer"
TAIL_BAR = 3.0
WARMUP_S = 2.0  # h2load's warm-up before every measured window


def grpc_frame(model: str, inputs: dict[str, np.ndarray]) -> bytes:
    """The HTTP/2 body of one unary ModelInfer call: the gRPC length prefix and the request, raw contents."""
    msg = grpc_load.request(model, inputs)
    return struct.pack(">BI", 0, len(msg)) + msg


def need_h2load() -> str:
    return common.need_tool("h2load", "nghttp2-client")


def h2load(
    target: str,
    body: bytes,
    *,
    concurrency: int,
    seconds: float,
    warmup: float = WARMUP_S,
    cpus: str | None = None,
    name: str = "",
    rest: dict[str, str] | None = None,
) -> Result:
    """Closed-loop gRPC load: ``concurrency`` connections with one call in flight on each, for ``seconds`` after
    ``warmup``. Percentiles from the per-request log (the requests finished in the measured window).

    ``rest=headers`` sends ``body`` as a REST POST over HTTP/1.1 to the URL ``target`` instead (``--h1``): the same
    client for both protocols at concurrency 1."""
    exe = need_h2load()
    with tempfile.TemporaryDirectory(dir=common.BENCH_DIR) as tmp:
        body_path, log_path = Path(tmp, "body.bin"), Path(tmp, "requests.log")
        body_path.write_bytes(body)
        argv = [*common.pin(cpus), exe, "-t", "1", "-c", str(concurrency), "-m", "1"]
        argv += ["-D", f"{seconds:g}", "--warm-up-time", f"{warmup:g}", "-d", str(body_path)]
        argv += ["--log-file", str(log_path)]
        if rest is None:
            argv += ["-H", "content-type: application/grpc", "-H", "te: trailers", f"http://{target}{PATH}"]
        else:
            argv += ["--h1", *(x for k, v in rest.items() for x in ("-H", f"{k}: {v}")), target]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + warmup + 60)
        if out.returncode != 0:
            raise RuntimeError(f"h2load failed ({out.returncode}): {out.stdout[-1500:]} {out.stderr[-1500:]}")
        log = np.loadtxt(log_path, dtype=np.int64, ndmin=2)
    summary = _h2load_summary(out.stdout)
    ok = log[:, 1] == 200
    lat = log[ok, 2] / 1e3
    return Result(
        name,
        "h2load",
        "raw" if rest is None else "binary",
        concurrency,
        throughput=summary["2xx"] / seconds,
        p50_ms=float(np.percentile(lat, 50)),
        p99_ms=float(np.percentile(lat, 99)),
        requests=summary["2xx"],
        errors=summary["failed"] + summary["errored"] + summary["timeout"] + int((~ok).sum()),
        extra={"p90_ms": float(np.percentile(lat, 90)), "logged": len(log), "h2load_req_s": summary["req_s"]},
    )


def _h2load_summary(text: str) -> dict[str, Any]:
    m = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, "
        r"(\d+) timeout",
        text,
    )
    codes = re.search(r"status codes: (\d+) 2xx", text)
    rate = re.search(r"finished in [^,]+, ([\d.]+) req/s", text)
    if m is None or codes is None or rate is None:
        raise RuntimeError(f"unexpected h2load output: {text[-1500:]}")
    failed, errored, timeout = map(int, m.groups()[4:])
    return {
        "failed": failed,
        "errored": errored,
        "timeout": timeout,
        "2xx": int(codes.group(1)),
        "req_s": float(rate.group(1)),
    }


# -- is every answer real? ------------------------------------------------------------------------------------


def check_answer(target: str, model: str, inputs: dict[str, np.ndarray], output: str, expected: np.ndarray) -> None:
    """One tritonclient.grpc call (raw contents, as h2load sends): status OK and the in-process answer."""
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(target)
    try:
        items = []
        for name, x in inputs.items():
            item = tc.InferInput(name, list(x.shape), "FP32")
            item.set_data_from_numpy(x)
            items.append(item)
        got = client.infer(model, items).as_numpy(output)
    finally:
        client.close()
    if got is None or not np.allclose(got, expected, atol=1e-5):
        raise RuntimeError(f"{target} answered {got}, expected {expected}")


def _counter(url: str, pattern: str) -> float:
    text = httpx.get(url, timeout=10).text
    return sum(float(m.group(1)) for m in re.finditer(pattern, text, re.MULTILINE))


def slimserve_ok(url: str, protocol: str = "grpc") -> Callable[[], float]:
    pattern = (
        r'^slimserve_requests_total\{(?=[^}]*outcome="success")(?=[^}]*protocol="' + protocol + r'")[^}]*\} '
        r"([\d.e+]+)$"
    )
    return lambda: _counter(f"{url}/metrics", pattern)


INLINE_SERIES = r"^slimserve_inline_executions_total\{[^}]*\} ([\d.e+]+)$"


def mlserver_ok(metrics_url: str) -> Callable[[], float]:
    return lambda: _counter(metrics_url, r"^model_infer_request_success_total\{[^}]*\} ([\d.e+]+)$")


def counted(result: Result, before: float, after: float) -> None:
    """The server's success counter moved by at least what h2load saw answered (warm-up calls come on top)."""
    moved = after - before
    result.extra["server_counted"] = moved
    if moved < result.requests:
        raise RuntimeError(f"{result.target}: h2load counted {result.requests} answers but the server {moved:.0f}")


def cpu_seconds(marker: str) -> float:
    """User + system CPU time of the processes whose command line contains ``marker``, and their children.

    CPU time per answered call is the server's own cost, which other work on a shared core barely moves (it
    takes wall time, not the server's CPU time): the steadier measure of per-call cost on a loaded box. Read
    from /proc (Linux, as taskset) rather than adding psutil for one sum.
    """
    procs: dict[int, tuple[int, float]] = {}
    roots = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            procs[int(d.name)] = common.proc_cpu(d.name)
            if marker.encode() in (d / "cmdline").read_bytes():
                roots.add(int(d.name))
    total, frontier = 0.0, set(roots)
    while frontier:
        total += sum(procs[p][1] for p in frontier if p in procs)
        frontier = {p for p, (ppid, _) in procs.items() if ppid in frontier}
    return total


@contextlib.contextmanager
def floor_server(model: Path, cpus: str | None) -> Iterator[Target]:
    """bench/grpc_floor.py (grpc.aio answering a fixed response) on a free port; yields it as a Target."""
    import grpc

    port = common.free_port()
    argv = [*common.pin(cpus), sys.executable, str(HERE / "grpc_floor.py"), "--port", str(port), "--model", str(model)]
    with common.process(argv, cwd=common.REPO, log_name="grpc-floor"):
        target = f"{common.HOST}:{port}"
        with grpc.insecure_channel(target) as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
        yield Target(target, None, port_marker(target))


@dataclass(frozen=True)
class Target:
    """A gRPC server under load: its address, its success counter (None: it keeps none) and what names its process
    on its command line (for its CPU time, ``cpu_seconds``)."""

    address: str
    ok: Callable[[], float] | None
    marker: str


def slimserve_target(url: str) -> Target:
    return Target(common.grpc_address(url), slimserve_ok(url), port_marker(url))


def port_marker(address: str) -> str:
    """``--port <n>`` as it stands in a server's command line (NUL-separated), from its URL or address."""
    return f"--port\0{address.rsplit(':', 1)[1]}\0"


def measured(name: str, target: Target, body: bytes, concurrency: int, seconds: float, rnd: int) -> Result:
    """One checked h2load point: the server's counter must have moved by at least h2load's answers, and the
    result carries the server's CPU per call (a server without a counter: h2load's answers, warm-up included)."""
    before, cpu0 = target.ok() if target.ok else 0.0, cpu_seconds(target.marker)
    r = h2load(target.address, body, concurrency=concurrency, seconds=seconds, cpus="1", name=name)
    cpu = cpu_seconds(target.marker) - cpu0
    if target.ok:
        counted(r, before, target.ok())
    else:
        r.extra["server_counted"] = r.requests * (1 + WARMUP_S / seconds)
    r.extra.update(round=rnd, server_cpu_ms_per_call=1e3 * cpu / r.extra["server_counted"])
    return r


# -- the parts --------------------------------------------------------------------------------------------------


def part_peers(args: argparse.Namespace, model: Path) -> tuple[list[Result], list[str]]:
    inputs = models.mlp_input(1)
    expected = peers._reference(model, inputs)
    body = grpc_frame("mlp", inputs)
    results: list[Result] = []
    with contextlib.ExitStack() as stack:
        slim_url = stack.enter_context(peers.slimserve_server(model, "0"))
        mls = stack.enter_context(peers.mlserver_server(model, "0"))
        floor = stack.enter_context(floor_server(model, "0"))
        targets = {
            "slimserve": slimserve_target(slim_url),
            "mlserver": Target(mls.grpc, mlserver_ok(mls.metrics), mls.repo),
            "grpc.aio floor": floor,
        }
        for rnd in range(args.rounds):
            for name in common.rotated(list(targets), rnd):
                check_answer(targets[name].address, "mlp", inputs, models.MLP_OUTPUT, expected)
                r = measured(name, targets[name], body, args.concurrency, args.seconds, rnd)
                results.append(r)
                print(
                    f"round {rnd}: {r.line()} (server counted {r.extra['server_counted']:.0f}, "
                    f"{r.extra['server_cpu_ms_per_call']:.3f} CPU-ms per call)",
                    flush=True,
                )
    med = {n: statistics.median(r.throughput for r in results if r.target == n) for n in targets}
    p99 = {n: statistics.median(r.p99_ms for r in results if r.target == n) for n in targets}
    rng = {n: [round(r.throughput) for r in results if r.target == n] for n in targets}
    per_round = [
        a.throughput / b.throughput
        for a, b in zip(
            [r for r in results if r.target == "slimserve"], [r for r in results if r.target == "mlserver"], strict=True
        )
    ]
    cpu = {n: statistics.median(r.extra["server_cpu_ms_per_call"] for r in results if r.target == n) for n in targets}
    ratio = med["slimserve"] / med["mlserver"]
    paired = statistics.median(per_round)  # each round's pair ran back to back: drift on the box cancels
    ok = min(ratio, paired) >= peers.BAR_RATIO and p99["slimserve"] < p99["mlserver"]
    line = (
        f"c={args.concurrency} gRPC (h2load): slimserve {med['slimserve']:,.0f} req/s (rounds {rng['slimserve']}) "
        f"p99 {p99['slimserve']:.2f} ms, MLServer {med['mlserver']:,.0f} req/s (rounds {rng['mlserver']}) p99 "
        f"{p99['mlserver']:.2f} ms: ratio of medians {ratio:.2f}x, median of per-round ratios {paired:.2f}x (range "
        f"{min(per_round):.2f}-{max(per_round):.2f}x) -> {'PASS' if ok else 'FAIL'}"
    )
    cpu_line = (
        f"server CPU per call (median): slimserve {cpu['slimserve']:.3f} ms, MLServer {cpu['mlserver']:.3f} ms: "
        f"MLServer spends {cpu['mlserver'] / cpu['slimserve']:.2f}x slimserve's CPU per call"
    )
    fl = "grpc.aio floor"
    floor_line = (
        f"grpc.aio floor (fixed answer, no decode/model): {med[fl]:,.0f} req/s, {cpu[fl]:.3f} CPU-ms per call "
        f"(approx.); slimserve reaches {med['slimserve'] / med[fl]:.2f}x of it, MLServer "
        f"{med['mlserver'] / med[fl]:.2f}x; the most any grpc.aio server can be over MLServer here: "
        f"{med[fl] / med['mlserver']:.2f}x"
    )
    return results, [line, cpu_line, floor_line]


def data_plane(url: str) -> tuple[int, int]:
    """The server's own count and total time (ns) of successful requests, begin to succeed: decode, scheduler, model,
    encode (Triton's statistics extension)."""
    stats = httpx.get(f"{url}/v2/models/mlp/stats", timeout=10).json()["model_stats"][0]
    success = stats["inference_stats"]["success"]
    return success["count"], success["ns"]


def part_c1(args: argparse.Namespace, model: Path) -> tuple[list[Result], list[str]]:
    """Five points per round, in rotating order: perf_analyzer -i http / -i grpc, h2load over REST (HTTP/1.1,
    binary tensor body) / gRPC, each with the server's CPU time per call and its data-plane time per request; and
    h2load against the grpc.aio floor (bench/grpc_floor.py), what grpc.aio costs before any work is done."""
    inputs = models.mlp_input(1)
    expected = peers._reference(model, inputs)
    bin_body, hlen = common.v2_binary_body(inputs, [models.MLP_OUTPUT])
    hdrs = {"content-type": "application/octet-stream", "inference-header-content-length": str(hlen)}
    grpc_body = grpc_frame("mlp", inputs)
    results: list[Result] = []
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(peers.slimserve_server(model, "0"))
        floor = stack.enter_context(floor_server(model, "0"))
        grpc_target = common.grpc_address(url)
        marker = port_marker(url)
        counters = {"REST": slimserve_ok(url, "rest"), "gRPC": slimserve_ok(url, "grpc")}

        def perf_analyzer(proto: str) -> Result:
            return common.perf_analyzer(
                url if proto == "REST" else grpc_target,
                "mlp",
                concurrency=1,
                interval_ms=2000,
                cpus="1",
                target=f"slimserve {proto}",
                protocol="http" if proto == "REST" else "grpc",
            )

        def with_h2load(proto: str) -> Result:
            name = f"slimserve {proto}"
            if proto == "REST":
                rest_url = f"{url}/v2/models/mlp/infer"
                return h2load(rest_url, bin_body, concurrency=1, seconds=args.seconds, cpus="1", name=name, rest=hdrs)
            return h2load(grpc_target, grpc_body, concurrency=1, seconds=args.seconds, cpus="1", name=name)

        points = [(t, p) for t in ("perf_analyzer", "h2load") for p in ("REST", "gRPC")] + [("h2load", "floor")]
        for rnd in range(args.rounds):
            check_answer(grpc_target, "mlp", inputs, models.MLP_OUTPUT, expected)
            check_answer(floor.address, "mlp", inputs, models.MLP_OUTPUT, expected)
            for tool, proto in common.rotated(points, rnd):
                if proto == "floor":
                    r = measured("grpc.aio floor", floor, grpc_body, 1, args.seconds, rnd)
                    results.append(r)
                    print(f"round {rnd}: {r.line()}", flush=True)
                    continue
                before, cpu0, (n0, ns0) = counters[proto](), cpu_seconds(marker), data_plane(url)
                r = (perf_analyzer if tool == "perf_analyzer" else with_h2load)(proto)
                calls = counters[proto]() - before
                n1, ns1 = data_plane(url)
                if tool == "h2load":
                    counted(r, before, before + calls)
                r.extra.update(
                    round=rnd,
                    server_cpu_ms_per_call=1e3 * (cpu_seconds(marker) - cpu0) / calls,
                    data_plane_ms=(ns1 - ns0) / (n1 - n0) / 1e6,
                )
                results.append(r)
                print(
                    f"round {rnd}: {r.line()} ({r.extra['server_cpu_ms_per_call']:.3f} server CPU-ms per call, "
                    f"data plane {r.extra['data_plane_ms']:.3f} ms)",
                    flush=True,
                )
    (inproc,) = overhead.in_process(model, args.seconds, [1], "0")
    print(inproc.line(), flush=True)
    lines = []
    for tool in ("perf_analyzer", "h2load"):
        mine = [r for r in results if r.tool == tool]
        rest = [r for r in mine if r.target == "slimserve REST"]
        grpc = [r for r in mine if r.target == "slimserve gRPC"]
        diff = [g.p50_ms - r.p50_ms for g, r in zip(grpc, rest, strict=True)]
        cpu = {
            n: statistics.median(r.extra["server_cpu_ms_per_call"] for r in rs)
            for n, rs in (("REST", rest), ("gRPC", grpc))
        }
        verdict = "PASS" if max(diff) <= 0 else "FAIL" if min(diff) > 0 else "within noise (the sign varies by round)"
        lines.append(
            f"c=1 {tool}: over in-process p50 {inproc.p50_ms:.3f} ms REST adds "
            f"{statistics.median(r.p50_ms for r in rest) - inproc.p50_ms:.3f} ms, gRPC adds "
            f"{statistics.median(r.p50_ms for r in grpc) - inproc.p50_ms:.3f} ms (medians of {len(rest)} rounds); "
            f"gRPC - REST per round: median {statistics.median(diff):+.3f} ms, range {min(diff):+.3f} to "
            f"{max(diff):+.3f} ms -> {verdict}; server CPU per call REST {cpu['REST']:.3f} ms, "
            f"gRPC {cpu['gRPC']:.3f} ms"
        )
    lines.append(_c1_ceiling(results))
    return [*results, inproc], lines


def _c1_ceiling(results: list[Result]) -> str:
    """Whether any grpc.aio server could meet the c=1 bar (h2load, per round): it answers no sooner than the floor
    (grpc.aio doing no work) plus the data plane (the same code as REST's; the smaller of the two protocols' times, a
    lower bound), against REST's whole path."""
    by = {
        name: [r for r in results if r.tool == "h2load" and r.target == name]
        for name in ("slimserve REST", "slimserve gRPC", "grpc.aio floor")
    }
    rest, grpc, floor = by["slimserve REST"], by["slimserve gRPC"], by["grpc.aio floor"]
    least = [
        f.p50_ms + min(r.extra["data_plane_ms"], g.extra["data_plane_ms"]) - r.p50_ms
        for r, g, f in zip(rest, grpc, floor, strict=True)
    ]
    med = statistics.median
    if min(least) > 0:
        verdict = "above 0 in every round: no grpc.aio server running this data plane can add as little as REST"
    elif max(least) <= 0:
        verdict = "at or below 0 in every round: grpc.aio leaves room, the rest of the gap is slimserve's"
    else:
        verdict = "the sign varies by round: the bar sits at grpc.aio's floor, within noise"
    return (
        f"c=1 ceiling (h2load, medians): grpc.aio floor p50 {med(f.p50_ms for f in floor):.3f} ms (no decode, no "
        f"model); data plane per request (server statistics) REST {med(r.extra['data_plane_ms'] for r in rest):.3f} "
        f"ms, gRPC {med(g.extra['data_plane_ms'] for g in grpc):.3f} ms; REST's whole path p50 "
        f"{med(r.p50_ms for r in rest):.3f} ms. Floor + data plane - REST p50, per round: median {med(least):+.3f} ms "
        f"(range {min(least):+.3f} to {max(least):+.3f}): {verdict}"
    )


#: the A/B parts: a setting, its two values (the first is the default), and what each value is called
AB_PARTS = {
    "loop": ("SLIMSERVE_EVENT_LOOP", ("auto", "asyncio"), "event loop: uvloop / asyncio"),
    "inline": ("SLIMSERVE_INLINE_MAX_US", ("100", "0"), "inline runs: on (100 us) / off"),
}


def part_ab(args: argparse.Namespace, model: Path, part: str) -> tuple[list[Result], list[str]]:
    """Two slimserve servers that differ in one setting (AB_PARTS), gRPC at c=8, interleaved rounds."""
    var, values, title = AB_PARTS[part]
    inputs = models.mlp_input(1)
    expected = peers._reference(model, inputs)
    body = grpc_frame("mlp", inputs)
    results: list[Result] = []
    with contextlib.ExitStack() as stack:
        urls = {}
        for value in values:
            os.environ[var] = value  # the child server reads it (common.slimserve copies environ)
            try:
                urls[f"slimserve {var}={value}"] = stack.enter_context(peers.slimserve_server(model, "0"))
            finally:
                del os.environ[var]
        for rnd in range(args.rounds):
            for name in common.rotated(list(urls), rnd):
                target = slimserve_target(urls[name])
                check_answer(target.address, "mlp", inputs, models.MLP_OUTPUT, expected)
                r = measured(name, target, body, args.concurrency, args.seconds, rnd)
                results.append(r)
                print(
                    f"{part} round {rnd}: {r.line()} ({r.extra['server_cpu_ms_per_call']:.3f} CPU-ms per call)",
                    flush=True,
                )
        # how many executions each server ran on its event loop, of the requests it answered
        inline = {name: (_counter(f"{url}/metrics", INLINE_SERIES), slimserve_ok(url)()) for name, url in urls.items()}
    a = [r for r in results if r.target.endswith(f"={values[0]}")]
    b = [r for r in results if r.target.endswith(f"={values[1]}")]
    ratios = [x.throughput / y.throughput for x, y in zip(a, b, strict=True)]
    cpu = [y.extra["server_cpu_ms_per_call"] / x.extra["server_cpu_ms_per_call"] for x, y in zip(a, b, strict=True)]
    line = (
        f"{title}, gRPC c={args.concurrency}: throughput ratio per round "
        f"{', '.join(f'{x:.2f}' for x in ratios)} (median {statistics.median(ratios):.2f}x); CPU per call "
        f"{var}={values[1]} / {var}={values[0]}: median {statistics.median(cpu):.2f}x; inline executions / gRPC "
        f"successes: {', '.join(f'{n} {i:,.0f} / {ok:,.0f}' for n, (i, ok) in inline.items())}"
    )
    return results, [line]


def part_tail(args: argparse.Namespace) -> tuple[list[Result], list[str]]:
    results: list[Result] = []
    x = {"input": tail.DIGIT}
    body = grpc_frame("digits", x)
    with tail.digits_server("tail-h2load") as (url, model):
        expected = peers._reference(model, x)
        target = slimserve_target(url)
        for rnd in range(args.tail_rounds):
            check_answer(target.address, "digits", x, "logits", expected)
            r = measured("slimserve gRPC", target, body, 32, args.seconds, rnd)
            results.append(r)
            print("tail round", rnd, end=": ")
            tail.report(r)
    ratios = [r.p99_ms / r.p50_ms for r in results]
    med = statistics.median(ratios)
    line = (
        f"tail c=32 gRPC (h2load, digits CNN): p99/p50 median {med:.2f} (rounds "
        f"{', '.join(f'{x:.2f}' for x in ratios)}), {statistics.median(r.throughput for r in results):,.0f} req/s "
        f"-> {'PASS' if med <= TAIL_BAR else 'FAIL'}"
    )
    return results, [line]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="peers,c1,tail")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of peers and c1 (default 5)")
    ap.add_argument("--tail-rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    need_h2load()
    parts = args.parts.split(",")
    notes = common.machine_notes()
    print(f"machine: {notes}", flush=True)
    model = models.write(common.BENCH_DIR / "models")["mlp"]
    results: list[Result] = []
    lines: list[str] = []
    for part in parts:
        rs, ls = {
            "peers": lambda: part_peers(args, model),
            "c1": lambda: part_c1(args, model),
            "tail": lambda: part_tail(args),
            "loop": lambda: part_ab(args, model, "loop"),
            "inline": lambda: part_ab(args, model, "inline"),
        }[part]()
        results += rs
        lines += ls
        for line in ls:
            print(line, flush=True)
    print(common.table([r.row() for r in results]))
    for line in lines:
        print(line)
    notes["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    path = common.save("grpc_h2load", {"results": results, "summary": lines, "machine": notes, "args": vars(args)})
    print(f"raw results: {path.relative_to(common.REPO)}")


if __name__ == "__main__":
    common.run_main(main)
