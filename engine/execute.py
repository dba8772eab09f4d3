"""Execution: stream every planned tensor through the backend, chunk by chunk.

Per chunk: take zero-copy views of the inputs through their memory maps, let the method
compute into a pooled output buffer, hand the buffer to the writer thread, and drop the
consumed input pages from the process. The next chunk's input ranges are prefetched
(``MADV_WILLNEED``) while this one computes, the writer writes while the next one computes,
so reading, compute and writing overlap; memory is a fixed number of chunk buffers.
"""

from __future__ import annotations

import os
import queue
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from .blas import single_threaded_blas
from .checkpoint import Checkpoint, SafetensorsFile, TensorInfo
from .methods.base import ChunkContext, MergeMethod
from .plan import MergePlan, OutputTensor
from .reduce import TensorStates
from .writer import ShardWriter, aligned_buffer, placed

DEFAULT_CHUNK_BYTES = 8 * 2**20
# Compute threads: one per core, leaving the kernel's page-cache copies to the writer thread.
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)


@dataclass(frozen=True)
class Chunk:
    """Elements [first, first + count) of one output tensor."""

    tensor: OutputTensor
    first: int
    count: int


def iter_chunks(plan: MergePlan, chunk_bytes: int) -> Iterator[Chunk]:
    """Every planned tensor cut into chunks whose largest operand is at most ``chunk_bytes``."""
    for tensor in plan.tensors:
        if tensor.name in plan.skip:  # already in place (resumed merge)
            continue
        for t in tensor.pieces():
            widest = max([t.dtype.itemsize, t.base.dtype.itemsize, *(m.dtype.itemsize for m in t.models)])
            step = max(1, chunk_bytes // widest)
            step = t.requant.step(step) if t.requant is not None else step  # whole fp8 block rows
            for first in range(0, t.numel, step):
                yield Chunk(t, first, min(step, t.numel - first))


class BufferPool:
    """A fixed set of equal page-aligned byte buffers, handed out and returned across threads;
    each holds one chunk ``placed`` for the writer (safeblend.writer)."""

    def __init__(self, count: int, nbytes: int) -> None:
        self.count = count
        self._free: queue.Queue = queue.Queue()
        for _ in range(count):
            self._free.put(aligned_buffer(nbytes))

    def acquire(self) -> np.ndarray:
        return self._free.get()

    def release(self, buffer: np.ndarray) -> None:
        self._free.put(buffer)


@dataclass
class ExecutionStats:
    bytes_read: int = 0
    bytes_written: int = 0


class Executor:
    """Runs a plan on the CPU with a few compute threads and one writer thread."""

    def __init__(
        self,
        plan: MergePlan,
        base: Checkpoint,
        models: list[Checkpoint],
        method: MergeMethod,
        backend,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        workers: int = DEFAULT_WORKERS,
    ) -> None:
        self.plan = plan
        self.method = method
        self.backend = backend
        self.chunk_bytes = chunk_bytes
        self.workers = max(1, workers)
        self._files: dict = {f.path: f for ckpt in (base, *models) for f in ckpt.files}
        # Per-tensor method state; runs a method's reduce passes (if any) before a tensor's first chunk.
        self._states = TensorStates(method, plan, self._file, chunk_bytes, self.workers)

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
        pending: deque[tuple[Chunk, Future]] = deque()
        compute = ThreadPoolExecutor(self.workers, thread_name_prefix="safeblend-compute")
        with single_threaded_blas(), compute as workers:
            try:
                for chunk in iter_chunks(self.plan, self.chunk_bytes):
                    self._prefetch(chunk)  # in flight before a worker reaches it
                    pending.append((chunk, workers.submit(self._process, chunk, writer, pool)))
                    if len(pending) >= in_flight:
                        self._collect(*pending.popleft(), stats, progress)
                while pending:
                    self._collect(*pending.popleft(), stats, progress)
            except BaseException:
                workers.shutdown(wait=True, cancel_futures=True)
                raise
        return stats

    def _buffer_pool(self, writer: ShardWriter) -> BufferPool:
        """Chunk buffers for the writer's queue plus two chunks in flight per worker.

        A hook: the sweep executor (safeblend.lambda_sweep) sizes its own pool for several outputs.
        """
        return BufferPool(count=writer.depth + 2 * self.workers, nbytes=self.chunk_bytes)

    def _buffers_per_chunk(self) -> int:
        """Pool buffers one chunk may hold at once (a hook, like ``_buffer_pool``)."""
        return 1

    @staticmethod
    def _collect(chunk: Chunk, future: Future, stats: ExecutionStats,
                 progress: Callable[[int], None] | None) -> None:
        stats.bytes_read += future.result()
        written = chunk.count * chunk.tensor.dtype.itemsize
        stats.bytes_written += written
        if progress is not None:
            progress(written)

    def _sources(self, t: OutputTensor) -> list[TensorInfo]:
        return [t.base, *t.models] if t.action == "merge" else [t.base]

    def _file(self, info: TensorInfo) -> SafetensorsFile:
        return self._files[info.file]

    def _prefetch(self, chunk: Chunk) -> None:
        for info in self._sources(chunk.tensor):
            size = info.dtype.itemsize
            self._file(info).prefetch(info.start + chunk.first * size, chunk.count * size)

    def _process(self, chunk: Chunk, writer: ShardWriter, pool: BufferPool) -> int:
        """Compute one chunk and queue its write; returns the input bytes it read."""
        t = chunk.tensor
        out_offset = t.offset + chunk.first * t.dtype.itemsize
        if t.action == "copy":
            info, file = t.base, self._file(t.base)
            start, length = info.start + chunk.first * info.dtype.itemsize, chunk.count * info.dtype.itemsize
            if info.dtype != t.dtype:  # a tensor taken from one model, cast to the output dtype
                buffer = pool.acquire()
                out_bytes = placed(buffer, out_offset, chunk.count * t.dtype.itemsize)
                np.copyto(out_bytes.view(t.dtype.numpy), file.view(info, chunk.first, chunk.count), casting="unsafe")
                file.release(start, length)
                writer.submit(t.shard, out_offset, out_bytes, lambda: pool.release(buffer))
                return length
            writer.submit(t.shard, out_offset, file.byte_view(start, length), lambda: file.release(start, length))
            return length
        if t.requant is not None:  # --dtype fp8: merge in fp32, then fresh block scales (safeblend.quantized)
            return self._process_requantized(chunk, writer)
        buffer = pool.acquire()
        out_bytes = placed(buffer, out_offset, chunk.count * t.dtype.itemsize)
        out = out_bytes.view(t.dtype.numpy)
        sources = [(info, self._file(info)) for info in self._sources(t)]
        views = [f.view(info, chunk.first, chunk.count) for info, f in sources]
        context, state, read = self._states.get(t)
        self.method.merge_chunk(self.backend, views[0], views[1:], out, ChunkContext(context, chunk.first), state)
        read += self._release(sources, chunk)
        writer.submit(t.shard, out_offset, out_bytes, lambda: pool.release(buffer))
        return read

    def _process_requantized(self, chunk: Chunk, writer: ShardWriter) -> int:
        """A chunk of whole fp8 block rows: merged in fp32, quantized with fresh block scales;
        its codes and its rows of the scale tensor are queued for writing."""
        t = chunk.tensor
        sources = [(info, self._file(info)) for info in self._sources(t)]
        views = [f.view(info, chunk.first, chunk.count) for info, f in sources]
        context, state, read = self._states.get(t)
        merged = np.empty(chunk.count, np.float32)
        self.method.merge_chunk(self.backend, views[0], views[1:], merged, ChunkContext(context, chunk.first), state)
        read += self._release(sources, chunk)
        for target, offset, data in t.requant.quantize(t, merged, chunk.first, self.plan.skip):
            writer.submit(target.shard, target.offset + offset, data)
        return read

    @staticmethod
    def _release(sources: list[tuple[TensorInfo, SafetensorsFile]], chunk: Chunk) -> int:
        """Drop a computed chunk's input ranges from the process; returns the bytes they read."""
        read = 0
        for info, f in sources:
            start, length = info.start + chunk.first * info.dtype.itemsize, chunk.count * info.dtype.itemsize
            f.release(start, length)
            read += f.stored_bytes(start, length)
        return read
