"""Surviving faults: a locked staging directory, a journal of finished tensors, resume.

A merge writes into ``.{OUT}.safeblend-partial`` beside OUT. Inside it:

- ``.safeblend-lock``: held with ``flock`` for the whole run, so a second merge into the same
  OUT is refused while the first is alive, and a partial left by a dead one can be resumed.
- ``.safeblend-journal``: JSON lines. The first holds the run's fingerprint (every shard
  header — so the recipe and the layout —, each input file's path, size, mtime and header
  digest, and the settings that change bytes); each further line names one tensor whose bytes
  are on disk, with its shard, offset, length and prefix digest (below). Lines are appended in batches, each
  batch after ``fdatasync`` of the shards it covers and followed by ``fdatasync`` of the
  journal, so a journaled tensor's bytes are durable. A torn last line is ignored.

A hasher thread follows the writes in file order, feeding each shard's SHA-256 (recorded in
the manifest). When the hash passes a tensor's last byte, the digest of the shard so far (a
copy of the running SHA-256, finished) is that tensor's journal checksum: it covers the tensor,
and one pass yields both the manifest and the journal at no cost beyond the SHA-256 itself (a
separate CRC-32 per tensor took 0.55 s of CPU on a 2.2 GB output). It hashes a written chunk
from the chunk's own buffer, which the writer hands over instead of releasing (so the buffer
pool, not the hasher, bounds how far writing runs ahead), and re-reads from the file only what
no buffer brought: headers, and tensors kept by ``--resume``. Behind it the hashed prefix is
flushed and dropped from the page cache (``fdatasync`` + ``POSIX_FADV_DONTNEED``; most of each
chunk never entered it, being written with O_DIRECT, safeblend.writer, but the rest did): the output
then holds a few tens of MiB of cache, not its whole size, and new writes reuse those pages
instead of claiming memory the kernel has not touched yet, which on a VM costs a host fault per
4 KiB page (benchmarks/page_recycling.py: 0.35 GiB/s into fresh pages, 1.3 GiB/s recycled,
fsync included).

``--resume`` checks the fingerprint, re-hashes each shard's journaled prefix and keeps the
tensors up to the first whose prefix digest differs (that one and every later one in its shard
are redone); the executor skips the kept tensors, so a resumed output is byte-identical to an
uninterrupted one. Hashing runs in file order, so a shard's journaled tensors form a prefix of it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .checkpoint import reference_paths
from .errors import OutputError
from .output_paths import check_replaceable, check_staging
from .plan import MergePlan, Shard
from .units import format_size
from .writer import OutputDir, ShardWriter, WriteDone, fsync_dir

LOCK_NAME = ".safeblend-lock"
JOURNAL_NAME = ".safeblend-journal"
JOURNAL_VERSION = 2  # 2: prefix SHA-256 per tensor (1 had CRC-32s)
# The hasher's and flusher's idle wake-up. The flusher commits whatever the hasher finished
# while the last batch synced, so the journal trails the writes by about one fdatasync.
COMMIT_INTERVAL_S = 0.25
_PASS_BYTES = 64 * 2**20
_READ_BLOCK = 4 * 2**20
# Hashed bytes of a shard that may stay in the page cache before they are flushed and dropped.
_DROP_BYTES = 32 * 2**20
# Test hook: SIGKILL this process at a named point ("start", "write:N", "closed", "finishing").
FAULT_ENV = "SAFEBLEND_FAULT_KILL_AT"
FAULT_STATE_ENV = "SAFEBLEND_FAULT_STATE"
SLOW_ENV = "SAFEBLEND_FAULT_SLOW_WRITE_S"  # test hook: sleep after each write, to interrupt mid-merge


class MergeInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the merge; the partial output is kept for ``--resume``."""


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


