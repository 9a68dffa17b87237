"""A corpus of hostile "models", built in code (no downloads, nothing stored in the repository).

Each case is bytes that an attacker (or a broken exporter) could upload as ``model``. Every one of them
must be refused with a 4xx and a message, write nothing, and leave the server healthy. The builders skip
``onnx.checker`` on purpose and produce bytes that ``onnx.helper`` alone would refuse to make.

Sizes are chosen to be dangerous if anything ever materialised them (tens of GiB to exabytes), while
the bytes themselves stay small: the only big case is the protobuf bomb (a few MiB).
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.onnx_models import mlp

F = TensorProto.FLOAT
I64 = TensorProto.INT64
GIANT = 1 << 34  # 16 Gi elements: 64 GiB as float32, more than this machine has
BOMB_NODES = 1_500_000  # tiny Identity nodes in the protobuf bomb (about 30 MiB of protobuf)


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[TensorProto] | None = None,
    opset: int = 17,
    ir_version: int = 8,
    functions: list[onnx.FunctionProto] | None = None,
    extra_opsets: dict[str, int] | None = None,
    name: str = "hostile",
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializers or [])
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    m = helper.make_model(graph, opset_imports=opsets, producer_name="slimserve-hostile", functions=functions or [])
    m.ir_version = ir_version
    return m


def _x(dims: list[int | str] | None = None, name: str = "x", elem: int = F) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, dims if dims is not None else ["N", 4])


def _i64(name: str, values: list[int]) -> TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def _bytes(m: onnx.ModelProto) -> bytes:
    return m.SerializeToString()


# -- not a model at all ---------------------------------------------------------------------------------


def random_bytes() -> bytes:
    return np.random.default_rng(1234).integers(0, 256, 64 * 1024, dtype=np.uint8).tobytes()


def truncated_protobuf() -> bytes:
    data = mlp(in_dim=32, hidden=64)
    return data[: len(data) // 2]


def zip_npz() -> bytes:
    """A valid .npz (a zip archive), uploaded as the model."""
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((4, 4), np.float32))
    return buf.getvalue()


def zip_with_model_inside() -> bytes:
    """A zip archive holding a perfectly good model.onnx: still not an ONNX protobuf."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("model.onnx", mlp())
    return buf.getvalue()


def wire_type_garbage() -> bytes:
    """Field 7 (graph) declared with a length far past the end of the buffer."""
    return b"\x08\x08" + b"\x3a" + b"\xff\xff\xff\xff\x0f" + b"\x00" * 16


# -- header and typing nonsense -------------------------------------------------------------------------


def ir_version_99() -> bytes:
    m = onnx.load_from_string(mlp())
    m.ir_version = 99
    return _bytes(m)


def ir_version_0() -> bytes:
    m = onnx.load_from_string(mlp())
    m.ir_version = 0
    return _bytes(m)


def opset_99() -> bytes:
    m = onnx.load_from_string(mlp())
    m.opset_import[0].version = 99
    return _bytes(m)


def opset_1_ancient() -> bytes:
    """Opset 1: no runtime serves it (ONNX Runtime starts at opset 7)."""
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [_x()], [_x(name="y")], opset=1, ir_version=3)
    return _bytes(m)


def no_default_opset() -> bytes:
    m = onnx.load_from_string(mlp())
    del m.opset_import[:]
    m.opset_import.append(helper.make_opsetid("ai.onnx.ml", 3))
    return _bytes(m)


def nonsense_elem_type() -> bytes:
    m = _model([helper.make_node("Identity", ["x"], ["y"])], [_x()], [_x(name="y")])
    m.graph.input[0].type.tensor_type.elem_type = 977
    m.graph.output[0].type.tensor_type.elem_type = 977
    return _bytes(m)


