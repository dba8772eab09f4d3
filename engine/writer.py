"""Writing the output: shard files laid out up front and filled in place, built beside OUT.

The plan fixes every shard's header and size, so each file is created, given its header and
allocated to full size before any data arrives; chunks are then written at their offsets by
a background thread (``pwrite``), overlapping disk writes with compute. Everything happens in
a staging directory next to OUT, which is flushed and renamed into place only when complete:
a failed or interrupted merge never leaves a directory at OUT that looks finished.

Where the filesystem allows it, the whole 4 KiB blocks of a chunk go to the disk with
``O_DIRECT``, straight from the chunk's buffer: no copy into the page cache and no writeback
later (measured here: 0.44 GB durable in 0.21 s and 40 ms of CPU, against 0.27 s and 125 ms
buffered). The executor lays each chunk out in its buffer at the same offset modulo 4 KiB as
in the file (``placed``), so its aligned middle is aligned in memory too. The partial blocks at
a chunk's two ends, which it shares with its neighbours and the header, go through the page
cache; no block is ever written both ways. Bytes that are not so placed (a tensor copied
straight from an input's memory map) are written buffered.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from .abort import Abort
from .errors import OutputError
from .units import format_size

if TYPE_CHECKING:  # the writer needs only the plan's shape, never the planner
    from .plan import MergePlan

INDEX_NAME = "model.safetensors.index.json"

# O_DIRECT wants the file offset, the length and the memory address aligned to the disk's
# logical block (512 B or 4 KiB); 4 KiB suits both.
DIRECT_ALIGN = 4096


def placed(buffer: np.ndarray, offset: int, nbytes: int) -> np.ndarray:
    """The ``nbytes`` of a page-aligned ``buffer`` (``nbytes + DIRECT_ALIGN`` long) to fill with
    the bytes bound for file ``offset``: at the same position modulo DIRECT_ALIGN as in the file."""
    shift = offset % DIRECT_ALIGN
    return buffer[shift : shift + nbytes]


def aligned_buffer(nbytes: int) -> np.ndarray:
    """A page-aligned byte buffer with room for ``placed`` bytes of up to ``nbytes``."""
    raw = np.empty(nbytes + 2 * DIRECT_ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % DIRECT_ALIGN
    return raw[start : start + nbytes + DIRECT_ALIGN]


class OutputDir:
    """The output directory's life cycle: staging beside OUT, then an atomic rename."""

    def __init__(self, final: Path, overwrite: bool) -> None:
        self.final = Path(os.path.abspath(final))
        self.overwrite = overwrite
        self.staging = self.final.with_name(f".{self.final.name}.safeblend-partial")

    def check_space(self, needed_bytes: int) -> None:
        """OutputError naming the filesystem when it has less than ``needed_bytes`` free."""
        free = shutil.disk_usage(self.final.parent).free
        if free < needed_bytes:
            raise OutputError(
                f"{self.final.parent}: not enough space on {filesystem_of(self.final.parent)} for the output: "
                f"needs {format_size(needed_bytes)}, {format_size(free)} free"
            )

    def commit(self) -> None:
        """Flush the staging directory and move it to OUT (replacing OUT if allowed)."""
        from .output_paths import replace_output

        fsync_dir(self.staging)
        replace_output(self.staging, self.final, self.overwrite)  # deletes only what safeblend wrote
        fsync_dir(self.final.parent)

    def abort(self) -> None:
        """Remove the staging directory and everything in it."""
        _remove(self.staging)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def filesystem_of(path: Path) -> str:
    """The mount point holding ``path`` and its type, e.g. ``/mnt/out (ext4)``, for messages."""
    mount = Path(os.path.realpath(path))
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    fstype = "?"
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as handle:
            for line in handle:  # the last entry for a mount point is the one in effect
                fields = line.split()
                if len(fields) > 2 and fields[1].replace("\\040", " ") == str(mount):
                    fstype = fields[2]
    except OSError:
        pass
    return f"the filesystem mounted at {mount} ({fstype})"


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (new, renamed or removed files) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


WriteDone = Callable[[], None]


