"""Per-tensor method state for the executor, after the method's reduce passes.

A method that needs whole-tensor statistics (SLERP's norms, TIES's thresholds, Model
Stock's cosines, DARE's L1 norms) declares reduce passes; before the first chunk of a tensor
is merged, the passes run here over the tensor's chunks, through the same memory maps and
releasing each chunk's pages after use, so memory stays O(chunk per thread). The state is
shared by the compute threads working on that tensor's chunks: the first thread to need it
runs the passes (spreading each pass's chunks over ``workers`` threads of its own, since the
executor's other workers are waiting for the same state), the others wait. A method without
reduce passes costs one ``prepare`` call per tensor.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from .checkpoint import SafetensorsFile, TensorInfo
from .chunks import chunk_elements, element_steps, release_inputs
from .methods.base import ChunkContext, MergeMethod, TensorContext
from .methods.params import layer_positions
from .plan import MergePlan, OutputTensor

# States kept after use: more than the chunks the executor can have in flight at once.
_KEEP = 64


@dataclass
class _Entry:
    ready: threading.Event = field(default_factory=threading.Event)
    context: TensorContext | None = None
    state: Any = None
    error: BaseException | None = None


class TensorStates:
    """``get(tensor)`` → (context, state, bytes read by its reduce passes), once per tensor."""

    def __init__(
        self,
        method: MergeMethod,
        plan: MergePlan,
        file_of: Callable[[TensorInfo], SafetensorsFile],
        chunk_bytes: int,
        workers: int = 1,
    ) -> None:
        self.method = method
        self.file_of = file_of
        self.chunk_bytes = chunk_bytes
        self.workers = max(1, workers)
        self._positions = layer_positions(t.name for t in plan.tensors)
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        # Per-tensor parameters (filters, gradients) are resolved now, so that a recipe that
        # does not cover some tensor fails before any data is read.
        for t in plan.tensors:
            if t.action == "merge":
                method.prepare(self.context(t))

    def context(self, t: OutputTensor) -> TensorContext:
        return TensorContext(t.name, t.numel, self._positions.get(t.name, 1.0), tuple(t.shape))

    def get(self, t: OutputTensor) -> tuple[TensorContext, Any, int]:
        with self._lock:
            entry = self._entries.get(t.name)
            owner = entry is None
            if owner:
                entry = self._entries[t.name] = _Entry()
                while len(self._entries) > _KEEP:
                    self._entries.popitem(last=False)
        if not owner:
            entry.ready.wait()
            if entry.error is not None:
                raise entry.error
            return entry.context, entry.state, 0
        try:
            entry.context = self.context(t)
            entry.state = self.method.prepare(entry.context)
            self.method.attach_reader(entry.state, lambda first, count: self.read(t, first, count))
            read = self._reduce(t, entry.context, entry.state)
        except BaseException as exc:
            entry.error = exc
            raise
        finally:
            entry.ready.set()
        return entry.context, entry.state, read

    def read(self, t: OutputTensor, first: int, count: int) -> list[Any]:
        """Zero-copy views of elements [first, first + count) of ``t``'s base and models."""
        sources = [t.base, *t.models]
        return [self.file_of(info).view(info, first, count) for info in sources]

    def _reduce(self, t: OutputTensor, context: TensorContext, state: Any) -> int:
        """Run the method's reduce passes over the tensor's chunks; returns the bytes read."""
        passes = self.method.reduce_passes(state)
        if not passes:
            return 0
        sources = [t.base, *t.models]
        files = [self.file_of(info) for info in sources]
        for info, f in zip(sources, files):
            hold = getattr(f, "hold", None)  # a streamed input: fetched once for every pass (safeblend.remote)
            if hold is not None:
                hold(info)
        steps = list(element_steps(t.numel, chunk_elements(self.chunk_bytes, *(i.dtype.itemsize for i in sources))))

        def fold(pass_index: int, step: tuple[int, int]) -> int:
            first, count = step
            views = [f.view(info, first, count) for info, f in zip(sources, files)]
            self.method.accumulate(state, pass_index, views[0], views[1:], ChunkContext(context, first))
            del views
            return release_inputs(list(zip(sources, files)), first, count)

        read = 0
        threads = min(self.workers, len(steps))
        pool = ThreadPoolExecutor(threads, thread_name_prefix="safeblend-reduce") if threads > 1 else None
        try:
            pass_index = 0
            while pass_index < passes:
                if pool is None:
                    read += sum(fold(pass_index, step) for step in steps)
                else:
                    read += sum(pool.map(lambda step: fold(pass_index, step), steps))
                self.method.end_pass(state, pass_index)
                pass_index += 1
                passes = self.method.reduce_passes(state)  # a pass may find it needs more
            for info, f in zip(sources, files):
                done = getattr(f, "passes_done", None)  # its spool goes once the merge consumed it
                if done is not None:
                    done(info)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        return read