def undefined_elem_type() -> bytes:
    m = _model([helper.make_node("Identity", ["x"], ["y"])], [_x()], [_x(name="y")])
    m.graph.input[0].type.tensor_type.elem_type = TensorProto.UNDEFINED
    return _bytes(m)


def huge_declared_dims() -> bytes:
    d = 1 << 24
    m = _model([helper.make_node("Identity", ["x"], ["y"])], [_x([d, d])], [_x([d, d], name="y")])
    return _bytes(m)


def negative_dims() -> bytes:
    m = _model([helper.make_node("Identity", ["x"], ["y"])], [_x()], [_x(name="y")])
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = -5
    return _bytes(m)


# -- graph structure ------------------------------------------------------------------------------------


def empty_graph() -> bytes:
    return _bytes(_model([], [_x()], [_x(name="x2")]))


def no_outputs() -> bytes:
    return _bytes(_model([helper.make_node("Relu", ["x"], ["y"])], [_x()], []))


def duplicate_outputs() -> bytes:
    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["y"])]
    return _bytes(_model(nodes, [_x()], [_x(name="y")]))


def cycle() -> bytes:
    nodes = [helper.make_node("Add", ["x", "b"], ["a"]), helper.make_node("Relu", ["a"], ["b"])]
    return _bytes(_model(nodes, [_x()], [_x(name="a")]))


def custom_op_default_domain() -> bytes:
    return _bytes(_model([helper.make_node("TotallyNotAnOp", ["x"], ["y"])], [_x()], [_x(name="y")]))


def unknown_domain() -> bytes:
    node = helper.make_node("Exfiltrate", ["x"], ["y"], domain="evil.custom")
    return _bytes(_model([node], [_x()], [_x(name="y")], extra_opsets={"evil.custom": 1}))


def unknown_op_in_known_domain() -> bytes:
    """com.microsoft is a known domain; the operator in it is not."""
    node = helper.make_node("DefinitelyNotAContribOp", ["x"], ["y"], domain="com.microsoft")
    return _bytes(_model([node], [_x()], [_x(name="y")], extra_opsets={"com.microsoft": 1}))


def _nested_if(depth: int) -> bytes:
    """If within If within If ... ``depth`` levels deep (only the then-branch nests, so size stays linear).

    Python protobuf refuses to serialize past its recursion limit, so the model is assembled by hand
    from the serialized innermost subgraph outwards.
    """
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "e", [], [_vi("e")]).SerializeToString()
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["c0"])], "c0", [], [_vi("c0")]).SerializeToString()
    out = "c0"
    for level in range(1, depth + 1):
        out = f"c{level}" if level < depth else "y"
        then_attr = _field(1, b"then_branch") + _field(6, g) + _varint_field(20, onnx.AttributeProto.GRAPH)
        else_attr = _field(1, b"else_branch") + _field(6, else_g) + _varint_field(20, onnx.AttributeProto.GRAPH)
        node = _field(1, b"cond") + _field(2, out.encode()) + _field(4, b"If") + _field(5, then_attr)
        node += _field(5, else_attr)
        if level < depth:
            g = _field(1, node) + _field(2, out.encode()) + _field(12, _vi(out).SerializeToString())
    head = _model([], [_x()], [_x(name="y")], initializers=[numpy_helper.from_array(np.array(True), "cond")])
    graph = head.graph.SerializeToString() + _field(1, node)
    head.ClearField("graph")
    return head.SerializeToString() + _field(7, graph)


def deeply_nested_if() -> bytes:
    """2000 levels: past every protobuf and C++ recursion budget."""
    return _nested_if(2000)


def nested_if_40() -> bytes:
    """40 levels of If: just past the protobuf parser's nesting limit (100 messages, 3 per level)."""
    return _nested_if(40)


