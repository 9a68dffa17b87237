"""The compression passes an "optimize for me" search may combine: their knobs, ranges, order, and why each is in.

Each ``Pass`` declares its knobs as a small typed grid. A knob with ``loss_grows`` set is monotone in accuracy
loss along its grid (``"up"``: more loss as the value rises, e.g. sparsity; ``"down"``: more loss as it falls,
e.g. bits), so a search can bisect it against a tolerance instead of trying every value. ``order`` fixes where a
pass runs in a chain (lower first); ``exclusive`` lists passes that do the same job differently (one of them per
chain). ``check_chain`` validates and orders a chain of pass names.

Numbers in the ``why`` comments are from docs/benchmarks/passes-encoder.md and passes-digits.md (MiniLM
encoder: all-MiniLM-L6-v2, fp32 90.3 MB; digits CNN: 283,786 parameters, 1.14 MB; ONNX Runtime 1.32 on a
2-core AVX-512 VNNI CPU).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

Objective = Literal["latency", "throughput", "size"]


@dataclass(frozen=True)
class Knob:
    name: str
    values: tuple[object, ...]  # the grid a search walks, in order
    default: object
    loss_grows: Literal["up", "down"] | None = None  # monotone in loss along ``values``; None: no order
    doc: str = ""


@dataclass(frozen=True)
class Pass:
    name: str
    entry: str  # "module:function"
    order: int  # position in a chain (lower runs first)
    knobs: tuple[Knob, ...]
    objectives: tuple[Objective, ...]  # what it can improve
    targets: tuple[str, ...]  # runtimes whose artifacts it makes: "cpu" (ORT CPU), "tensorrt", "cuda"
    needs_data: bool  # calibration / evaluation samples
    why: str  # why it is in the space (or out, for OUT_OF_SPACE)
    exclusive: tuple[str, ...] = field(default_factory=tuple)

    def knob(self, name: str) -> Knob:
        return next(k for k in self.knobs if k.name == name)


PASSES: dict[str, Pass] = {
    p.name: p
    for p in (
        Pass(
            "fuse_transformer",
            "compression.graph_opt:fuse_transformer",
            order=10,
            knobs=(
                Knob("attention", (False, True), True, doc="Attention fusion (then QAttention under dynamic int8)"),
                Knob("skip_layer_norm", (False,), False, doc="kept off: measured slower (see why)"),
            ),
            objectives=("latency", "throughput"),
            targets=("cpu",),
            needs_data=False,
            why="Attention fusion made fp32 1.04-1.13x faster and is the fastest int8 path once quantized dynamically "
            "(QAttention). Before quantization: after it, ORT's matchers no longer see the MatMul/Add patterns. "
            "SkipLayerNormalization stays off: Attention+SkipLN ran 1.01x where Attention alone ran 1.13x.",
        ),
        Pass(
            "prune",
            "compression.prune:prune_model",
            order=20,
            knobs=(
                Knob("sparsity", (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95), 0.7, "up"),
                Knob("pattern", ("unstructured", "2:4"), "unstructured", doc="2:4 only pays on sparse tensor cores"),
                Knob("scope", ("per_layer", "global"), "per_layer"),
            ),
            objectives=("size",),
            targets=("cpu", "tensorrt", "cuda"),
            needs_data=True,
            why="OBS-reconstructed pruning: digits -0.33 pt at 70 %, uniform 90 % -4 pt. Size only: ORT's CPU "
            "kernels are dense, so sparsity alone changes neither size (dense storage) nor latency; it pays "
            "through share + encode. Superseded by 'allocate' when a size budget is the goal.",
            exclusive=("allocate",),
        ),
        Pass(
            "allocate",
            "compression.allocation:measure + allocate, then prune_model(layer_sparsity=...)",
            order=20,
            knobs=(Knob("target_ratio", (10, 15, 20, 25, 30, 35, 40, 50, 60), 30, "up", "stored-size budget"),),
            objectives=("size",),
            targets=("cpu", "tensorrt", "cuda"),
            needs_data=True,
            why="Per-layer sparsity and bits from measured single-layer sensitivity under a byte budget: digits "
            "40.7x at -0.17 pt where uniform 80 % + 4 bit gave 22.3x at -0.67. The budget is the one monotone "
            "knob; the search bisects it.",
            exclusive=("prune",),
        ),
        Pass(
            "dead_channels",
            "compression.prune:zero_dead_channels",
            order=15,
            knobs=(),
            objectives=("size",),
            targets=("cpu", "tensorrt", "cuda"),
            needs_data=False,
            why="Exact (calibration-exact with data): zeroes producer rows no consumer reads. Digits: 103 of 256 fc1 "
            "units never fire on calibration, 37.6 % of all weights. Runs first (so allocation prices the real "
            "layers) and again, without data, after pruning (allocation.compress_to_budget does both).",
        ),
        Pass(
            "int8_dynamic",
            "compression.dynamic:quantize_dynamic_int8",
            order=30,
            knobs=(
                Knob("smooth_alpha", ("auto", None, 0.5, 0.75, 0.9), "auto", doc="chosen on evaluation samples"),
                Knob("embeddings", (False, True), True, "up", "per-row int8 Gather tables (3.9x vs 1.6x smaller)"),
            ),
            objectives=("latency", "throughput", "size"),
            targets=("cpu",),
            needs_data=True,
            why="With Attention fused: 1.96-2.11x fp32 at batch 32 (2 threads; 2.3x in 1-thread CPU time), cosine "
            "0.998 with SmoothQuant 0.75 + per-channel weights. ORT's defaults (per-tensor, no smoothing: cosine "
            "0.964) are out for tolerance 0.01; per-channel alone 0.993.",
            exclusive=("int8_static", "weight_only", "share", "encode"),
        ),
        Pass(
            "int8_static",
            "compression.quantize:quantize_model",
            order=30,
            knobs=(
                Knob("calibration", ("minmax", "percentile", "entropy"), "minmax", doc="all 0.998 once smoothed"),
                Knob("smooth_alpha", ("auto", None, 0.5, 0.75, 0.9), "auto"),
                Knob("tolerance", (0.0, 0.002, 0.005, 0.01, 0.02), 0.01, "up", "op-wise fallback to float"),
                Knob("embeddings", (False, True), True, "up", "per-row int8 Gather tables"),
            ),
            objectives=("latency", "throughput", "size"),
            targets=("cpu", "tensorrt"),
            needs_data=True,
            why="QDQ with SmoothQuant + fallback: cosine 0.998, 1.89-2.02x fp32 at batch 32 (2 threads), 3.9x smaller "
            "with int8 embeddings; the `qdq` form is what TensorRT consumes. ORT's static defaults (all ops, per "
            "tensor) collapse to cosine 0.34: out.",
            exclusive=("int8_dynamic", "weight_only", "share", "encode"),
        ),
        Pass(
            "weight_only",
            "compression.weight_only:quantize_weight_only",
            order=30,
            knobs=(
                Knob("bits", (8, 4), 4, "up", "grid runs 8 -> 4: loss grows along it"),
                Knob("block_size", (16, 32, 64, 128, 256), 32, "up"),
                Knob("symmetric", (True, False), True),
                Knob("accuracy_level", (4, 0), 4, doc="4: int8 compute (VNNI); 0: fp32 compute"),
            ),
            objectives=("size",),
            targets=("cpu", "cuda"),
            needs_data=False,
            why="MatMulNBits: 4-bit is the smallest encoder (18.9 MB) but cosine 0.95-0.97 and 1.0-1.1x fp32 speed; "
            "8-bit cosine 0.999 at 1.2-1.4x. A size point for loose tolerances, not a latency point on this CPU.",
            exclusive=("int8_dynamic", "int8_static", "share", "encode"),
        ),
        Pass(
            "share",
            "compression.codebook:share_calibrated",
            order=40,
            knobs=(
                Knob("bits", (5, 4, 3, 2, 1), 4, "up", "grid runs 5 -> 1: loss grows along it"),
                Knob("refit", (True, False), True, doc="least-squares centroids"),
            ),
            objectives=("size",),
            targets=("cpu", "tensorrt", "cuda"),
            needs_data=True,
            why="OBS rounding onto the k-means codebook + least-squares centroids: the digits model's validation KL "
            "at 4 bits 0.0043 -> 0.0019 over plain k-means, at 2 bits 0.029 -> 0.0085. Float weights out, so it "
            "feeds encode, never int8.",
            exclusive=("int8_dynamic", "int8_static", "weight_only"),
        ),
        Pass(
            "encode",
            "compression.encode:encode_model",
            order=50,
            knobs=(Knob("bits", (8, 6, 5, 4, 3, 2), 4, "up", "lossless when 'share' ran first"),),
            objectives=("size",),
            targets=("cpu", "tensorrt", "cuda"),
            needs_data=False,
            why="Deep Compression storage (codebooks, gap-coded positions, rANS within 0.1 % of entropy): the size "
            "pass. Decoded to dense fp32 to run, so no latency gain.",
            exclusive=("int8_dynamic", "int8_static", "weight_only"),
        ),
    )
}

# Measured and left out of the space (kept here so a search, and a reader, knows why).
OUT_OF_SPACE: dict[str, str] = {
    "int8_dynamic_ort_defaults": "per-tensor weights, no SmoothQuant: encoder cosine 0.964 (out for 0.01)",
    "int8_static_ort_defaults": "every op quantized, per tensor: encoder cosine 0.34, 0.79x fp32 speed",
    "int8_qoperator": "QOperator U8S8: cosine 0.932 (no float residual path) and slower than QDQ (195 vs 169 ms)",
    "embeddings_dequantize_first": "DequantizeLinear(axis=0) before the Gather: ORT dequantizes the whole table "
    "every run (+46 MB, +6 ms at batch 1); gather-then-dequantize is what compression.embeddings writes",
    "multi_head_attention_fusion": "MHA + static QDQ projections: 1.69x fp32 vs 2.23x without the fusion",
    "skip_layer_norm_fusion": "ORT 1.32's SkipLayerNormalization is slower here (Attention+SkipLN 1.01x vs 1.13x)",
    "ort_offline_optimized_graph": "ORT_ENABLE_EXTENDED/ALL saved offline: the same rewrites ORT does at load, "
    "so no run-time gain; ALL is CPU-specific and the file is tied to one ORT version",
    "position_context_coding": "per-input-channel density model for pruned positions: saves ~7 % of position "
    "bytes before its ~0.6 KB table on digits; not worth a format change",
    "fp16": "GPU targets only (no GPU here to measure); belongs to the TensorRT/CUDA engine build",
}


def check_chain(names: Iterable[str]) -> list[str]:
    """The passes of a chain in run order; unknown names, repeats and exclusive pairs raise ValueError."""
    chain = list(names)
    unknown = [n for n in chain if n not in PASSES]
    if unknown:
        raise ValueError(f"unknown pass(es) {unknown}; known: {sorted(PASSES)}")
    if len(set(chain)) != len(chain):
        raise ValueError(f"a pass appears twice in {chain}")
    for a in chain:
        clash = [b for b in chain if b in PASSES[a].exclusive]
        if clash:
            raise ValueError(f"{a} and {clash[0]} do the same job differently: choose one")
    return sorted(chain, key=lambda n: PASSES[n].order)


# The best measured recipes: the search's starting points (bench/passes_encoder.py, bench/passes_digits.py).
RECIPES: dict[str, list[tuple[str, dict[str, object]]]] = {
    "transformer-latency-cpu": [
        ("fuse_transformer", {"attention": True, "skip_layer_norm": False}),
        ("int8_dynamic", {"smooth_alpha": "auto", "embeddings": True}),
    ],
    "transformer-tensorrt": [("int8_static", {"calibration": "minmax", "smooth_alpha": "auto", "embeddings": True})],
    "cnn-size": [
        ("dead_channels", {}),
        ("allocate", {"target_ratio": 40}),
        ("share", {"bits": 4, "refit": True}),
        ("encode", {"bits": 8}),
    ],
}
