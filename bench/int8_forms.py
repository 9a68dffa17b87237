"""Is the CPU int8 form (`int8-cpu`) faster than the QDQ form (`int8`)? The decision a compress job makes.

Run from the repository root, holding the machine lock:

    flock /tmp/slimserve-bench.lock .venv/bin/python bench/int8_forms.py [--rounds 30] [--threads 1]

For each model it quantizes with ``compression.quantize.quantize_model`` (minmax, SmoothQuant auto), then
times the two forms against each other with ``compression.evaluate.compare_latency`` -- the interleaved A/B
comparison a job runs, with the job's one intra-op thread by default -- at batch 1. It prints the median latency
ratio cpu / qdq with its 95% interval, and whether the job would publish `int8-cpu` (the whole interval below
1 - margin). The last row of each model times the qdq form against itself: the noise floor, which must never
count as faster.

Models: a small MLP (64 -> 256 -> 10), the digits CNN (tests/compression/digits.py) and, when its
weights are installed, the all-MiniLM-L6-v2 sentence encoder (tests/compression/encoder.py, seq 128).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compression.evaluate import compare_latency  # noqa: E402
from compression.pipeline import CPU_FORM_MARGIN  # noqa: E402
from compression.quantize import quantize_model  # noqa: E402
from tests import onnx_models  # noqa: E402
from tests.compression import digits as D  # noqa: E402

Data = dict[str, np.ndarray]


def models() -> list[tuple[str, onnx.ModelProto, Data, Data]]:
    rng = np.random.default_rng(0)
    out = []
    mlp = onnx.load_from_string(onnx_models.mlp(in_dim=64, hidden=256, out_dim=10))
    x = rng.standard_normal((160, 64)).astype(np.float32)
    out.append(("mlp 64-256-10", mlp, {"x": x[:128]}, {"x": x[128:]}))
    data = D.load_data()
    digits = onnx.load_from_string(D.digits_model())
    out.append(("digits CNN", digits, {"input": data.x_calib[:256]}, {"input": data.x_test[:128]}))
    try:
        from tests.compression import encoder as E

        path = E.encoder_path()
        out.append(("MiniLM-L6 encoder", onnx.load(path), E.encoder_inputs(64, seed=1), E.encoder_inputs(32, seed=2)))
    except Exception as e:  # EncoderUnavailable, or the tokenizer missing
        print(f"(encoder skipped: {e})", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30, help="interleaved rounds per comparison")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (0: its default; jobs: 1)")
    args = ap.parse_args()
    print(f"`{' '.join(sys.argv)}` on {platform.machine()}, {time.strftime('%Y-%m-%d %H:%M')}\n")
    print("| model | A / B | ratio A/B | 95% interval | A ms | B ms | calls/timing | publish int8-cpu |")
    print("|---|---|---|---|---|---|---|---|")
    for name, model, calibration, evaluation in models():
        forms, _ = quantize_model(model, calibration, evaluation=evaluation)
        qdq, cpu = forms["qdq"].SerializeToString(), forms["cpu"].SerializeToString()
        pairs = [("cpu / qdq", cpu, qdq), ("qdq / qdq", qdq, qdq)]
        for label, a, b in pairs:
            c = compare_latency(a, b, evaluation, rounds=args.rounds, threads=args.threads)
            verdict = ("yes" if c.faster(CPU_FORM_MARGIN) else "no") if label == "cpu / qdq" else "(noise floor)"
            print(
                f"| {name} | {label} | {c.ratio:.3f} | {c.low:.3f}-{c.high:.3f} | {c.a_ms:.3f} | {c.b_ms:.3f} "
                f"| {c.calls} | {verdict} |"
            )


if __name__ == "__main__":
    main()
