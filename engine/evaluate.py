"""Evaluating swept models: ``safeblend sweep ... --eval CMD`` and ``sweep(..., evaluate=fn)``.

Each evaluator is run once per swept model:

* a command (``--eval``): a template in which ``{model}``, ``{weight}`` and ``{index}`` stand
  for the model directory, the weight as its directory names it (``0.3``) and its 0-based
  position in the sweep. It is split like a POSIX shell line (``shlex``) and run without a
  shell, each placeholder replaced inside its argument, so paths with spaces stay one
  argument; with ``shell=True`` (``--eval-shell``) it goes to ``/bin/sh -c`` with the
  values quoted. Its stdout and stderr go to ``logs/lambda-<w>.eval-<n>.stdout|stderr`` in
  the sweep directory; its metrics are the JSON object on the last non-empty line of its
  stdout, and an exit status other than 0, a timeout or anything else on that line fails it.
  The environment also carries SAFEBLEND_MODEL, SAFEBLEND_WEIGHT and SAFEBLEND_INDEX.
* a Python callable ``fn(model: str, weight: float) -> Mapping[str, float]``; raising fails it.

Metrics are the object's finite numbers (other values are listed as ignored). A failed
evaluation is recorded in the report with why; it only fails the run when a ``--keep`` rule
needs what it would have printed (``keep_rule.choose``).

When evaluations start: the sweep writes every model in one read pass, so all of them become
complete together, when the pass ends. Evaluation starts right after it, every (model,
evaluator) pair queued in weight order and run ``jobs`` at a time; a model's row is reported
as soon as its last evaluation finishes.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .errors import SpecError
from .keep_rule import KeepRule, choose, parse_keep_rule
from .output_paths import remove_output
from .sweep_report import EvalRecord, Row, SweepReport, write_report

PLACEHOLDERS = ("model", "weight", "index")
_PLACEHOLDER = re.compile(r"\{(model|weight|index)\}")
# Words in braces close to a placeholder's name are almost surely typos ({modle}, {weights});
# others ({print} in an awk program, `${x}` in a shell line) are the command's own.
_BRACED_WORD = re.compile(r"(?<!\$)\{([A-Za-z_]+)\}")
# How long a timed-out command gets between SIGTERM and SIGKILL.
KILL_GRACE_S = 5.0
# Bytes of stdout read back to find its last line (metrics are one short line).
_TAIL_BYTES = 1 << 16


@dataclass(frozen=True)
class Target:
    """One swept model to evaluate."""

    index: int
    weight: float
    path: Path
    label: str  # its directory name, lambda-<w>

    @property
    def weight_text(self) -> str:
        return self.label.split("-", 1)[1]


class EvalFailed(Exception):
    """An evaluation's one-line reason for failing, recorded in the report."""


