"""The writer's O_DIRECT path (engine/writer.py): every byte lands where the plan puts it,
whether a chunk's buffer is placed for direct I/O, misplaced, or a view of an input's memory
map; whole aligned blocks of placed chunks bypass the page cache; a filesystem that refuses
O_DIRECT gets the same bytes through the page cache."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from safeblend import writer as writer_module
from safeblend.checkpoint import Checkpoint
from safeblend.plan import make_plan
from safeblend.writer import DIRECT_ALIGN, ShardWriter, aligned_buffer, placed
from tests.helpers import write_checkpoint

# Tensor byte sizes around the 4 KiB block: none, inside one block, exactly one, straddling.
SIZES = {"a": 1, "b": 4095, "c": 4096, "d": 4097, "e": 3 * 4096 + 6, "f": 50_001, "g": 2, "h": 70_000}


def _plan(tmp_path: Path, shard_bytes: int = 1 << 30):
    tensors = {name: np.zeros(n, np.int8) for name, n in SIZES.items()}
    write_checkpoint(tmp_path / "base", tensors)
    write_checkpoint(tmp_path / "ft", tensors)
    base, ft = Checkpoint.open(tmp_path / "base"), Checkpoint.open(tmp_path / "ft")
    return make_plan(base, [ft], None, shard_bytes, {"format": "pt"}), base, ft


def _expected_bytes(plan, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {t.name: rng.integers(0, 256, t.nbytes, dtype=np.uint8) for t in plan.tensors}


def _source(placement: str, data: np.ndarray, offset: int, keep: list) -> memoryview:
    """``data`` handed to the writer the way a caller would: placed in a pool buffer, in a
    buffer whose address is off by a few bytes, or as a view of a memory-mapped file."""
    if placement == "placed":
        out = placed(aligned_buffer(len(data)), offset, len(data))
    elif placement == "misplaced":
        out = placed(aligned_buffer(len(data) + 8), offset + 3, len(data))
    else:  # a read-only map of a file holding the bytes at the same page offset as in the output
        # (so that, like a placed buffer, it can go direct: from the mapped file's pages)
        shift = offset % mmap.PAGESIZE
        path = Path(keep[0]) / f"src-{offset}"
        path.write_bytes(bytes(shift) + data.tobytes())
        with open(path, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ)
        keep.append(mapped)
        return memoryview(mapped)[shift : shift + len(data)]
    out[:] = data
    return memoryview(out)


def _write_all(tmp_path: Path, plan, expected, placement: str, chunk: int, rng) -> ShardWriter:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    writer = ShardWriter(out_dir, plan)
    writer.open()
    jobs = [(t, lo) for t in plan.tensors for lo in range(0, t.nbytes, chunk)]
    keep: list = [str(tmp_path)]
    for k in rng.permutation(len(jobs)):  # chunks arrive out of file order, as from two workers
        t, lo = jobs[k]
        data = expected[t.name][lo : lo + chunk]
        writer.submit(t.shard, t.offset + lo, _source(placement, data, t.offset + lo, keep))
    writer.close()
    return writer


def _file_bytes(tmp_path: Path, plan, expected) -> list[tuple[bytes, bytes]]:
    """(file content, header + expected tensor bytes) for each shard."""
    pairs = []
    for i, shard in enumerate(plan.shards):
        want = bytearray(shard.size)
        want[: len(shard.header)] = shard.header
        for t in plan.tensors:
            if t.shard == i:
                want[t.offset : t.offset + t.nbytes] = expected[t.name].tobytes()
        pairs.append(((tmp_path / "out" / shard.filename).read_bytes(), bytes(want)))
    return pairs


@pytest.mark.parametrize("placement", ["placed", "misplaced", "mmap"])
@pytest.mark.parametrize("chunk", [1000, 4096, 10_000, 65_536])
@pytest.mark.parametrize("shards", [1, 3])
def test_every_byte_lands_where_the_plan_puts_it(tmp_path, placement, chunk, shards):
    rng = np.random.default_rng(chunk + shards)
    plan, *_ = _plan(tmp_path, shard_bytes=1 << 30 if shards == 1 else 60_000)
    assert len(plan.shards) == shards
    expected = _expected_bytes(plan, rng)
    writer = _write_all(tmp_path, plan, expected, placement, chunk, rng)
    for got, want in _file_bytes(tmp_path, plan, expected):
        assert got == want
    assert writer.bytes_written == sum(t.nbytes for t in plan.tensors) + sum(len(s.header) for s in plan.shards)
    if placement == "misplaced":
        assert writer.bytes_direct == 0  # its blocks are not aligned in memory: all through the cache


def _takes_direct_io(directory: Path) -> bool:
    probe = directory / "probe"
    probe.touch()
    fd = writer_module._open_direct(probe)
    if fd < 0:
        return False
    os.close(fd)
    return True


def test_whole_blocks_of_placed_chunks_bypass_the_page_cache(tmp_path):
    if not _takes_direct_io(tmp_path):
        pytest.skip(f"{tmp_path}'s filesystem refuses O_DIRECT; the page-cache path is tested elsewhere")
    rng = np.random.default_rng(1)
    plan, *_ = _plan(tmp_path)
    expected = _expected_bytes(plan, rng)
    writer = _write_all(tmp_path, plan, expected, "placed", 65_536, rng)
    # Every whole 4 KiB block inside a chunk went direct; only blocks shared with a neighbour did not.
    inside = 0
    for t in plan.tensors:
        for lo in range(0, t.nbytes, 65_536):
            start, end = t.offset + lo, t.offset + min(t.nbytes, lo + 65_536)
            first, last = -(-start // DIRECT_ALIGN) * DIRECT_ALIGN, end // DIRECT_ALIGN * DIRECT_ALIGN
            inside += max(0, last - first)
    assert inside > 0 and writer.bytes_direct == inside
    for got, want in _file_bytes(tmp_path, plan, expected):
        assert got == want


def test_a_filesystem_refusing_o_direct_gets_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_module, "_open_direct", lambda path: -1)
    rng = np.random.default_rng(2)
    plan, *_ = _plan(tmp_path)
    expected = _expected_bytes(plan, rng)
    writer = _write_all(tmp_path, plan, expected, "placed", 10_000, rng)
    assert writer.bytes_direct == 0
    for got, want in _file_bytes(tmp_path, plan, expected):
        assert got == want


def test_direct_writes_refused_after_opening_fall_back_to_the_page_cache(tmp_path, monkeypatch):
    """Some filesystems open with O_DIRECT and then refuse the writes (EINVAL): the chunk and
    every later one go through the page cache."""
    real = writer_module._pwrite_all
    refused = []

    def refuse_direct(fd: int, view: memoryview, offset: int) -> None:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        real(fd, view, offset)

    monkeypatch.setattr(writer_module, "_open_direct", lambda path: os.open(path, os.O_WRONLY | os.O_DIRECT))
    monkeypatch.setattr(writer_module, "_pwrite_all", refuse_direct)
    rng = np.random.default_rng(3)
    plan, *_ = _plan(tmp_path)
    expected = _expected_bytes(plan, rng)
    writer = _write_all(tmp_path, plan, expected, "placed", 10_000, rng)
    assert len(refused) == 1 and writer.bytes_direct == 0
    for got, want in _file_bytes(tmp_path, plan, expected):
        assert got == want


@pytest.mark.parametrize("method", ["linear", "dare-linear"])
def test_a_merge_places_its_chunks_so_most_bytes_go_direct(tmp_path, monkeypatch, method):
    """End to end: the executor places each computed chunk for the writer, so all but the
    partial blocks at chunk ends bypass the page cache (where the filesystem allows it)."""
    if not _takes_direct_io(tmp_path):
        pytest.skip(f"{tmp_path}'s filesystem refuses O_DIRECT; the page-cache path is tested elsewhere")
    import safeblend
    from safeblend.journal import JournaledWriter

    writers: list[ShardWriter] = []
    original_open = JournaledWriter.open

    def remember(self) -> None:
        writers.append(self)
        original_open(self)

    monkeypatch.setattr(JournaledWriter, "open", remember)
    rng = np.random.default_rng(4)
    tensors = {f"w{i}": rng.standard_normal((257, 999)).astype(np.float32) for i in range(3)}
    write_checkpoint(tmp_path / "base", tensors)
    write_checkpoint(tmp_path / "ft", {k: v + 0.01 for k, v in tensors.items()})
    result = safeblend.merge(tmp_path / "base", tmp_path / "ft", tmp_path / "out", method=method, weight=0.6,
                          chunk_size="256KiB", progress=False, on_warning=lambda message: None)
    (writer,) = writers
    # Per chunk at most two partial blocks go through the cache: 2 × 4 KiB of each 256 KiB.
    assert writer.bytes_direct >= 0.9 * result.bytes_written


def test_gpu_pipeline_cast_copies_come_from_its_placed_pool(tmp_path, monkeypatch):
    """The GPU pipeline's copied tensors cast to the output dtype go out like its merged chunks:
    from a pooled pinned buffer, placed, so their whole blocks bypass the page cache (they were
    once cast into a fresh, unplaced array per chunk, all written through the cache)."""
    if not _takes_direct_io(tmp_path):
        pytest.skip(f"{tmp_path}'s filesystem refuses O_DIRECT; the page-cache path is tested elsewhere")
    pytest.importorskip("torch", reason="the test extra installs torch")
    pytest.importorskip("triton", reason="the test extra installs triton")
    import torch

    import safeblend
    import safeblend.api
    from safeblend.journal import JournaledWriter
    from tests import test_cuda_pipeline as cuda

    if not cuda.tb.INTERPRETED:
        pytest.skip("a GPU is present: the stand-in runs only under the Triton interpreter")
    writers: list[ShardWriter] = []
    original_open = JournaledWriter.open

    def remember(self) -> None:
        writers.append(self)
        original_open(self)

    class PageAligned(cuda.StandInExecutor):
        def _pinned(self, nbytes: int):  # as cudaHostAlloc's: page-aligned
            return torch.from_numpy(aligned_buffer(nbytes)[:nbytes])

    monkeypatch.setattr(JournaledWriter, "open", remember)
    monkeypatch.setattr(safeblend.api, "_select_backend", cuda._select_stand_in)
    monkeypatch.setattr(safeblend.api, "CudaExecutor", PageAligned)
    rng = np.random.default_rng(5)
    write_checkpoint(tmp_path / "base", {f"w{i}": rng.standard_normal((257, 999)).astype(np.float32)
                                         for i in range(3)})
    # The base as its own fine-tune: every tensor is planned as a copy, here cast to bf16.
    result = safeblend.merge(tmp_path / "base", tmp_path / "base", tmp_path / "out", weight=0.6, dtype="bf16",
                             device="cuda", chunk_size="256KiB", on_warning=lambda message: None)
    (writer,) = writers
    assert result.device == "cuda"
    assert writer.bytes_direct >= 0.9 * result.bytes_written
