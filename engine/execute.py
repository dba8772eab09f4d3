"""Execution: stream every planned tensor through the backend, chunk by chunk.

Per chunk: take zero-copy views of the inputs through their memory maps, let the method
compute into a pooled output buffer, hand the buffer to the writer thread, and drop the
consumed input pages from the process. The next chunk's input ranges are prefetched
(``MADV_WILLNEED``) while this one computes, the writer writes while the next one computes,
so reading, compute and writing overlap; memory is a fixed number of chunk buffers.

``ExecutorBase`` is what every executor (CPU here, GPU in safeblend.execute_cuda, the sweep's
in safeblend.lambda_sweep) shares: the inputs' files, per-tensor method state, and copied
tensors' bytes (cast ones through a pooled buffer placed for ``O_DIRECT``). Any thread's
failure ends the run through the writer's ``Abort`` (safeblend.abort).
"""

from __future__ import annotations

import os
import queue
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterable, TypeVar

import numpy as np

from .abort import Abort
from .blas import single_threaded_blas
from .checkpoint import Checkpoint, SafetensorsFile, TensorInfo
from .chunks import Chunk, iter_chunks, release_inputs
from .methods._blocks import scratch
from .methods.base import ChunkContext, MergeMethod
from .plan import MergePlan, OutputTensor
from .reduce import TensorStates
from .writer import ShardWriter, WriteDone, aligned_buffer, placed

DEFAULT_CHUNK_BYTES = 8 * 2**20
# Compute threads: one per core, leaving the kernel's page-cache copies to the writer thread.
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)
T = TypeVar("T")


def run_in_order(items: Iterable[T], work: Callable[[T], Any], collect: Callable[[T, Any], None], workers: int,
                 in_flight: int, abort: Abort, before: Callable[[T], None] | None = None) -> None:
    """``work`` on each item on ``workers`` threads, at most ``in_flight`` at once, and
    ``collect`` of each result in item order (on this thread, so folds are deterministic).

    ``before`` runs on this thread as an item is queued (readahead). A failure anywhere ends
    the run with the first one (``abort``); the threads are joined before it is raised.
    """
    pending: deque[tuple[T, Future]] = deque()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="safeblend-compute")
    with single_threaded_blas(), pool:
        try:
            for item in items:
                abort.check()  # another thread failed: stop queueing
                if before is not None:
                    before(item)
                pending.append((item, pool.submit(abort.guarded(work), item)))
                if len(pending) >= in_flight:
                    item, future = pending.popleft()
                    collect(item, future.result())
            while pending:
                item, future = pending.popleft()
                collect(item, future.result())
        except BaseException as exc:
            first = abort.first(exc)
            pool.shutdown(wait=True, cancel_futures=True)  # every wait of theirs polls the abort
            raise first


class BufferPool:
    """A fixed set of equal page-aligned byte buffers, handed out and returned across threads;
    each holds one chunk ``placed`` for the writer (safeblend.writer). ``acquire`` raises the
    merge's first failure rather than wait for buffers a failed thread will never return."""

    def __init__(self, count: int, nbytes: int, abort: Abort, allocate: Callable[[int], Any] = aligned_buffer) -> None:
        self.count = count
        self.abort = abort  # the merge's: a pool of its own would never hear of a failure
        self._free: queue.Queue = queue.Queue()
        for _ in range(count):
            self._free.put(allocate(nbytes))

    def acquire(self) -> Any:
        return self.abort.get(self._free)

    def release(self, buffer: Any) -> None:
        self._free.put(buffer)


@dataclass
class ExecutionStats:
    bytes_read: int = 0
    bytes_written: int = 0


class ExecutorBase:
    """What every executor shares; ``run(writer, progress)`` computes and writes every chunk
    of the plan but the ``kept`` tensors, and returns the bytes read and written."""

    def __init__(
        self,
        plan: MergePlan,
        base: Checkpoint,
        models: list[Checkpoint],
        method: MergeMethod,
        backend,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        workers: int = DEFAULT_WORKERS,
        kept: frozenset[str] = frozenset(),
    ) -> None:
        self.plan = plan
        self.method = method
        self.backend = backend
        self.chunk_bytes = chunk_bytes
        self.workers = max(1, workers)
        self.kept = kept
        self._files: dict = {f.path: f for ckpt in (base, *models) for f in ckpt.files}
        # Per-tensor method state; runs a method's reduce passes (if any) before a tensor's first
        # chunk. Per-tensor parameters are resolved now: a bad recipe fails before any read.
        self._states = TensorStates(method, plan, self._file, chunk_bytes, self.workers)

    def _file(self, info: TensorInfo) -> SafetensorsFile:
        return self._files[info.file]

    def _sources(self, t: OutputTensor) -> list[TensorInfo]:
        return [t.base, *t.models] if t.action == "merge" else [t.base]

    def _prefetch(self, chunk: Chunk) -> None:
        for info in self._sources(chunk.tensor):
            self._file(info).prefetch(*chunk.source_range(info))

    def _copy(self, chunk: Chunk, pool: BufferPool) -> tuple[Any, WriteDone, int]:
        """A copied chunk's output bytes, the callback that frees them once written, and the
        input bytes read: the input's own mapped bytes, or, for a tensor taken from one model
        and cast to the output dtype, the cast into a pooled buffer placed for O_DIRECT."""
        t = chunk.tensor
        info, file = t.base, self._file(t.base)
        start, length = chunk.source_range(info)
        if info.dtype == t.dtype:
            return file.byte_view(start, length), partial(file.release, start, length), length
        buffer = pool.acquire()
        out = placed(self._host(buffer), *chunk.out_range)
        np.copyto(out.view(t.dtype.numpy), file.view(info, chunk.first, chunk.count), casting="unsafe")
        file.release(start, length)
        return out, partial(pool.release, buffer), length

    def _host(self, buffer: Any) -> np.ndarray:
        """A pooled buffer as a numpy byte array (a hook: the GPU pool holds pinned tensors)."""
        return buffer


