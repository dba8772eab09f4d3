"""Any pipeline thread's failure ends the merge with that failure's error, never a hang.

Each thread of a merge (the reader/prefetch stage, a compute thread, the writer, the journal's
hasher and flusher) is made to fail at the first, a middle and the last chunk. The failing
thread first waits, so that the others have run ahead and block on it (a full buffer pool, a
full write queue): the merge must still end, promptly, with the injected error, and leave
nothing at OUT or beside it. Each case runs in a thread joined with a timeout, so a regression
fails the test instead of hanging CI.
"""

from __future__ import annotations

import errno
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import safeblend
from safeblend import execute, journal, writer
from safeblend.chunks import Chunk, iter_chunks
from safeblend.cli import main
from safeblend.errors import OutputError
from tests.helpers import random_tensor, run_bounded, write_checkpoint

CHUNK = 4096
STALL_S = 0.3  # how long a failing thread waits first: the others fill every buffer meanwhile
TIMEOUT_S = 20
POSITIONS = ("first", "middle", "last")


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Path:
    """12 bf16 tensors of 3-10 chunks each (4 KiB chunks), an int buffer copied from the base."""
    root = tmp_path_factory.mktemp("faults")
    rng = np.random.default_rng(5)
    base = {f"layers.{i}.w": random_tensor(rng, (8 * (3 + i % 8), 128), "bf16") for i in range(12)}
    ft = {name: random_tensor(rng, t.shape, "bf16") for name, t in base.items()}
    base["ids"] = ft["ids"] = np.arange(700, dtype=np.int64)
    write_checkpoint(root / "base", base, shards=2)
    write_checkpoint(root / "ft", ft)
    return root


@pytest.fixture(scope="module")
def chunks(pair, tmp_path_factory) -> list[Chunk]:
    """The chunks of a clean run, in order (what the cases aim at)."""
    seen: list[Chunk] = []
    original = execute.Executor.run

    def recording(self, *args, **kwargs):
        seen.extend(iter_chunks(self.plan, self.chunk_bytes))
        return original(self, *args, **kwargs)

    execute.Executor.run = recording
    try:
        _merge(pair, tmp_path_factory.mktemp("clean") / "out")
    finally:
        execute.Executor.run = original
    assert len(seen) >= 40
    return seen


def _merge(pair: Path, out: Path) -> None:
    safeblend.merge(pair / "base", pair / "ft", out, weight=0.6, chunk_size=CHUNK, shard_size="60kB",
                    device="cpu", on_warning=lambda m: None)


