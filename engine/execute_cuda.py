"""Execution on a CUDA GPU: the CPU Executor's chunk stream with the arithmetic on the device.

A merge chunk moves through five stages, each overlapped with the others:

    reader threads   mmap view ─► pinned host slot (this is where file pages are read),
                     then the consumed input pages are released from the process
    copy-in stream   pinned slot ─► device slot                     (H2D)
    compute stream   method.merge_chunk(TritonBackend, device views) ─► device out buffer
    copy-out stream  device out buffer ─► pinned out buffer          (D2H)
    writer thread    pinned out buffer ─► shard file (pwrite), buffer back to its pool

The main thread only enqueues GPU work and waits on the oldest chunk's D2H event, so while it
waits, later chunks are being read, copied and computed. Every buffer is allocated once,
before the first chunk: device memory is ``DEVICE_SLOTS × (inputs + 1) × slot bytes`` and
pinned host memory is bounded by ``PINNED_INPUT_BUDGET`` plus the output buffers, whatever the
model or tensor size. Tensors that are only copied (integer buffers, fp8) never touch the GPU:
their bytes go from the input's memory map to the writer (cast ones through the pinned output
pool), in file order with the merged chunks, as on the CPU path.

torch is imported inside ``run``, so importing this module costs nothing on a CPU-only box.
"""

from __future__ import annotations

import collections
import itertools
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator

import numpy as np

from .checkpoint import Checkpoint
from .errors import SpecError
from .chunks import Chunk, iter_chunks, release_inputs
from .execute import DEFAULT_CHUNK_BYTES, BufferPool, ExecutionStats, ExecutorBase
from .methods.base import ChunkContext, MergeMethod
from .plan import MergePlan
from .writer import DIRECT_ALIGN, ShardWriter, WriteDone, placed

# Chunks resident on the device at once: one being copied in, one computed, one copied out.
DEVICE_SLOTS = 3
# Chunks read ahead into pinned memory while the GPU works; each read runs on its own thread
# because a single memcpy out of the page cache (~5-8 GB/s) is slower than PCIe.
READ_AHEAD = 2
READER_THREADS = 2
# Pinned input staging, all slots together. Pinned pages count towards RSS; this keeps the
# host side well inside the 1 GiB target next to torch's CUDA context, for any model count.
PINNED_INPUT_BUDGET = 192 * 2**20
# Smallest slot the budget may shrink a chunk to (a PCIe round trip per chunk costs ~10 µs),
# and the alignment of every slot (so that a
# byte slice of a slot can be viewed as any element type).
MIN_SLOT_BYTES = 1 * 2**20
SLOT_ALIGN = 4096

_TORCH_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def staging_slot_bytes(chunk_bytes: int, n_inputs: int) -> int:
    """Bytes per operand slot: the requested chunk, shrunk so pinned input staging stays
    within ``PINNED_INPUT_BUDGET`` however many models are merged."""
    slots = DEVICE_SLOTS + READ_AHEAD
    fitting = PINNED_INPUT_BUDGET // (slots * n_inputs)
    size = min(chunk_bytes, max(MIN_SLOT_BYTES, fitting))  # never above the request
    return max(SLOT_ALIGN, size - size % SLOT_ALIGN)


@dataclass
class _InFlight:
    """A chunk on its way to the writer, in file order: a merge whose GPU work has been
    enqueued (retired once its D2H copy is done), or a copy whose bytes are ready."""

    chunk: Chunk
    in_slot: int | None  # the pinned input slot a merge frees when retired
    data: Any  # the output bytes (a numpy view of a pinned buffer, or an input's map)
    release: WriteDone  # frees ``data`` once written
    done: Any = None  # torch.cuda.Event recorded after a merge's D2H copy
    read: int = 0  # input bytes a copy read (a merge's are counted as its read completes)