class Executor(ExecutorBase):
    """Runs a plan on the CPU with a few compute threads and one writer thread."""

    def run(self, writer: ShardWriter, progress: Callable[[int], None] | None = None) -> ExecutionStats:
        """Compute and write every chunk; ``progress`` gets the output bytes of each chunk.

        Chunks are computed by ``workers`` threads (numpy releases the GIL in its loops), at
        most two per worker in flight; each finished chunk goes to the writer thread.

        The journal's hasher keeps a written chunk's buffer until every byte before it in its
        shard is written (it hashes in file order), so the buffers of all chunks after the
        oldest one in flight may wait on that one. The number in flight is capped so that
        those can never take the whole pool: the oldest chunk always finds a buffer.
        """
        stats = ExecutionStats()
        pool = self._buffer_pool(writer)
        in_flight = min(2 * self.workers, 1 + (pool.count - 1) // self._buffers_per_chunk())
        run_in_order(iter_chunks(self.plan, self.chunk_bytes, self.kept),
                     lambda chunk: self._process(chunk, writer, pool),
                     lambda chunk, read: self._collect(chunk, read, stats, progress),
                     self.workers, in_flight, writer.abort, before=self._prefetch)
        return stats

    def _buffer_pool(self, writer: ShardWriter) -> BufferPool:
        """Chunk buffers for the writer's queue plus two chunks in flight per worker (a hook:
        the sweep executor, safeblend.lambda_sweep, sizes its own for several outputs)."""
        return BufferPool(writer.depth + 2 * self.workers, self.chunk_bytes, writer.abort)

    def _buffers_per_chunk(self) -> int:
        """Pool buffers one chunk may hold at once (a hook, like ``_buffer_pool``)."""
        return 1

    @staticmethod
    def _collect(chunk: Chunk, read: int, stats: ExecutionStats, progress: Callable[[int], None] | None) -> None:
        """Count a finished chunk (on the main thread, in chunk order)."""
        stats.bytes_read += read
        written = chunk.out_range[1]
        stats.bytes_written += written
        if progress is not None:
            progress(written)

    def _process(self, chunk: Chunk, writer: ShardWriter, pool: BufferPool) -> int:
        """Compute one chunk and queue its write; returns the input bytes it read."""
        t = chunk.tensor
        offset, nbytes = chunk.out_range
        if t.action == "copy":
            data, done, read = self._copy(chunk, pool)
            writer.submit(t.shard, offset, data, done)
            return read
        if t.requant is not None:  # --dtype fp8: merge in fp32, then fresh block scales (safeblend.quantized)
            return self._process_requantized(chunk, writer)
        buffer = pool.acquire()
        out_bytes = placed(buffer, offset, nbytes)
        sources = [(info, self._file(info)) for info in self._sources(t)]
        views = [f.view(info, chunk.first, chunk.count) for info, f in sources]
        context, state, read = self._states.get(t)
        self.method.merge_chunk(self.backend, views[0], views[1:], out_bytes.view(t.dtype.numpy),
                                ChunkContext(context, chunk.first), state)
        # Submitted before the inputs are released: the output watch (safeblend.output_checks)
        # compares early chunks with the base's values, which a streamed input would otherwise
        # fetch again once released.
        writer.submit(t.shard, offset, out_bytes, partial(pool.release, buffer))
        read += release_inputs(sources, chunk.first, chunk.count)
        return read

    def _process_requantized(self, chunk: Chunk, writer: ShardWriter) -> int:
        """A chunk of whole fp8 block rows: merged in fp32, quantized with fresh block scales;
        its codes and its rows of the scale tensor are queued for writing."""
        t = chunk.tensor
        sources = [(info, self._file(info)) for info in self._sources(t)]
        views = [f.view(info, chunk.first, chunk.count) for info, f in sources]
        context, state, read = self._states.get(t)
        merged = scratch("requantize", 1, np.float32, chunk.count)[0][: chunk.count]  # reused: fresh pages cost
        self.method.merge_chunk(self.backend, views[0], views[1:], merged, ChunkContext(context, chunk.first), state)
        read += release_inputs(sources, chunk.first, chunk.count)
        for target, offset, data in t.requant.quantize(t, merged, chunk.first, self.kept):
            writer.submit(target.shard, target.offset + offset, data)
        return read
