"""ENCODE: Deep Compression's storage stage (Han et al. 2016) into one compact, versioned artifact.

Per linear-layer weight (MatMul/Gemm/Conv weight operands):

* weight sharing: 1-D k-means (Lloyd, linear initialisation over [min, max]) of the non-zero values into
  ``2**bits`` centroids; exact zeros stay zero and are not coded;
* the positions of the non-zeros as relative gaps (zeros since the previous non-zero) over the flattened
  tensor; a gap >= G-1 is written as escape symbols G-1 ("G-1 more zeros, no weight here") and a remainder,
  the escape-code variant of the paper's filler zeros. G (a power of two up to 256) is chosen per layer to
  minimise the coded size;
* the code stream and the gap stream, each rANS-coded under its own exact order-0 counts (``_entropy``).

Artifact layout (little-endian)::

    b"SLMZ" | u8 version | u32 meta length | meta (raw LZMA2) | streams (code, gap per layer, concatenated)
    meta = varint len | ONNX skeleton (the model with the encoded tensors' data removed) | varint layers |
           per layer: varint initializer index, varint k, k x float32 codebook, code counts, varint G,
                      gap counts, varint code-stream bytes, varint gap-stream bytes

Everything but the streams (header, skeleton, codebooks, count tables) is the fixed overhead, reported apart.
"""

from __future__ import annotations

import lzma
import struct
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from compression import _entropy as ent
from compression.fold import fold_constants
from compression.onnx_graph import FLOAT_TYPES

MAGIC = b"SLMZ"
VERSION = 1
MIN_ENCODED_WEIGHTS = 256  # smaller tensors stay exact in the skeleton: a codebook would not pay for itself
WEIGHT_OPS = {"MatMul": (0, 1), "Gemm": (0, 1), "Conv": (1,), "ConvTranspose": (1,)}
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


@dataclass
class EncodeReport:
    bits: int
    original_bytes: int
    encoded_bytes: int
    ratio: float
    layers: list[dict] = field(default_factory=list)
    stream_bytes: int = 0  # all coded streams
    entropy_bytes: float = 0.0  # their order-0 entropy bound
    overhead_bytes: int = 0  # header + compressed (skeleton, codebooks, count tables)
    skeleton_bytes: int = 0  # the uncompressed ONNX skeleton
    bits_per_weight_overall: float = 0.0  # 8 x artifact bytes / all parameters of the model
    skipped: list[dict] = field(default_factory=list)  # float tensors kept exact in the skeleton, with why
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in [2, 8], got {bits!r}")


# --------------------------------------------------------------------------------------------- weight sharing


