"""Which graphs may run on the event loop: ``compute_bounded_by_shapes`` (backends/onnx_model.py) says whether one
inference's work is bounded by its inputs' shapes, so that a request's cost can be predicted from its size."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from backends import BackendOptions, load_backend
from backends.onnx_model import compute_bounded_by_shapes, parse_model
from tests.onnx_models import conv_net, expand_by_input, mlp, reshape_by_input, string_join


def _graph(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], inits: list[TensorProto]) -> onnx.ModelProto:
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return helper.make_model(
        helper.make_graph(nodes, "g", inputs, [out], inits), opset_imports=[helper.make_opsetid("", 17)]
    )


X = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
N = helper.make_tensor_value_info("n", TensorProto.INT64, [])


@pytest.mark.parametrize(
    ("model", "bounded"),
    [
        (mlp(), True),
        (conv_net(), True),
        (reshape_by_input(), True),  # Reshape keeps the element count: the input's values cannot grow the work
        (string_join(), True),
        (expand_by_input(), False),  # Expand to a shape the caller sends: [1, 3] can become [10**9, 3]
    ],
)
def test_shipped_test_models(model: bytes, bounded: bool) -> None:
    assert compute_bounded_by_shapes(parse_model(model)) is bounded


def test_sizes_from_constants_are_bounded_and_from_run_time_values_are_not() -> None:
    shape = numpy_helper.from_array(np.array([2, 3], np.int64), "shape")
    constant = _graph([helper.make_node("Expand", ["x", "shape"], ["y"])], [X], [shape])
    assert compute_bounded_by_shapes(constant)
    computed = _graph([helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Expand", ["x", "s"], ["y"])], [X], [])
    assert not compute_bounded_by_shapes(computed)  # conservative: computed sizes count as run-time values
    zero, one = (numpy_helper.from_array(np.array(v, np.int64), name) for v, name in ((0, "zero"), (1, "one")))
    ranged = _graph(
        [helper.make_node("Range", ["zero", "n", "one"], ["r"]), helper.make_node("Cast", ["r"], ["y"], to=1)],
        [N],
        [zero, one],
    )
    assert not compute_bounded_by_shapes(ranged)


@pytest.mark.parametrize(
    ("op", "size_input", "arity"),
    [("HannWindow", 0, 1), ("DFT", 1, 2), ("Col2Im", 1, 3), ("MaxUnpool", 2, 3), ("AffineGrid", 1, 2)],
)
def test_every_operator_sized_by_a_value_is_not_bounded(op: str, size_input: int, arity: int) -> None:
    """Signal, image and unpooling operators whose output size is one of their inputs' values: a run-time value
    there is refused, a constant is not."""
    consts = [numpy_helper.from_array(np.array(2, np.int64), f"c{i}") for i in range(arity)]
    fed = [("n" if i == size_input else f"c{i}") for i in range(arity)]
    assert not compute_bounded_by_shapes(_graph([helper.make_node(op, fed, ["y"])], [N], consts))
    assert compute_bounded_by_shapes(_graph([helper.make_node(op, [f"c{i}" for i in range(arity)], ["y"])], [], consts))


def test_control_flow_is_never_bounded() -> None:
    body_out = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["out"])], "b", [], [body_out])
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    model = _graph([helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)], [X, cond], [])
    assert not compute_bounded_by_shapes(model)


def test_the_cpu_backend_carries_the_verdict() -> None:
    opts = BackendOptions(intra_op_threads=1)
    assert load_backend("onnxruntime-cpu", mlp(), opts).inline_safe
    assert not load_backend("onnxruntime-cpu", expand_by_input(), opts).inline_safe
