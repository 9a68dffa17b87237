"""Weight-only block quantization (MatMulNBits, 4 or 8 bits) through ``onnxruntime.quantization``.

``MatMulNBitsQuantizer`` stores each MatMul weight as 4- or 8-bit integers with one float scale (and, when
asymmetric, a zero point) per ``block_size`` consecutive input channels; ORT runs it as the ``MatMulNBits``
contrib op, which with ``accuracy_level=4`` quantizes the activations to int8 per block on the fly and uses the
int8 dot-product kernels (AVX-512 VNNI here), and with 0/1 dequantizes the weights to fp32.

Where it stands on this CPU (ORT 1.32, MiniLM encoder, docs/benchmarks/passes-encoder.md):

* **4-bit**: the smallest encoder (18.9 MB with int8 embeddings, 4.8x) but mean cosine 0.95-0.97 (round-to-
  nearest; block 32 or 128, symmetric or not): outside a 0.01 tolerance, and not faster than fp32 (1.0-1.1x). In
  the space for the *size* objective at looser tolerances, and for memory-bound models (large weights, batch 1)
  that this encoder is not.
* **8-bit**: cosine 0.9990 (block 128) / 0.9996 (block 32), 23 MB, but 1.2-1.4x fp32 at batch 32 against 2.2x+
  for the int8 MatMul paths: a frontier point for *accuracy* at int8 size, not for latency.

Needs the ``onnx-ir`` package (a dependency of ORT's quantizer module, declared in slimserve's ``compression``
extra). Large Gather tables are left alone here (``compression.embeddings`` stores them as int8).
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx

BLOCK_SIZES = (16, 32, 64, 128, 256)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # 0: unset (fp32 compute), 1 fp32, 2 fp16, 3 bf16, 4 int8 activations


@dataclass
class WeightOnlyReport:
    bits: int
    block_size: int
    symmetric: bool
    accuracy_level: int
    nodes_quantized: int
    nodes_left: list[dict] = field(default_factory=list)  # MatMuls with a float weight left alone, with why

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def quantize_weight_only(
    model: onnx.ModelProto,
    bits: int = 4,
    block_size: int = 32,
    symmetric: bool = True,
    accuracy_level: int = 4,
    exclude: list[str] | None = None,
) -> tuple[onnx.ModelProto, WeightOnlyReport]:
    """MatMulNBits for every MatMul with a constant 2-D float weight (except nodes named in ``exclude``)."""
    if bits not in (4, 8) or isinstance(bits, bool):
        raise ValueError(f"bits must be 4 or 8 (what ORT's MatMulNBits CPU kernels take), got {bits!r}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size!r}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise ValueError(f"accuracy_level must be one of {ACCURACY_LEVELS}, got {accuracy_level!r}")
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )
    except ImportError as e:  # onnx-ir missing, or an ORT without the quantizer
        raise RuntimeError(f"weight-only quantization needs ORT's MatMulNBitsQuantizer (onnx-ir): {e}") from e
    work = onnx.ModelProto()
    work.CopyFrom(model)
    kept = {vi.name for vi in work.graph.value_info}
    before = _float_matmuls(work)
    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size,
        is_symmetric=symmetric,
        accuracy_level=accuracy_level,
        bits=bits,
        op_types_to_quantize=("MatMul",),
    )
    quantizer = MatMulNBitsQuantizer(
        work,
        bits=bits,
        block_size=block_size,
        is_symmetric=symmetric,
        accuracy_level=accuracy_level,
        nodes_to_exclude=list(exclude or []),
        algo_config=config,
        op_types_to_quantize=("MatMul",),
    )
    with _quiet():
        quantizer.process()
    out = quantizer.model.model
    annotations = [vi for vi in out.graph.value_info if vi.name in kept]
    del out.graph.value_info[:]  # as for the int8 passes: no SkipLayerNormalization fusion at load
    out.graph.value_info.extend(annotations)
    after = _float_matmuls(out)
    report = WeightOnlyReport(
        bits, block_size, symmetric, accuracy_level, sum(1 for n in out.graph.node if n.op_type == "MatMulNBits")
    )
    for name, why in after.items():
        report.nodes_left.append({"name": name, "reason": "excluded" if name in (exclude or []) else why})
    if not report.nodes_quantized and before:
        report.nodes_left.append({"name": "*", "reason": "ORT's quantizer took none of the MatMuls"})
    return out, report


def _float_matmuls(model: onnx.ModelProto) -> dict[str, str]:
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits:
            w = inits[n.input[1]]
            if w.data_type == onnx.TensorProto.FLOAT:
                out[n.name] = "weight is not 2-D" if len(w.dims) != 2 else "left by the quantizer"
    return out


@contextlib.contextmanager
def _quiet() -> Any:
    logger = logging.getLogger("onnxruntime.quantization")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)
