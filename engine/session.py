"""One merge's output while it is built: a locked staging directory beside OUT, resume, commit.

A merge writes into ``.{OUT}.safeblend-partial`` beside OUT, holding ``.safeblend-lock`` with
``flock`` for the whole run (a second merge into OUT is refused while the first is alive; a
partial left by a dead one can be resumed) and the journal (safeblend.journal). ``--resume``
checks the journal's fingerprint, re-hashes each shard's journaled prefix and keeps the tensors
up to the first whose digest differs; the executor skips the kept ones, so a resumed output is
byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from .abort import Abort
from .errors import OutputError
from .journal import (JOURNAL_NAME, JOURNAL_VERSION, JournaledWriter, Progress, check_prefix_digests,
                      describe_mismatch, fault_point, fingerprint, read_journal)
from .manifest import write_manifest
from .output_paths import check_replaceable, check_staging
from .plan import MergePlan
from .units import format_size
from .writer import OutputDir, fsync_dir

LOCK_NAME = ".safeblend-lock"


class MergeInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the merge; the partial output is kept for ``--resume``."""


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

    def __init__(self, final: Path, overwrite: bool, plan: MergePlan, abort: Abort) -> None:
        self.abort = abort
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
              inputs: Sequence[str | os.PathLike], settings: dict[str, Any],
              abort: Abort | None = None) -> "MergeSession":
        """Create or reopen the staging directory, lock it and (with ``resume``) keep the
        journaled tensors whose bytes check out (``kept``: the executor skips them)."""
        session = cls(Path(out), overwrite, plan, abort or Abort())
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
        self.progress = Progress(staging, self.plan, self._journal_fd, set(self.kept), self.abort)
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
                f"({describe_mismatch(header.get('fingerprint') or {}, print_)}); rerun it as before, or delete "
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
            kept, failed = check_prefix_digests(path, sorted(by_shard[shard], key=lambda e: e.end))
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
        hashes, write the manifest, drop journal and lock, rename."""
        assert self.progress is not None
        digests = self.progress.finish()
        missing = [s.filename for s in self.plan.shards if s.filename not in digests]
        if missing:
            raise OutputError(f"{self.staging / missing[0]}: not every byte was written; the merge is incomplete")
        fault_point("closed")
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


def _allocated(directory: Path, plan: MergePlan) -> int:
    """Bytes the partial shards already occupy on disk (they are sparse until written)."""
    total = 0
    for shard in plan.shards:
        try:
            total += min(shard.size, os.stat(directory / shard.filename).st_blocks * 512)
        except FileNotFoundError:
            pass
    return total
