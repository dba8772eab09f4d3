"""``safeblend verify`` catches every kind of damage; a full disk gives a clear error and
leaves nothing at OUT (on a small tmpfs the test mounts, skipped where mounting is refused)."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from safeblend import merge
from safeblend.cli import main
from safeblend.errors import OutputError
from safeblend.manifest import verify
from tests.helpers import random_tensor, write_checkpoint


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pair")
    rng = np.random.default_rng(11)
    shapes = {f"layers.{i}.w": (256, 256) for i in range(6)}
    write_checkpoint(root / "base", {n: random_tensor(rng, s, "bf16") for n, s in shapes.items()},
                     config={"torch_dtype": "bfloat16"})
    write_checkpoint(root / "ft", {n: random_tensor(rng, s, "bf16") for n, s in shapes.items()})
    return root


@pytest.fixture
def merged(pair, tmp_path) -> Path:
    merge(pair / "base", pair / "ft", tmp_path / "out", shard_size="300kB", chunk_size="64KiB")
    return tmp_path / "out"


def _verify(path: Path):
    return CliRunner().invoke(main, ["verify", str(path)])


def test_clean_output_verifies(merged):
    result = _verify(merged)
    assert result.exit_code == 0, result.output
    assert "OK:" in result.output
    manifest = json.loads((merged / "safeblend.json").read_text())
    assert len(manifest["shards"]) == 3 and "model.safetensors.index.json" in manifest["files"]
    assert "config.json" in manifest["files"]


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, expected", [
    (lambda d: _flip(d / "model-00002-of-00003.safetensors", -100), "model-00002-of-00003.safetensors: SHA-256 differs"),
    (lambda d: _flip(d / "model-00001-of-00003.safetensors", 20), "header:"),
    (lambda d: (d / "model-00003-of-00003.safetensors").write_bytes(
        (d / "model-00003-of-00003.safetensors").read_bytes()[:-10]), "size is"),
    (lambda d: (d / "model-00003-of-00003.safetensors").unlink(), "is missing"),
    (lambda d: (d / "extra.safetensors").write_bytes((d / "model-00001-of-00003.safetensors").read_bytes()),
     "extra.safetensors: shard not listed"),
    (lambda d: (d / "model.safetensors.index.json").write_text(
        (d / "model.safetensors.index.json").read_text().replace('"total_size": ', '"total_size": 1')),
     "metadata.total_size is"),
    (lambda d: (d / "config.json").write_text("{}"), "config.json: SHA-256 differs"),
    (lambda d: (d / "safeblend.json").unlink(), "safeblend.json: missing"),
])
def test_damage_is_named(merged, damage, expected):
    damage(merged)
    report = verify(merged)
    assert not report.ok
    assert any(expected in p for p in report.problems), report.problems
    result = _verify(merged)
    assert result.exit_code == 1
    assert expected in result.output and "verification failed" in result.output


@pytest.fixture
def tiny_fs(tmp_path):
    """A 512 KiB tmpfs mounted for the test (skipped where mounting is not permitted)."""
    mount = tmp_path / f"mnt-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here ({done.stderr.strip() or done.returncode}); "
                    "the full-disk tests need CAP_SYS_ADMIN")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_is_refused_up_front_naming_the_filesystem(pair, tiny_fs):
    out = tiny_fs / "out"
    with pytest.raises(OutputError) as info:
        merge(pair / "base", pair / "ft", out)
    message = str(info.value)
    assert f"mounted at {tiny_fs} (tmpfs)" in message and "needs 787" in message and "free" in message
    assert list(tiny_fs.iterdir()) == []


def test_full_disk_mid_write_is_a_clear_error_and_leaves_nothing(pair, tiny_fs, monkeypatch):
    from safeblend.writer import OutputDir

    # Another process takes the space after the up-front check: the check passes, writes fail.
    monkeypatch.setattr(OutputDir, "check_space", lambda self, needed: None)
    out = tiny_fs / "out"
    result = CliRunner().invoke(main, ["merge", str(pair / "base"), str(pair / "ft"), "-o", str(out), "-q",
                                       "--chunk-size", "64KiB"])
    assert result.exit_code == 1
    assert f"mounted at {tiny_fs} (tmpfs) ran out of space while writing" in result.output, result.output
    assert "Traceback" not in result.output
    assert list(tiny_fs.iterdir()) == []  # neither OUT nor its partial output


def test_manifest_digests_equal_the_written_bytes_whatever_the_chunking(pair, tmp_path):
    """The hasher feeds SHA-256 from the chunks' own buffers (and from the file for headers):
    every shard's recorded digest must equal a fresh digest of the file, for chunkings that
    split tensors, shards and headers differently."""
    import hashlib

    for chunk in ("4KiB", "96KiB", "8MiB"):
        out = tmp_path / chunk
        merge(pair / "base", pair / "ft", out, shard_size="300kB", chunk_size=chunk, device="cpu")
        shards = json.loads((out / "safeblend.json").read_text())["shards"]
        assert len(shards) == 3
        for shard in shards:
            data = (out / shard["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard["sha256"], (chunk, shard["file"])


def test_a_failing_hasher_stops_the_merge_with_its_error_and_never_hangs(pair, tmp_path, monkeypatch):
    """Chunk buffers wait for the hasher before returning to their pool; if the hasher dies,
    the buffers it held must come back, or the compute threads would wait for them forever."""
    from safeblend import journal

    calls = {"n": 0}
    original = journal.Progress._feed

    def failing(self, s, block):
        calls["n"] += 1
        if calls["n"] > 3:
            time.sleep(0.5)  # long enough for the compute threads to use up every pooled buffer
            raise OSError(5, "Input/output error (injected)")
        original(self, s, block)

    monkeypatch.setattr(journal.Progress, "_feed", failing)
    out = tmp_path / "out"
    raised: list[BaseException] = []

    def run() -> None:
        try:
            merge(pair / "base", pair / "ft", out, shard_size="300kB", chunk_size="4KiB", device="cpu")
        except BaseException as exc:  # noqa: BLE001
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the merge hung after its hasher failed"
    assert len(raised) == 1 and "injected" in str(raised[0]), raised
    assert not out.exists()
