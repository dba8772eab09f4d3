"""``tradeoff.png``: each metric against λ and, with exactly two metrics, one against the other
with every point labelled by its λ — the safety/performance trade-off picture of a sweep.

matplotlib is optional: without it ``plot_tradeoff`` draws nothing and returns a one-line note.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sweep_report import SweepReport


def plot_tradeoff(report: "SweepReport", path: str | os.PathLike, dpi: int = 110) -> str | None:
    """Draw the report's metrics to ``path``; returns None, or why nothing was drawn.

    Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend change).
    The chosen λ, if any, is ringed in every panel.
    """
    name = os.path.basename(os.fspath(path))
    if importlib.util.find_spec("matplotlib") is None:
        return f"{name} not drawn: matplotlib is not installed (pip install 'safeblend[plot]')"
    metrics = report.metric_names
    if not metrics:
        return f"{name} not drawn: no evaluation printed a metric"
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = len(metrics) + (1 if len(metrics) == 2 else 0)
    columns = min(panels, 3)
    rows = -(-panels // columns)
    figure = Figure(figsize=(4.2 * columns, 3.6 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    chosen = report.chosen
    for k, metric in enumerate(metrics):
        axes = figure.add_subplot(rows, columns, k + 1)
        points = [(row.weight, row.metrics[metric]) for row in report.rows if metric in row.metrics]
        axes.plot([w for w, _ in points], [v for _, v in points], marker="o", linewidth=1.5)
        if chosen is not None and metric in chosen.metrics:
            axes.plot([chosen.weight], [chosen.metrics[metric]], marker="o", markersize=12, fillstyle="none",
                      color="red", linestyle="none", label=f"kept: λ={chosen.weight:g}")
            axes.legend(fontsize="small")
        axes.set_xlabel("λ")
        axes.set_ylabel(metric)
        axes.set_title(f"{metric} against λ")
        axes.grid(True, alpha=0.3)
    if len(metrics) == 2:
        x_metric, y_metric = metrics
        axes = figure.add_subplot(rows, columns, panels)
        both = [row for row in report.rows if x_metric in row.metrics and y_metric in row.metrics]
        xs, ys = [r.metrics[x_metric] for r in both], [r.metrics[y_metric] for r in both]
        axes.plot(xs, ys, marker="o", linewidth=1, color="gray")
        for row, x, y in zip(both, xs, ys):
            axes.annotate(f"λ={row.weight:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize="small")
        if chosen is not None and chosen in both:
            axes.plot([chosen.metrics[x_metric]], [chosen.metrics[y_metric]], marker="o", markersize=12,
                      fillstyle="none", color="red", linestyle="none")
        axes.set_xlabel(x_metric)
        axes.set_ylabel(y_metric)
        axes.set_title(f"{y_metric} against {x_metric}")
        axes.grid(True, alpha=0.3)
    temporary = os.path.join(os.path.dirname(os.fspath(path)), f".{name}.tmp")
    figure.savefig(temporary, dpi=dpi, format="png")
    os.replace(temporary, path)  # never a half-drawn file under the final name
    return None
