"""Speed / quality Pareto plot of bench rows (PNG, matplotlib's Agg canvas, no pyplot state)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from ..errors import DiffspeedError

_LABELS = {
    "speedup": "speedup vs full model (x)",
    "psnr_db": "PSNR vs full model (dB)",
    "ssim": "SSIM vs full model",
    "latency_ms": "latency (ms)",
    "judge_accuracy": "judge accuracy",
    "peak_mem_mb": "peak memory (MiB)",
    "rel_error": "relative error vs full model",
}


def _num(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated when both coordinates are to be maximised, sorted by x."""
    front = []
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return sorted(front)


def pareto_plot(rows: Sequence[dict[str, Any]], path: str | Path, x: str = "speedup", y: str = "psnr_db",
                title: str | None = None) -> Path:
    """Scatter ``y`` against ``x`` (one labelled point per recipe) with the Pareto frontier (both
    maximised), saved as a PNG at ``path``.

    Rows identical to the full model (``identical: true``, PSNR infinite) are drawn on a band above
    the best finite PSNR, marked "identical"; rows with an error or without both values are left out.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pts: list[tuple[float, float, str, bool]] = []
    for r in rows:
        if r.get("error"):
            continue
        xv = _num(r.get(x))
        yv = _num(r.get(y))
        ident = bool(r.get("identical")) and y == "psnr_db" and yv is None
        if xv is None or (yv is None and not ident):
            continue
        pts.append((xv, yv if yv is not None else math.nan, str(r.get("recipe", "?")), ident))
    if not pts:
        raise DiffspeedError(f"nothing to plot: no row has numeric {x!r} and {y!r}")

    finite_y = [p[1] for p in pts if not p[3]]
    cap = (max(finite_y) + 5.0) if finite_y else 60.0
    pts = [(px, cap if ident else py, label, ident) for px, py, label, ident in pts]

    fig = Figure(figsize=(7, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for px, py, label, ident in pts:
        ax.scatter([px], [py], marker="*" if ident else "o", s=90 if ident else 40,
                   color="tab:green" if ident else "tab:blue", zorder=3)
        ax.annotate(label + (" (identical)" if ident else ""), (px, py), textcoords="offset points", xytext=(5, 5),
                    fontsize=8)
    front = pareto_frontier([(px, py) for px, py, _, _ in pts])
    if len(front) > 1:
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="tab:orange", label="Pareto frontier",
                zorder=2)
        ax.legend(loc="lower left", fontsize=8)
    if any(p[3] for p in pts):
        ax.axhline(cap, color="tab:green", lw=0.5, ls=":")
    ax.set_xlabel(_LABELS.get(x, x))
    ax.set_ylabel(_LABELS.get(y, y) + (" (identical = top band)" if any(p[3] for p in pts) else ""))
    if title is None and rows:
        r0 = rows[0]
        title = f"{r0.get('model', '')}: {r0.get('steps', '?')} steps, batch {r0.get('batch', '?')}, {r0.get('device_name') or r0.get('device', '')}"
    if title:
        ax.set_title(title, fontsize=10)
    ax.margins(x=0.15, y=0.08)  # room for the labels
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png")
    except OSError as exc:
        raise DiffspeedError(f"cannot write the plot to {str(out)!r}: {exc.strerror or exc}") from None
    return out
