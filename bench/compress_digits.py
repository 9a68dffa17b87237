"""Compression results on the digits CNN: PRUNE (magnitude vs OBS reconstruction), ENCODE, and both.

    .venv/bin/python bench/compress_digits.py [--runs 200] [--threads 1]

Prints Markdown tables: accuracy on the 600 held-out samples (never used for training or calibration),
agreement with the fp32 model, stored size, and ONNX Runtime CPU latency; then the per-stream entropy
accounting of the ENCODE artifacts. The trained model is cached under tests/.cache/ (trained on first use).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402

from compression.encode import encode_model  # noqa: E402
from compression.evaluate import evaluate_variant, measure_latency  # noqa: E402
from compression.prune import prune_model  # noqa: E402
from tests.compression import digits as D  # noqa: E402

PRUNE_GRID = [  # (sparsity, pattern, scope)
    (0.5, "unstructured", "per_layer"),
    (0.7, "unstructured", "per_layer"),
    (0.7, "unstructured", "global"),
    (0.8, "unstructured", "per_layer"),
    (0.85, "unstructured", "per_layer"),
    (0.9, "unstructured", "per_layer"),
    (0.5, "2:4", "per_layer"),
]
ENCODE_GRID = [(0.0, 4), (0.0, 5), (0.7, 4), (0.7, 5), (0.8, 3), (0.8, 4), (0.8, 5), (0.85, 4)]  # (sparsity, bits)


def row(cells: list[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(header: list[str], rows: list[list[object]]) -> str:
    return "\n".join([row(header), row(["---"] * len(header)), *(row(r) for r in rows)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200, help="timed runs per latency measurement")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (0: its default)")
    args = ap.parse_args()

    data = D.load_data()
    ref_bytes = D.digits_model()
    ref = onnx.load_from_string(ref_bytes)
    feeds, labels = {"input": data.x_test}, data.y_test
    calib = {"input": data.x_calib}

    def latency(model_bytes: bytes) -> tuple[float, float, float, float]:
        one = measure_latency(model_bytes, feeds, batch_size=1, runs=args.runs, threads=args.threads)
        big = measure_latency(model_bytes, feeds, batch_size=64, runs=max(args.runs // 4, 10), threads=args.threads)
        return one["p50_ms"], one["p99_ms"], big["p50_ms"], big["p99_ms"]

    def line(name: str, candidate: bytes, seconds: float, lat: bool = True) -> list[object]:
        r = evaluate_variant(ref_bytes, candidate, feeds, labels)
        p = r["primary"]
        lat_cells = [f"{v:.3f}" for v in latency(candidate)] if lat else ["", "", "", ""]
        return [
            name,
            f"{r['sparsity']:.3f}",
            f"{r['size_bytes']:,}",
            f"{r['size_ratio']:.1f}x",
            f"{100 * p['accuracy_candidate']:.2f}",
            f"{100 * (p['accuracy_candidate'] - p['accuracy_reference']):+.2f}",
            f"{100 * p['top1_agreement']:.2f}",
            f"{p['mean_cosine']:.5f}",
            *lat_cells,
            f"{seconds:.1f}",
        ]

    header = [
        "variant",
        "sparsity",
        "bytes",
        "ratio",
        "top-1 %",
        "Δ pts",
        "agree %",
        "cosine",
        "p50 b1 ms",
        "p99 b1 ms",
        "p50 b64 ms",
        "p99 b64 ms",
        "time s",
    ]
    print(f"# digits CNN: {sum(t.ByteSize() for t in ref.graph.initializer):,} bytes of initializers; ", end="")
    print(f"{len(data.y_test)} held-out samples, {len(data.y_calib)} calibration samples")
    print(f"python {platform.python_version()}, {platform.machine()}, latency threads={args.threads}\n")

    prune_rows = [line("fp32 original", ref_bytes, 0.0)]
    pruned: dict[float, onnx.ModelProto] = {}
    for sparsity, pattern, scope in PRUNE_GRID:
        for method, c in (("magnitude", None), ("OBS", calib)):
            t0 = time.perf_counter()
            model, _ = prune_model(ref, sparsity, pattern, calibration=c, scope=scope)  # type: ignore[arg-type]
            dt = time.perf_counter() - t0
            if method == "OBS" and pattern == "unstructured" and scope == "per_layer":
                pruned[sparsity] = model
            label = f"{pattern} {sparsity:.0%} {scope.replace('_', '-')} {method}"
            prune_rows.append(line(label, model.SerializeToString(), dt, lat=sparsity in (0.7, 0.5)))
    print("## PRUNE (dense fp32 storage)\n")
    print(table(header, prune_rows) + "\n")

    enc_rows, stream_rows = [], []
    for sparsity, bits in ENCODE_GRID:
        model = pruned[sparsity] if sparsity else ref
        t0 = time.perf_counter()
        blob, rep = encode_model(model, bits)
        dt = time.perf_counter() - t0
        name = f"{'OBS ' + format(sparsity, '.0%') + ' + ' if sparsity else ''}encode {bits}-bit"
        bpw = 8 * rep.stream_bytes / max(sum(la["weights"] for la in rep.layers), 1)
        enc_rows.append([*line(name, blob, dt, lat=False)[:8], f"{bpw:.3f}", f"{rep.overhead_bytes:,}", f"{dt:.1f}"])
        for la in rep.layers:
            for s in ("code", "gap"):
                b, h = la[f"{s}_bytes"], la[f"{s}_entropy_bytes"]
                gap = f"{100 * (b / h - 1):+.2f}%" if h else "(0 entropy)"
                stream_rows.append([name, la["name"], s, la["nonzeros"], f"{h:,.1f}", f"{b:,}", gap])
    print("## PRUNE + ENCODE (one artifact; decoded to run)\n")
    print(table([*header[:8], "stream bits/weight", "overhead bytes", "time s"], enc_rows) + "\n")
    print("## ENCODE streams vs their order-0 entropy (bar: coded <= 1.03 x entropy)\n")
    cols = ["variant", "layer", "stream", "nonzeros", "entropy bytes", "coded bytes", "over entropy"]
    print(table(cols, stream_rows))
    worst = max((float(r[-1].rstrip("%")) for r in stream_rows if r[-1].endswith("%")), default=0.0)
    print(f"\nworst stream: {worst:+.2f}% over its entropy")


if __name__ == "__main__":
    main()
