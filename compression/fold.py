"""Constant folding before a stage looks for weights, with ONNX Runtime's own offline optimizer.

Exporters often compute weights in the graph: ``Reshape(Constant)``, ``Transpose(W)``, ``ConstantOfShape``, a
``Cast`` of an fp16 initializer. Prune, quantize and encode find weights as initializers feeding MatMul, Gemm
and Conv, so on such a model they would find "nothing to quantize". ONNX Runtime folds these subgraphs when it
loads a model. Its optimizer, run at ``ORT_ENABLE_BASIC`` with ``optimized_model_filepath``, writes the same
folded graph to a file.

Why ONNX Runtime and not onnx-simplifier or onnxscript's optimizer: it is already a dependency, and it is the
runtime that serves the variants, so the folded graph is exactly what it would build at load. The basic level's
rewrites do not depend on the execution provider, and they keep to standard ONNX operators: constant folding,
redundant-node elimination, and Conv + BatchNormalization / Add / Mul fused into Conv. The result is checked
(no operator domain the model did not already use, ``onnx.checker`` passes); a result that fails the check is
not used.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import onnx

MAX_FOLD_BYTES = 1_800_000_000  # protobuf's 2 GB limit on the serialized model ORT reads and writes back
log = logging.getLogger(__name__)


def has_constant_subgraph(model: onnx.ModelProto) -> bool:
    """True when a node of the main graph computes a value from constants only (what folding removes)."""
    g = model.graph
    overridable = {i.name for i in g.input}  # an initializer that is also an input can be fed: not constant
    constants = {t.name for t in g.initializer if t.name not in overridable}
    for node in g.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            return True
        used = [i for i in node.input if i]
        if used and all(i in constants for i in used):
            return True
    return False


def fold_constants(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """The model with its constant subgraphs folded, and a note saying what was done (None: nothing to fold).

    The input model is returned unchanged when it has nothing to fold, or when folding fails or would change
    the model into something other than plain ONNX (the note says why).
    """
    if not has_constant_subgraph(model):
        return model, None
    if model.ByteSize() > MAX_FOLD_BYTES:
        return model, "constant subgraphs left unfolded: the model is too large to fold in memory"
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="slimserve-fold-") as tmp:
        path = Path(tmp) / "folded.onnx"
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(path)
        try:
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            folded = onnx.load(str(path))
        except Exception as e:  # onnxruntime's and protobuf's own exception types
            log.info("constant folding failed: %s", e)
            return model, f"constant subgraphs left unfolded: ONNX Runtime could not fold them ({str(e)[:200]})"
    problem = _not_plain(model, folded)
    if problem:
        log.warning("constant folding result not used: %s", problem)
        return model, f"constant subgraphs left unfolded: the folded graph {problem}"
    return folded, (
        f"constant subgraphs folded by ONNX Runtime (basic level): {len(model.graph.node)} -> "
        f"{len(folded.graph.node)} nodes"
    )


def _not_plain(original: onnx.ModelProto, folded: onnx.ModelProto) -> str | None:
    """Restore what the optimizer drops or adds to the model's header; say why the result is unusable, if so."""
    domains = {o.domain or "" for o in original.opset_import}
    new = sorted({n.domain for n in folded.graph.node if (n.domain or "") not in domains | {"ai.onnx"}})
    if new:
        return f"uses operator domains {new} that the model did not"
    # ORT lists every domain it knows in opset_import and clears the producer: keep the model's own.
    del folded.opset_import[:]
    folded.opset_import.extend(original.opset_import)
    folded.ir_version = original.ir_version
    for name in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(folded, name, getattr(original, name))
    del folded.metadata_props[:]
    folded.metadata_props.extend(original.metadata_props)
    folded.graph.name = original.graph.name
    if _interface(folded) != _interface(original):
        return "changed the model's inputs or outputs"
    try:
        onnx.checker.check_model(folded)
    except Exception as e:  # onnx.checker.ValidationError and friends
        return f"fails onnx.checker ({str(e)[:200]})"
    return None


def _interface(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits], [o.name for o in model.graph.output]