class Command:
    """An ``--eval`` command template, validated when built (before any model is written)."""

    def __init__(self, template: str, number: int, timeout: float | None = None, shell: bool = False) -> None:
        self.template = template
        self.number = number  # 1-based, as listed: names its logs
        self.timeout = timeout
        self.shell = shell
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen] = set()
        for word in _BRACED_WORD.findall(template):
            if word not in PLACEHOLDERS and difflib.get_close_matches(word.lower(), PLACEHOLDERS, cutoff=0.7):
                raise SpecError(f"--eval {template!r}: unknown placeholder {{{word}}}; use "
                                + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS))
        if timeout is not None and not timeout > 0:
            raise SpecError(f"--eval-timeout {timeout}: must be a positive number of seconds")
        if shell:
            self.argv = None
            if not template.strip():
                raise SpecError("--eval '': empty command")
            return
        try:
            self.argv = shlex.split(template)
        except ValueError as exc:
            raise SpecError(f"--eval {template!r}: {exc}") from None
        if not self.argv:
            raise SpecError("--eval '': empty command")
        program = self.argv[0]
        if not _PLACEHOLDER.search(program) and shutil.which(program) is None:
            raise SpecError(f"--eval {template!r}: {program}: command not found")

    @property
    def name(self) -> str:
        return self.template

    def argv_for(self, target: Target) -> list[str]:
        """The command line for one model (``/bin/sh -c LINE`` in shell mode)."""
        values = {"model": str(target.path), "weight": target.weight_text, "index": str(target.index)}
        if self.shell:
            line = _PLACEHOLDER.sub(lambda m: shlex.quote(values[m[1]]), self.template)
            return ["/bin/sh", "-c", line]
        return [_PLACEHOLDER.sub(lambda m: values[m[1]], arg) for arg in self.argv]

    def run(self, target: Target, logs: Path, stop: threading.Event) -> EvalRecord:
        """Run on one model; never raises for the command's own failures (they are the record's)."""
        argv = self.argv_for(target)
        stem = f"{target.label}.eval-{self.number}"
        out_path, err_path = logs / f"{stem}.stdout", logs / f"{stem}.stderr"
        record = EvalRecord(evaluator=self.template, argv=argv, stdout=str(out_path), stderr=str(err_path))
        env = {**os.environ, "SAFEBLEND_MODEL": str(target.path), "SAFEBLEND_WEIGHT": target.weight_text,
               "SAFEBLEND_INDEX": str(target.index)}
        started = time.perf_counter()
        try:
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                if stop.is_set():
                    raise EvalFailed("not started: the run was interrupted")
                try:
                    # A session of its own, so a timeout ends the command's children too.
                    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                                               start_new_session=True)
                except OSError as exc:
                    raise EvalFailed(f"cannot start {argv[0]}: {exc.strerror or exc}") from None
                with self._lock:
                    self._running.add(process)
                try:
                    record.returncode = _wait(process, self.timeout)
                finally:
                    with self._lock:
                        self._running.discard(process)
            if record.returncode is None:
                raise EvalFailed(f"timed out after {self.timeout:g} s (killed)")
            if record.returncode != 0:
                raise EvalFailed(f"exit status {record.returncode}{_last_words(err_path)}")
            record.metrics, record.ignored = parse_metrics(_last_line(out_path))
        except EvalFailed as exc:
            record.error = str(exc)
        record.seconds = round(time.perf_counter() - started, 4)
        return record

    def kill_all(self) -> None:
        """End every command still running (an interrupted run)."""
        with self._lock:
            running = list(self._running)
        for process in running:
            _kill_group(process, signal.SIGKILL)


class PythonEvaluator:
    """A callable ``fn(model, weight) -> Mapping[str, float]`` as an evaluator."""

    def __init__(self, fn: Callable[[str, float], Mapping[str, Any]]) -> None:
        self.fn = fn
        self.name = getattr(fn, "__qualname__", None) or repr(fn)

    def run(self, target: Target, logs: Path, stop: threading.Event) -> EvalRecord:
        record = EvalRecord(evaluator=self.name)
        started = time.perf_counter()
        try:
            if stop.is_set():
                raise EvalFailed("not started: the run was interrupted")
            try:
                result = self.fn(str(target.path), target.weight)
            except Exception as exc:  # noqa: BLE001 - the evaluator's failure is the record's
                raise EvalFailed(f"{type(exc).__name__}: {exc}") from None
            if not isinstance(result, Mapping):
                raise EvalFailed(f"returned {type(result).__name__}, not a mapping of metric names to numbers")
            record.metrics, record.ignored = _numbers(dict(result))
        except EvalFailed as exc:
            record.error = str(exc)
        record.seconds = round(time.perf_counter() - started, 4)
        return record

    def kill_all(self) -> None:
        pass


def parse_metrics(line: str) -> tuple[dict[str, float], list[str]]:
    """Metrics from the last stdout line: a JSON object; its finite numbers are the metrics.

    >>> parse_metrics('{"safety": 0.97, "task": 61, "model": "x"}')
    ({'safety': 0.97, 'task': 61.0}, ['model'])
    """
    if not line:
        raise EvalFailed("printed nothing on stdout; the last line must be a JSON object of metrics")
    try:
        value = json.loads(line)
    except ValueError:
        raise EvalFailed(f"last stdout line is not a JSON object: {_clip(line)}") from None
    if not isinstance(value, dict):
        raise EvalFailed(f"last stdout line is JSON but not an object: {_clip(line)}")
    metrics, ignored = _numbers(value)
    if not metrics:
        raise EvalFailed(f"last stdout line has no numeric metric: {_clip(line)}")
    return metrics, ignored