def _vi(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, F, None)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(num: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def _varint_field(num: int, value: int) -> bytes:
    return _varint(num << 3) + _varint(value)


def protobuf_bomb(nodes: int = BOMB_NODES) -> bytes:
    """Millions of tiny Identity nodes in a chain: a few tens of MiB that expand enormously once parsed."""
    parts = [_field(1, _field(1, b"x") + _field(2, b"a0") + _field(4, b"Identity"))]
    for i in range(1, nodes):
        parts.append(_field(1, _field(1, b"a%x" % (i - 1)) + _field(2, b"a%x" % i) + _field(4, b"Identity")))
    head = _model([], [_x()], [_x(name="a%x" % (nodes - 1))])
    graph = head.graph.SerializeToString() + b"".join(parts)
    head.ClearField("graph")
    return head.SerializeToString() + _field(7, graph)


# -- functions --------------------------------------------------------------------------------------------


def _self_recursive_functions(mutual: bool) -> bytes:
    # com.microsoft: a domain the server accepts, so the model gets past the domain check to the checker
    dom = "com.microsoft"
    if mutual:
        f = helper.make_function(
            dom,
            "F",
            ["a"],
            ["b"],
            [helper.make_node("G", ["a"], ["b"], domain=dom)],
            [helper.make_opsetid("", 17), helper.make_opsetid(dom, 1)],
        )
        g = helper.make_function(
            dom,
            "G",
            ["a"],
            ["b"],
            [helper.make_node("F", ["a"], ["b"], domain=dom)],
            [helper.make_opsetid("", 17), helper.make_opsetid(dom, 1)],
        )
        fns = [f, g]
    else:
        fns = [
            helper.make_function(
                dom,
                "F",
                ["a"],
                ["b"],
                [helper.make_node("F", ["a"], ["b"], domain=dom)],
                [helper.make_opsetid("", 17), helper.make_opsetid(dom, 1)],
            )
        ]
    node = helper.make_node("F", ["x"], ["y"], domain=dom)
    return _bytes(_model([node], [_x()], [_x(name="y")], functions=fns, extra_opsets={dom: 1}))


def recursive_function() -> bytes:
    return _self_recursive_functions(mutual=False)


def mutually_recursive_functions() -> bytes:
    return _self_recursive_functions(mutual=True)


# -- tensors that lie ---------------------------------------------------------------------------------------


def initializer_size_lie() -> bytes:
    """An initializer that claims 2**40 elements but carries 16 bytes."""
    w = TensorProto(name="w", data_type=F, dims=[1 << 20, 1 << 20], raw_data=b"\0" * 16)
    nodes = [helper.make_node("Add", ["x", "w"], ["y"])]
    return _bytes(_model(nodes, [_x([1, 4])], [_x([1, 4], name="y")], initializers=[w]))


def constant_size_lie() -> bytes:
    """The same lie inside a Constant node's attribute."""
    t = TensorProto(name="c", data_type=F, dims=[GIANT], raw_data=b"\0" * 16)
    nodes = [helper.make_node("Constant", [], ["c"], value=t), helper.make_node("Add", ["x", "c"], ["y"])]
    return _bytes(_model(nodes, [_x([1, 4])], [_x([1, 4], name="y")]))


def sparse_initializer_huge() -> bytes:
    """A sparse initializer with one value and a dense shape of 2**34: densifying it would need 64 GiB."""
    values = numpy_helper.from_array(np.array([1.0], np.float32), "w")
    indices = numpy_helper.from_array(np.array([GIANT - 1], np.int64), "w_idx")
    sparse = helper.make_sparse_tensor(values, indices, [GIANT])
    nodes = [helper.make_node("ReduceSum", ["w"], ["s"], keepdims=0), helper.make_node("Add", ["x", "s"], ["y"])]
    m = _model(nodes, [_x()], [_x(name="y")])
    m.graph.sparse_initializer.append(sparse)
    return _bytes(m)


def sparse_initializer_bad_indices() -> bytes:
    """Sparse indices pointing far outside the dense shape (an out-of-bounds write when densified)."""
    values = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "w")
    indices = numpy_helper.from_array(np.array([0, 1 << 40], np.int64), "w_idx")
    sparse = helper.make_sparse_tensor(values, indices, [4])
    nodes = [helper.make_node("Add", ["x", "w"], ["y"])]
    m = _model(nodes, [_x()], [_x(name="y")])
    m.graph.sparse_initializer.append(sparse)
    return _bytes(m)


