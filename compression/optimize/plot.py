"""The frontier plot of an optimize job: accuracy loss against batch-1 latency, stored size as marker area,
the Pareto frontier drawn as a step line and the choice ringed. SVG, drawn with matplotlib's Agg backend.

matplotlib (the ``compression`` extra) is imported with the module, so that importing it fails without matplotlib:
the plot route answers 404 then. pyplot is imported only when a plot is drawn.
"""

from __future__ import annotations

import io
from typing import Any

import matplotlib

from compression.optimize.frontier import cost, finished

matplotlib.use("Agg")


def frontier_svg(result: dict[str, Any]) -> bytes:
    """An SVG of the job result's trials (see the module doc)."""
    import matplotlib.pyplot as plt

    rows = finished(result.get("trials") or [])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        if rows:
            biggest = max(r["size_bytes"] for r in rows)
            xs = [r["p50_ms"] for r in rows]
            ys = [100.0 * r["loss"] for r in rows]
            area = [20 + 400 * r["size_bytes"] / biggest for r in rows]
            colors = ["tab:red" if r.get("on_frontier") else "tab:blue" for r in rows]
            ax.scatter(xs, ys, s=area, c=colors, alpha=0.6, edgecolors="black", linewidths=0.5)
            for r, x, y in zip(rows, xs, ys, strict=True):
                ax.annotate(r.get("ladder", ""), (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
            front = sorted((r for r in rows if r.get("on_frontier")), key=lambda r: cost(r, result["objective"]))
            if front:
                ax.plot([r["p50_ms"] for r in front], [100.0 * r["loss"] for r in front], "r--", lw=1, label="frontier")
            chosen = [r for r in rows if r.get("chosen")]
            for r in chosen:
                ax.scatter([r["p50_ms"]], [100.0 * r["loss"]], s=600, facecolors="none", edgecolors="green", lw=2)
            ax.axhline(100.0 * result.get("tolerance", 0.0), color="gray", lw=0.8, ls=":", label="tolerance")
            ax.legend(loc="upper right", fontsize=8)
        ax.set_xlabel("latency p50, batch 1 (ms)")
        ax.set_ylabel("accuracy loss (%)")
        ax.set_title(f"optimize ({result.get('objective', '?')}): marker area = stored size", fontsize=10)
        buf = io.BytesIO()
        fig.savefig(buf, format="svg", bbox_inches="tight")
        return buf.getvalue()
    finally:
        plt.close(fig)
