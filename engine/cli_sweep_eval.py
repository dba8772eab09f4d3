"""The ``safeblend sweep`` options that evaluate the swept models and pick λ.

Declared here and attached to the sweep command by one decorator (``eval_options``), so the
sweep command in cli.py only hands them over: ``--eval`` (repeatable), ``--eval-shell``,
``--eval-jobs``, ``--eval-timeout``, ``--keep``, ``--eval-only DIR``, ``--no-plot``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from .errors import SafeblendError
from .sweep_report import REPORT_JSON, Row, SweepReport, format_row, format_table, weight_text
from .units import format_size

EVAL_KEYS = ("eval_commands", "eval_shell", "eval_jobs", "eval_timeout", "keep", "eval_only", "plot")


def eval_options(f):
    """Attach the evaluation options to a click command (they arrive as keyword arguments)."""
    options = [
        click.option("--eval", "eval_commands", multiple=True, metavar="CMD",
                     help="Evaluate each swept model with CMD (repeatable); {model}, {weight}, {index} are "
                          "replaced; metrics are the JSON object on its last stdout line."),
        click.option("--eval-shell", is_flag=True, help="Run --eval commands through /bin/sh (default: no shell)."),
        click.option("--eval-jobs", default=1, show_default=True, type=click.IntRange(1),
                     help="Evaluations run at the same time."),
        click.option("--eval-timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
                     help="Kill an evaluation that runs longer, and record it as failed (default: no limit)."),
        click.option("--keep", metavar="RULE",
                     help="Keep only the model RULE picks, e.g. 'best task where safety >= 0.95' "
                          "(grammar: README); the other swept models are deleted."),
        click.option("--eval-only", type=click.Path(path_type=Path, file_okay=False), metavar="DIR",
                     help="(Re-)evaluate the models of an existing sweep directory instead of sweeping."),
        click.option("--plot/--no-plot", default=True, help="Draw tradeoff.png (needs matplotlib; default on)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def eval_plan(ctx: click.Context, options: dict[str, Any], as_json: bool, quiet: bool):
    """The EvalPlan the options ask for, or None without --eval; usage errors for misuse."""
    from .evaluate import Command, EvalPlan

    commands = options["eval_commands"]
    if not commands:
        for key, flag in (("keep", "--keep"), ("eval_only", "--eval-only"), ("eval_timeout", "--eval-timeout")):
            if options[key] is not None:
                raise click.UsageError(f"{flag} needs at least one --eval CMD", ctx)
        return None
    timeout, shell = options["eval_timeout"], options["eval_shell"]
    table_to_stderr = as_json

    def show(line: str) -> None:
        if not quiet:
            click.echo(line, err=table_to_stderr)

    def on_row(row: Row) -> None:
        show(format_row(row))

    def on_start(targets, sweep: dict[str, Any] | None) -> None:
        if sweep is not None and not quiet and not as_json:
            print_sweep_line(sweep)
        show(f"Evaluating {len(targets)} model(s) with {len(commands)} command(s), "
             f"{options['eval_jobs']} at a time:")

    return EvalPlan(evaluators=[Command(c, n, timeout, shell) for n, c in enumerate(commands, 1)],
                    jobs=options["eval_jobs"], keep=options["keep"], plot=options["plot"],
                    on_start=on_start, on_row=on_row, on_note=lambda note: click.echo(f"Note: {note}", err=True))


def print_sweep_line(summary: dict[str, Any]) -> None:
    """The sweep's summary (before its evaluations), as `safeblend sweep` prints it."""
    click.echo(f"Swept {len(summary['weights'])} weights ({summary['method']}) into {summary['output']}: "
               f"read {format_size(summary['bytes_read'])} once, wrote {format_size(summary['bytes_written'])} "
               f"in {summary['seconds']:.1f} s", err=True)


def finish(report: SweepReport, as_json: bool, quiet: bool) -> None:
    """Print the report (JSON or the final table and choice); exit 1 when --keep chose nothing."""
    root = Path(report.directory)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    elif not quiet:
        click.echo("")
        click.echo(format_table(report))
    if not quiet:
        if report.failures:
            click.echo(f"Warning: {report.failures} evaluation(s) failed; why is in {root / REPORT_JSON} "
                       f"and their output in {root / 'logs'}", err=True)
        for row in report.rows:
            if row.dropped and not as_json:
                click.echo(f"  λ={weight_text(row)} dropped: {row.dropped}", err=True)
        click.echo(f"Report: {root / REPORT_JSON}, {root / 'report.csv'}"
                   + (f", {report.plot}" if report.plot else ""), err=True)
    keep = report.keep
    if keep is None:
        return
    if keep["chosen"] is None:
        raise SafeblendError(f"--keep {keep['rule']!r}: {keep['reason']}; nothing deleted (report: {root / REPORT_JSON})")
    if not quiet:
        click.echo(f"Kept {keep['model']} ({keep['reason']}); removed {len(keep['removed'])} other model(s)",
                   err=True)