def _external(t: TensorProto, location: str, length: int) -> TensorProto:
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in {"location": location, "offset": "0", "length": str(length)}.items():
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def _external_weight_model(location: str) -> onnx.ModelProto:
    w = _external(numpy_helper.from_array(np.ones((4, 3), np.float32), "w"), location, 48)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    return _model(nodes, [_x()], [_x(["N", 3], name="y")], initializers=[w])


def external_data_dotdot() -> bytes:
    return _bytes(_external_weight_model("../../../../../../etc/passwd"))


def external_data_absolute() -> bytes:
    return _bytes(_external_weight_model("/etc/passwd"))


def external_data_symlink(link: Path) -> bytes:
    """``link`` is a symlink the test plants (pointing at /etc/passwd); the model names it plainly."""
    return _bytes(_external_weight_model(str(link)))


def external_data_relative_cwd() -> bytes:
    """A relative name resolved against the server's working directory (its repository checkout)."""
    return _bytes(_external_weight_model("README.md"))


def external_data_in_sparse_initializer() -> bytes:
    """External data hidden in a sparse initializer's values: not a place every scanner looks."""
    values = _external(numpy_helper.from_array(np.ones(12, np.float32), "w"), "README.md", 48)
    indices = numpy_helper.from_array(np.arange(12, dtype=np.int64), "w_idx")
    sparse = helper.make_sparse_tensor(values, indices, [4, 3])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    m = _model(nodes, [_x()], [_x(["N", 3], name="y")])
    m.graph.sparse_initializer.append(sparse)
    return _bytes(m)


def external_data_in_sparse_constant() -> bytes:
    """External data in a Constant node's ``sparse_value`` attribute."""
    values = _external(numpy_helper.from_array(np.ones(12, np.float32), "w"), "README.md", 48)
    indices = numpy_helper.from_array(np.arange(12, dtype=np.int64), "w_idx")
    sparse = helper.make_sparse_tensor(values, indices, [4, 3])
    nodes = [
        helper.make_node("Constant", [], ["w"], sparse_value=sparse),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    return _bytes(_model(nodes, [_x()], [_x(["N", 3], name="y")]))


def external_data_in_function() -> bytes:
    """External data in a Constant inside a model-local function."""
    dom = "local.fn"
    t = _external(numpy_helper.from_array(np.ones((4, 3), np.float32), "w"), "README.md", 48)
    fn = helper.make_function(
        dom,
        "Leak",
        ["a"],
        ["b"],
        [helper.make_node("Constant", [], ["w"], value=t), helper.make_node("MatMul", ["a", "w"], ["b"])],
        [helper.make_opsetid("", 17)],
    )
    node = helper.make_node("Leak", ["x"], ["y"], domain=dom)
    return _bytes(_model([node], [_x()], [_x(["N", 3], name="y")], functions=[fn], extra_opsets={dom: 1}))


# -- graphs that would allocate absurd memory, or never finish, at run time ---------------------------------


def constant_of_shape_huge() -> bytes:
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["big"], value=numpy_helper.from_array(np.zeros(1, np.float32))),
        helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
        helper.make_node("Add", ["x", "s"], ["y"]),
    ]
    return _bytes(_model(nodes, [_x()], [_x(name="y")], initializers=[_i64("shape", [1 << 17, 1 << 17])]))


