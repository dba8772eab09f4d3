"""PEFT's ``rank_pattern`` / ``alpha_pattern`` keys, matched as PEFT matches them, in bounded time.

PEFT picks a module's key with ``re.match(rf"(.*\\.)?({key})$", module)``: the key, as a
regular expression, must match the whole module name or a part of it that follows a dot.
Keys come from an adapter's config file, so they are untrusted: Python's backtracking
matcher takes exponential time on keys such as ``(.*.*)*Z``. Here a key is parsed once
(``re``'s own parser, so the syntax and its errors are Python's) and run by a Thompson
automaton — every live state advanced together, one character at a time — so a match costs
at most (module name length + 1) × (automaton size), whatever the key. The automaton is
capped at ``MAX_STATES`` states (counted repeats ``{m,n}`` are unrolled); larger keys, and
constructs an automaton cannot run (back-references, look-arounds, flags), are refused with
one line naming the key. Keys without regex syntax other than ``.`` (nearly all real ones)
take a direct suffix comparison.
"""

from __future__ import annotations

import re
from typing import Callable

try:  # Python 3.11+: re's parser is re._parser; 3.10 has it as sre_parse
    from re import _constants as _sre
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover
    import sre_constants as _sre  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

MAX_STATES = 2000
MAX_KEY_LENGTH = 1000
_PLAIN = re.compile(r"[\w\-.]*")  # no regex syntax except '.', which matches any character

Predicate = Callable[[str], bool]


class PatternError(ValueError):
    """A key that is not a valid regular expression, or one this matcher cannot run."""


class ModulePattern:
    """One compiled key; ``matches(module)`` is PEFT's ``re.match(rf"(.*\\.)?({key})$", module)``."""

    def __init__(self, key: str) -> None:
        if not isinstance(key, str):
            raise PatternError(f"pattern {key!r} is not a string")
        if len(key) > MAX_KEY_LENGTH:
            raise PatternError(f"pattern {key[:40]!r}... is longer than {MAX_KEY_LENGTH} characters")
        self.key = key
        self._plain = _PLAIN.fullmatch(key) is not None
        self._program: list[tuple] = []
        if not self._plain:
            try:
                parsed = _sre_parse.parse(key)
            except re.error as exc:
                raise PatternError(f"pattern {key!r} is not a valid regular expression ({exc})") from None
            except RecursionError:
                raise PatternError(f"pattern {key!r} nests too deeply") from None
            flags = parsed.state.flags & ~(_sre.SRE_FLAG_UNICODE)
            if flags:
                raise PatternError(f"pattern {key!r}: inline flags are not supported")
            self._emit(list(parsed))
            self._program.append(("match",))

    def matches(self, module: str) -> bool:
        """Whether the key names ``module`` (the whole name, or a part after a dot)."""
        if self._plain:
            return self._plain_match(module)
        return self._run(module)

    # -- plain keys: a suffix comparison where '.' is any character ------------------------------

    def _plain_match(self, module: str) -> bool:
        n, k = len(module), len(self.key)
        if k > n or (k < n and module[n - k - 1] != "."):
            return False
        return all(p == "." and c != "\n" or p == c for p, c in zip(self.key, module[n - k:]))

    # -- compiling to an automaton ---------------------------------------------------------------

    def _add(self, instruction: tuple) -> int:
        if len(self._program) >= MAX_STATES:
            raise PatternError(f"pattern {self.key!r} is too large to match safely (over {MAX_STATES} states)")
        self._program.append(instruction)
        return len(self._program) - 1

    def _emit(self, items: list) -> None:
        for op, av in items:
            self._emit_one(op, av)

    def _emit_one(self, op, av) -> None:
        if op in (_sre.LITERAL, _sre.NOT_LITERAL, _sre.ANY, _sre.IN):
            self._add(("char", _predicate(op, av, self.key)))
        elif op is _sre.SUBPATTERN:
            _group, add_flags, del_flags, sub = av
            if add_flags or del_flags:
                raise PatternError(f"pattern {self.key!r}: inline flags are not supported")
            self._emit(list(sub))
        elif op is _sre.BRANCH:
            self._emit_branch(av[1])
        elif op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT) or op is getattr(_sre, "POSSESSIVE_REPEAT", None):
            self._emit_repeat(*av)
        elif op is _sre.AT and av in (_sre.AT_BEGINNING, _sre.AT_BEGINNING_STRING):
            self._add(("begin",))
        elif op is _sre.AT and av in (_sre.AT_END, _sre.AT_END_STRING):
            self._add(("end",))
        else:
            raise PatternError(f"pattern {self.key!r}: {str(op).lower()} is not supported in rank/alpha patterns")

    def _emit_branch(self, alternatives: list) -> None:
        jumps = []
        for i, alt in enumerate(alternatives):
            if i < len(alternatives) - 1:
                split = self._add(("split", None, None))
                self._emit(list(alt))
                jumps.append(self._add(("jmp", None)))
                self._program[split] = ("split", split + 1, len(self._program))
            else:
                self._emit(list(alt))
        for j in jumps:
            self._program[j] = ("jmp", len(self._program))

    def _emit_repeat(self, lo: int, hi: int, sub) -> None:
        if lo > MAX_STATES or (hi != _sre.MAXREPEAT and hi > MAX_STATES):
            raise PatternError(f"pattern {self.key!r} is too large to match safely (a repeat count over {MAX_STATES})")
        for _ in range(lo):
            self._emit(list(sub))
        if hi == _sre.MAXREPEAT:  # L: split(body, out); body; jmp L
            loop = self._add(("split", None, None))
            self._emit(list(sub))
            self._add(("jmp", loop))
            self._program[loop] = ("split", loop + 1, len(self._program))
            return
        splits = []
        for _ in range(hi - lo):  # each further copy is optional
            splits.append(self._add(("split", None, None)))
            self._emit(list(sub))
        for s in splits:
            self._program[s] = ("split", s + 1, len(self._program))

    # -- running it ------------------------------------------------------------------------------

    def _run(self, text: str) -> bool:
        """Thompson simulation of ``(.*\\.)?(key)$`` over ``text``: a thread starts at 0 and
        after every dot; a thread reaching "match" at the end of ``text`` is a match."""
        program, n = self._program, len(text)
        current: list[int] = []
        for pos in range(n + 1):
            seen: set[int] = set(current)
            if pos == 0 or text[pos - 1] == ".":
                self._follow(0, pos, n, current, seen)
            if pos == n:
                return any(program[pc][0] == "match" for pc in current)
            nxt: list[int] = []
            nseen: set[int] = set()
            ch = text[pos]
            for pc in current:
                instruction = program[pc]
                if instruction[0] == "char" and instruction[1](ch):
                    self._follow(pc + 1, pos + 1, n, nxt, nseen)
            current = nxt
        return False  # pragma: no cover  (the loop returns at pos == n)

    def _follow(self, start: int, pos: int, n: int, out: list[int], seen: set[int]) -> None:
        """Add the threads reachable from ``start`` without reading a character."""
        stack = [start]
        program = self._program
        while stack:
            pc = stack.pop()
            if pc in seen:
                continue
            seen.add(pc)
            kind = program[pc][0]
            if kind == "jmp":
                stack.append(program[pc][1])
            elif kind == "split":
                stack += [program[pc][2], program[pc][1]]
            elif kind == "begin":
                if pos == 0:
                    stack.append(pc + 1)
            elif kind == "end":
                if pos == n:
                    stack.append(pc + 1)
            else:
                out.append(pc)