class CudaExecutor(ExecutorBase):
    """Runs a plan through pinned staging buffers, CUDA streams and the Triton backend.

    Same contract as ``safeblend.execute.Executor``: ``run(writer, progress)`` computes and
    writes every chunk and returns the bytes read and written. ``report`` describes the
    buffers and streams after a run (for tests and the benchmark log).
    """

    def __init__(
        self,
        plan: MergePlan,
        base: Checkpoint,
        models: list[Checkpoint],
        method: MergeMethod,
        backend,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        kept: frozenset[str] = frozenset(),
    ) -> None:
        if not method.runs_on_gpu():  # the method declares it
            raise SpecError(
                f"--device cuda: method {method.name!r} with these parameters needs whole-tensor "
                "statistics or per-element work that the GPU pipeline does not have yet; use --device cpu"
            )
        super().__init__(plan, base, models, method, backend, chunk_bytes, workers=1, kept=kept)
        self.n_inputs = 1 + len(models)
        self.slot_bytes = staging_slot_bytes(chunk_bytes, self.n_inputs)
        self.report: dict[str, Any] = {}

    def run(self, writer: ShardWriter, progress: Callable[[int], None] | None = None) -> ExecutionStats:
        """Compute and write every chunk; ``progress`` gets the output bytes of each chunk.

        Chunks reach the writer in file order (copies wait behind the merges before them), so
        the journal's hasher, which keeps each written buffer until the bytes before it are
        written, always has the oldest buffer back first: the output pool never runs dry.
        """
        import torch

        self._torch = torch
        self._cuda = self._cuda_api()
        abort = writer.abort
        self._allocate(writer)
        for f in self._files.values():  # open every map now, not racing in the reader threads
            if f.tensors:
                f.byte_view(0, 0)
        stats = ExecutionStats()
        chunks = iter_chunks(self.plan, self.slot_bytes, self.kept)  # cut to the staging slot
        reads: collections.deque[tuple[Chunk, int | None, Future | None]] = collections.deque()
        inflight: collections.deque[_InFlight] = collections.deque()
        readers = ThreadPoolExecutor(READER_THREADS, thread_name_prefix="safeblend-read")
        read = abort.guarded(self._read)  # a reader's failure stops every thread at once
        ok = False
        try:
            exhausted = self._fill(chunks, reads, readers, read)
            while reads:
                abort.check()
                chunk, in_slot, future = reads.popleft()
                while len(inflight) >= DEVICE_SLOTS:
                    self._retire(inflight.popleft(), writer, stats, progress)
                if future is None:  # a copy: its bytes, cast on the host if need be
                    data, release, nbytes = self._copy(chunk, self._out_pool)
                    inflight.append(_InFlight(chunk, None, data, release, read=nbytes))
                else:
                    stats.bytes_read += future.result()
                    inflight.append(self._launch(chunk, in_slot, slot=next(self._device_cursor)))
                if not exhausted:
                    exhausted = self._fill(chunks, reads, readers, read)
            while inflight:
                self._retire(inflight.popleft(), writer, stats, progress)
            ok = True
        except BaseException as exc:
            raise abort.first(exc)
        finally:
            readers.shutdown(wait=True, cancel_futures=True)
            if not ok:
                self._quiesce()
            else:
                self.report["peak_device_bytes"] = self._cuda.max_memory_allocated(self._device)
        return stats

    # -- set-up ---------------------------------------------------------------------------

    def _allocate(self, writer: ShardWriter) -> None:
        """Streams, device slots and pinned pools, once per run."""
        torch, cuda = self._torch, self._cuda
        self._device = self._run_device()
        cuda.reset_peak_memory_stats(self._device)
        self._copy_in = cuda.Stream(self._device)
        self._compute = cuda.Stream(self._device)
        self._copy_out = cuda.Stream(self._device)
        slot = self.slot_bytes
        # One device allocation per slot: n_inputs operand regions, then the output region.
        self._device_slots = [
            torch.empty((self.n_inputs + 1) * slot, dtype=torch.uint8, device=self._device)
            for _ in range(DEVICE_SLOTS)
        ]
        self._device_cursor = itertools.cycle(range(DEVICE_SLOTS))  # round robin over the device slots
        self._pinned_in = [self._pinned(self.n_inputs * slot) for _ in range(DEVICE_SLOTS + READ_AHEAD)]
        self._pinned_in_np = [t.numpy() for t in self._pinned_in]
        self._free_in = list(range(len(self._pinned_in)))
        # Held by: chunks in flight, the writer's queue, the write in progress.
        out_count = DEVICE_SLOTS + writer.depth + 1
        # Room to place a chunk at its file offset modulo DIRECT_ALIGN (safeblend.writer.placed).
        self._out_pool = BufferPool(out_count, slot, writer.abort, lambda n: self._pinned(n + DIRECT_ALIGN))
        self.report = {
            "device": cuda.get_device_name(self._device),
            "slot_bytes": slot,
            "device_slots": DEVICE_SLOTS,
            "device_buffer_bytes": DEVICE_SLOTS * (self.n_inputs + 1) * slot,
            "pinned_bytes": len(self._pinned_in) * self.n_inputs * slot + out_count * (slot + DIRECT_ALIGN),
            "pinned": all(t.is_pinned() for t in self._pinned_in),
            "streams": [s.cuda_stream for s in (self._copy_in, self._compute, self._copy_out)],
            "merge_chunks": 0,
        }

    def _cuda_api(self):
        """The torch.cuda namespace (a seam: tests swap in synchronous stand-ins on the CPU)."""
        return self._torch.cuda

    def _run_device(self):
        return self._torch.device("cuda", self._cuda.current_device())

    def _pinned(self, nbytes: int):
        """A page-locked host buffer: DMA-able, so H2D/D2H copies run async on the copy engines."""
        return self._torch.empty(nbytes, dtype=self._torch.uint8, pin_memory=True)

    def _quiesce(self) -> None:
        """After a failure: let queued copies finish before their pinned buffers are dropped."""
        try:
            self._cuda.synchronize()
        except Exception:  # noqa: BLE001  (the original error is the one worth reporting)
            pass

    # -- reading ---------------------------------------------------------------------------

    def _fill(self, chunks: Iterator[Chunk], reads: collections.deque, readers: ThreadPoolExecutor,
              read: Callable[[Chunk, int], int]) -> bool:
        """Queue reads until READ_AHEAD chunks are pending or no pinned slot is free; copies
        queue in order without a slot. Returns True once the chunk stream is exhausted."""
        while len(reads) < READ_AHEAD and self._free_in:
            chunk = next(chunks, None)
            if chunk is None:
                return True
            if chunk.tensor.action == "copy":
                reads.append((chunk, None, None))
                continue
            self._prefetch(chunk)
            in_slot = self._free_in.pop()
            reads.append((chunk, in_slot, readers.submit(read, chunk, in_slot)))
        return False

    def _read(self, chunk: Chunk, in_slot: int) -> int:
        """Copy a chunk's inputs from their memory maps into a pinned slot (reader thread)."""
        staging = self._pinned_in_np[in_slot]
        sources = [(info, self._file(info)) for info in self._sources(chunk.tensor)]
        for k, (info, f) in enumerate(sources):
            start, length = chunk.source_range(info)
            region = staging[k * self.slot_bytes : k * self.slot_bytes + length]
            np.copyto(region, np.frombuffer(f.byte_view(start, length), dtype=np.uint8))
        return release_inputs(sources, chunk.first, chunk.count)

    # -- GPU -------------------------------------------------------------------------------

    def _launch(self, chunk: Chunk, in_slot: int, slot: int) -> _InFlight:
        """Enqueue H2D, the method's kernel and D2H for one chunk on their streams."""
        t = chunk.tensor
        infos = self._sources(t)
        device_buffer = self._device_slots[slot]
        staging = self._pinned_in[in_slot]
        sb = self.slot_bytes
        copied = self._cuda.Event()
        with self._cuda.stream(self._copy_in):
            for k, info in enumerate(infos):
                n = chunk.source_range(info)[1]
                device_buffer[k * sb : k * sb + n].copy_(staging[k * sb : k * sb + n], non_blocking=True)
            copied.record(self._copy_in)
        offset, out_bytes = chunk.out_range
        out_region = device_buffer[self.n_inputs * sb : self.n_inputs * sb + out_bytes]
        computed = self._cuda.Event()
        self._compute.wait_event(copied)
        with self._cuda.stream(self._compute):
            views = [device_buffer[k * sb : k * sb + chunk.source_range(info)[1]].view(self._dtype(info.dtype.name))
                     for k, info in enumerate(infos)]
            context, state, _ = self._states.get(t)  # no reduce passes here: nothing is read
            self.method.merge_chunk(self.backend, views[0], views[1:], out_region.view(self._dtype(t.dtype.name)),
                                    ChunkContext(context, chunk.first), state)
            computed.record(self._compute)
        out_buffer = self._out_pool.acquire()  # blocks only while the writer is behind
        # Placed like every pooled chunk, so the writer can send it with O_DIRECT where the
        # pinned buffer is page-aligned (cudaHostAlloc's are).
        shift = offset % DIRECT_ALIGN
        done = self._cuda.Event()
        self._copy_out.wait_event(computed)
        with self._cuda.stream(self._copy_out):
            out_buffer[shift : shift + out_bytes].copy_(out_region, non_blocking=True)
            done.record(self._copy_out)
        self.report["merge_chunks"] += 1
        data = placed(self._host(out_buffer), offset, out_bytes)
        return _InFlight(chunk, in_slot, data, partial(self._out_pool.release, out_buffer), done)

    def _retire(self, job: _InFlight, writer: ShardWriter, stats: ExecutionStats, progress) -> None:
        """Wait for a merge's D2H copy and free its input slot; queue the chunk's output for writing."""
        if job.done is not None:
            job.done.synchronize()  # releases the GIL while waiting
        if job.in_slot is not None:
            self._free_in.append(job.in_slot)
        t = job.chunk.tensor
        offset, nbytes = job.chunk.out_range
        writer.submit(t.shard, offset, job.data, job.release)
        stats.bytes_read += job.read
        stats.bytes_written += nbytes
        if progress is not None:
            progress(nbytes)

    # -- helpers ---------------------------------------------------------------------------

    def _host(self, buffer) -> np.ndarray:
        return buffer.numpy()

    def _dtype(self, name: str):
        return getattr(self._torch, _TORCH_DTYPES[name])
