"""safeblend sweep --resume: an interrupted or killed sweep keeps its partial outputs, and the
resumed sweep is byte-identical to an uninterrupted one (as merge --resume)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from safeblend.journal import JOURNAL_NAME, read_journal
from safeblend.session import MergeInterrupted, MergeSession
from safeblend.lambda_sweep import sweep
from tests.helpers import interrupt_collect, random_tensor, run_bounded, write_checkpoint

REPO = Path(__file__).resolve().parents[1]
CHUNK = "16KiB"
WEIGHTS = "0.2,0.5,0.8"
NAMES = ["lambda-0.2", "lambda-0.5", "lambda-0.8"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Path:
    """16 bf16 tensors of 4-12 chunks each; outputs in 2 shards."""
    root = tmp_path_factory.mktemp("pair")
    rng = np.random.default_rng(11)
    base, ft = {}, {}
    for i in range(16):
        shape = (16 * (4 + i % 9), 512)
        base[f"layers.{i}.w"] = random_tensor(rng, shape, "bf16")
        ft[f"layers.{i}.w"] = random_tensor(rng, shape, "bf16")
    write_checkpoint(root / "base", base, shards=2, config={"model_type": "llama", "torch_dtype": "bfloat16"})
    write_checkpoint(root / "ft", ft)
    return root


def _sweep(pair: Path, out: Path, **kwargs):
    return sweep(pair / "base", pair / "ft", out, WEIGHTS, chunk_size=CHUNK, shard_size="1MB", **kwargs)


def _resume_within(pair: Path, out: Path, seconds: float = 60, **kwargs):
    """The resumed sweep in a thread: an output waiting for bytes no one writes fails the test, not CI."""
    finished: list = []
    raised = run_bounded(lambda: finished.append(_sweep(pair, out, resume=True, **kwargs)), seconds,
                         "the resumed sweep hung")
    if raised:
        raise raised[0]
    return finished[0]


@pytest.fixture(scope="module")
def clean(pair: Path) -> Path:
    _sweep(pair, pair / "clean")
    return pair / "clean"


def _files(directory: Path) -> dict[str, bytes]:
    return {f"{d.name}/{p.name}": p.read_bytes() for d in sorted(directory.iterdir()) for p in sorted(d.iterdir())}


def _partials(out: Path) -> list[Path]:
    return sorted(out.glob(".*.safeblend-partial"))


def test_interrupted_sweep_keeps_partials_and_resumes_byte_identical(pair, clean, tmp_path, monkeypatch):
    out = tmp_path / "out"
    restore = interrupt_collect(monkeypatch, after=30)
    with pytest.raises(MergeInterrupted, match="--resume"):
        _sweep(pair, out)
    assert [p.name for p in _partials(out)] == [f".{n}.safeblend-partial" for n in NAMES]
    assert not list(out.glob("lambda-*"))
    restore()
    with pytest.raises(Exception, match="--resume"):  # without it: told how to resume
        _sweep(pair, out)
    messages: list[str] = []
    _sweep(pair, out, resume=True, on_warning=messages.append)
    assert _files(out) == _files(clean)
    assert not _partials(out)
    kept = next(m for m in messages if m.startswith("--resume: kept"))
    assert "in each of 3 partial outputs" in kept and not kept.startswith("--resume: kept 0 ")


def test_outputs_with_different_journals_keep_only_what_all_kept(pair, clean, tmp_path, monkeypatch):
    """One output's journal lost its last entries: the others redo those tensors too (one pass
    feeds all), and every output still comes out byte-identical."""
    out = tmp_path / "out"
    restore = interrupt_collect(monkeypatch, after=40)
    with pytest.raises(MergeInterrupted):
        _sweep(pair, out)
    restore()
    journal = out / f".{NAMES[1]}.safeblend-partial" / JOURNAL_NAME
    _, entries, _ = read_journal(journal)
    assert len(entries) >= 2
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:-2]))  # the middle output forgets its last two tensors
    messages: list[str] = []
    _resume_within(pair, out, on_warning=messages.append)
    assert _files(out) == _files(clean)
    kept = next(m for m in messages if m.startswith("--resume: kept"))
    assert kept.startswith(f"--resume: kept {len(entries) - 2} of 16 tensors"), (kept, len(entries))


def test_outputs_committed_before_an_interrupt_are_kept(pair, clean, tmp_path, monkeypatch):
    out = tmp_path / "out"
    original, commits = MergeSession.commit, []

    def interrupt_second(self):
        commits.append(1)
        if len(commits) == 2:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(MergeSession, "commit", interrupt_second)
    with pytest.raises(MergeInterrupted, match="--resume"):
        _sweep(pair, out)
    monkeypatch.setattr(MergeSession, "commit", original)
    assert [p.name for p in out.glob("lambda-*")] == [NAMES[0]]
    first = (out / NAMES[0] / "safeblend.json").stat().st_mtime_ns
    messages: list[str] = []
    result = _sweep(pair, out, resume=True, on_warning=messages.append)
    assert _files(out) == _files(clean)
    assert (out / NAMES[0] / "safeblend.json").stat().st_mtime_ns == first  # not rewritten
    assert f"--resume: {NAMES[0]} was completed by the interrupted sweep; kept" in messages
    assert "--resume: kept 16 of 16 tensors" in next(m for m in messages if m.startswith("--resume: kept 16"))
    assert [Path(r.output).name for r in result.outputs] == NAMES and result.outputs[0].bytes_written == 0


def test_killed_sweep_resumes_from_the_command_line(pair, clean, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "safeblend.cli", "sweep", str(pair / "base"), str(pair / "ft"), "-o", str(out),
           "--weights", WEIGHTS, "--chunk-size", CHUNK, "--shard-size", "1MB", "-q"]
    env = {**os.environ, "SAFEBLEND_FAULT_KILL_AT": "write:20", "SAFEBLEND_FAULT_SLOW_WRITE_S": "0.003"}
    killed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert len(_partials(out)) == 3
    refused = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "--resume" in refused.stderr and "Traceback" not in refused.stderr
    resumed = subprocess.run([*cmd, "--resume"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert _files(out) == _files(clean)
    again = subprocess.run([*cmd, "--resume"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stderr.count("was completed by the interrupted sweep; kept") == 3
