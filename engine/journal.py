"""The journal of a merge's finished tensors: its format, the run's fingerprint, and the
hasher and flusher threads that write it while the output is written.

``.safeblend-journal`` (in the staging directory, safeblend.session) is JSON lines. The first
holds the run's fingerprint (every shard header — so the recipe and the layout —, each input
file's path, size and mtime, and the settings that change bytes); each further line names one
tensor whose bytes are on disk, with its shard, offset, length and prefix digest. Lines are
appended in batches, each after ``fdatasync`` of the shards it covers and followed by
``fdatasync`` of the journal, so a journaled tensor's bytes are durable. A torn last line is
ignored.

A hasher thread follows the writes in file order, feeding each shard's SHA-256 (recorded in
the manifest). When the hash passes a tensor's last byte, the digest of the shard so far (a
copy of the running SHA-256, finished) is that tensor's journal checksum: one pass yields both
the manifest and the journal at no cost beyond the SHA-256 itself (a separate CRC-32 per tensor
took 0.55 s of CPU on a 2.2 GB output). It hashes a written chunk from the chunk's own buffer,
which the writer hands over instead of releasing (so the buffer pool, not the hasher, bounds how
far writing runs ahead), and re-reads from the file only what no buffer brought: headers, and
tensors kept by ``--resume``. Behind it a flusher thread makes the hashed prefix durable, drops
it from the page cache (``fdatasync`` + ``POSIX_FADV_DONTNEED``: the output then holds a few tens
of MiB of cache, and new writes reuse those pages instead of claiming fresh ones, which on a VM
costs a host fault per 4 KiB page; benchmarks/page_recycling.py: 0.35 GiB/s into fresh pages,
1.3 GiB/s recycled) and commits the journal lines. Hashing runs in file order, so a shard's
journaled tensors form a prefix of it, which ``check_prefix_digests`` re-hashes on resume.
``fault_point`` and the slowed writes are test hooks: they kill a merge at named points.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .abort import Abort
from .checkpoint import reference_paths
from .errors import OutputError
from .plan import MergePlan, Shard
from .writer import ShardWriter, WriteDone

JOURNAL_NAME = ".safeblend-journal"
JOURNAL_VERSION = 2  # 2: prefix SHA-256 per tensor (1 had CRC-32s)
# The hasher's and flusher's idle wake-up. The flusher commits whatever the hasher finished
# while the last batch synced, so the journal trails the writes by about one fdatasync.
COMMIT_INTERVAL_S = 0.25
_PASS_BYTES = 64 * 2**20
_READ_BLOCK = 4 * 2**20
# Hashed bytes of a shard that may stay in the page cache before they are flushed and dropped.
_DROP_BYTES = 32 * 2**20
# Written blocks kept for hashing that no buffer pool bounds (those submitted without a release:
# an fp8 output's codes, whose weight's scale tensor, laid out before it, is complete only after
# the weight's last chunk, so the hash waits there): beyond this many bytes the hasher reads them
# back from the file instead (a 18432×7168 weight's codes are 132 MB).
_HOLD_UNPOOLED_BYTES = 32 * 2**20
# Test hook: SIGKILL this process at a named point ("start", "write:N", "closed", "finishing").
FAULT_ENV = "SAFEBLEND_FAULT_KILL_AT"
FAULT_STATE_ENV = "SAFEBLEND_FAULT_STATE"
SLOW_ENV = "SAFEBLEND_FAULT_SLOW_WRITE_S"  # test hook: sleep after each write, to interrupt mid-merge


# -- fingerprint ----------------------------------------------------------------------------


def fingerprint(plan: MergePlan, inputs: Sequence[str | os.PathLike], settings: dict[str, Any]) -> dict[str, Any]:
    """What must not change between a run and its resume, as comparable JSON parts: the output
    shards' headers (recipe, dtypes, layout), the inputs' files (size, mtime) and ``settings``."""
    files = []
    for root in (p for item in inputs for p in reference_paths(item)):  # MODEL+ADAPTER: both
        paths = sorted(p for p in root.iterdir() if p.suffix in (".safetensors", ".json")) if root.is_dir() else [root]
        for path in paths:
            st = os.stat(path)
            files.append({"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    headers = hashlib.sha256()
    for shard in plan.shards:
        headers.update(shard.filename.encode() + b"\0" + shard.header)
    return {"output": headers.hexdigest(), "inputs": files, "settings": settings}


def describe_mismatch(old: dict[str, Any], new: dict[str, Any]) -> str:
    if old.get("inputs") != new.get("inputs"):
        before = {f["path"]: f for f in old.get("inputs", [])}
        for f in new["inputs"]:
            prev = before.get(f["path"])
            if prev is None:
                return f"input {f['path']} was not part of it"
            if prev != f:
                return f"input {f['path']} changed since (size or modification time differs)"
        return "its inputs differ"
    if old.get("settings") != new.get("settings"):
        keys = sorted(k for k in {**old.get("settings", {}), **new["settings"]}
                      if old.get("settings", {}).get(k) != new["settings"].get(k))
        return "it used different " + ", ".join(f"{k} ({old.get('settings', {}).get(k)} then, {new['settings'].get(k)} now)"
                                               for k in keys)
    return "its recipe or output layout differs (method, parameters, dtype, shard size or inputs' tensors)"


# -- journal file ---------------------------------------------------------------------------


@dataclass
class JournalEntry:
    """One finished tensor: where its bytes are, and the SHA-256 of its shard's bytes
    [0, offset + nbytes) — everything up to and including the tensor."""

    name: str
    shard: int
    offset: int
    nbytes: int
    prefix_sha256: str

    @property
    def end(self) -> int:
        return self.offset + self.nbytes

    def line(self) -> bytes:
        return (json.dumps({"t": self.name, "s": self.shard, "o": self.offset, "n": self.nbytes,
                            "sha": self.prefix_sha256}, separators=(",", ":")) + "\n").encode()


def read_journal(path: Path) -> tuple[dict[str, Any] | None, list[JournalEntry], int]:
    """(header, entries, length of the intact prefix); a torn or corrupt tail is dropped."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, [], 0
    header, entries, good = None, [], 0
    for raw in data.split(b"\n")[:-1]:  # the piece after the last newline is torn
        try:
            record = json.loads(raw)
            if header is None:
                if not isinstance(record, dict) or record.get("safeblend_journal") != JOURNAL_VERSION:
                    break
                header = record
            else:
                entries.append(JournalEntry(str(record["t"]), int(record["s"]), int(record["o"]),
                                            int(record["n"]), str(record["sha"])))
        except (ValueError, KeyError, TypeError):
            break  # only the last batch can be torn; anything after a bad line is not trusted
        good += len(raw) + 1
    return header, entries, good


