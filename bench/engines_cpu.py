"""What the CPU engine (ONNX Runtime's offline-optimized graph, built by the `build` job) changes for a replica.

Run from the repository root, holding the machine lock:

    flock /tmp/slimserve-bench.lock .venv/bin/python bench/engines_cpu.py [--rounds 5] [--runs 200]

For the digits CNN and the MiniLM-shaped encoder (tests/compression; seq 128) it builds the engine in both formats
with the job's own builder (``compression.engine_build.build_onnxruntime_cpu``: ORT format and optimized ONNX),
packs and installs it as a replica does, then loads each form through ``backends.load_backend`` -- the code a
replica runs -- in interleaved rounds (plain, engine-ort, engine-onnx; the order rotates each round):

* load: ``load_backend`` (session creation; the plain model is optimized at ORT_ENABLE_ALL here, the engine is
  loaded with optimizations off);
* warm-up: the first inference, on zeros (what a replica does before it serves);
* first request: the next inference, on a real input, batch 1;
* steady state: the median of ``--runs`` inferences at batch 1 (and at batch 8 for the encoder).

Each form is compared with the plain model as the median of per-round ratios (engine / plain), with the smallest
and largest ratio of the rounds: the machine is shared, so only ratios within a round mean much. The outputs of
every form are compared with the plain model's too.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends import BackendOptions, load_backend  # noqa: E402
from backends.engine_artifacts import install, pack  # noqa: E402
from backends.engines import EngineKey, RuntimeVersions  # noqa: E402
from backends.targets import cpu_target  # noqa: E402
from compression.engine_build import Build, build_onnxruntime_cpu  # noqa: E402
from model_store import sha256_bytes  # noqa: E402
from service.settings import usable_cpus  # noqa: E402

FORMS = ("plain", "engine-ort", "engine-onnx")


def models() -> dict[str, tuple[bytes, dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """name -> (model, one real input at batch 1, the same at batch 8)."""
    from tests.compression import digits, encoder

    out = {}
    x = digits.load_data().x_test
    out["digits CNN"] = (digits.digits_model(), {"input": x[:1]}, {"input": x[:8]})
    try:
        enc = encoder.encoder_path().read_bytes()
    except Exception as e:  # the MiniLM weights are a test extra
        print(f"(encoder skipped: {e})", file=sys.stderr)
    else:
        try:
            feeds = encoder.encoder_inputs(8)
        except encoder.EncoderUnavailable:  # no tokenizer installed: token ids drawn from the vocabulary
            ids = np.random.default_rng(0).integers(1000, 30000, (8, encoder.SEQ_LEN), dtype=np.int64)
            feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        out["MiniLM encoder"] = (enc, {k: v[:1] for k, v in feeds.items()}, feeds)
    return out


def build(model: bytes, fmt: str, folder: Path) -> Path:
    """The artifact as the job makes it, installed as a replica installs it."""
    key = EngineKey(
        variant_sha256=sha256_bytes(model),
        builder="onnxruntime-cpu",
        target=cpu_target().id,
        precision=None,
        runtime=RuntimeVersions.detect().for_builder("onnxruntime-cpu"),
        profile=None,
        build_options={"format": fmt, "graph_optimization_level": "ORT_ENABLE_ALL"},
    )
    out = folder / f"build-{fmt}"
    out.mkdir()
    t0 = time.perf_counter()
    facts = build_onnxruntime_cpu(Build(key, model, cpu_target(), RuntimeVersions(), out, None, lambda *_: None))  # type: ignore[arg-type]
    seconds = time.perf_counter() - t0
    manifest = {"digest": key.digest, "key": key.to_dict(), "load": facts.pop("load"), "format": fmt, "build": facts}
    pack(out, manifest, folder / f"{fmt}.tar")
    install(folder / f"{fmt}.tar", folder / f"engine-{fmt}")
    print(f"  built {fmt}: {seconds:.3f} s, {(folder / f'{fmt}.tar').stat().st_size / 1e6:.2f} MB")
    return folder / f"engine-{fmt}"


def measure(model: bytes, opts: BackendOptions, one: dict[str, Any], batch: dict[str, Any], runs: int) -> dict:
    t0 = time.perf_counter()
    b = load_backend("onnxruntime-cpu", model, opts)
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    b.warmup()
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = b.infer(one)
    first = time.perf_counter() - t0
    lat = []
    for _ in range(runs):
        t0 = time.perf_counter()
        b.infer(one)
        lat.append(time.perf_counter() - t0)
    lat8 = []
    for _ in range(max(10, runs // 20)):
        t0 = time.perf_counter()
        b.infer(batch)
        lat8.append(time.perf_counter() - t0)
    b.unload()
    return {
        "load": load,
        "warmup": warm,
        "first": first,
        "p50": statistics.median(lat),
        "p50_b8": statistics.median(lat8),
        "out": out,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    threads = usable_cpus()
    print(f"# CPU engine vs plain model: {platform.processor() or platform.machine()}, {cpu_target().id}, "
          f"{threads} intra-op threads, {args.rounds} rounds\n")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="slimserve-bench-") as tmp:
        for name, (model, one, batch) in models().items():
            print(f"## {name} ({len(model) / 1e6:.1f} MB)")
            folder = Path(tmp) / name.replace(" ", "-")
            folder.mkdir()
            engine_dirs = {"engine-ort": build(model, "ort", folder), "engine-onnx": build(model, "onnx", folder)}
            options = {
                f: BackendOptions(intra_op_threads=threads, extra={"engine_dir": str(d)} if d else {})
                for f, d in {"plain": None, **engine_dirs}.items()
            }
            rows: dict[str, list[dict]] = {f: [] for f in FORMS}
            for r in range(args.rounds):
                order = FORMS[r % 3 :] + FORMS[: r % 3]
                for form in order:
                    rows[form].append(measure(model, options[form], one, batch, args.runs))
            report(rows)


def report(rows: dict[str, list[dict]]) -> None:
    metrics = [("load", "load"), ("warmup", "warm-up"), ("first", "first request"), ("p50", "p50 batch 1"),
               ("p50_b8", "p50 batch 8")]  # fmt: skip
    print("\n| measure | plain (median ms) | engine-ort (ms) | ort / plain | engine-onnx (ms) | onnx / plain |")
    print("|---|---|---|---|---|---|")
    for key, label in metrics:
        cells = [f"{statistics.median(x[key] for x in rows['plain']) * 1e3:.3f}"]
        for form in ("engine-ort", "engine-onnx"):
            ratios = [e[key] / p[key] for e, p in zip(rows[form], rows["plain"], strict=True)]
            med = statistics.median(x[key] for x in rows[form]) * 1e3
            cells += [f"{med:.3f}", f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"]
        print(f"| {label} | " + " | ".join(cells) + " |")
    for form in ("engine-ort", "engine-onnx"):
        diffs = [
            float(np.abs(e["out"][k].astype(np.float64) - p["out"][k]).max())
            for e, p in zip(rows[form], rows["plain"], strict=True)
            for k in p["out"]
        ]
        print(f"\n{form}: largest output difference from the plain model: {max(diffs):.3g}")
    print()


if __name__ == "__main__":
    main()