def _describe_mismatch(old: dict[str, Any], new: dict[str, Any]) -> str:
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

    def __init__(self, directory: Path, plan: MergePlan, journal_fd: int, already: set[str]) -> None:
        self.directory = directory
        self.journal_fd = journal_fd
        self.already = already  # journaled by an earlier run: not appended again
        self.shards = [_ShardProgress(i, s.filename, s.size, sorted((t.offset, t.offset + t.nbytes, t.name)
                                                                     for t in s.tensors))
                       for i, s in enumerate(plan.shards)]
        self.journaled: list[str] = []
        self.error: BaseException | None = None
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
        self.hash_seconds = 0.0
        self.commit_seconds = 0.0

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
            if data is not None and self._holding:
                s.blocks[offset] = (data, release)
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
        if self.error is not None and not discard:
            raise self.error
        return {s.filename: s.sha.hexdigest() for s in self.shards if s.cursor == s.size}

    def raise_pending(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._stop and not self._work():
                        self._cv.wait(timeout=COMMIT_INTERVAL_S)
                    work = [] if self._discard else [(s, min(s.frontier, s.cursor + _PASS_BYTES))
                                                     for s in self.shards if s.frontier > s.cursor]
                    stop = self._stop
                for s, end in work:
                    self._hash(s, end)
                self._hand_over()
                if stop and not work:
                    return
        except BaseException as exc:  # noqa: BLE001  (re-raised on the main thread)
            self.error = exc
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
            while True:
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
        except BaseException as exc:  # noqa: BLE001  (re-raised on the main thread)
            self.error = self.error or exc

    def _droppable(self, threshold: int) -> bool:
        return any(s.hashed - s.dropped >= threshold for s in self.shards)

    def _release_blocks(self) -> None:
        """Hand back every block still held (the thread is ending): nothing must wait on them."""
        with self._cv:
            self._holding = False
            held = [release for s in self.shards for _, release in s.blocks.values()]
            for s in self.shards:
                s.blocks.clear()
        for release in held:
            if release is not None:
                release()

    def _work(self) -> bool:
        return any(s.frontier > s.cursor for s in self.shards)

    def _hash(self, s: _ShardProgress, end: int) -> None:
        """Hash the shard from the cursor to at least ``end`` (a held block is hashed whole)."""
        started = time.perf_counter()
        while s.cursor < end and not self._discard:
            with self._cv:
                block = s.blocks.pop(s.cursor, None)
                next_block = min((o for o in s.blocks if o > s.cursor), default=end)
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
        self.hash_seconds += time.perf_counter() - started

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
        started = time.perf_counter()
        os.fdatasync(s.fd)  # dirty pages cannot be dropped
        if hashed > s.dropped:
            os.posix_fadvise(s.fd, s.dropped, hashed - s.dropped, os.POSIX_FADV_DONTNEED)
            s.dropped = hashed
        self.commit_seconds += time.perf_counter() - started

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
        started = time.perf_counter()
        data = b"".join(e.line() for e in batch)
        while data:
            data = data[os.write(self.journal_fd, data):]
        os.fdatasync(self.journal_fd)
        self.journaled += [e.name for e in batch]
        self.commit_seconds += time.perf_counter() - started


class JournaledWriter(ShardWriter):
    """A ShardWriter that reports each landed write to the journal's hasher, and on resume
    reopens the shards an earlier run laid out instead of creating them."""

    def __init__(self, directory: Path, plan: MergePlan, progress: Progress, kept: dict[str, tuple[int, int]],
                 depth: int = 4) -> None:
        super().__init__(directory, plan, depth)
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
        self.progress.raise_pending()
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


# -- the session: staging, lock, resume, commit -----------------------------------------------


def _clear_directory(directory: Path, keep: str) -> None:
    """Remove everything in ``directory`` except the entry named ``keep``."""
    for entry in directory.iterdir():
        if entry.name == keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


class MergeSession:
    """One merge's output: locked staging beside OUT, journal, resume, manifest, commit."""

    def __init__(self, final: Path, overwrite: bool, plan: MergePlan) -> None:
        self.output = OutputDir(final, overwrite)
        self.staging = self.output.staging
        self.plan = plan
        self.messages: list[str] = []
        self.kept: dict[str, tuple[int, int]] = {}
        self._lock_fd = -1
        self._journal_fd = -1
        self._journal_fd_opened = False
        self.progress: Progress | None = None
        self.writer: JournaledWriter | None = None

    @classmethod
    def start(cls, out: str | os.PathLike, *, overwrite: bool, resume: bool, plan: MergePlan,
              inputs: Sequence[str | os.PathLike], settings: dict[str, Any]) -> "MergeSession":
        """Create or reopen the staging directory, lock it and (with ``resume``) keep the
        journaled tensors whose bytes check out; ``plan.skip`` gets their names."""
        session = cls(Path(out), overwrite, plan)
        try:
            session._open(resume, fingerprint(plan, inputs, settings))
        except BaseException as exc:
            session._release()
            if isinstance(exc, KeyboardInterrupt) and session._journal_fd_opened:
                raise MergeInterrupted(f"the partial output is kept at {session.staging}; rerun the same command "
                                       "with --resume to finish it") from exc
            raise
        return session

    @property
    def kept_bytes(self) -> int:
        return sum(t.nbytes for t in self.plan.tensors if t.name in self.kept)

    def _open(self, resume: bool, print_: dict[str, Any]) -> None:
        final, staging = self.output.final, self.staging
        check_replaceable(final, self.output.overwrite)  # only safeblend's own output: safeblend.output_paths
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{final.parent}: cannot create output's parent directory: {exc.strerror}") from exc
        existed = staging.exists()
        if not existed:
            self.output.check_space(self.plan.output_bytes)
            try:
                staging.mkdir()
            except FileExistsError:
                existed = True
            except OSError as exc:
                raise OutputError(f"{staging}: cannot create: {exc.strerror}") from exc
        check_staging(staging, existed)  # a real directory of ours, never a planted link
        self._lock(existed)
        if existed and not resume and self.output.overwrite:
            # Holding the lock, so no live merge owns it: --overwrite means start over.
            _clear_directory(staging, keep=LOCK_NAME)
            self.messages.append(f"--overwrite: discarded the partial output of an interrupted merge at {staging}")
            self.output.check_space(self.plan.output_bytes)
            existed = False
        if existed and not resume:
            raise OutputError(
                f"{staging}: a partial output of an interrupted merge into {final.name} is here; rerun the "
                f"same command with --resume to finish it, or delete it (rm -r '{staging}') to start over"
            )
        if existed:
            self._resume(print_)
        else:
            if resume:
                self.messages.append(f"--resume: no partial output at {staging}; starting a fresh merge")
            self._new_journal(print_)
        self.plan.skip = frozenset(self.kept)
        self.progress = Progress(staging, self.plan, self._journal_fd, set(self.kept))
        self.writer = JournaledWriter(staging, self.plan, self.progress, self.kept)
        fault_point("start")

    def _lock(self, existed: bool) -> None:
        path = self.staging / LOCK_NAME
        try:
            # In a partial we did not create, never create the lock: its absence means the
            # owner is between removing it and renaming the directory, or died before locking.
            self._lock_fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | (0 if existed else os.O_CREAT), 0o644)
        except FileNotFoundError:
            raise OutputError(
                f"{self.staging}: a partial output without a lock file is here (a merge is finishing, or one "
                f"died before it began); if no merge into {self.output.final.name} is running, delete it"
            ) from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(self._lock_fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise OutputError(
                f"{self.output.final}: another merge (pid {owner}) is writing this output right now "
                f"(into {self.staging}); wait for it to finish or stop it"
            ) from None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)

    def _new_journal(self, print_: dict[str, Any]) -> None:
        path = self.staging / JOURNAL_NAME
        self._journal_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        header = {"safeblend_journal": JOURNAL_VERSION, "fingerprint": print_}
        os.write(self._journal_fd, (json.dumps(header, separators=(",", ":")) + "\n").encode())
        os.fdatasync(self._journal_fd)
        fsync_dir(self.staging)
        self._journal_fd_opened = True

    def _resume(self, print_: dict[str, Any]) -> None:
        path = self.staging / JOURNAL_NAME
        header, entries, good = read_journal(path)
        if header is None:
            raise OutputError(f"{self.staging}: the partial output has no readable journal, so it cannot be "
                              f"resumed; delete it (rm -r '{self.staging}') and merge again")
        if header.get("fingerprint") != print_:
            raise OutputError(
                f"{self.staging}: cannot resume: the partial output was made by a different merge "
                f"({_describe_mismatch(header.get('fingerprint') or {}, print_)}); rerun it as before, or delete "
                f"it (rm -r '{self.staging}') to start over"
            )
        self._journal_fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.ftruncate(self._journal_fd, good)  # drop a torn last line before appending
        valid_shards = self._verify_shards()
        by_name = {t.name: t for t in self.plan.tensors}
        latest = {e.name: e for e in entries}  # a tensor redone by an earlier resume: its last line
        bad, by_shard = [], {}
        for e in latest.values():
            t = by_name.get(e.name)
            if t is None or (t.shard, t.offset, t.nbytes) != (e.shard, e.offset, e.nbytes) or e.shard not in valid_shards:
                bad.append(e.name)
            else:
                by_shard.setdefault(e.shard, []).append(e)
        for shard in sorted(by_shard):
            path = self.staging / self.plan.shards[shard].filename
            kept, failed = _check_prefix_digests(path, sorted(by_shard[shard], key=lambda e: e.end))
            self.kept.update((e.name, (e.shard, e.offset)) for e in kept)
            bad += [e.name for e in failed]
        if bad:
            self.messages.append(f"--resume: {len(bad)} journaled tensor(s) failed their check and are redone "
                                 f"(first: {bad[0]!r})")
        left = self.plan.output_bytes - _allocated(self.staging, self.plan)
        self.output.check_space(max(0, left))
        self.messages.append(
            f"--resume: kept {len(self.kept)} of {len(self.plan.tensors)} tensors "
            f"({format_size(self.kept_bytes)}) from {self.staging}; merging the rest"
        )

    def _verify_shards(self) -> set[int]:
        """Shards whose size and header match the plan; others are deleted and redone."""
        valid = set()
        for i, shard in enumerate(self.plan.shards):
            path = self.staging / shard.filename
            try:
                with open(path, "rb") as handle:
                    ok = os.fstat(handle.fileno()).st_size == shard.size and handle.read(len(shard.header)) == shard.header
            except FileNotFoundError:
                continue
            if ok:
                valid.add(i)
            else:
                path.unlink()
        return valid

    def commit(self) -> dict[str, str]:
        """After the writer closed and the index and model files are written: finish the
        hashes, apply checkpoint quirks, write the manifest, drop journal and lock, rename."""
        from .quirks import apply_output_files
        from .manifest import write_manifest

        assert self.progress is not None
        digests = self.progress.finish()
        missing = [s.filename for s in self.plan.shards if s.filename not in digests]
        if missing:
            raise OutputError(f"{self.staging / missing[0]}: not every byte was written; the merge is incomplete")
        fault_point("closed")
        apply_output_files(self.plan, self.staging)
        write_manifest(self.staging, self.plan, digests)
        fault_point("finishing")
        (self.staging / JOURNAL_NAME).unlink()
        (self.staging / LOCK_NAME).unlink()
        self.output.commit()
        self._release()
        return digests

    def fail(self, exc: BaseException) -> None:
        """Called with the exception that stopped the merge; the caller re-raises it.

        An interrupt keeps the staging directory (journal flushed) for ``--resume`` and turns
        into MergeInterrupted; any other failure removes it.
        """
        interrupted = isinstance(exc, KeyboardInterrupt)
        if self.writer is not None:
            self.writer.abandon()
        if self.progress is not None:
            try:
                self.progress.finish(discard=not interrupted)
            except BaseException:  # noqa: BLE001  (the original failure is what matters)
                pass
        self._release()
        if not interrupted:
            self.output.abort()
        elif not isinstance(exc, MergeInterrupted):
            raise MergeInterrupted(
                f"the partial output is kept at {self.staging}; rerun the same command with --resume to "
                "finish it"
            ) from exc

    def _release(self) -> None:
        for name in ("_journal_fd", "_lock_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)  # closing the lock's descriptor releases the flock
                setattr(self, name, -1)


def _check_prefix_digests(path: Path, entries: list[JournalEntry]) -> tuple[list[JournalEntry], list[JournalEntry]]:
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


def _allocated(directory: Path, plan: MergePlan) -> int:
    """Bytes the partial shards already occupy on disk (they are sparse until written)."""
    total = 0
    for shard in plan.shards:
        try:
            total += min(shard.size, os.stat(directory / shard.filename).st_blocks * 512)
        except FileNotFoundError:
            pass
    return total


__all__ = ["MergeInterrupted", "MergeSession", "read_journal"]