def fault_point(name: str, state: Callable[[], dict] | None = None) -> None:
    """Test hook: SIGKILL ourselves when ``SAFEBLEND_FAULT_KILL_AT`` names this point."""
    if os.environ.get(FAULT_ENV) != name:
        return
    target = os.environ.get(FAULT_STATE_ENV)
    if target and state is not None:
        Path(target).write_text(json.dumps(state()))
    os.kill(os.getpid(), signal.SIGKILL)


# -- hashing and journaling while writing ---------------------------------------------------


@dataclass
class _ShardProgress:
    """One shard's written prefix, hashing cursor and running digests."""

    index: int
    filename: str
    size: int
    tensors: list[tuple[int, int, str]]  # (start, end, name) in file order
    fd: int = -1
    frontier: int = 0  # end of the contiguous written prefix
    cursor: int = 0  # bytes hashed so far
    landed: dict[int, int] = field(default_factory=dict)  # written ranges beyond the frontier
    # Written ranges beyond the cursor whose bytes are still in memory: offset -> (bytes, release).
    blocks: dict[int, tuple[memoryview, WriteDone | None]] = field(default_factory=dict)
    sha: Any = field(default_factory=hashlib.sha256)
    next: int = 0  # index of the first tensor not yet wholly hashed
    hashed: int = 0  # the cursor as the flusher last saw it
    dropped: int = 0  # bytes [0, dropped) flushed and dropped from the page cache


