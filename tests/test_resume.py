"""Faults during a merge: SIGKILL at several points then --resume, Ctrl-C, locking, journal
checks. Every resumed output must be byte-identical to an uninterrupted run, and no fault may
leave a directory at OUT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from safeblend.errors import OutputError
from click.testing import CliRunner

from safeblend import merge
from safeblend.cli import main
from safeblend.journal import JOURNAL_NAME, read_journal
from safeblend.session import LOCK_NAME, MergeInterrupted
from tests.helpers import interrupt_collect, random_tensor, write_checkpoint

REPO = Path(__file__).resolve().parents[1]
CHUNK = "16KiB"


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Path:
    """24 bf16 tensors of 4-12 chunks each, in 2 input shards; output in 3 shards."""
    root = tmp_path_factory.mktemp("pair")
    rng = np.random.default_rng(7)
    base, ft = {}, {}
    for i in range(24):
        shape = (16 * (4 + i % 9), 512)
        base[f"layers.{i}.w"] = random_tensor(rng, shape, "bf16")
        ft[f"layers.{i}.w"] = random_tensor(rng, shape, "bf16")
    base["norm"], ft["norm"] = random_tensor(rng, (512,), "fp32"), random_tensor(rng, (512,), "fp32")
    write_checkpoint(root / "base", base, shards=2, config={"model_type": "llama", "torch_dtype": "bfloat16"})
    write_checkpoint(root / "ft", ft, shards=2)
    return root


def _cli(pair: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "safeblend.cli", "merge", str(pair / "base"), str(pair / "ft"), "-o", str(out),
           "--weight", "0.6", "--chunk-size", CHUNK, "--shard-size", "1MB", "--device", "cpu", "-q", *extra]
    return subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def clean(pair: Path) -> Path:
    out = pair / "clean"
    result = _cli(pair, out)
    assert result.returncode == 0, result.stderr
    return out


def _staging(out: Path) -> Path:
    return out.with_name(f".{out.name}.safeblend-partial")


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _writes_in(clean: Path) -> int:
    """Chunk writes of the clean run: every tensor's chunks (16 KiB of the widest operand)."""
    from safeblend.checkpoint import Checkpoint

    ckpt = Checkpoint.open(clean)
    try:
        return sum(-(-t.numel // (16384 // t.dtype.itemsize)) for t in ckpt.tensors.values())
    finally:
        ckpt.close()


@pytest.mark.parametrize("point", ["start", "write:1", "write:third", "write:two-thirds", "write:last",
                                   "closed", "finishing"])
def test_killed_merge_resumes_byte_identical(pair, clean, tmp_path, point):
    writes = _writes_in(clean)
    point = {"write:third": f"write:{writes // 3}", "write:two-thirds": f"write:{2 * writes // 3}",
             "write:last": f"write:{writes}"}.get(point, point)
    out, state = tmp_path / "out", tmp_path / "state.json"
    # Writes slowed to ~5 MB/s so that, as in a real write-bound merge, a tensor takes longer to
    # write than an fdatasync; at full speed this tiny merge outruns the journal's syncs.
    killed = _cli(pair, out, env={"SAFEBLEND_FAULT_KILL_AT": point, "SAFEBLEND_FAULT_STATE": str(state),
                                  "SAFEBLEND_FAULT_SLOW_WRITE_S": "0.003"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()
    assert (_staging(out) / JOURNAL_NAME).is_file()
    _, journaled, _ = read_journal(_staging(out) / JOURNAL_NAME)

    refused = _cli(pair, out)  # without --resume: told how to resume or discard
    assert refused.returncode == 1 and "--resume" in refused.stderr and "rm -r" in refused.stderr

    messages: list[str] = []
    merge(pair / "base", pair / "ft", out, weight=0.6, chunk_size=CHUNK, shard_size="1MB", device="cpu",
          resume=True, on_warning=messages.append)
    assert _files(out) == _files(clean)
    assert not _staging(out).exists()
    kept = next(m for m in messages if m.startswith("--resume: kept"))
    assert kept.startswith(f"--resume: kept {len(journaled)} of 25 tensors"), kept  # nothing journaled is redone
    if state.exists():  # killed mid-write: only tensors in flight (started, not journaled) are redone
        s = json.loads(state.read_text())
        names = {e.name for e in journaled}
        assert set(s["journaled"]) <= names  # the hasher may commit more between snapshot and kill
        in_flight = set(s["started"]) - names
        assert len(in_flight) <= 4, in_flight
    if point in ("closed", "finishing"):
        assert len(journaled) == 25


def test_interrupt_keeps_partial_for_resume(pair, clean, tmp_path, monkeypatch):
    out = tmp_path / "out"
    restore = interrupt_collect(monkeypatch, after=40)
    with pytest.raises(MergeInterrupted, match="--resume"):
        merge(pair / "base", pair / "ft", out, weight=0.6, chunk_size=CHUNK, shard_size="1MB", device="cpu")
    assert not out.exists()
    _, journaled, _ = read_journal(_staging(out) / JOURNAL_NAME)
    assert journaled, "finished tensors were journaled before stopping"
    restore()
    merge(pair / "base", pair / "ft", out, weight=0.6, chunk_size=CHUNK, shard_size="1MB", device="cpu", resume=True)
    assert _files(out) == _files(clean)


def test_sigterm_stops_cleanly_with_resume_hint(pair, clean, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "safeblend.cli", "merge", str(pair / "base"), str(pair / "ft"), "-o", str(out),
           "--weight", "0.6", "--chunk-size", CHUNK, "--shard-size", "1MB", "--device", "cpu", "-q"]
    env = {**os.environ, "SAFEBLEND_FAULT_SLOW_WRITE_S": "0.005"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    journal = _staging(out) / JOURNAL_NAME
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (journal.exists() and journal.read_bytes().count(b"\n") > 2):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the merge finished before SIGTERM arrived")
    assert proc.returncode == 130, err
    assert "Interrupted:" in err and "--resume" in err and "Traceback" not in err
    assert not out.exists()
    assert _cli(pair, out, "--resume").returncode == 0
    assert _files(out) == _files(clean)


def test_second_merge_into_same_output_is_refused_while_first_runs(pair, tmp_path):
    import fcntl

    out = tmp_path / "out"
    staging = _staging(out)
    staging.mkdir()
    lock = os.open(staging / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)  # stands in for a live merge holding the lock
    os.write(lock, b"4242\n")
    try:
        for extra in ((), ("--resume",)):
            result = _cli(pair, out, *extra)
            assert result.returncode == 1
            assert "another merge (pid 4242) is writing this output right now" in result.stderr
    finally:
        os.close(lock)
    assert not out.exists() and staging.exists()


def test_resume_refuses_a_different_recipe_or_changed_input(pair, tmp_path):
    out = tmp_path / "out"
    assert _cli(pair, out, env={"SAFEBLEND_FAULT_KILL_AT": "write:5"}).returncode == -signal.SIGKILL
    other = _cli(pair, out, "--resume", "--dtype", "fp32")
    assert other.returncode == 1 and "made by a different merge" in other.stderr
    touched = pair / "ft" / "model-00001-of-00002.safetensors"
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        changed = _cli(pair, out, "--resume")
        assert changed.returncode == 1 and "changed since" in changed.stderr and touched.name in changed.stderr
    finally:
        os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert not out.exists()


def test_torn_journal_and_corrupted_tensor_are_redone(pair, clean, tmp_path):
    out = tmp_path / "out"
    assert _cli(pair, out, env={"SAFEBLEND_FAULT_KILL_AT": "closed"}).returncode == -signal.SIGKILL
    journal = _staging(out) / JOURNAL_NAME
    header, entries, _ = read_journal(journal)
    with open(journal, "ab") as handle:
        handle.write(b'{"t":"layers.3.w","s":0,"o":')  # torn last line
    victim = entries[2]
    shard = sorted(_staging(out).glob("*.safetensors"))[victim.shard]
    with open(shard, "r+b") as handle:  # flip a byte of a journaled tensor
        handle.seek(victim.offset + 10)
        byte = handle.read(1)
        handle.seek(victim.offset + 10)
        handle.write(bytes([byte[0] ^ 0xFF]))
    messages: list[str] = []
    merge(pair / "base", pair / "ft", out, weight=0.6, chunk_size=CHUNK, shard_size="1MB", device="cpu",
          resume=True, on_warning=messages.append)
    # The victim fails its check, and so does every later tensor of its shard (their prefix
    # digests cover the victim's bytes); tensors before it and in other shards are kept.
    redone = [e for e in entries if e.shard == victim.shard and e.offset >= victim.offset]
    failed = f"{len(redone)} journaled tensor(s) failed their check and are redone (first: {victim.name!r})"
    assert f"--resume: {failed}" in messages, messages
    kept = len({e.name for e in entries}) - len(redone)
    assert any(f"kept {kept} of" in m for m in messages), messages
    assert _files(out) == _files(clean)


def test_overwrite_discards_a_stale_partial_and_starts_over(pair, clean, tmp_path, monkeypatch):
    from safeblend import execute

    out = tmp_path / "out"
    original = execute.Executor._collect

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(execute.Executor, "_collect", staticmethod(interrupt))
    with pytest.raises(MergeInterrupted):
        merge(pair / "base", pair / "ft", out, weight=0.6, chunk_size=CHUNK, shard_size="1MB", device="cpu")
    assert _staging(out).exists()
    monkeypatch.setattr(execute.Executor, "_collect", staticmethod(original))
    with pytest.raises(OutputError, match="--resume"):  # neither --resume nor --overwrite: refused
        merge(pair / "base", pair / "ft", out, weight=0.6, chunk_size=CHUNK, shard_size="1MB", device="cpu")
    messages: list[str] = []
    merge(pair / "base", pair / "ft", out, weight=0.6, chunk_size=CHUNK, shard_size="1MB", device="cpu",
          overwrite=True, on_warning=messages.append)
    assert any("discarded the partial output" in m for m in messages)
    assert _files(out) == _files(clean) and not _staging(out).exists()


def test_resume_without_partial_starts_fresh(pair, clean, tmp_path):
    messages: list[str] = []
    merge(pair / "base", pair / "ft", tmp_path / "out", weight=0.6, chunk_size=CHUNK, shard_size="1MB",
          device="cpu", resume=True, on_warning=messages.append)
    assert any("no partial output" in m for m in messages)
    assert _files(tmp_path / "out") == _files(clean)


def test_failure_removes_staging_and_leaves_nothing_at_out(pair, tmp_path, monkeypatch):
    from safeblend import execute

    def boom(*args, **kwargs):
        raise RuntimeError("compute failed")

    monkeypatch.setattr(execute.Executor, "_process", boom)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        merge(pair / "base", pair / "ft", out, chunk_size=CHUNK, device="cpu")
    assert not out.exists() and not _staging(out).exists()


def test_inputs_are_not_modified(pair, clean, tmp_path):
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for d in ("base", "ft") for p in (pair / d).iterdir()}
    _cli(pair, tmp_path / "out")
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for d in ("base", "ft") for p in (pair / d).iterdir()}
    assert before == after


def test_cli_resume_flag_and_message(pair, clean, tmp_path):
    out = tmp_path / "out"
    assert _cli(pair, out, env={"SAFEBLEND_FAULT_KILL_AT": "write:20"}).returncode == -signal.SIGKILL
    result = CliRunner().invoke(main, ["merge", str(pair / "base"), str(pair / "ft"), "-o", str(out), "--weight",
                                       "0.6", "--chunk-size", CHUNK, "--shard-size", "1MB", "--device", "cpu",
                                       "--resume", "-q"])
    assert result.exit_code == 0, result.output
    assert "--resume: kept" in result.output
    assert _files(out) == _files(clean)