class ShardWriter:
    """Creates the planned shard files and writes chunks into them from a background thread.

    ``submit`` hands over a buffer and a callback; the callback runs on the writer thread once
    the bytes are in the file (that is how buffers return to their pool and consumed input
    ranges are released). At most ``depth`` writes wait in the queue, which bounds memory. A
    failed write is the merge's failure (``abort``, shared with the other threads): the writer
    stops writing, and waits on it raise it.
    """

    def __init__(self, directory: Path, plan: MergePlan, depth: int = 4, abort: Abort | None = None) -> None:
        self.directory = directory
        self.plan = plan
        self._fds: list[int] = []
        self._direct_fds: list[int] = []  # -1 where the filesystem refuses O_DIRECT
        self.depth = depth
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self.abort = abort or Abort()
        self._abandoned = False
        self._thread = threading.Thread(target=self._run, name="safeblend-writer", daemon=True)
        self.bytes_written = 0
        self.bytes_direct = 0  # of which written with O_DIRECT

    def open(self) -> None:
        """Create every shard: header written, file sized to its final length."""
        for shard in self.plan.shards:
            path = self.directory / shard.filename
            self._fds.append(self._open_shard(path, shard))
            self._direct_fds.append(_open_direct(path))
        self._thread.start()

    def _open_shard(self, path: Path, shard) -> int:
        """Create one shard file with its header, sized to its final length; returns its fd."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            # Sized, not allocated: posix_fallocate's unwritten extents measured slower to fill
            # here, and free space is checked up front (OutputDir.check_space).
            os.ftruncate(fd, shard.size)
            self._write_buffered(fd, memoryview(shard.header), 0, path)
        except BaseException:
            os.close(fd)
            raise
        self.bytes_written += len(shard.header)
        return fd

    def submit(self, shard: int, offset: int, data: memoryview, done: WriteDone | None = None) -> None:
        """Queue ``data`` for writing at ``offset`` of shard ``shard``; blocks while the queue is full."""
        self.abort.put(self._queue, (shard, offset, data, done))

    def close(self) -> None:
        """Wait for every queued write, flush all shards to disk and close them."""
        if self._thread.is_alive():
            self._queue.put(None)  # the thread drains the queue whatever happened
            self._thread.join()
        self.abort.check()
        for shard, fd in zip(self.plan.shards, self._fds):
            try:
                os.fdatasync(fd)
            except OSError as exc:
                raise self._io_error(self.directory / shard.filename, exc) from exc
        self._close_fds()

    def abandon(self) -> None:
        """Stop after the writes already started; used when the merge fails or is interrupted."""
        if self._thread.is_alive():
            self._abandoned = True
            while True:  # drain so the thread sees the sentinel promptly
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._queue.put(None)
            self._thread.join()
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in [*self._fds, *self._direct_fds]:
            if fd >= 0:
                os.close(fd)
        self._fds, self._direct_fds = [], []

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._abandoned or self.abort.error is not None:
                continue  # nobody waits for these buffers any more (their waits poll the abort)
            shard, offset, data, done = job
            try:
                self._write(shard, memoryview(data).cast("B"), offset)
                if done is not None:
                    done()
            except BaseException as exc:  # noqa: BLE001  (every other thread raises it)
                self.abort.fail(exc)

    def _write(self, shard: int, view: memoryview, offset: int) -> None:
        """Write one chunk: its whole aligned blocks with O_DIRECT where its buffer is placed
        (see ``placed``) and the shard takes it, the rest (or all of it) through the page cache."""
        path = self.directory / self.plan.shards[shard].filename
        head = -offset % DIRECT_ALIGN
        body = (len(view) - head) // DIRECT_ALIGN * DIRECT_ALIGN if len(view) > head else 0
        direct_fd = self._direct_fds[shard]
        if direct_fd < 0 or body == 0 or (_address(view) + head) % DIRECT_ALIGN:
            head, body = len(view), 0  # all of it through the page cache
        else:
            try:
                _pwrite_all(direct_fd, view[head : head + body], offset + head)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise self._io_error(path, exc) from exc
                # A filesystem that opened with O_DIRECT but refuses these writes: buffered from now on.
                os.close(direct_fd)
                self._direct_fds[shard] = -1
                head, body = len(view), 0
            else:
                self.bytes_direct += body
        fd = self._fds[shard]
        self._write_buffered(fd, view[:head], offset, path)
        self._write_buffered(fd, view[head + body :], offset + head + body, path)
        self.bytes_written += len(view)

    def _write_buffered(self, fd: int, view: memoryview, offset: int, path: Path) -> None:
        if not view:
            return
        try:
            _pwrite_all(fd, view, offset)
        except OSError as exc:
            raise self._io_error(path, exc) from exc
        # Start writeback of what was just written now (FADV_DONTNEED on dirty pages queues
        # them for the disk without waiting), so the final fdatasync finds little left
        # and the disk works while the next chunks compute.
        os.posix_fadvise(fd, offset, len(view), os.POSIX_FADV_DONTNEED)

    def _io_error(self, path: Path, exc: OSError) -> OutputError:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return OutputError(
                f"{path}: {filesystem_of(path.parent)} ran out of space while writing (the output needs "
                f"{format_size(self.plan.output_bytes)}; {format_size(shutil.disk_usage(path.parent).free)} free)"
            )
        return OutputError(f"{path}: write failed: {exc.strerror or exc}")


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _open_direct(path: Path) -> int:
    """A second write descriptor of ``path`` with O_DIRECT, or -1 where that is refused
    (tmpfs before Linux 6.6, some network and FUSE filesystems)."""
    if not hasattr(os, "O_DIRECT"):
        return -1
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError:
        return -1


def _address(view: memoryview) -> int:
    """The memory address of a byte view's first byte."""
    return np.frombuffer(view, dtype=np.uint8).ctypes.data if len(view) else 0


def write_index(directory: Path, plan: MergePlan, metadata: dict[str, str]) -> None:
    """Write ``model.safetensors.index.json`` (only for sharded outputs, as Hugging Face does)."""
    if len(plan.shards) == 1:
        return
    index = {
        "metadata": {"total_size": plan.total_size, **metadata},
        "weight_map": {t.name: plan.shards[t.shard].filename for t in plan.tensors},
    }
    write_text_durably(directory / INDEX_NAME, json.dumps(index, indent=2) + "\n")


def write_text_durably(path: Path, text: str) -> None:
    """Write a small text file and fsync it."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