class Progress:
    """Follows landed writes: a hasher thread hashes shards in file order, and a flusher thread
    makes the hashed bytes durable, drops them from the page cache and group-commits their
    journal lines — waiting on the disk there, so hashing never does."""

    def __init__(self, directory: Path, plan: MergePlan, journal_fd: int, already: set[str], abort: Abort) -> None:
        self.directory = directory
        self.journal_fd = journal_fd
        self.already = already  # journaled by an earlier run: not appended again
        self.shards = [_ShardProgress(i, s.filename, s.size, sorted((t.offset, t.offset + t.nbytes, t.name)
                                                                     for t in s.tensors))
                       for i, s in enumerate(plan.shards)]
        self.journaled: list[str] = []
        self.abort = abort  # a failure here stops every thread of the merge, and theirs stops these
        self._pending: list[JournalEntry] = []
        self._cv = threading.Condition()
        self._stop = False
        self._discard = False
        self._thread = threading.Thread(target=self._run, name="safeblend-hasher", daemon=True)
        self._flusher = threading.Thread(target=self._flush_run, name="safeblend-flush", daemon=True)
        self._flush_cv = threading.Condition()
        self._to_commit: list[JournalEntry] = []  # handed from the hasher to the flusher
        self._hasher_done = False
        self._buffer = memoryview(bytearray(_READ_BLOCK))  # the hasher thread's read buffer
        self._holding = True  # landed() keeps blocks for hashing; off once the thread ends
        self._unpooled = 0  # bytes of held blocks without a release (_HOLD_UNPOOLED_BYTES)

    def start(self) -> None:
        for s in self.shards:
            s.fd = os.open(self.directory / s.filename, os.O_RDONLY)
        self._thread.start()
        self._flusher.start()

    def landed(self, shard: int, offset: int, length: int, data: memoryview | None = None,
               release: WriteDone | None = None) -> None:
        """Bytes [offset, offset + length) of a shard are in the file (called after pwrite).

        With ``data`` (those bytes, still in memory) they are hashed from it, and ``release``
        runs once they are; without, the hasher reads them back from the file.
        """
        s = self.shards[shard]
        with self._cv:
            if data is not None and self._holding and (
                    release is not None or self._unpooled + length <= _HOLD_UNPOOLED_BYTES):
                s.blocks[offset] = (data, release)
                if release is None:
                    self._unpooled += length
                release = None
            s.landed[offset] = offset + length
            advanced = False
            while s.frontier in s.landed:
                s.frontier = s.landed.pop(s.frontier)
                advanced = True
            if advanced:
                self._cv.notify()
        if release is not None:
            release()

    def started(self) -> list[str]:
        """Tensors with at least one byte written (for the fault hook's state file)."""
        names = []
        with self._cv:
            for s in self.shards:
                ranges = [(0, s.frontier), *s.landed.items()]
                names += [n for lo, hi, n in s.tensors if hi > lo and any(a < hi and lo < b for a, b in ranges)]
        return names

    def finish(self, discard: bool = False) -> dict[str, str]:
        """Stop the thread after it has hashed what was written (or at once with ``discard``);
        commits the last batch. Returns each shard's SHA-256 once every byte was hashed."""
        with self._cv:
            self._stop, self._discard = True, discard
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join()
        if self._flusher.is_alive():
            self._flusher.join()
        for s in self.shards:
            if s.fd >= 0:
                os.close(s.fd)
                s.fd = -1
        if not discard:
            self.abort.check()
        return {s.filename: s.sha.hexdigest() for s in self.shards if s.cursor == s.size}

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._stop and not self._work() and self.abort.error is None:
                        self._cv.wait(timeout=COMMIT_INTERVAL_S)
                    if self.abort.error is not None:
                        return  # another thread failed: nothing more is written
                    work = [] if self._discard else [(s, min(s.frontier, s.cursor + _PASS_BYTES))
                                                     for s in self.shards if s.frontier > s.cursor]
                    stop = self._stop
                for s, end in work:
                    self._hash(s, end)
                self._hand_over()
                if stop and not work:
                    return
        except BaseException as exc:  # noqa: BLE001  (every other thread raises it)
            self.abort.fail(exc)
        finally:
            self._release_blocks()
            with self._flush_cv:
                self._hasher_done = True
                self._flush_cv.notify()

    def _hand_over(self) -> None:
        """Give the flusher the tensors finished so far and how far each shard is hashed."""
        with self._flush_cv:
            self._to_commit += self._pending
            self._pending = []
            for s in self.shards:
                s.hashed = s.cursor
            self._flush_cv.notify()

    def _flush_run(self) -> None:
        """The flusher: flush and drop hashed bytes, then commit the journal lines that cover them
        (group commit: whatever finished while the last batch synced goes in the next)."""
        try:
            while self.abort.error is None:
                with self._flush_cv:
                    while not self._hasher_done and not self._to_commit and not self._droppable(_DROP_BYTES):
                        self._flush_cv.wait(timeout=COMMIT_INTERVAL_S)
                    done = self._hasher_done
                    batch, self._to_commit = self._to_commit, []
                    targets = [(s, s.hashed) for s in self.shards
                               if s.hashed - s.dropped >= (1 if done else _DROP_BYTES)
                               or any(e.shard == s.index for e in batch)]
                for s, hashed in targets:
                    self._drop(s, hashed)
                if batch:
                    self._commit(batch)
                if done and not batch and not targets:
                    return
        except BaseException as exc:  # noqa: BLE001  (every other thread raises it)
            self.abort.fail(exc)

    def _droppable(self, threshold: int) -> bool:
        return any(s.hashed - s.dropped >= threshold for s in self.shards)

    def _release_blocks(self) -> None:
        """Hand back every block still held (the thread is ending): nothing must wait on them."""
        with self._cv:
            self._holding = False
            held = [release for s in self.shards for _, release in s.blocks.values()]
            for s in self.shards:
                s.blocks.clear()
            self._unpooled = 0
        for release in held:
            if release is not None:
                release()

    def _work(self) -> bool:
        return any(s.frontier > s.cursor for s in self.shards)

    def _hash(self, s: _ShardProgress, end: int) -> None:
        """Hash the shard from the cursor to at least ``end`` (a held block is hashed whole)."""
        while s.cursor < end and not self._discard and self.abort.error is None:
            with self._cv:
                block = s.blocks.pop(s.cursor, None)
                next_block = min((o for o in s.blocks if o > s.cursor), default=end)
                if block is not None and block[1] is None:
                    self._unpooled -= memoryview(block[0]).nbytes
            if block is not None:
                data, release = block
                self._feed(s, memoryview(data).cast("B"))
                if release is not None:
                    release()
                continue
            view = self._buffer[: min(len(self._buffer), end - s.cursor, next_block - s.cursor)]
            n = os.preadv(s.fd, [view], s.cursor)
            if n <= 0:
                raise OutputError(f"{self.directory / s.filename}: short read at byte {s.cursor} while hashing")
            self._feed(s, view[:n])
        self._journal_through(s, s.cursor)  # empty tensors at the cursor

    def _feed(self, s: _ShardProgress, block: memoryview) -> None:
        """The next bytes of the shard, at the cursor, into its SHA-256, pausing at each tensor's
        end to journal the tensor with the digest so far."""
        start, end = s.cursor, s.cursor + len(block)
        pos = start
        while pos < end:
            self._journal_through(s, pos)
            stop = min(end, s.tensors[s.next][1]) if s.next < len(s.tensors) else end
            s.sha.update(block[pos - start : stop - start])
            pos = stop
        s.cursor = end
        self._journal_through(s, end)

    def _drop(self, s: _ShardProgress, hashed: int) -> None:
        """Flush the shard and drop its bytes up to ``hashed`` from the page cache: nothing reads
        them again. The flush also makes the journal lines of tensors before ``hashed`` safe."""
        os.fdatasync(s.fd)  # dirty pages cannot be dropped
        if hashed > s.dropped:
            os.posix_fadvise(s.fd, s.dropped, hashed - s.dropped, os.POSIX_FADV_DONTNEED)
            s.dropped = hashed

    def _journal_through(self, s: _ShardProgress, pos: int) -> None:
        """Queue a journal entry for every tensor that ends at or before ``pos`` (the SHA-256
        has consumed exactly the shard's first ``pos`` bytes)."""
        while s.next < len(s.tensors) and s.tensors[s.next][1] <= pos:
            lo, hi, name = s.tensors[s.next]
            if name not in self.already:
                self._pending.append(JournalEntry(name, s.index, lo, hi - lo, s.sha.copy().hexdigest()))
            s.next += 1

    def _commit(self, batch: list[JournalEntry]) -> None:
        """Append and sync the batch's journal lines (its shards were flushed just before)."""
        data = b"".join(e.line() for e in batch)
        while data:
            data = data[os.write(self.journal_fd, data):]
        os.fdatasync(self.journal_fd)
        self.journaled += [e.name for e in batch]


