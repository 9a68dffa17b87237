"""`slimserve serve` with the cyclic collector's pauses recorded (the evidence for the tail fix, issue 13).

Runs the server as the CLI does, with a ``gc.callbacks`` hook timing every collection; on exit it writes, per
generation, the count, p50, max and total pause in ms to ``$GC_PROBE_OUT`` (default gc.json), with the number of
tracked and frozen objects. ``SETTLE=0`` replaces ``settle_heap`` (service/loaded.py) by a no-op: the code as it
was before the fix, for an A/B in one run.

    SETTLE=1 taskset -c 0 .venv/bin/python bench/gc_probe.py serve --port 8000 --data-dir /tmp/d
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import sys
import time
from typing import Any

_start: list[float] = [0.0]
_pauses: list[tuple[int, float]] = []


def _hook(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _start[0] = time.perf_counter()
    else:
        _pauses.append((info["generation"], time.perf_counter() - _start[0]))


def _dump() -> None:
    out: dict[str, Any] = {}
    for gen in sorted({g for g, _ in _pauses}):
        ms = sorted(d * 1e3 for g, d in _pauses if g == gen)
        out[f"gen{gen}"] = {"n": len(ms), "p50_ms": ms[len(ms) // 2], "max_ms": ms[-1], "sum_ms": sum(ms)}
    out["tracked_objects"] = len(gc.get_objects())
    out["frozen_objects"] = gc.get_freeze_count()
    with open(os.environ.get("GC_PROBE_OUT", "gc.json"), "w") as f:
        json.dump(out, f)


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    gc.callbacks.append(_hook)
    atexit.register(_dump)
    if os.environ.get("SETTLE") == "0":
        import service.app
        import service.loaded

        service.loaded.settle_heap = lambda: None  # type: ignore[assignment]
        service.app.settle_heap = lambda: None  # type: ignore[attr-defined]
    from service.cli import main as cli

    sys.argv = ["slimserve", *sys.argv[1:]]
    cli()


if __name__ == "__main__":
    main()
