"""In-process cost of decoding KServe v2 JSON inference requests (no server, no socket).

Times ``service.v2codec.decode_request`` on FP32 requests of shape 1x4 and 1x784 (the sizes of a tabular
model and of an MNIST image), plus a 1x784 binary request for scale. Each point is the median of
``--rounds`` rounds of ``--number`` calls. With ``--baseline REV`` the codec of that git revision is timed
too, round by round in alternation with the working tree's, so both see the same machine load and the
ratio is the result (the machine is shared and noisy).

    .venv/bin/python bench/json_codec.py
    .venv/bin/python bench/json_codec.py --baseline HEAD~1 --rounds 15
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from backends import TensorSpec  # noqa: E402
from service.v2codec import decode_request  # noqa: E402


def _json_body(cols: int, rng: np.random.Generator) -> bytes:
    data = rng.standard_normal(cols).astype(np.float32).tolist()
    return orjson.dumps({"id": "1", "inputs": [{"name": "x", "shape": [1, cols], "datatype": "FP32", "data": data}]})


def _binary_body(cols: int, rng: np.random.Generator) -> tuple[bytes, str]:
    arr = rng.standard_normal((1, cols)).astype(np.float32)
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [1, cols], "datatype": "FP32", "parameters": {"binary_data_size": arr.nbytes}}
            ]
        }
    )
    return header + arr.tobytes(), str(len(header))


def _codec_at(rev: str) -> Callable[..., Any]:
    """decode_request as it was at git revision ``rev`` (loaded beside the current one, same imports)."""
    source = subprocess.run(
        ["git", "show", f"{rev}:service/v2codec.py"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "v2codec_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("v2codec_baseline", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.decode_request  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--number", type=int, default=5000)
    ap.add_argument("--baseline", metavar="REV", help="also time the codec of this git revision, interleaved")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    cases: dict[str, tuple[bytes, str | None, int]] = {
        "json 1x4": (_json_body(4, rng), None, 4),
        "json 1x784": (_json_body(784, rng), None, 784),
        "binary 1x784": (*_binary_body(784, rng), 784),
    }
    codecs: dict[str, Callable[..., Any]] = {"current": decode_request}
    if args.baseline:
        codecs = {"baseline": _codec_at(args.baseline), **codecs}
    out: dict[str, dict[str, float]] = {}
    for name, (body, hlen, cols) in cases.items():
        spec = {"x": TensorSpec("x", "FP32", (-1, cols))}
        outputs = frozenset({"y"})
        samples: dict[str, list[float]] = {c: [] for c in codecs}
        for _ in range(args.rounds):
            for cname, decode in codecs.items():

                def call(
                    decode: Callable[..., Any] = decode,
                    body: bytes = body,
                    hlen: str | None = hlen,
                    spec: dict[str, TensorSpec] = spec,
                    outputs: frozenset[str] = outputs,
                ) -> None:
                    decode(body, hlen, spec, outputs, 32)

                call()
                samples[cname].append(timeit.timeit(call, number=args.number) / args.number * 1e6)
        row = {f"{c}_median_us": statistics.median(v) for c, v in samples.items()}
        line = "  ".join(f"{c} {statistics.median(v):7.2f} us" for c, v in samples.items())
        if args.baseline:
            row["ratio"] = row["current_median_us"] / row["baseline_median_us"]
            line += f"  current/baseline {row['ratio']:.2f}x"
        out[name] = row
        print(f"{name:14s} {line}", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