class JournaledWriter(ShardWriter):
    """A ShardWriter that reports each landed write to the journal's hasher, and on resume
    reopens the shards an earlier run laid out instead of creating them."""

    def __init__(self, directory: Path, plan: MergePlan, progress: Progress, kept: dict[str, tuple[int, int]],
                 depth: int = 4) -> None:
        super().__init__(directory, plan, depth, progress.abort)
        self.progress = progress
        self.kept = kept  # name -> (shard, offset) of tensors kept from the partial output
        self._writes = 0
        self._lock = threading.Lock()
        self._slow = float(os.environ.get(SLOW_ENV, 0) or 0)

    def _open_shard(self, path: Path, shard: Shard) -> int:
        if path.exists():  # resumed: checked against the plan by MergeSession._verify_shards
            return os.open(path, os.O_WRONLY)
        return super()._open_shard(path, shard)

    def open(self) -> None:
        super().open()
        for i, shard in enumerate(self.plan.shards):
            self.progress.landed(i, 0, len(shard.header))
        for t in self.plan.tensors:
            if t.name in self.kept:
                self.progress.landed(t.shard, t.offset, t.nbytes)
        self.progress.start()

    def submit(self, shard: int, offset: int, data: memoryview, done: WriteDone | None = None) -> None:
        length = memoryview(data).nbytes

        def landed() -> None:
            self.progress.landed(shard, offset, length, data, done)  # runs done once hashed
            if self._slow:
                time.sleep(self._slow)
            if FAULT_ENV in os.environ:
                with self._lock:
                    self._writes += 1
                    count = self._writes
                fault_point(f"write:{count}", self._fault_state)

        super().submit(shard, offset, data, landed)

    def _fault_state(self) -> dict:
        return {"started": self.progress.started(), "journaled": [*self.progress.already, *self.progress.journaled]}


def check_prefix_digests(path: Path, entries: list[JournalEntry]) -> tuple[list[JournalEntry], list[JournalEntry]]:
    """(kept, failed): hash the shard from its start through its journaled tensors, in file
    order; those up to the first prefix digest that differs are kept, that one and the rest fail."""
    sha, pos = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        for k, e in enumerate(entries):
            while pos < e.end:
                block = handle.read(min(_READ_BLOCK, e.end - pos))
                if not block:
                    return entries[:k], entries[k:]
                sha.update(block)
                pos += len(block)
            if sha.copy().hexdigest() != e.prefix_sha256:
                return entries[:k], entries[k:]
    return entries, []
