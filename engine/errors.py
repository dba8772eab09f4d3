"""Exceptions the engine raises; the CLI turns each into a one-line ``Error: ...``."""


class SafeblendError(Exception):
    """Base class: a failure the user can act on, described in one line."""


class CheckpointError(SafeblendError):
    """An input checkpoint is missing, malformed or unsupported."""


class IncompatibleInputsError(SafeblendError):
    """The inputs do not match each other (names, shapes)."""


class OutputError(SafeblendError):
    """The output cannot be written where or how it was asked."""


class SpecError(SafeblendError):
    """The merge request itself is invalid (method, weights, dtype, sizes)."""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type's name when it has none): another
    library's multi-line error, fit for one ``Error:`` line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