def _predicate(op, av, key: str) -> Predicate:
    """The test one character must pass for a LITERAL, NOT_LITERAL, ANY or IN item."""
    if op is _sre.LITERAL:
        c = chr(av)
        return lambda ch: ch == c
    if op is _sre.NOT_LITERAL:
        c = chr(av)
        return lambda ch: ch != c
    if op is _sre.ANY:
        return lambda ch: ch != "\n"
    tests: list[Predicate] = []
    negate = False
    for item_op, item_av in av:
        if item_op is _sre.NEGATE:
            negate = True
        elif item_op is _sre.LITERAL:
            tests.append(lambda ch, c=chr(item_av): ch == c)
        elif item_op is _sre.RANGE:
            tests.append(lambda ch, lo=item_av[0], hi=item_av[1]: lo <= ord(ch) <= hi)
        elif item_op is _sre.CATEGORY and item_av in _CATEGORIES:
            tests.append(_CATEGORIES[item_av])
        else:
            raise PatternError(f"pattern {key!r}: {str(item_op).lower()} in a character class is not supported")
    if negate:
        return lambda ch: not any(t(ch) for t in tests)
    return lambda ch: any(t(ch) for t in tests)


def _word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


_CATEGORIES: dict = {
    _sre.CATEGORY_DIGIT: str.isdecimal,
    _sre.CATEGORY_NOT_DIGIT: lambda ch: not ch.isdecimal(),
    _sre.CATEGORY_SPACE: str.isspace,
    _sre.CATEGORY_NOT_SPACE: lambda ch: not ch.isspace(),
    _sre.CATEGORY_WORD: _word,
    _sre.CATEGORY_NOT_WORD: lambda ch: not _word(ch),
}
