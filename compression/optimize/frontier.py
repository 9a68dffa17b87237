"""The trials' Pareto frontier (accuracy loss against the objective's cost), the choice, and honesty.

A trial is on the frontier when no other finished trial is at least as good on both loss and cost and better on
one. The choice is the cheapest trial within the tolerance; it becomes the default variant only when it is
*honest*: it delivers what its objective and its name promise. For latency and throughput that means faster than
the original beyond measurement noise (``compression.timing``: interleaved rounds, the whole 95 % interval of the
time ratio below ``1 - SPEED_MARGIN``); for size, smaller by more than ``SIZE_MARGIN``; and a variant with int8
in its chain must hold most of its weight bytes in int8 (``INT8_SHARE``), or it is an "int8" that is mostly float.

The compress pipeline's default (``compression.pipeline``) is held to the same bars: these constants and
``int8_verdict`` are the one definition of both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from compression.timing import Comparison

SPEED_MARGIN = 0.05  # a variant becomes the default only when faster than the original by this, beyond noise
SIZE_MARGIN = 0.01
INT8_SHARE = 0.5  # an "int8" variant must hold at least this share of its weight bytes in int8
MAX_TIMED = 3  # candidates timed against the original before giving up on a faster one


def int8_verdict(share: float) -> str | None:
    """Why an int8 variant with ``share`` of its weight bytes in int8 is not honest; None when it is int8 in fact."""
    if share >= INT8_SHARE:
        return None
    return (
        f"an int8 variant with only {100 * share:.0f} % of its weight bytes in int8 "
        f"(at least {100 * INT8_SHARE:.0f} % expected): mostly float"
    )


def cost(row: dict[str, Any], objective: str) -> float:
    """What the objective minimizes: batch-1 p50 (latency), minus batch-32 throughput, or stored bytes."""
    if objective == "latency":
        return float(row["p50_ms"])
    if objective == "throughput":
        return -float(row["throughput"])
    return float(row["size_bytes"])


def finished(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("state") == "done" and r.get("loss") is not None]


def pareto(rows: list[dict[str, Any]], objective: str) -> set[str]:
    """Keys of the finished trials no other finished trial dominates in (loss, cost)."""
    done = finished(rows)
    points = [(max(0.0, r["loss"]), cost(r, objective), r["key"]) for r in done]
    front = set()
    for loss, c, key in points:
        dominated = any((lo <= loss and co <= c) and (lo < loss or co < c) for lo, co, other in points if other != key)
        if not dominated:
            front.add(key)
    return front


def candidates(rows: list[dict[str, Any]], objective: str) -> list[dict[str, Any]]:
    """Finished trials within tolerance, cheapest first. For size, only those smaller than the original
    (``rows[0]``): sizes are exact. Latency and throughput were measured one trial after another, so machine
    drift can reorder close trials: whether a candidate beats the original is left to the interleaved timing
    (``honesty``)."""
    ok = [r for r in finished(rows) if r.get("within_tolerance") and r.get("chain")]
    if objective == "size":
        ok = [r for r in ok if cost(r, objective) < cost(rows[0], objective)]
    return sorted(ok, key=lambda r: (cost(r, objective), r["loss"]))


def closest(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The least-loss finished trial other than the original (for "no variant within tolerance")."""
    done = [r for r in finished(rows) if r.get("chain")]
    return min(done, key=lambda r: r["loss"]) if done else None


def describe(row: dict[str, Any]) -> str:
    chain = " -> ".join(
        f"{name}({', '.join(f'{k}={v}' for k, v in knobs.items())})" if knobs else name for name, knobs in row["chain"]
    )
    return chain or "original"


def honesty(
    row: dict[str, Any], original: dict[str, Any], objective: str, timing: Comparison | None
) -> tuple[bool, str]:
    """(honest, why): does the variant deliver what its objective and name say? ``timing`` compares this
    variant against the original (latency/throughput)."""
    names = [name for name, _ in row["chain"]]
    if any(n.startswith("int8") for n in names):
        mostly_float = int8_verdict(row.get("int8_weight_share", 0.0))
        if mostly_float is not None:
            return False, mostly_float
    smaller = row["size_bytes"] < (1.0 - SIZE_MARGIN) * original["size_bytes"]
    if objective == "size":
        if not smaller:
            return False, f"not smaller than the original ({row['size_bytes']:,} vs {original['size_bytes']:,} bytes)"
        return True, f"{original['size_bytes'] / row['size_bytes']:.2f}x smaller than the original"
    if timing is None:
        return False, "not timed against the original"
    span = f"time ratio {timing.ratio:.3f} (95 % interval {timing.low:.3f}-{timing.high:.3f}, {timing.rounds} rounds)"
    if not timing.faster(SPEED_MARGIN):
        return False, f"not faster than the original by {100 * SPEED_MARGIN:.0f} % beyond noise: {span}"
    return True, f"faster than the original beyond noise: {span}"