def constant_of_shape_via_shape_arithmetic() -> bytes:
    """The huge shape is computed from the input's own shape: Shape -> Mul by a constant -> ConstantOfShape."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s0"]),
        helper.make_node("Mul", ["s0", "k"], ["s1"]),
        helper.make_node("ConstantOfShape", ["s1"], ["big"], value=numpy_helper.from_array(np.ones(1, np.float32))),
        helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
        helper.make_node("Add", ["x", "s"], ["y"]),
    ]
    return _bytes(_model(nodes, [_x([1, 4])], [_x([1, 4], name="y")], initializers=[_i64("k", [1 << 17, 1 << 17])]))


def expand_huge() -> bytes:
    nodes = [
        helper.make_node("Expand", ["x", "shape"], ["big"]),
        helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
        helper.make_node("Add", ["x", "s"], ["y"]),
    ]
    return _bytes(_model(nodes, [_x([1, 1])], [_x([1, 1], name="y")], initializers=[_i64("shape", [1 << 17, 1 << 17])]))


def tile_huge() -> bytes:
    nodes = [
        helper.make_node("Tile", ["x", "reps"], ["big"]),
        helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
        helper.make_node("Add", ["x", "s"], ["y"]),
    ]
    return _bytes(_model(nodes, [_x([1, 4])], [_x([1, 4], name="y")], initializers=[_i64("reps", [1 << 17, 1 << 17])]))


def range_huge() -> bytes:
    nodes = [
        helper.make_node("Range", ["start", "limit", "delta"], ["r"]),
        helper.make_node("ReduceSum", ["r"], ["s"], keepdims=0),
        helper.make_node("Cast", ["s"], ["sf"], to=F),
        helper.make_node("Add", ["x", "sf"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(0, np.int64), "start"),
        numpy_helper.from_array(np.array(GIANT, np.int64), "limit"),
        numpy_helper.from_array(np.array(1, np.int64), "delta"),
    ]
    return _bytes(_model(nodes, [_x()], [_x(name="y")], initializers=inits))


def reshape_huge() -> bytes:
    """Reshape a small constant into a 2**40-element shape (a lie the runtime must refuse, not honour)."""
    nodes = [
        helper.make_node("Reshape", ["c", "shape"], ["big"]),
        helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
        helper.make_node("Add", ["x", "s"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.ones(4, np.float32), "c"), _i64("shape", [1 << 20, 1 << 20])]
    return _bytes(_model(nodes, [_x()], [_x(name="y")], initializers=inits))


def resize_huge() -> bytes:
    """Upsample a [1,1,2,2] input by 2**16 on each spatial axis: 2**34 elements."""
    nodes = [
        helper.make_node("Resize", ["x", "", "scales"], ["big"], mode="nearest"),
        helper.make_node("ReduceSum", ["big"], ["y"], keepdims=1),
    ]
    scales = numpy_helper.from_array(np.array([1, 1, 1 << 16, 1 << 16], np.float32), "scales")
    return _bytes(_model(nodes, [_x([1, 1, 2, 2])], [_x([1, 1, 1, 1], name="y")], initializers=[scales]))


def loop_enormous_trip_count() -> bytes:
    """A Loop whose trip count is 2**62 with an always-true condition: warm-up would never finish."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["v_in"], ["v_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", I64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", F, None),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", F, None),
        ],
    )
    nodes = [helper.make_node("Loop", ["M", "cond", "x"], ["y"], body=body)]
    inits = [numpy_helper.from_array(np.array(1 << 62, np.int64), "M"), numpy_helper.from_array(np.array(True), "cond")]
    return _bytes(_model(nodes, [_x()], [_x(name="y")], initializers=inits))