def _numbers(values: dict[str, Any]) -> tuple[dict[str, float], list[str]]:
    """Split into finite numbers (metrics) and the names of everything else."""
    metrics, ignored = {}, []
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            metrics[str(key)] = float(value)
        else:
            ignored.append(str(key))
    return metrics, ignored


def _clip(text: str, width: int = 80) -> str:
    text = text.strip()
    return repr(text if len(text) <= width else text[:width] + "…")


def _last_line(path: Path) -> str:
    """The last non-empty line of a (possibly long) log file."""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - _TAIL_BYTES))
        tail = handle.read().decode("utf-8", errors="replace")
    lines = [line for line in tail.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _last_words(err_path: Path) -> str:
    line = _last_line(err_path)
    return f": {_clip(line, 120)}" if line else ""


def _wait(process: subprocess.Popen, timeout: float | None) -> int | None:
    """The exit status, or None after killing a command that outlived ``timeout``."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            _kill_group(process, signal.SIGKILL)
            process.wait()
        return None


def _kill_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# -- what ``sweep(..., evaluate=...)`` accepts, and the run over every model -------------------


@dataclass
class EvalPlan:
    """How to evaluate a sweep: evaluators, parallelism, the keep rule, the plot.

    ``sweep(..., evaluate=EvalPlan(...))``; a plain callable or list stands for
    ``EvalPlan(evaluators=...)``. ``on_row`` is called (in the calling thread) with each
    model's row as soon as its evaluations are done, ``on_start`` with the models and the sweep's summary
    (None for an existing sweep) before the first starts; ``on_note`` with one-line notes (a plot not drawn).
    """

    evaluators: Sequence[Any]
    jobs: int = 1
    keep: KeepRule | str | None = None
    plot: bool = True
    on_start: Callable[[list[Target], dict[str, Any] | None], None] | None = None
    on_row: Callable[[Row], None] | None = None
    on_note: Callable[[str], None] | None = None
    _runners: list[Any] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        items = [self.evaluators] if callable(self.evaluators) or isinstance(self.evaluators, str) \
            else list(self.evaluators)
        if not items:
            raise SpecError("no evaluator given")
        self._runners = [as_evaluator(item, n) for n, item in enumerate(items, 1)]
        if isinstance(self.keep, str):
            self.keep = parse_keep_rule(self.keep)
        if self.jobs < 1:
            raise SpecError(f"--eval-jobs {self.jobs}: must be at least 1")


def as_evaluator(item: Any, number: int) -> Any:
    """A Command, a PythonEvaluator, or a command template string (run without a shell)."""
    if isinstance(item, (Command, PythonEvaluator)):
        return item
    if isinstance(item, str):
        return Command(item, number)
    if callable(item):
        return PythonEvaluator(item)
    raise SpecError(f"evaluator {item!r}: give a command string or a callable (model, weight) -> metrics")


def as_plan(evaluate: Any) -> EvalPlan:
    return evaluate if isinstance(evaluate, EvalPlan) else EvalPlan(evaluators=evaluate)


def evaluate_models(root: Path, targets: list[Target], plan: EvalPlan, removable: set[Path],
                    sweep: dict[str, Any] | None = None) -> SweepReport:
    """Run every evaluator on every target, choose with the keep rule, write the report files.

    ``removable`` are the model directories the sweep wrote: the only ones ``--keep`` deletes.
    """
    started = time.perf_counter()
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    runners = plan._runners
    if plan.on_start:
        plan.on_start(targets, sweep)
    records: dict[int, list[EvalRecord | None]] = {t.index: [None] * len(runners) for t in targets}
    rows: dict[int, Row] = {}
    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=plan.jobs, thread_name_prefix="safeblend-eval")
    try:
        futures: dict[Future, tuple[Target, int]] = {
            pool.submit(runner.run, target, logs, stop): (target, k)
            for target in targets for k, runner in enumerate(runners)
        }
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=lambda f: (futures[f][0].index, futures[f][1])):
                target, k = futures[future]
                records[target.index][k] = future.result()
                if all(r is not None for r in records[target.index]):
                    rows[target.index] = Row.build(target.index, target.weight, str(target.path),
                                                   records[target.index])
                    if plan.on_row:
                        plan.on_row(rows[target.index])
    except BaseException as exc:
        stop.set()
        for runner in runners:
            runner.kill_all()
        if isinstance(exc, KeyboardInterrupt):
            raise KeyboardInterrupt(f"evaluation stopped; the models in {root} are complete: "
                                    f"evaluate them with --eval-only {root}") from None
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    report = SweepReport(directory=str(root), evaluators=[r.name for r in runners],
                         rows=[rows[t.index] for t in targets], sweep=sweep,
                         seconds=round(time.perf_counter() - started, 4))
    if plan.keep is not None:
        _apply_keep(report, plan.keep, removable)
    write_report(report, root, plot=plan.plot, on_note=plan.on_note)
    return report


def _apply_keep(report: SweepReport, rule: KeepRule, removable: set[Path]) -> None:
    """Choose one row; delete the other models the sweep wrote, only when a choice was made."""
    labels = [f"λ={row.weight:g}" for row in report.rows]
    choice = choose(rule, [row.metrics for row in report.rows], labels)
    removed: list[str] = []
    for i, row in enumerate(report.rows):
        row.kept = i == choice.chosen if choice.chosen is not None else None
        row.dropped = choice.dropped.get(i)
    if choice.chosen is not None:
        for i, row in enumerate(report.rows):
            path = Path(row.model)
            if i != choice.chosen and path in removable and path.is_dir() and not path.is_symlink():
                # Only the files the sweep wrote go; an evaluation's own files in the model
                # directory stay (and so does the directory, holding them).
                left = remove_output(path)
                row.removed = True
                removed.append(row.model)
                if left:
                    report.notes.append(f"{path}: kept {', '.join(left[:3])}{' …' if len(left) > 3 else ''}, "
                                        "which safeblend did not write; the model's own files were removed")
    report.keep = {"rule": rule.text, "chosen": report.rows[choice.chosen].weight if choice.chosen is not None else None,
                   "model": report.rows[choice.chosen].model if choice.chosen is not None else None,
                   "reason": choice.reason, "removed": removed}


def evaluate_result(result: Any, evaluate: Any) -> SweepReport:
    """Evaluate what ``sweep`` just wrote (``result`` a SweepResult); its outputs are removable."""
    plan = as_plan(evaluate)
    targets = [Target(i, w, Path(out.output), Path(out.output).name)
               for i, (w, out) in enumerate(zip(result.weights, result.outputs))]
    return evaluate_models(Path(result.output), targets, plan, {t.path for t in targets}, sweep=result.to_dict())


def evaluate_directory(directory: str | os.PathLike, evaluate: Any,
                       weights: Sequence[float] | None = None) -> SweepReport:
    """(Re-)evaluate an existing sweep directory: every complete ``lambda-<w>/`` in it, or the given weights.

    ``--keep`` removes only directories safeblend wrote (they carry its manifest).
    """
    from .lambda_sweep import DIR_PREFIX, output_name

    plan = as_plan(evaluate)
    root = Path(os.path.abspath(directory))
    if not root.is_dir():
        raise SpecError(f"--eval-only {directory}: not a directory")
    found = sorted(found_models(root).items())
    if weights is not None:
        have = dict(found)
        missing = [output_name(w) for w in weights if float(w) not in have]
        if missing:
            raise SpecError(f"{root}: no complete model for {', '.join(missing)}")
        found = sorted((float(w), have[float(w)]) for w in weights)
    if not found:
        raise SpecError(f"--eval-only {root}: no complete {DIR_PREFIX}<w>/ model directory in it")
    targets = [Target(i, w, path, path.name) for i, (w, path) in enumerate(found)]
    removable = {t.path for t in targets if is_safeblend_output(t.path)}
    return evaluate_models(root, targets, plan, removable)


def found_models(root: Path) -> dict[float, Path]:
    """The complete swept models in a sweep directory, by weight (staging directories are hidden)."""
    from .lambda_sweep import DIR_PREFIX

    models = {}
    for path in root.glob(DIR_PREFIX + "*"):
        try:
            weight = float(path.name[len(DIR_PREFIX):])
        except ValueError:
            continue
        if path.is_dir() and not path.is_symlink() and is_safeblend_output(path):
            models[weight] = path
    return models


def is_safeblend_output(path: Path) -> bool:
    """Whether safeblend wrote this directory (a merge's or an adapter sweep's manifest)."""
    from .manifest import MANIFEST_NAME

    return (path / MANIFEST_NAME).is_file()
