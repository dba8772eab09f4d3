"""Inputs that change while a merge reads them: a truncation stops the merge with a clear
error (never SIGBUS), and an input rewritten in place is caught before commit."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from safeblend import merge
from safeblend.errors import CheckpointError as InputChangedError  # its base class: also on old code
from tests.helpers import random_tensor, write_checkpoint

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("changing")
    rng = np.random.default_rng(9)
    shapes = {f"layers.{i}.w": (256, 512) for i in range(8)}  # 4 MiB of fp32 per model
    write_checkpoint(root / "base", {n: random_tensor(rng, s, "fp32") for n, s in shapes.items()})
    write_checkpoint(root / "ft", {n: random_tensor(rng, s, "fp32") for n, s in shapes.items()})
    return root


def test_an_input_truncated_mid_merge_is_a_clear_error_not_sigbus(pair, tmp_path):
    victim = tmp_path / "base"
    write_checkpoint(victim, {})  # placeholder dir, replaced by a copy below
    (victim / "model.safetensors").write_bytes((pair / "base" / "model.safetensors").read_bytes())
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "safeblend.cli", "merge", str(victim), str(pair / "ft"), "-o", str(out), "-q",
           "--chunk-size", "64KiB", "--device", "cpu"]
    env = {**os.environ, "SAFEBLEND_FAULT_SLOW_WRITE_S": "0.02"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    journal = tmp_path / ".out.safeblend-partial" / ".safeblend-journal"
    deadline = time.monotonic() + 30
    while not journal.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(0.3)  # well into the data
    assert proc.poll() is None, "the merge ended before the input could be truncated"
    # truncate(2) waits while the merge holds its lease; run it beside the merge.
    cut = threading.Thread(target=os.truncate, args=(victim / "model.safetensors", 4096), daemon=True)
    cut.start()
    try:
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    cut.join(timeout=60)
    assert proc.returncode == 1, (proc.returncode, stderr)  # SIGBUS would be -7
    lines = stderr.strip().splitlines()
    assert lines[-1] == f"Error: {victim / 'model.safetensors'}: changed while being read (another process " \
                        "opened it for writing or truncated it)", stderr
    assert "Traceback" not in stderr
    assert not out.exists() and not (tmp_path / ".out.safeblend-partial").exists()
    assert os.path.getsize(victim / "model.safetensors") == 4096  # the truncation went through after


def test_an_input_rewritten_in_place_is_caught_before_commit(pair, tmp_path, monkeypatch):
    from safeblend import api

    ft = tmp_path / "ft"
    ft.mkdir()
    (ft / "model.safetensors").write_bytes((pair / "ft" / "model.safetensors").read_bytes())
    original = api.write_model_files

    def rewrite_then_copy(*args, **kwargs):
        # Same size, same inode, new bytes: what an in-place writer that held the file open
        # before the merge began (so no lease could be taken) leaves behind.
        path = ft / "model.safetensors"
        with open(path, "r+b") as handle:
            handle.seek(-4, os.SEEK_END)
            handle.write(b"\0\0\0\0")
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        return original(*args, **kwargs)

    monkeypatch.setattr(api, "write_model_files", rewrite_then_copy)
    from safeblend import checkpoint

    if hasattr(checkpoint, "input_guard"):  # as on a filesystem without leases: only the end check
        monkeypatch.setattr(checkpoint.input_guard, "lease", lambda f, fd: None)
    with pytest.raises(InputChangedError, match="model.safetensors: changed while being read .its inode, size "
                                                "or modification time differ"):
        merge(pair / "base", ft, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.safeblend-partial").exists()


_NO_LEASE_SCRIPT = """
import os, sys
from safeblend import checkpoint, merge
if hasattr(checkpoint, "input_guard"):  # as where no lease is granted (another owner, NFS)
    checkpoint.input_guard.lease = lambda f, fd: None
victim, calls = sys.argv[1], []
original = checkpoint.SafetensorsFile.prefetch

def prefetch(self, start, length):
    calls.append(start)
    if len(calls) == 6:  # a few chunks in: cut the file's last 64 KiB, which no chunk in flight reads
        os.truncate(victim, os.path.getsize(victim) - 65536)
    return original(self, start, length)

checkpoint.SafetensorsFile.prefetch = prefetch
try:
    merge(sys.argv[2], sys.argv[3], sys.argv[4], chunk_size="64KiB", device="cpu")
except checkpoint.CheckpointError as exc:
    print(exc)
    sys.exit(1)
"""


def test_without_a_lease_a_truncation_is_caught_before_the_next_chunk(pair, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes((pair / "base" / "model.safetensors").read_bytes())
    done = subprocess.run([sys.executable, "-c", _NO_LEASE_SCRIPT, str(base / "model.safetensors"), str(base),
                           str(pair / "ft"), str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])  # SIGBUS would be -7
    assert done.stdout.strip() == f"{base / 'model.safetensors'}: changed while being read (its size is no longer " \
                                  f"{(pair / 'base' / 'model.safetensors').stat().st_size} bytes)"
    assert not (tmp_path / "out").exists()