def _target(chunks: list[Chunk], position: str) -> Chunk:
    return {"first": chunks[0], "middle": chunks[len(chunks) // 2], "last": chunks[-1]}[position]


def _injected(what: str) -> OSError:
    return OSError(errno.EIO, f"{what} failed (injected)")


def _inject(monkeypatch, thread: str, target: Chunk) -> None:
    """Make ``thread`` fail when it reaches the ``target`` chunk."""
    offset, nbytes = target.out_range
    shard, name = target.tensor.shard, target.tensor.name

    def is_target(chunk: Chunk) -> bool:
        return (chunk.tensor.name, chunk.first) == (name, target.first)

    if thread == "prefetch":
        original_prefetch = execute.Executor._prefetch

        def prefetch(self, chunk):
            if is_target(chunk):
                raise _injected("prefetch")
            original_prefetch(self, chunk)

        monkeypatch.setattr(execute.Executor, "_prefetch", prefetch)
    elif thread == "compute":
        original_process = execute.Executor._process

        def process(self, chunk, out, pool):
            if is_target(chunk):
                time.sleep(STALL_S)
                raise _injected("compute")
            return original_process(self, chunk, out, pool)

        monkeypatch.setattr(execute.Executor, "_process", process)
    elif thread == "writer":
        original_pwrite = writer._pwrite_all

        def pwrite(fd, view, at):
            if at <= offset < at + len(view):
                time.sleep(STALL_S)
                raise OSError(errno.ENOSPC, "No space left on device")
            original_pwrite(fd, view, at)

        monkeypatch.setattr(writer, "_pwrite_all", pwrite)
    elif thread == "hasher":
        original_feed = journal.Progress._feed

        def feed(self, s, block):
            if s.index == shard and s.cursor <= offset < s.cursor + len(block):
                time.sleep(STALL_S)
                raise _injected("hasher")
            original_feed(self, s, block)

        monkeypatch.setattr(journal.Progress, "_feed", feed)
    elif thread == "flusher":
        original_commit = journal.Progress._commit

        def commit(self, batch):
            if any(e.name == name for e in batch):
                time.sleep(STALL_S)
                raise _injected("flusher")
            original_commit(self, batch)

        monkeypatch.setattr(journal.Progress, "_commit", commit)
    else:
        raise AssertionError(thread)


def _run_bounded(work) -> list[BaseException]:
    """Run ``work`` in a thread; fail (rather than hang) if it is not done within TIMEOUT_S."""
    return run_bounded(work, TIMEOUT_S, "the merge hung after one of its threads failed")


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("thread", ["prefetch", "compute", "writer", "hasher", "flusher"])
def test_a_failing_thread_ends_the_merge_with_its_error(pair, chunks, tmp_path, monkeypatch, thread, position):
    _inject(monkeypatch, thread, _target(chunks, position))
    out = tmp_path / "out"
    started = time.perf_counter()
    raised = _run_bounded(lambda: _merge(pair, out))
    assert len(raised) == 1, "the merge finished although a thread failed"
    error = raised[0]
    if thread == "writer":
        assert isinstance(error, OutputError) and "ran out of space while writing" in str(error), repr(error)
    else:
        assert isinstance(error, OSError) and f"{thread} failed (injected)" in str(error), repr(error)
    assert time.perf_counter() - started < 10 * STALL_S + 2
    assert not out.exists()
    assert not out.with_name(f".{out.name}.safeblend-partial").exists()


def test_cli_reports_a_full_disk_in_one_line_not_as_an_interrupt(pair, chunks, tmp_path, monkeypatch):
    _inject(monkeypatch, "writer", _target(chunks, "middle"))
    out = tmp_path / "out"
    results = []
    _run_bounded(lambda: results.append(CliRunner().invoke(main, [
        "merge", str(pair / "base"), str(pair / "ft"), "-o", str(out), "-q", "--chunk-size", str(CHUNK),
        "--shard-size", "60kB", "--device", "cpu"])))
    result = results[0]
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "ran out of space while writing" in lines[0]
    assert "Interrupted" not in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("position", POSITIONS)
def test_a_failing_gpu_reader_ends_the_merge_with_its_error(pair, chunks, tmp_path, monkeypatch, position):
    """The GPU pipeline's reader threads, through the CPU stand-in of tests/test_cuda_pipeline.py."""
    pytest.importorskip("torch", reason="the test extra installs torch")
    pytest.importorskip("triton", reason="the test extra installs triton")
    import safeblend.api
    from tests import test_cuda_pipeline as cuda

    if not cuda.tb.INTERPRETED:
        pytest.skip("a GPU is present: the stand-in runs only under the Triton interpreter")
    monkeypatch.setattr(safeblend.api, "_select_backend", cuda._select_stand_in)
    monkeypatch.setattr(safeblend.api, "CudaExecutor", cuda.StandInExecutor)
    target = _target([c for c in chunks if c.tensor.action == "merge"], position)
    original_read = cuda.StandInExecutor._read

    def read(self, chunk, in_slot):
        if (chunk.tensor.name, chunk.first) == (target.tensor.name, target.first):
            time.sleep(STALL_S)
            raise _injected("reader")
        return original_read(self, chunk, in_slot)

    monkeypatch.setattr(cuda.StandInExecutor, "_read", read)
    out = tmp_path / "out"
    raised = _run_bounded(lambda: safeblend.merge(pair / "base", pair / "ft", out, weight=0.6, chunk_size=CHUNK,
                                                  shard_size="60kB", device="cuda", on_warning=lambda m: None))
    assert len(raised) == 1 and "reader failed (injected)" in str(raised[0]), raised
    assert not out.exists() and not out.with_name(f".{out.name}.safeblend-partial").exists()


def test_a_failing_writer_ends_a_sweep_with_its_error(pair, chunks, tmp_path, monkeypatch):
    """A sweep's outputs share one failure slot: one output's writer failing ends them all."""
    from safeblend.lambda_sweep import sweep

    _inject(monkeypatch, "writer", _target(chunks, "middle"))
    out = tmp_path / "s"
    raised = _run_bounded(lambda: sweep(pair / "base", pair / "ft", out, "0.2,0.5,0.8", chunk_size=CHUNK,
                                        shard_size="60kB", on_warning=lambda m: None))
    assert len(raised) == 1 and isinstance(raised[0], OutputError), raised
    assert "ran out of space while writing" in str(raised[0])
    assert not out.exists() or not any(out.iterdir())
