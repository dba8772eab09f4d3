"""The base's non-weight files: regular files only, permissions never widened, counted in the
up-front space check; names and paths printed with control characters escaped."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from safeblend import merge
from safeblend.cli import main
from safeblend.errors import CheckpointError, OutputError
from helpers import random_tensor, write_checkpoint


def _pair(root: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(2)
    shapes = {"layers.0.w": (16, 16), "layers.1.w": (16, 16)}
    base = write_checkpoint(root / "base", {n: random_tensor(rng, s, "fp32") for n, s in shapes.items()},
                            config={"torch_dtype": "float32"})
    ft = write_checkpoint(root / "ft", {n: random_tensor(rng, s, "fp32") for n, s in shapes.items()})
    return base, ft


def test_a_fifo_among_the_tokenizer_files_is_skipped_with_a_warning(tmp_path):
    base, ft = _pair(tmp_path)
    os.mkfifo(base / "tokenizer.json")  # opening it to copy would block forever
    (base / "tokenizer_config.json").write_text("{}")
    messages: list[str] = []
    merge(base, ft, tmp_path / "out", on_warning=messages.append)
    assert any("tokenizer.json: skipped: not a regular file" in m for m in messages), messages
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == "{}"
    assert not (tmp_path / "out" / "tokenizer.json").exists()


def test_a_config_that_is_not_a_regular_file_is_an_error(tmp_path):
    base, ft = _pair(tmp_path)
    (base / "config.json").unlink()
    os.mkfifo(base / "config.json")
    with pytest.raises(CheckpointError, match=r"config.json: is not a regular file"):
        merge(base, ft, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_copies_never_widen_permissions(tmp_path):
    base, ft = _pair(tmp_path)
    (base / "tokenizer.json").write_text("{}")
    os.chmod(base / "tokenizer.json", 0o600)
    os.chmod(base / "config.json", 0o640)
    merge(base, ft, tmp_path / "out")
    for name, source in [("tokenizer.json", 0o600), ("config.json", 0o640)]:
        mode = stat.S_IMODE(os.stat(tmp_path / "out" / name).st_mode)
        assert mode & ~source == 0, f"{name}: {oct(mode)} is wider than the source's {oct(source)}"


def test_the_space_check_counts_the_non_weight_files(tmp_path, monkeypatch):
    base, ft = _pair(tmp_path)
    (base / "tokenizer.json").write_bytes(b" " * 3_000_000)  # far larger than the weights
    from safeblend import writer
    from safeblend.checkpoint import Checkpoint

    weights = sum(f.stat().st_size for f in base.glob("*.safetensors")) + 100_000  # shards' headers differ
    real = writer.shutil.disk_usage
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: real(p)._replace(free=weights))
    assert Checkpoint.open(base).nbytes < weights
    with pytest.raises(OutputError, match="not enough space"):
        merge(base, ft, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_control_characters_in_names_and_paths_are_escaped(tmp_path):
    evil = tmp_path / "model\x1b[2J\nwith-newline"
    result = CliRunner().invoke(main, ["merge", str(evil), str(evil), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "\x1b" not in result.output and "\\x1b[2J\\nwith-newline" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    base, ft = _pair(tmp_path)
    write_checkpoint(tmp_path / "odd", {"w\x1b]0;pwned\x07": np.ones(2, np.float32)})
    inspected = CliRunner().invoke(main, ["inspect", str(tmp_path / "odd")])
    assert inspected.exit_code == 0 and "\x1b" not in inspected.output and "\x07" not in inspected.output
    assert "w\\x1b]0;pwned\\x07" in inspected.output


def test_diff_escapes_control_characters_in_tensor_names(tmp_path):
    name = "w\x1b[31mred"
    write_checkpoint(tmp_path / "a", {name: np.ones(4, np.float32)})
    write_checkpoint(tmp_path / "b", {name: np.full(4, 2, np.float32)})
    result = CliRunner().invoke(main, ["diff", str(tmp_path / "a"), str(tmp_path / "b"), "-q"])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "w\\x1b[31mred" in result.output
