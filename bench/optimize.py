"""The optimize job against issue 11's bars, end to end through a real server and its job worker.

    flock /tmp/slimserve-bench.lock .venv/bin/python bench/optimize.py encoder   # tolerance 0.01, latency
    flock /tmp/slimserve-bench.lock .venv/bin/python bench/optimize.py digits    # tolerance 0.01, size

encoder: the trained all-MiniLM-L6-v2 (tests/compression/encoder.py) uploaded with 256 calibration sentences
(seed 1; the job holds a quarter out), optimized with no other hint. Then: mean cosine of the default variant
against fp32 on 256 test sentences (seed 3, in-process), stored size ratio, batch-32 latency through the server
(default variant vs ``:original``, interleaved rounds with a 95 % interval, ``compression.timing``), and the
batching bar: batch-1 requests at concurrency 32 (wrk, binary tensors) against the default variant with its
tuned serving config, as a share of in-process ONNX Runtime's batch-32 rows/s for the same model on the same
cores.

digits: the digits CNN uploaded with its 1197 training samples and labels; top-1 on the 600 held-out test samples
(never seen by the job), stored size ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402
import httpx  # noqa: E402
import numpy as np  # noqa: E402

from compression.evaluate import run_model  # noqa: E402
from compression.metrics import compare  # noqa: E402
from compression.optimize.frontier import describe  # noqa: E402
from compression.timing import compare_timings  # noqa: E402
from model_store import open_store  # noqa: E402
from service.settings import usable_cpus  # noqa: E402
from tests.compression.optimize_helpers import npz  # noqa: E402


def serve(data: Path) -> Any:
    port = common.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMSERVE_")}
    env.update({"SLIMSERVE_LOG_LEVEL": "warning", "SLIMSERVE_SYNC_INTERVAL_S": "1", "SLIMSERVE_JOB_WORKERS": "1"})
    argv = [str(common.VENV_BIN / "slimserve"), "serve", "--host", common.HOST, "--port", str(port)]
    url = f"http://{common.HOST}:{port}"
    return url, common.process(
        [*argv, "--data-dir", str(data)], env=env, cwd=ROOT, ready_url=f"{url}/v2/health/ready", log_name="optimize"
    )


def optimize(c: httpx.Client, name: str, model: bytes, calibration: bytes, goals: dict[str, Any]) -> dict[str, Any]:
    files = {"model": ("model.onnx", model), "calibration": ("cal.npz", calibration)}
    r = c.post("/v1/models", data={"name": name}, files=files)
    assert r.status_code == 201, r.text
    t0 = time.monotonic()
    job = c.post(f"/v1/models/{name}/versions/1/optimize", json=goals).json()
    while job["state"] in ("queued", "running"):
        time.sleep(2)
        job = c.get(f"/v1/jobs/{job['id']}").json()
        print(f"  {time.monotonic() - t0:6.0f}s {job['stage']} {job['progress']:.2f}", file=sys.stderr)
    assert job["state"] == "succeeded", job
    job["result"]["wall_s"] = round(time.monotonic() - t0, 1)
    return job


def runnable_of(data: Path, model: str, variant: str) -> bytes:
    """The ONNX model a variant runs, read from the server's store (the stored form may be an ENCODE artifact)."""
    store = open_store(f"sqlite:///{data / 'catalog.db'}", data / "blobs")
    try:
        record = store.catalog.get_version(model, 1).variant(variant)
        assert record is not None
        return store.blobs.get_bytes(record.runnable_sha256)
    finally:
        store.close()


def trials_table(result: dict[str, Any]) -> str:
    lines = ["| trial | loss | size MB | ratio | p50 ms b1 | p99 ms b1 | rows/s b32 | frontier | chosen | honest |"]
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for t in result["trials"]:
        chain = describe(t)
        if t.get("state") != "done":
            lines.append(f"| {chain} | failed: {t.get('error', '')[:80]} | | | | | | | | |")
            continue
        lines.append(
            f"| {chain} | {t['loss']:.4f} | {t['size_bytes'] / 1e6:.2f} | {t['compression_ratio']:.2f}x "
            f"| {t['p50_ms']:.2f} | {t['p99_ms']:.2f} | {t['throughput']:.0f} | {'*' if t['on_frontier'] else ''} "
            f"| {'>' if t['chosen'] else ''} | {t.get('honest', '')} |"
        )
    return "\n".join(lines)


