"""The evaluated sweep's report: rows per λ, ``report.json``, ``report.csv``, the terminal table.

``report.json`` holds everything (every evaluation's command line, exit status, seconds,
metrics, error and log files; the keep rule's choice and why each λ was dropped; the sweep's
own summary). ``report.csv`` is one line per λ: the weight, every metric, the evaluation
seconds, status, keep decision, model directory and log files. Both are written whole to a
temporary name and renamed, so neither is ever seen half-written.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

REPORT_JSON = "report.json"
REPORT_CSV = "report.csv"
PLOT_NAME = "tradeoff.png"


@dataclass
class EvalRecord:
    """One evaluator on one model."""

    evaluator: str
    argv: list[str] | None = None
    returncode: int | None = None
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)  # keys whose values were not finite numbers
    error: str | None = None
    stdout: str | None = None  # log files (commands only)
    stderr: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Row:
    """One swept model: its weight, merged metrics and what ``--keep`` decided."""

    index: int
    weight: float
    model: str
    metrics: dict[str, float]
    seconds: float
    evaluations: list[EvalRecord]
    kept: bool | None = None  # None: no keep rule, or it chose nothing
    dropped: str | None = None  # why the keep rule did not choose this λ
    removed: bool = False  # its directory was deleted by --keep

    @property
    def ok(self) -> bool:
        return all(e.ok for e in self.evaluations)

    @property
    def errors(self) -> list[str]:
        return [f"eval {n}: {e.error}" for n, e in enumerate(self.evaluations, 1) if e.error]

    @classmethod
    def build(cls, index: int, weight: float, model: str, records: list[EvalRecord]) -> "Row":
        """Merge the records' metrics. A metric printed by two evaluators is not guessed between:
        the later one fails, naming the earlier."""
        metrics: dict[str, float] = {}
        owner: dict[str, int] = {}
        for n, record in enumerate(records, 1):
            clash = [m for m in record.metrics if m in owner]
            if clash:
                record.error = (f"metric {clash[0]!r} is also printed by eval {owner[clash[0]]}; "
                                "give each metric one evaluator")
                record.metrics = {}
                continue
            for name, value in record.metrics.items():
                metrics[name], owner[name] = value, n
        return cls(index, weight, model, metrics, round(sum(r.seconds for r in records), 4), records)


@dataclass
class SweepReport:
    """What ``sweep(..., evaluate=...)`` returns and ``report.json`` holds."""

    directory: str
    evaluators: list[str]
    rows: list[Row]
    seconds: float  # wall time of all evaluations
    sweep: dict[str, Any] | None = None  # the SweepResult's to_dict(); None for --eval-only
    keep: dict[str, Any] | None = None  # rule, chosen weight and model, reason, removed
    plot: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def metric_names(self) -> list[str]:
        """Every metric any row has, in order of first appearance."""
        return list(dict.fromkeys(name for row in self.rows for name in row.metrics))

    @property
    def chosen(self) -> Row | None:
        return next((row for row in self.rows if row.kept), None)

    @property
    def failures(self) -> int:
        return sum(not e.ok for row in self.rows for e in row.evaluations)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["metrics"] = self.metric_names
        for row, out in zip(self.rows, data["rows"]):
            out["ok"] = row.ok
        return data


def write_report(report: SweepReport, root: Path, plot: bool = True,
                 on_note: Callable[[str], None] | None = None) -> None:
    """Write ``report.json``, ``report.csv`` and (when asked and possible) ``tradeoff.png``."""
    from .tradeoff_plot import plot_tradeoff

    if plot:
        note = plot_tradeoff(report, root / PLOT_NAME)
        if note:
            report.notes.append(note)
            if on_note:
                on_note(note)
        else:
            report.plot = str(root / PLOT_NAME)
    _write_atomically(root / REPORT_CSV, _csv_text(report))
    _write_atomically(root / REPORT_JSON, json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")


def _csv_text(report: SweepReport) -> str:
    metrics = report.metric_names
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["lambda", *metrics, "seconds", "status", "keep", "model", "logs"])
    for row in report.rows:
        logs = [p for e in row.evaluations for p in (e.stdout, e.stderr) if p]
        writer.writerow([repr(row.weight), *(_number(row.metrics.get(m)) for m in metrics), row.seconds,
                         "ok" if row.ok else "failed: " + "; ".join(row.errors), _keep_text(row),
                         row.model, " ".join(logs)])
    return buffer.getvalue()


def _number(value: float | None) -> str:
    return "" if value is None else repr(value)


def _keep_text(row: Row) -> str:
    if row.kept:
        return "chosen"
    if row.dropped:
        return "dropped: " + row.dropped + ("; removed" if row.removed else "")
    return ""


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


# -- the terminal table --------------------------------------------------------------------------


def weight_text(row: Row) -> str:
    """The weight as its directory names it: ``0.3`` for ``lambda-0.3``."""
    return Path(row.model).name.split("-", 1)[-1]


def format_row(row: Row) -> str:
    """One line as a model's evaluations finish: ``λ=0.3   safety 0.97  task 0.61  1.2 s``."""
    metrics = "  ".join(f"{name} {value:.6g}" for name, value in row.metrics.items())
    status = "" if row.ok else "  FAILED " + "; ".join(row.errors)
    return f"{'λ=' + weight_text(row):<8} {metrics}  {row.seconds:.1f} s{status}".rstrip()


def format_table(report: SweepReport) -> str:
    """The final table: λ, every metric, seconds, and the keep decision."""
    metrics = report.metric_names
    header = ["λ", *metrics, "seconds", "keep"]
    lines = [header]
    for row in report.rows:
        label = weight_text(row)
        keep = "chosen" if row.kept else ("dropped" + (" (removed)" if row.removed else "") if row.dropped else "")
        if not row.ok:
            keep = (keep + " " if keep else "") + "eval failed"
        lines.append([label, *(f"{row.metrics[m]:.6g}" if m in row.metrics else "—" for m in metrics),
                      f"{row.seconds:.1f}", keep])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)