def loop_unbounded() -> bytes:
    """A Loop with no trip count at all and a condition that stays true: a while(true)."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["v_in"], ["v_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", I64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", F, None),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", F, None),
        ],
    )
    nodes = [helper.make_node("Loop", ["", "cond", "x"], ["y"], body=body)]
    inits = [numpy_helper.from_array(np.array(True), "cond")]
    return _bytes(_model(nodes, [_x()], [_x(name="y")], initializers=inits))


def complex_input() -> bytes:
    """A COMPLEX64 input: no protocol datatype carries it (STRING is BYTES, which the server serves)."""
    m = _model(
        [helper.make_node("Identity", ["x"], ["y"])],
        [_x(elem=TensorProto.COMPLEX64)],
        [_x(name="y", elem=TensorProto.COMPLEX64)],
    )
    return _bytes(m)


def sequence_output() -> bytes:
    nodes = [helper.make_node("SequenceConstruct", ["x"], ["y"])]
    out = helper.make_tensor_sequence_value_info("y", F, ["N", 4])
    return _bytes(_model(nodes, [_x()], [out]))


# -- the corpus ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], bytes]
    #: lower-case substrings, one of which the error message must contain
    expect: tuple[str, ...]
    status: int = 400


CASES: list[Case] = [
    Case("random-bytes", random_bytes, ("not an onnx model",)),
    Case("truncated-protobuf", truncated_protobuf, ("not an onnx model", "protobuf")),
    Case("zip-npz", zip_npz, ("not an onnx model",)),
    Case("zip-with-model", zip_with_model_inside, ("not an onnx model",)),
    Case("length-past-end", wire_type_garbage, ("not an onnx model",)),
    Case("ir-version-99", ir_version_99, ("ir_version", "ir version", "onnx.checker")),
    Case("ir-version-0", ir_version_0, ("ir_version", "ir version", "onnx.checker")),
    Case("opset-99", opset_99, ("opset", "does not load")),
    Case("opset-1-ancient", opset_1_ancient, ("opset", "does not load")),
    Case("no-default-opset", no_default_opset, ("opset",)),
    Case("nonsense-elem-type", nonsense_elem_type, ("type", "onnx.checker")),
    Case("undefined-elem-type", undefined_elem_type, ("type", "onnx.checker")),
    Case("huge-declared-dims", huge_declared_dims, ("elements",)),
    Case("negative-dims", negative_dims, ("negative", "onnx.checker")),
    Case("empty-graph", empty_graph, ("no nodes", "onnx.checker")),
    Case("no-outputs", no_outputs, ("no outputs", "onnx.checker")),
    Case("duplicate-node-outputs", duplicate_outputs, ("onnx.checker",)),
    Case("cycle", cycle, ("onnx.checker",)),
    Case("custom-op-default-domain", custom_op_default_domain, ("onnx.checker",)),
    Case("unknown-domain", unknown_domain, ("evil.custom",)),
    Case("unknown-op-com-microsoft", unknown_op_in_known_domain, ("does not load", "onnx.checker")),
    Case("if-nested-40", nested_if_40, ("nest",)),
    Case("if-nested-2000", deeply_nested_if, ("nest",)),
    Case("protobuf-bomb", protobuf_bomb, ("nodes",)),
    Case("recursive-function", recursive_function, ("recursive", "function")),
    Case("mutually-recursive-functions", mutually_recursive_functions, ("recursive", "function")),
    Case("initializer-size-lie", initializer_size_lie, ("elements", "size", "onnx.checker")),
    Case("constant-size-lie", constant_size_lie, ("elements", "size", "onnx.checker")),
    Case("sparse-initializer-huge", sparse_initializer_huge, ("dense shape",)),
    Case("sparse-initializer-bad-indices", sparse_initializer_bad_indices, ("onnx.checker", "indices", "index")),
    Case("external-data-dotdot", external_data_dotdot, ("external data",)),
    Case("external-data-absolute", external_data_absolute, ("external data",)),
    Case("external-data-relative", external_data_relative_cwd, ("external data",)),
    Case("external-data-sparse-initializer", external_data_in_sparse_initializer, ("external data",)),
    Case("external-data-sparse-constant", external_data_in_sparse_constant, ("external data",)),
    Case("external-data-in-function", external_data_in_function, ("external data",)),
    Case("constant-of-shape-huge", constant_of_shape_huge, ("elements",)),
    Case("constant-of-shape-shape-arith", constant_of_shape_via_shape_arithmetic, ("elements",)),
    Case("expand-huge", expand_huge, ("elements",)),
    Case("tile-huge", tile_huge, ("elements",)),
    Case("range-huge", range_huge, ("elements",)),
    Case("reshape-huge", reshape_huge, ("elements", "does not load", "reshape")),
    Case("resize-huge", resize_huge, ("elements",)),
    Case("loop-trip-count-2^62", loop_enormous_trip_count, ("loop",)),
    Case("loop-unbounded", loop_unbounded, ("loop",)),
    Case("complex-input", complex_input, ("element type", "datatype", "type")),
    Case("sequence-output", sequence_output, ("not a tensor",)),
]


def write_corpus(directory: Path) -> list[Path]:
    """Write every case to ``directory`` (for running them by hand: ``python -m tests.hardening.corpus DIR``)."""
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for case in CASES:
        p = directory / f"{case.name}.onnx"
        p.write_bytes(case.build())
        out.append(p)
    return out


if __name__ == "__main__":
    import sys

    for path in write_corpus(Path(sys.argv[1] if len(sys.argv) > 1 else "hostile-corpus")):
        print(path, path.stat().st_size)


# -- hostile calibration data ------------------------------------------------------------------------------


def npz_bomb(rows: int = 1 << 27, cols: int = 4) -> bytes:
    """A calibration .npz of about 2 MiB whose one array inflates to ``rows * cols`` float32 (2 GiB by
    default). The deflate stream is one compressed 16 MiB block of zeros repeated (each block ends on a
    full flush, so blocks are independent), and the zip64 container is written by hand: building it
    takes a second and little memory."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (rows, cols)})
    head = header.getvalue()  # magic, version and the header dict
    chunk = bytes(16 << 20)
    total = rows * cols * 4
    assert total % len(chunk) == 0
    c1 = zlib.compressobj(9, zlib.DEFLATED, -15)
    c2 = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c2.compress(chunk) + c2.flush(zlib.Z_FULL_FLUSH)
    n = total // len(chunk)
    deflated = c1.compress(head) + c1.flush(zlib.Z_FULL_FLUSH) + block * n
    deflated += zlib.compressobj(9, zlib.DEFLATED, -15).flush(zlib.Z_FINISH)
    crc = zlib.crc32(head)
    for _ in range(n):
        crc = zlib.crc32(chunk, crc)
    size = len(head) + total
    return _zip64_single(b"x.npy", deflated, crc, size)


def _zip64_single(name: bytes, deflated: bytes, crc: int, size: int) -> bytes:
    """A zip archive with one deflated member whose sizes live in zip64 extra fields."""
    extra = struct.pack("<HHQQ", 1, 16, size, len(deflated))
    local = struct.pack(
        "<IHHHHHIIIHH", 0x04034B50, 45, 0, 8, 0, 0x21, crc, 0xFFFFFFFF, 0xFFFFFFFF, len(name), len(extra)
    )
    central = struct.pack(
        "<IHHHHHHIIIHHHHHII",
        0x02014B50,
        45,
        45,
        0,
        8,
        0,
        0x21,
        crc,
        0xFFFFFFFF,
        0xFFFFFFFF,
        len(name),
        len(extra),
        0,
        0,
        0,
        0,
        0,
    )
    body = local + name + extra + deflated
    cd = central + name + extra
    eocd = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(cd), len(body), 0)
    return body + cd + eocd


def npz_pickled_object() -> bytes:
    """An .npz whose array is a pickled object array (arbitrary code on load if pickles were allowed)."""
    buf = io.BytesIO()
    np.savez(buf, x=np.array([{"a": 1}, None], dtype=object))
    return buf.getvalue()
