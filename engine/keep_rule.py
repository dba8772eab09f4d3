"""``--keep`` rules: which swept model to keep, from the metrics its evaluations printed.

The grammar is deliberately small (keywords are case-insensitive)::

    rule      := ("best" | "lowest") METRIC [ "where" condition ( "and" condition )* ]
    condition := METRIC op NUMBER            op: >=  <=  >  <

``best task`` keeps the λ with the highest ``task``; ``lowest loss`` the one with the lowest
``loss``; ``best task where safety >= 0.95 and refusals < 0.1`` first drops every λ that fails
a condition. Equal scores go to the smaller λ (closer to the base model). METRIC is a name as
the evaluation printed it: letters, digits, ``_ . - /``, not starting with a digit or ``-``.

The rule never guesses: when a metric it reads is missing for some λ (its evaluation failed,
or no evaluation prints it) or no λ meets the conditions, ``choose`` returns no choice, with
the reason, and the caller deletes nothing.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from .errors import SpecError

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt,
}
_TOKEN = re.compile(r"\s*(?:(?P<op>>=|<=|>|<)|(?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
                    r"|(?P<word>[A-Za-z_][\w.\-/]*))")
_KEYWORDS = ("best", "lowest", "where", "and")
USAGE = "best METRIC | lowest METRIC, optionally followed by: where METRIC >=|<=|>|< NUMBER [and ...]"


@dataclass(frozen=True)
class Condition:
    metric: str
    op: str
    value: float

    def holds(self, x: float) -> bool:
        return OPERATORS[self.op](x, self.value)

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"


@dataclass(frozen=True)
class KeepRule:
    """A parsed rule: maximise (``best``) or minimise (``lowest``) ``metric`` under ``conditions``."""

    text: str
    goal: str  # "best" or "lowest"
    metric: str
    conditions: tuple[Condition, ...] = ()

    @property
    def metrics(self) -> list[str]:
        """Every metric the rule reads, in order of appearance, without repeats."""
        return list(dict.fromkeys([self.metric, *(c.metric for c in self.conditions)]))


@dataclass
class Choice:
    """What a rule made of the rows: the chosen index (or None, with ``reason``), and per row
    why it was dropped (absent for the chosen one and for rows that qualified but lost)."""

    chosen: int | None
    reason: str
    dropped: dict[int, str] = field(default_factory=dict)


def parse_keep_rule(text: str) -> KeepRule:
    """Parse ``text``; SpecError with the grammar on any mistake.

    >>> parse_keep_rule("best task where safety >= 0.95").conditions[0].value
    0.95
    """
    tokens = _tokenize(text)
    kinds = [kind for kind, _ in tokens]

    def fail(why: str) -> SpecError:
        return SpecError(f"--keep {text!r}: {why}; the rule is {USAGE}")

    if not tokens or tokens[0] not in (("word", "best"), ("word", "lowest")):
        raise fail("it must start with 'best' or 'lowest'")
    if len(tokens) < 2 or kinds[1] != "metric":
        raise fail(f"'{tokens[0][1]}' must be followed by a metric name")
    goal, metric = tokens[0][1], tokens[1][1]
    conditions: list[Condition] = []
    rest = tokens[2:]
    if rest:
        if rest[0] != ("word", "where"):
            raise fail(f"expected 'where' after the metric, got {rest[0][1]!r}")
        rest = rest[1:]
        while True:
            if len(rest) < 3 or [k for k, _ in rest[:3]] != ["metric", "op", "number"]:
                shown = " ".join(v for _, v in rest[:3]) or "nothing"
                raise fail(f"expected a condition like 'safety >= 0.95', got {shown!r}")
            conditions.append(Condition(rest[0][1], rest[1][1], float(rest[2][1])))
            rest = rest[3:]
            if not rest:
                break
            if rest[0] != ("word", "and"):
                raise fail(f"conditions are joined with 'and', got {rest[0][1]!r}")
            rest = rest[1:]
    return KeepRule(text=text.strip(), goal=goal, metric=metric, conditions=tuple(conditions))


def _tokenize(text: str) -> list[tuple[str, str]]:
    """(kind, text) pairs; kind is op, number, metric, or word for a keyword (lower-cased)."""
    tokens: list[tuple[str, str]] = []
    pos, end = 0, len(text.rstrip())
    while pos < end:
        match = _TOKEN.match(text, pos)
        if not match or match.end() == pos:
            raise SpecError(f"--keep {text!r}: cannot read {text[pos:].strip()!r}; the rule is {USAGE}")
        pos = match.end()
        if match["op"]:
            tokens.append(("op", match["op"]))
        elif match["number"]:
            if not math.isfinite(float(match["number"])):
                raise SpecError(f"--keep {text!r}: {match['number']} is not a finite number")
            tokens.append(("number", match["number"]))
        elif match["word"].lower() in _KEYWORDS:
            tokens.append(("word", match["word"].lower()))
        else:
            tokens.append(("metric", match["word"]))
    return tokens


def choose(rule: KeepRule, rows: Sequence[Mapping[str, float]], labels: Sequence[str]) -> Choice:
    """Apply ``rule`` to each row's metrics (``labels`` name rows in messages, e.g. ``λ=0.3``).

    Rows are in ascending weight order, so ties go to the earliest row. No choice when any row
    lacks a metric the rule reads (a failed evaluation might have been the best), or when no
    row meets every condition.
    """
    missing = {i: [m for m in rule.metrics if m not in row] for i, row in enumerate(rows)}
    missing = {i: names for i, names in missing.items() if names}
    if missing:
        dropped = {i: f"no value for {', '.join(names)}" for i, names in missing.items()}
        where = "; ".join(f"{labels[i]}: {', '.join(names)}" for i, names in missing.items())
        return Choice(None, f"metrics the rule needs are missing ({where}); fix the evaluation and "
                            "rerun with --eval-only", dropped)
    dropped: dict[int, str] = {}
    for i, row in enumerate(rows):
        failed = [f"{c.metric} = {row[c.metric]:g}, not {c.op} {c.value:g}" for c in rule.conditions
                  if not c.holds(row[c.metric])]
        if failed:
            dropped[i] = "; ".join(failed)
    candidates = [i for i in range(len(rows)) if i not in dropped]
    if not candidates:
        return Choice(None, f"no λ meets {' and '.join(map(str, rule.conditions))}", dropped)
    sign = 1.0 if rule.goal == "best" else -1.0
    chosen = max(candidates, key=lambda i: (sign * rows[i][rule.metric], -i))
    best_value = rows[chosen][rule.metric]
    for i in candidates:
        if i == chosen:
            continue
        value = rows[i][rule.metric]
        if value == best_value:
            dropped[i] = f"{rule.metric} = {value:g}, tied with {labels[chosen]} (ties go to the smaller λ)"
        else:
            better = "higher" if rule.goal == "best" else "lower"
            dropped[i] = f"{rule.metric} = {value:g}; {labels[chosen]} has {better} {best_value:g}"
    return Choice(chosen, f"{rule.goal} {rule.metric} = {rows[chosen][rule.metric]:g}"
                          + (f" where {' and '.join(map(str, rule.conditions))}" if rule.conditions else ""),
                  dropped)
