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
their bytes go from the input's memory map straight to the writer, as on the CPU path.

torch is imported inside ``run``, so importing this module costs nothing on a CPU-only box.
"""

from __future__ import annotations

import collections
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .checkpoint import Checkpoint, SafetensorsFile, TensorInfo
from .errors import SpecError
from .execute import DEFAULT_CHUNK_BYTES, BufferPool, Chunk, ExecutionStats, iter_chunks
from .methods.base import ChunkContext, MergeMethod
from .plan import MergePlan
from .reduce import TensorStates
from .writer import DIRECT_ALIGN, ShardWriter

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
    """A chunk whose GPU work has been enqueued; retired once its D2H copy is done."""

    chunk: Chunk
    in_slot: int
    out_buffer: Any  # pinned torch uint8 tensor from the output pool
    out_shift: int  # where in it the chunk's bytes start (safeblend.writer.placed)
    out_bytes: int
    done: Any  # torch.cuda.Event recorded after the D2H copy


def runs_on_gpu(method: MergeMethod) -> bool:
    """Whether this pipeline can run ``method``: reduce passes (norms, thresholds) fold
    chunks on the host and have no device version yet. A method with reduce passes that can
    do without them says so itself (``runs_on_gpu()``: dare-linear with its default rescale)."""
    own = getattr(method, "runs_on_gpu", None)
    if own is not None:
        return bool(own())
    return type(method).reduce_passes is MergeMethod.reduce_passes


class CudaExecutor:
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
    ) -> None:
        if not runs_on_gpu(method):
            raise SpecError(
                f"--device cuda: method {method.name!r} with these parameters needs whole-tensor "
                "statistics or per-element work that the GPU pipeline does not have yet; use --device cpu"
            )
        self.plan = plan
        self.method = method
        self.backend = backend
        self.n_inputs = 1 + len(models)
        self.slot_bytes = staging_slot_bytes(chunk_bytes, self.n_inputs)
        self._files: dict = {f.path: f for ckpt in (base, *models) for f in ckpt.files}
        # Per-tensor parameters resolved up front, as on the CPU path (a bad recipe fails early).
        self._states = TensorStates(method, plan, self._file, chunk_bytes)
        self.report: dict[str, Any] = {}

    def run(self, writer: ShardWriter, progress: Callable[[int], None] | None = None) -> ExecutionStats:
        """Compute and write every chunk; ``progress`` gets the output bytes of each chunk."""
        import torch

        self._torch = torch
        self._cuda = self._cuda_api()
        self._allocate(writer)
        for f in self._files.values():  # open every map now, not racing in the reader threads
            if f.tensors:
                f.byte_view(0, 0)
        stats = ExecutionStats()
        chunks = iter_chunks(self.plan, self.slot_bytes)
        reads: collections.deque[tuple[Chunk, int, Future]] = collections.deque()
        inflight: collections.deque[_InFlight] = collections.deque()
        readers = ThreadPoolExecutor(READER_THREADS, thread_name_prefix="safeblend-read")
        ok = False
        try:
            exhausted = self._fill(chunks, reads, readers, writer, stats, progress)
            while reads:
                chunk, in_slot, future = reads.popleft()
                stats.bytes_read += future.result()
                while len(inflight) >= DEVICE_SLOTS:
                    self._retire(inflight.popleft(), writer, stats, progress)
                inflight.append(self._launch(chunk, in_slot, slot=self._next_device_slot()))
                if not exhausted:
                    exhausted = self._fill(chunks, reads, readers, writer, stats, progress)
            while inflight:
                self._retire(inflight.popleft(), writer, stats, progress)
            ok = True
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
        self._device_cursor = 0
        self._pinned_in = [self._pinned(self.n_inputs * slot) for _ in range(DEVICE_SLOTS + READ_AHEAD)]
        self._pinned_in_np = [t.numpy() for t in self._pinned_in]
        self._free_in = list(range(len(self._pinned_in)))
        # Held by: chunks in flight, the writer's queue, the write in progress.
        out_count = DEVICE_SLOTS + writer.depth + 1
        self._out_pool = BufferPool(count=0, nbytes=0)
        for _ in range(out_count):  # room to place a chunk at its file offset modulo DIRECT_ALIGN
            self._out_pool.release(self._pinned(slot + DIRECT_ALIGN))
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

    def _next_device_slot(self) -> int:
        slot = self._device_cursor
        self._device_cursor = (slot + 1) % DEVICE_SLOTS
        return slot

    # -- reading ---------------------------------------------------------------------------

    def _fill(self, chunks, reads, readers: ThreadPoolExecutor, writer: ShardWriter,
              stats: ExecutionStats, progress) -> bool:
        """Queue reads until READ_AHEAD are pending or no pinned slot is free; copy chunks go
        straight to the writer. Returns True once the chunk stream is exhausted."""
        while len(reads) < READ_AHEAD and self._free_in:
            chunk = next(chunks, None)
            if chunk is None:
                return True
            if chunk.tensor.action == "copy":
                stats.bytes_read += self._submit_copy(chunk, writer)
                written = chunk.count * chunk.tensor.dtype.itemsize
                stats.bytes_written += written
                if progress is not None:
                    progress(written)
                continue
            in_slot = self._free_in.pop()
            for info in self._inputs(chunk):
                size = info.dtype.itemsize
                self._file(info).prefetch(info.start + chunk.first * size, chunk.count * size)
            reads.append((chunk, in_slot, readers.submit(self._read, chunk, in_slot)))
        return False

    def _read(self, chunk: Chunk, in_slot: int) -> int:
        """Copy a chunk's inputs from their memory maps into a pinned slot (reader thread)."""
        staging = self._pinned_in_np[in_slot]
        total = 0
        for k, info in enumerate(self._inputs(chunk)):
            start, length = self._byte_range(info, chunk)
            f = self._file(info)
            region = staging[k * self.slot_bytes : k * self.slot_bytes + length]
            np.copyto(region, np.frombuffer(f.byte_view(start, length), dtype=np.uint8))
            f.release(start, length)
            total += f.stored_bytes(start, length)
        return total

    def _submit_copy(self, chunk: Chunk, writer: ShardWriter) -> int:
        """Hand a copy-only chunk's bytes from the base's map to the writer; returns bytes read."""
        t = chunk.tensor
        f = self._file(t.base)
        start, length = self._byte_range(t.base, chunk)
        out_offset = t.offset + chunk.first * t.dtype.itemsize
        if t.base.dtype != t.dtype:  # taken from one model (safeblend.quirks), cast to the output dtype on the host
            data = np.empty(chunk.count, t.dtype.numpy)
            np.copyto(data, f.view(t.base, chunk.first, chunk.count), casting="unsafe")
            f.release(start, length)
            writer.submit(t.shard, out_offset, data.view(np.uint8))
            return length
        writer.submit(t.shard, out_offset, f.byte_view(start, length), lambda: f.release(start, length))
        return length

    # -- GPU -------------------------------------------------------------------------------

    def _launch(self, chunk: Chunk, in_slot: int, slot: int) -> _InFlight:
        """Enqueue H2D, the method's kernel and D2H for one chunk on their streams."""
        t = chunk.tensor
        infos = self._inputs(chunk)
        device_buffer = self._device_slots[slot]
        staging = self._pinned_in[in_slot]
        sb = self.slot_bytes
        copied = self._cuda.Event()
        with self._cuda.stream(self._copy_in):
            for k, info in enumerate(infos):
                n = chunk.count * info.dtype.itemsize
                device_buffer[k * sb : k * sb + n].copy_(staging[k * sb : k * sb + n], non_blocking=True)
            copied.record(self._copy_in)
        out_bytes = chunk.count * t.dtype.itemsize
        out_region = device_buffer[self.n_inputs * sb : self.n_inputs * sb + out_bytes]
        computed = self._cuda.Event()
        self._compute.wait_event(copied)
        with self._cuda.stream(self._compute):
            views = [
                device_buffer[k * sb : k * sb + chunk.count * info.dtype.itemsize].view(self._dtype(info.dtype.name))
                for k, info in enumerate(infos)
            ]
            context, state, _ = self._states.get(t)  # no reduce passes here: nothing is read
            self.method.merge_chunk(self.backend, views[0], views[1:], out_region.view(self._dtype(t.dtype.name)),
                                    ChunkContext(context, chunk.first), state)
            computed.record(self._compute)
        out_buffer = self._out_pool.acquire()  # blocks only while the writer is behind
        # Placed like the CPU executor's chunks, so the writer can send it with O_DIRECT where
        # the pinned buffer is page-aligned (cudaHostAlloc's are).
        shift = (t.offset + chunk.first * t.dtype.itemsize) % DIRECT_ALIGN
        done = self._cuda.Event()
        self._copy_out.wait_event(computed)
        with self._cuda.stream(self._copy_out):
            out_buffer[shift : shift + out_bytes].copy_(out_region, non_blocking=True)
            done.record(self._copy_out)
        self.report["merge_chunks"] += 1
        return _InFlight(chunk, in_slot, out_buffer, shift, out_bytes, done)

    def _retire(self, job: _InFlight, writer: ShardWriter, stats: ExecutionStats, progress) -> None:
        """Wait for a chunk's D2H copy, free its input slot and queue its output for writing."""
        job.done.synchronize()  # releases the GIL while waiting
        self._free_in.append(job.in_slot)
        t = job.chunk.tensor
        buffer = job.out_buffer
        out_offset = t.offset + job.chunk.first * t.dtype.itemsize
        data = buffer[job.out_shift : job.out_shift + job.out_bytes].numpy()
        writer.submit(t.shard, out_offset, data, lambda: self._out_pool.release(buffer))
        stats.bytes_written += job.out_bytes
        if progress is not None:
            progress(job.out_bytes)

    # -- helpers ---------------------------------------------------------------------------

    def _inputs(self, chunk: Chunk) -> list[TensorInfo]:
        return [chunk.tensor.base, *chunk.tensor.models]

    def _file(self, info: TensorInfo) -> SafetensorsFile:
        return self._files[info.file]

    @staticmethod
    def _byte_range(info: TensorInfo, chunk: Chunk) -> tuple[int, int]:
        size = info.dtype.itemsize
        return info.start + chunk.first * size, chunk.count * size

    def _dtype(self, name: str):
        return getattr(self._torch, _TORCH_DTYPES[name])
