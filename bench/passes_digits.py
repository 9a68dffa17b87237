"""The digits CNN's size recipe: allocation + dead channels + calibrated sharing + ENCODE, against the bars.

    .venv/bin/python bench/passes_digits.py [--ratios 30 40 50] [--runs 300]
    .venv/bin/python bench/passes_digits.py --ablation      # what calibrated sharing and dead channels buy

Bars (issue 11): >= 30x smaller stored within 1 point top-1 (moonshot 40x). Data (tests/compression/digits.py):
calibration = the 512 calibration samples (OBS, Hessians, codebooks); validation = the other 685 training samples
(the allocation's sensitivity losses); test = the 600 held-out samples, used only for the numbers printed here.
Latency: the decoded artifact against fp32, in-process ONNX Runtime, one intra-op thread, interleaved runs,
median; ratio = fp32 / variant (ENCODE decodes to dense fp32, so ~1.0 is expected).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from compression.allocation import compress_to_budget  # noqa: E402
from compression.encode import decode_model, encode_model  # noqa: E402
from compression.prune import prune_model  # noqa: E402
from tests.compression import digits as D  # noqa: E402


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def latency_ratios(reference: onnx.ModelProto, model: onnx.ModelProto, x: np.ndarray, runs: int) -> list[float]:
    """fp32 median / variant median at batch 1 and 32, runs interleaved."""
    out = []
    for batch in (1, 32):
        feed = {"input": x[:batch]}
        sessions = [session(reference), session(model)]
        times: list[list[float]] = [[], []]
        for s in sessions:
            s.run(None, feed)
        for _ in range(runs):
            for i, s in enumerate(sessions):
                t = time.perf_counter()
                s.run(None, feed)
                times[i].append(time.perf_counter() - t)
        out.append(float(np.median(times[0]) / np.median(times[1])))
    return out


def kl(reference: np.ndarray, logits: np.ndarray) -> float:
    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z.astype(np.float64) - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    ref = log_softmax(reference)
    return float((np.exp(ref) * (ref - log_softmax(logits))).sum(axis=1).mean())


def ablation() -> None:
    """Validation KL (against fp32) of plain k-means vs calibrated sharing, at one fixed allocation."""
    from compression.codebook import share_calibrated
    from compression.prune import zero_dead_channels

    data = D.load_data()
    reference = onnx.load_from_string(D.digits_model())
    original = len(reference.SerializeToString())
    calibration = {"input": data.x_calib}
    validation = data.x_train[D.N_CALIB :]
    ref_val = session(reference).run(None, {"input": validation})[0]
    layers = {"conv2.weight": 0.7, "fc1.weight": 0.9, "fc2.weight": 0.7}
    pruned, _ = prune_model(reference, 0.0, calibration=calibration, layer_sparsity=layers)
    cleaned, _ = zero_dead_channels(pruned)
    print(f"allocation {layers} (OBS); validation KL against fp32 / artifact bytes\n")
    print(
        "| bits | k-means (ENCODE alone) | OBS rounding | + least squares (pruned target) "
        "| + least squares (unpruned target) | + dead channels |"
    )
    print("|---|---|---|---|---|---|")
    for bits in (4, 3, 2):
        cells = []
        for model, calibrated, refit, target in (
            (pruned, False, False, None),
            (pruned, True, False, None),
            (pruned, True, True, None),
            (pruned, True, True, reference),
            (cleaned, True, True, reference),
        ):
            if calibrated:
                model, _ = share_calibrated(model, bits, calibration, refit=refit, reference=target)
            blob, _ = encode_model(model, bits)
            logits = session(decode_model(blob)).run(None, {"input": validation})[0]
            cells.append(f"{kl(ref_val, logits):.4f} / {len(blob):,} B ({original / len(blob):.1f}x)")
        print(f"| {bits} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[30, 40, 50], help="target size ratios")
    ap.add_argument("--runs", type=int, default=300, help="timed runs per latency measurement")
    ap.add_argument("--ablation", action="store_true", help="only the sharing / dead-channel ablation")
    args = ap.parse_args()
    if args.ablation:
        ablation()
        return

    data = D.load_data()
    reference = onnx.load_from_string(D.digits_model())
    original = len(reference.SerializeToString())
    calibration = {"input": data.x_calib}
    validation = {"input": data.x_train[D.N_CALIB :]}
    ref_test = session(reference).run(None, {"input": data.x_test})[0]
    base_acc = float((ref_test.argmax(1) == data.y_test).mean())

    def row(name: str, size: int, model: onnx.ModelProto, seconds: float, detail: str) -> list[str]:
        logits = session(model).run(None, {"input": data.x_test})[0]
        acc = float((logits.argmax(1) == data.y_test).mean())
        agree = float((logits.argmax(1) == ref_test.argmax(1)).mean())
        b1, b32 = latency_ratios(reference, model, data.x_test, args.runs)
        return [
            name,
            f"{size:,}",
            f"**{original / size:.1f}x**",
            f"{100 * acc:.2f}",
            f"**{100 * (acc - base_acc):+.2f}**",
            f"{100 * agree:.2f}",
            f"{b1:.2f}x",
            f"{b32:.2f}x",
            f"{seconds:.0f}",
            detail,
        ]

    rows = [row("fp32", original, reference, 0.0, "")]
    t = time.perf_counter()
    pruned, _ = prune_model(reference, 0.8, calibration=calibration)
    blob, _ = encode_model(pruned, 4)
    rows.append(
        row(
            "previous best: OBS 80 % uniform + ENCODE 4 bit", len(blob), decode_model(blob), time.perf_counter() - t, ""
        )
    )

    options = None
    for ratio in args.ratios:
        t = time.perf_counter()
        result, options = compress_to_budget(reference, calibration, validation, ratio, options=options)
        seconds = time.perf_counter() - t
        plan = result.allocation
        layers = ", ".join(
            f"{n.split('.')[0]} {plan.layer_sparsity[n]:.2f}/{plan.layer_bits[n]}b" for n in plan.layer_sparsity
        )
        rows.append(
            row(
                f"recipe, target {ratio:g}x",
                result.size_bytes,
                decode_model(result.artifact),
                seconds,
                f"{layers}; predicted {plan.predicted_bytes:,.0f} B",
            )
        )

    print(
        f"# digits CNN: {original:,} bytes; test {len(data.y_test)} held-out samples, fp32 top-1 {100 * base_acc:.2f} %"
    )
    print(f"python {platform.python_version()}, onnxruntime {ort.__version__}, {platform.machine()}\n")
    header = ["variant", "bytes", "ratio", "top-1 %", "Δ pts", "agree %", "lat b1", "lat b32", "build s", "allocation"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(
        "\nallocation: layer sparsity/bits; lat = fp32 median / variant median (>1 is faster); build s of the first "
        "recipe row includes measuring the per-layer sensitivity, reused by the later rows."
    )


if __name__ == "__main__":
    main()