def encoder(args: argparse.Namespace) -> dict[str, Any]:
    from tests.compression.encoder import OUTPUT_NAME, encoder_inputs, encoder_path

    model = encoder_path().read_bytes()
    data = common.BENCH_DIR / f"optimize-encoder-{os.getpid()}"
    url, proc = serve(data)
    out: dict[str, Any] = {}
    with proc, httpx.Client(base_url=url, timeout=600) as c:
        goals = {"tolerance": 0.01, "objective": "latency", **args.goals}
        job = optimize(c, "enc", model, npz(**encoder_inputs(256, seed=1)), goals)
        result = job["result"]
        version = c.get("/v1/models/enc/versions/1").json()
        default = version["default_variant"]
        variant = next(v for v in version["variants"] if v["name"] == default)
        runnable = runnable_of(data, "enc", default)
        test = encoder_inputs(256, seed=3)
        cos = compare(run_model(model, test)[OUTPUT_NAME], run_model(runnable, test)[OUTPUT_NAME])
        out.update(
            goals=goals,
            search_s=result["wall_s"],
            trials=len(result["trials"]),
            message=result["message"],
            default_variant=default,
            mean_cosine_test=round(cos.mean_cosine, 5),
            size_ratio=round(len(model) / variant["size_bytes"], 3),
            serving_config=(result.get("serving_config") or {}).get("config"),
        )
        print(trials_table(result))
        # batch 32 through the server: the default variant against the original, interleaved
        batch = encoder_inputs(32, seed=4)
        body, hlen = common.v2_binary_body(batch, [OUTPUT_NAME])
        headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(hlen)}

        def post(name: str) -> Any:
            return lambda: c.post(f"/v2/models/{name}/infer", content=body, headers=headers).raise_for_status()

        timing = compare_timings(post("enc"), post("enc:original"), rounds=args.rounds, calls=1)
        out["batch32_speedup_via_server"] = {
            "speedup": round(1 / timing.ratio, 3),
            "interval": [round(1 / timing.high, 3), round(1 / timing.low, 3)],
            "default_ms": round(timing.a_ms, 1),
            "original_ms": round(timing.b_ms, 1),
            "rounds": timing.rounds,
        }
        # batching: batch-1 requests at concurrency 32 vs in-process batch 32 on the same cores
        one, hlen1 = common.v2_binary_body(encoder_inputs(1, seed=5), [OUTPUT_NAME])
        h1 = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(hlen1)}
        load = common.wrk(f"{url}/v2/models/enc/infer", one, h1, concurrency=32, seconds=args.seconds, warmup=3)
    ceiling = in_process_rows_per_s(runnable, batch, usable_cpus())
    out["batching"] = {
        "rows_per_s_concurrency32_batch1": round(load.throughput, 1),
        "in_process_batch32_rows_per_s": round(ceiling, 1),
        "share": round(load.throughput / ceiling, 3),
        "p50_ms": round(load.p50_ms, 1),
        "p99_ms": round(load.p99_ms, 1),
        "p99_over_p50": round(load.p99_ms / load.p50_ms, 2),
        "errors": load.errors,
    }
    return out


def in_process_rows_per_s(model: bytes, feed: dict[str, np.ndarray], threads: int, seconds: float = 5.0) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    session = ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])
    session.run(None, feed)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        session.run(None, feed)
        n += 1
    return n * len(next(iter(feed.values()))) / (time.perf_counter() - t0)


def digits(args: argparse.Namespace) -> dict[str, Any]:
    from tests.compression import digits as D

    d = D.load_data()
    model = D.digits_model()
    x = np.concatenate([d.x_calib, d.x_train[D.N_CALIB :]])
    y = np.concatenate([d.y_calib, d.y_train[D.N_CALIB :]])
    data = common.BENCH_DIR / f"optimize-digits-{os.getpid()}"
    url, proc = serve(data)
    with proc, httpx.Client(base_url=url, timeout=600) as c:
        goals = {"tolerance": 0.01, "objective": "size", **args.goals}
        job = optimize(c, "digits", model, npz(input=x, labels=y), goals)
        result = job["result"]
        print(trials_table(result))
        version = c.get("/v1/models/digits/versions/1").json()
        default = version["default_variant"]
        variant = next(v for v in version["variants"] if v["name"] == default)
        runnable = runnable_of(data, "digits", default)
    ref = run_model(model, {"input": d.x_test})["logits"].argmax(1)
    got = run_model(runnable, {"input": d.x_test})["logits"].argmax(1)
    return {
        "goals": goals,
        "search_s": result["wall_s"],
        "trials": len(result["trials"]),
        "message": result["message"],
        "default_variant": default,
        "size_ratio_stored": round(len(model) / variant["size_bytes"], 2),
        "top1_fp32_test": round(float((ref == d.y_test).mean()) * 100, 2),
        "top1_default_test": round(float((got == d.y_test).mean()) * 100, 2),
        "delta_points": round(float((got == d.y_test).mean() - (ref == d.y_test).mean()) * 100, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=["encoder", "digits"])
    ap.add_argument("--rounds", type=int, default=20, help="interleaved batch-32 rounds through the server")
    ap.add_argument("--seconds", type=float, default=10.0, help="wrk seconds for the batching bar")
    ap.add_argument(
        "--goals", type=json.loads, default={}, help="JSON goals added to the bar's, e.g. '{\"concurrency\": 32}'"
    )
    args = ap.parse_args()
    out = encoder(args) if args.model == "encoder" else digits(args)
    out["machine"] = common.machine_notes()
    print(json.dumps(out, indent=1))
    common.save(f"optimize-{args.model}", out)


if __name__ == "__main__":
    common.run_main(main)
