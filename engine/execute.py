"""Execution: stream every planned tensor through the backend, chunk by chunk.

Per chunk: take zero-copy views of the inputs through their memory maps, let the method
compute into a pooled output buffer, hand the buffer to the writer thread, and drop the
consumed input pages from the process. The next chunk's input ranges are prefetched
(``MADV_WILLNEED``) while this one computes, the writer writes while the next one computes,
so reading, compute and writing overlap; memory is a fixed number of chunk buffers.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from .checkpoint import Checkpoint, SafetensorsFile, TensorInfo
from .methods.base import MergeMethod
from .plan import MergePlan, OutputTensor
from .writer import ShardWriter

DEFAULT_CHUNK_BYTES = 16 * 2**20


@dataclass(frozen=True)
class Chunk:
    """Elements [first, first + count) of one output tensor."""

    tensor: OutputTensor
    first: int
    count: int


def iter_chunks(plan: MergePlan, chunk_bytes: int) -> Iterator[Chunk]:
    """Every planned tensor cut into chunks whose largest operand is at most ``chunk_bytes``."""
    for t in plan.tensors:
        widest = max([t.dtype.itemsize, t.base.dtype.itemsize, *(m.dtype.itemsize for m in t.models)])
        step = max(1, chunk_bytes // widest)
        for first in range(0, t.numel, step):
            yield Chunk(t, first, min(step, t.numel - first))


class BufferPool:
    """A fixed set of equal byte buffers, handed out and returned across threads."""

    def __init__(self, count: int, nbytes: int) -> None:
        self._free: queue.Queue = queue.Queue()
        for _ in range(count):
            self._free.put(np.empty(nbytes, dtype=np.uint8))

    def acquire(self) -> np.ndarray:
        return self._free.get()

    def release(self, buffer: np.ndarray) -> None:
        self._free.put(buffer)


@dataclass
class ExecutionStats:
    bytes_read: int = 0
    bytes_written: int = 0


class Executor:
    """Runs a plan on the CPU with one compute thread and one writer thread."""

    def __init__(
        self,
        plan: MergePlan,
        base: Checkpoint,
        models: list[Checkpoint],
        method: MergeMethod,
        backend,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        self.plan = plan
        self.method = method
        self.backend = backend
        self.chunk_bytes = chunk_bytes
        self._files: dict = {f.path: f for ckpt in (base, *models) for f in ckpt.files}

    def run(self, writer: ShardWriter, progress: Callable[[int], None] | None = None) -> ExecutionStats:
        """Compute and write every chunk; ``progress`` gets the output bytes of each chunk."""
        stats = ExecutionStats()
        pool = BufferPool(count=writer.depth + 2, nbytes=self.chunk_bytes)
        chunks = iter_chunks(self.plan, self.chunk_bytes)
        upcoming = next(chunks, None)
        while upcoming is not None:
            chunk, upcoming = upcoming, next(chunks, None)
            if upcoming is not None:
                self._prefetch(upcoming)
            stats.bytes_read += self._process(chunk, writer, pool)
            written = chunk.count * chunk.tensor.dtype.itemsize
            stats.bytes_written += written
            if progress is not None:
                progress(written)
        return stats

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
            writer.submit(t.shard, out_offset, file.byte_view(start, length), lambda: file.release(start, length))
            return length
        buffer = pool.acquire()
        out_bytes = buffer[: chunk.count * t.dtype.itemsize]
        out = out_bytes.view(t.dtype.numpy)
        sources = [(info, self._file(info)) for info in self._sources(t)]
        views = [f.view(info, chunk.first, chunk.count) for info, f in sources]
        self.method.merge_chunk(self.backend, views[0], views[1:], out)
        read = 0
        for info, f in sources:
            size = info.dtype.itemsize
            f.release(info.start + chunk.first * size, chunk.count * size)
            read += chunk.count * size
        writer.submit(t.shard, out_offset, out_bytes, lambda: pool.release(buffer))
        return read
