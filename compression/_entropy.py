"""Order-0 entropy coding of symbol streams with rANS, plus the small varint helpers of the ENCODE format.

The coder is ``constriction``'s stack-based ANS (PyPI ``constriction``: a maintained Rust library with Python
wheels), not hand-written code and not Huffman: Huffman spends at least 1 bit per symbol, so on the skewed
streams of a pruned model (one gap or code value far more frequent than the rest) it lands well above the
entropy, while ANS with 24-bit probabilities stays within a few bytes of it.

The model of a stream is its exact symbol counts, stored beside the stream, so the encoder and decoder build
the same quantised distribution from the same integers. A stream with a single distinct symbol needs no bytes.
"""

from __future__ import annotations

import numpy as np

try:
    import constriction
except ImportError:  # pragma: no cover - exercised only where the package is missing
    constriction = None


def _require() -> None:
    if constriction is None:
        raise RuntimeError("the ENCODE stage needs the 'constriction' package: pip install constriction")


def entropy_bytes(counts: np.ndarray) -> float:
    """The order-0 entropy bound of a stream with these symbol counts, in bytes."""
    c = counts[counts > 0].astype(np.float64)
    if c.size <= 1:
        return 0.0
    return float(-(c * np.log2(c / c.sum())).sum() / 8)


def _model(counts: np.ndarray) -> tuple[object, np.ndarray]:
    present = np.flatnonzero(counts)
    probs = counts[present].astype(np.float64) / float(counts[present].sum())
    return constriction.stream.model.Categorical(probs, perfect=False), present


def encode_symbols(symbols: np.ndarray, counts: np.ndarray) -> bytes:
    """rANS-code ``symbols`` (ints in 0..len(counts)-1) under the distribution ``counts``."""
    if np.count_nonzero(counts) <= 1:
        return b""
    _require()
    model, present = _model(counts)
    lookup = np.zeros(len(counts), dtype=np.int32)
    lookup[present] = np.arange(len(present), dtype=np.int32)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(lookup[symbols].astype(np.int32), model)
    raw = coder.get_compressed().astype("<u4").tobytes()
    # the last word is never zero (the coder drops zero words); its zero high bytes are implied
    trim = 0
    while trim < 3 and len(raw) > trim and raw[len(raw) - 1 - trim] == 0:
        trim += 1
    return raw[: len(raw) - trim]


def decode_symbols(data: bytes, counts: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`encode_symbols` for ``n`` symbols."""
    present = np.flatnonzero(counts)
    if len(present) == 0:
        return np.zeros(0, dtype=np.int64)
    if len(present) == 1:
        return np.full(n, present[0], dtype=np.int64)
    _require()
    model, present = _model(counts)
    padded = data + b"\0" * (-len(data) % 4)
    words = np.frombuffer(padded, dtype="<u4").astype(np.uint32)
    coder = constriction.stream.stack.AnsCoder(words)
    return present[np.asarray(coder.decode(model, n), dtype=np.int64)]


# --------------------------------------------------------------------------------------------- varints


def put_varint(out: bytearray, value: int) -> None:
    if value < 0:
        raise ValueError("varints are unsigned")
    while True:
        b = value & 0x7F
        value >>= 7
        out.append(b | (0x80 if value else 0))
        if not value:
            return


class Reader:
    """Reads varints and raw bytes from a buffer; running past its end raises ValueError."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def varint(self) -> int:
        value = shift = 0
        while True:
            if self.pos >= len(self.data) or shift > 63:
                raise ValueError("truncated or corrupt varint")
            b = self.data[self.pos]
            self.pos += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError("truncated data")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk


def put_counts(out: bytearray, counts: np.ndarray) -> None:
    """A symbol-count table, sparse: alphabet size, number present, then (index gap, count) pairs."""
    present = np.flatnonzero(counts)
    put_varint(out, len(counts))
    put_varint(out, len(present))
    prev = -1
    for i in present:
        put_varint(out, int(i) - prev - 1)
        put_varint(out, int(counts[i]))
        prev = int(i)


def get_counts(r: Reader) -> np.ndarray:
    size, n = r.varint(), r.varint()
    if n > size or size > 1 << 20:
        raise ValueError("corrupt count table")
    counts = np.zeros(size, dtype=np.int64)
    prev = -1
    for _ in range(n):
        prev += r.varint() + 1
        if prev >= size:
            raise ValueError("corrupt count table")
        counts[prev] = r.varint()
    return counts
