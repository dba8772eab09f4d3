"""One merge's failure slot, shared by every pipeline thread.

A merge runs on several threads: compute (or, on a GPU, readers), the writer, the journal's
hasher and flusher. Each waits on the others (a free buffer, room in the write queue, bytes to
hash), so one thread dying silently would leave the rest waiting forever. Instead every thread
reports its failure here, and every blocking wait polls this slot: the first failure wakes all
threads, and the merge ends with that failure's error (later ones are its consequences).

An interrupt (Ctrl-C, SIGTERM) is not a failure: the writer and hasher finish what was queued,
so that the journal covers it and ``--resume`` keeps it.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, TypeVar

T = TypeVar("T")
# How often a blocked thread looks at the slot: the longest a failure goes unnoticed.
POLL_S = 0.05


class Abort:
    """The first failure of any thread of one merge, and the event that wakes the others."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self._lock = threading.Lock()

    def fail(self, exc: BaseException) -> BaseException:
        """Record ``exc`` unless a failure came first; returns the first one (to re-raise)."""
        with self._lock:
            if self.error is None:
                self.error = exc
            return self.error

    def check(self) -> None:
        """Raise the first failure, if any thread has failed."""
        if self.error is not None:
            raise self.error

    def get(self, source: queue.Queue) -> T:
        """``source.get()`` that raises the first failure instead of waiting forever."""
        while True:
            self.check()
            try:
                return source.get(timeout=POLL_S)
            except queue.Empty:
                pass

    def put(self, target: queue.Queue, item: object) -> None:
        """``target.put(item)`` that raises the first failure instead of waiting forever."""
        while True:
            self.check()
            try:
                target.put(item, timeout=POLL_S)
                return
            except queue.Full:
                pass

    def guarded(self, work: Callable[..., T]) -> Callable[..., T]:
        """``work`` reporting its failure here (for work run on a pool thread)."""

        def run(*args, **kwargs) -> T:
            try:
                return work(*args, **kwargs)
            except BaseException as exc:
                self.fail(exc)
                raise

        return run

    def first(self, exc: BaseException) -> BaseException:
        """What a thread stopped by ``exc`` should raise: the first failure, or ``exc`` itself.

        An interrupt is never recorded (the other threads finish their queued work, module
        docstring), but yields to a failure that came before it."""
        if isinstance(exc, KeyboardInterrupt):
            return self.error or exc
        return self.fail(exc)
