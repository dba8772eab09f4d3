"""One merge's failure slot, shared by every pipeline thread.

A merge's threads (compute or GPU readers, the writer, the journal's hasher and flusher) wait on
each other: for a free buffer, room in the write queue, bytes to hash. So that one failing
thread never leaves the rest waiting forever, each reports its failure here and every blocking
wait polls the slot: the first failure wakes all threads, and the merge ends with its error
(later ones are its consequences). An interrupt (Ctrl-C, SIGTERM) is not a failure: the writer
and hasher finish what was queued, so the journal covers it for ``--resume``.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

POLL_S = 0.05  # how often a blocked thread looks at the slot


class Abort:
    """The first failure of any thread of one merge."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self._lock = threading.Lock()

    def fail(self, exc: BaseException) -> BaseException:
        """Record ``exc`` unless a failure came first; returns the first one."""
        with self._lock:
            self.error = self.error or exc
            return self.error

    def first(self, exc: BaseException) -> BaseException:
        """What a thread stopped by ``exc`` raises: the first failure. An interrupt is not
        recorded (module docstring) but yields to a failure that came before it."""
        return (self.error or exc) if isinstance(exc, KeyboardInterrupt) else self.fail(exc)

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def get(self, source: queue.Queue) -> Any:
        """``source.get()`` that raises the first failure instead of waiting forever."""
        return self._poll(source.get, queue.Empty)

    def put(self, target: queue.Queue, item: object) -> None:
        """``target.put(item)`` that raises the first failure instead of waiting forever."""
        self._poll(lambda timeout: target.put(item, timeout=timeout), queue.Full)

    def _poll(self, wait: Callable[..., Any], retry: type[Exception]) -> Any:
        while True:
            self.check()
            try:
                return wait(timeout=POLL_S)
            except retry:
                pass

    def guarded(self, work: Callable[..., Any]) -> Callable[..., Any]:
        """``work`` (run on a pool thread) reporting its failure here."""

        def run(*args: Any) -> Any:
            try:
                return work(*args)
            except BaseException as exc:
                self.fail(exc)
                raise

        return run