def share_weights(w: np.ndarray, bits: int, max_iter: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """k-means of the non-zero values (linear init): (float32 codebook, sorted; code of each non-zero, C order).

    Deterministic numpy Lloyd iterations on the sorted values (1-D: assignment is a searchsorted against the
    midpoints), rather than scikit-learn's KMeans, whose threaded sums can differ in the last bit between
    machines. Empty clusters are dropped, so the codebook has at most ``2**bits`` entries. A tensor that already
    has at most ``2**bits`` distinct non-zero values (weights shared by ``compression.codebook``) keeps them
    exactly: its values are the codebook.
    """
    _check_bits(bits)
    nz = w.ravel()[w.ravel() != 0]
    if nz.size == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    distinct, inverse = np.unique(nz.astype(np.float32), return_inverse=True)
    if len(distinct) <= 1 << bits:
        return distinct, inverse.astype(np.int64).ravel()
    nz = nz.astype(np.float64)
    xs = np.sort(nz)
    c = np.linspace(xs[0], xs[-1], 1 << bits)
    for _ in range(max_iter):
        idx = np.searchsorted((c[1:] + c[:-1]) / 2, xs)
        cnt = np.bincount(idx, minlength=len(c))
        new = np.sort(np.where(cnt > 0, np.bincount(idx, weights=xs, minlength=len(c)) / np.maximum(cnt, 1), c))
        if np.array_equal(new, c):
            break
        c = new
    book = np.unique(c.astype(np.float32))
    codes = np.searchsorted((book[1:].astype(np.float64) + book[:-1]) / 2, nz)
    used, codes = np.unique(codes, return_inverse=True)
    return book[used], codes.astype(np.int64)


def _layer_bits(model: onnx.ModelProto, bits: int, layer_bits: Mapping[str, int] | None) -> dict[str, int]:
    """Bits per float initializer: ``layer_bits`` where given, else ``bits``; unknown names are refused."""
    _check_bits(bits)
    names = {t.name for t in model.graph.initializer}
    out = dict.fromkeys(names, bits)
    for name, b in (layer_bits or {}).items():
        if name not in names:
            raise ValueError(f"layer_bits names {name!r}, which is not an initializer of the model")
        _check_bits(b)
        out[name] = int(b)
    return out


def _encodable(model: onnx.ModelProto, bits: dict[str, int]) -> tuple[list[int], list[dict]]:
    """Initializer indices to encode, and the float tensors kept exact with the reason."""
    inits = {t.name: i for i, t in enumerate(model.graph.initializer)}
    weight_names = set()
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx") and node.op_type in WEIGHT_OPS:
            weight_names.update(node.input[i] for i in WEIGHT_OPS[node.op_type] if i < len(node.input))
    chosen, skipped = [], []
    for name, i in inits.items():
        t = model.graph.initializer[i]
        if t.data_type not in FLOAT_TYPES:
            continue
        n = int(np.prod(t.dims)) if len(t.dims) else 1
        if name not in weight_names:
            skipped.append({"name": name, "reason": "not a MatMul/Gemm/Conv weight (kept exact)"})
        elif t.data_location == TensorProto.EXTERNAL:
            skipped.append({"name": name, "reason": "stored as external data"})
        elif n < max(MIN_ENCODED_WEIGHTS, 4 << bits[name]):
            skipped.append({"name": name, "reason": f"small tensor ({n} values; kept exact)"})
        else:
            chosen.append(i)
    return chosen, skipped


def share_model_weights(
    model: onnx.ModelProto, bits: int, layer_bits: Mapping[str, int] | None = None
) -> onnx.ModelProto:
    """The model with every encodable weight replaced by its shared (k-means) values: what decode returns."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    per_tensor = _layer_bits(out, bits, layer_bits)
    for i in _encodable(out, per_tensor)[0]:
        t = out.graph.initializer[i]
        w = numpy_helper.to_array(t)
        book, codes = share_weights(w, per_tensor[t.name])
        q = np.zeros(w.size, dtype=w.dtype)
        q[w.ravel() != 0] = book[codes].astype(w.dtype)
        t.CopyFrom(numpy_helper.from_array(q.reshape(w.shape), t.name))
    return out


# --------------------------------------------------------------------------------------------- gaps


def _gap_symbols(gaps: np.ndarray, g: int) -> np.ndarray:
    """Gaps as symbols < g: each gap is floor(gap / (g-1)) escapes (symbol g-1) then gap mod (g-1)."""
    esc = gaps // (g - 1)
    rem = gaps % (g - 1)
    out = np.full(int(esc.sum()) + len(gaps), g - 1, dtype=np.int64)
    out[np.cumsum(esc + 1) - 1] = rem
    return out


def _choose_alphabet(gaps: np.ndarray) -> int:
    """The power-of-two gap alphabet (2..256) with the smallest entropy + count-table estimate."""
    best, best_cost = 2, float("inf")
    for g in (2, 4, 8, 16, 32, 64, 128, 256):
        esc = gaps // (g - 1)
        counts = np.bincount(gaps % (g - 1), minlength=g)
        counts[g - 1] += int(esc.sum())
        cost = ent.entropy_bytes(counts) + 3 * np.count_nonzero(counts)
        if cost < best_cost:
            best, best_cost = g, cost
        if gaps.size == 0 or gaps.max() < g - 1:
            break
    return best


def estimate_bytes(w: np.ndarray, bits: int) -> float:
    """What ENCODE will spend on one tensor: its code and gap streams' order-0 entropy plus codebook and tables.

    The streams land within ~0.1 % of their entropy (docs/benchmarks/compression-digits.md), so this is what an
    allocation search can use to price a (sparsity, bits) choice without building the artifact.
    """
    book, codes = share_weights(w, bits)
    positions = np.flatnonzero(w.ravel())
    gaps = np.diff(positions, prepend=-1) - 1
    g = _choose_alphabet(gaps)
    code_counts = np.bincount(codes, minlength=len(book))
    gap_counts = np.bincount(_gap_symbols(gaps, g), minlength=g)
    tables = 3 * (np.count_nonzero(code_counts) + np.count_nonzero(gap_counts)) + 4 * len(book) + 8
    return ent.entropy_bytes(code_counts) + ent.entropy_bytes(gap_counts) + tables


# --------------------------------------------------------------------------------------------- encode / decode


def encode_model(
    model: onnx.ModelProto,
    bits: int,
    progress: Callable[[float], None] | None = None,
    layer_bits: Mapping[str, int] | None = None,
) -> tuple[bytes, EncodeReport]:
    """Weight-share, gap-code and rANS-code the model's linear weights into one artifact (see module doc).

    ``layer_bits`` (initializer name -> bits) overrides ``bits`` per tensor (per-layer bit widths). Weights
    computed by constant subgraphs are folded into initializers first (``compression.fold``).
    """
    original = model.SerializeToString()
    model, note = fold_constants(model)
    skel = onnx.ModelProto()
    skel.CopyFrom(model)
    per_tensor = _layer_bits(skel, bits, layer_bits)
    chosen, skipped = _encodable(skel, per_tensor)
    records = bytearray()
    ent.put_varint(records, len(chosen))
    streams: list[bytes] = []
    layers = []
    for li, i in enumerate(chosen):
        t = skel.graph.initializer[i]
        w = numpy_helper.to_array(t)
        flat = w.ravel()
        book, codes = share_weights(w, per_tensor[t.name])
        positions = np.flatnonzero(flat)
        gaps = np.diff(positions, prepend=-1) - 1
        g = _choose_alphabet(gaps)
        gap_syms = _gap_symbols(gaps, g)
        code_counts = np.bincount(codes, minlength=len(book))
        gap_counts = np.bincount(gap_syms, minlength=g)
        code_stream = ent.encode_symbols(codes, code_counts)
        gap_stream = ent.encode_symbols(gap_syms, gap_counts)
        rec = bytearray()
        ent.put_varint(rec, i)
        ent.put_varint(rec, len(book))
        rec += book.astype("<f4").tobytes()
        ent.put_counts(rec, code_counts)
        ent.put_varint(rec, g)
        ent.put_counts(rec, gap_counts)
        ent.put_varint(rec, len(code_stream))
        ent.put_varint(rec, len(gap_stream))
        records += rec
        streams += [code_stream, gap_stream]
        t.CopyFrom(TensorProto(name=t.name, data_type=t.data_type, dims=t.dims))  # the data lives in the streams
        code_h, gap_h = ent.entropy_bytes(code_counts), ent.entropy_bytes(gap_counts)
        sb = len(code_stream) + len(gap_stream)
        layers.append(
            {
                "name": t.name,
                "shape": list(w.shape),
                "weights": int(w.size),
                "nonzeros": int(positions.size),
                "bits": per_tensor[t.name],
                "centroids": len(book),
                "gap_alphabet": g,
                "escapes": int(len(gap_syms) - len(gaps)),
                "code_bytes": len(code_stream),
                "code_entropy_bytes": code_h,
                "gap_bytes": len(gap_stream),
                "gap_entropy_bytes": gap_h,
                "table_bytes": len(rec),
                "bits_per_weight": 8 * (sb + len(rec)) / w.size,
                "entropy_bits_per_weight": 8 * (code_h + gap_h) / w.size,
                "achieved_bits_per_weight": 8 * sb / w.size,
            }
        )
        if progress:
            progress((li + 1) / max(len(chosen), 1))
    skel_bytes = skel.SerializeToString()
    plain = bytearray()
    ent.put_varint(plain, len(skel_bytes))
    plain += skel_bytes + records
    meta = lzma.compress(bytes(plain), format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    blob = MAGIC + struct.pack("<BI", VERSION, len(meta)) + meta + b"".join(streams)
    stream_bytes = sum(len(s) for s in streams)
    report = EncodeReport(
        bits=bits,
        original_bytes=len(original),
        encoded_bytes=len(blob),
        ratio=len(original) / len(blob),
        layers=layers,
        stream_bytes=stream_bytes,
        entropy_bytes=sum(la["code_entropy_bytes"] + la["gap_entropy_bytes"] for la in layers),
        overhead_bytes=len(blob) - stream_bytes,
        skeleton_bytes=len(skel_bytes),
        bits_per_weight_overall=8 * len(blob) / max(1, sum(int(np.prod(t.dims)) for t in model.graph.initializer)),
        skipped=skipped,
        notes=[note] if note else [],
    )
    if progress and not chosen:
        progress(1.0)
    return blob, report


def is_encoded(blob: bytes) -> bool:
    return blob[:4] == MAGIC


def decode_model(blob: bytes) -> onnx.ModelProto:
    """Rebuild a runnable ONNX model from an ENCODE artifact; corrupt or foreign data raises ValueError."""
    if not is_encoded(blob) or len(blob) < 9:
        raise ValueError("not a slimserve ENCODE artifact (bad magic)")
    version, meta_len = struct.unpack_from("<BI", blob, 4)
    if version != VERSION:
        raise ValueError(f"ENCODE artifact version {version} is not supported (this build reads {VERSION})")
    try:
        plain = lzma.decompress(blob[9 : 9 + meta_len], format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    except lzma.LZMAError as e:
        raise ValueError(f"corrupt ENCODE artifact: {e}") from None
    r = ent.Reader(plain)
    model = onnx.ModelProto()
    try:
        model.ParseFromString(r.take(r.varint()))
    except Exception as e:  # protobuf raises its own DecodeError
        raise ValueError(f"corrupt ENCODE artifact: the skeleton does not parse ({e})") from None
    streams = ent.Reader(blob[9 + meta_len :])
    inits = model.graph.initializer
    for _ in range(r.varint()):
        i, k = r.varint(), r.varint()
        if i >= len(inits) or inits[i].data_type not in FLOAT_TYPES:
            raise ValueError("corrupt ENCODE artifact: bad tensor index")
        book = np.frombuffer(r.take(4 * k), dtype="<f4")
        code_counts, g, gap_counts = ent.get_counts(r), r.varint(), ent.get_counts(r)
        code_stream, gap_stream = streams.take(r.varint()), streams.take(r.varint())
        t = inits[i]
        shape = tuple(int(d) for d in t.dims)
        n = int(np.prod(shape)) if shape else 1
        nnz = int(code_counts.sum())
        if not (len(code_counts) == k <= 256 and len(gap_counts) == g and 2 <= g <= 256 and nnz <= n < 1 << 32):
            raise ValueError("corrupt ENCODE artifact: inconsistent tables")
        if int(gap_counts.sum()) > nnz + n // (g - 1):
            raise ValueError("corrupt ENCODE artifact: inconsistent tables")
        try:
            codes = ent.decode_symbols(code_stream, code_counts, nnz)
            syms = ent.decode_symbols(gap_stream, gap_counts, int(gap_counts.sum()))
        except Exception as e:
            raise ValueError(f"corrupt ENCODE artifact: a stream does not decode ({e})") from None
        real = syms != g - 1  # escapes carry g-1 zeros and no weight
        runs = np.cumsum(np.where(real, syms, g - 1) + real)  # position after each symbol
        positions = runs[real] - 1
        if len(positions) != nnz or (nnz and (positions[-1] >= n or codes.max() >= k)):
            raise ValueError("corrupt ENCODE artifact: positions out of range")
        dtype = FLOAT_TYPES[t.data_type]
        values = np.zeros(n, dtype=dtype)
        values[positions] = book[codes].astype(dtype)
        t.CopyFrom(numpy_helper.from_array(values.reshape(shape), t.name))
    if streams.pos != len(streams.data):
        raise ValueError("corrupt ENCODE artifact: trailing bytes after the streams")
    return model
