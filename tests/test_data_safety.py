"""Never destroy what safeblend did not write: --overwrite, symlinked inputs, the demo, staging
names, a replaced output that cannot be removed (safeblend.output_paths)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from safeblend import merge
from safeblend.cli import main
from safeblend.errors import OutputError, SpecError
from tests.helpers import random_tensor, write_checkpoint


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pair")
    rng = np.random.default_rng(5)
    shapes = {f"layers.{i}.w": (32, 48) for i in range(3)}
    write_checkpoint(root / "base", {n: random_tensor(rng, s, "fp32") for n, s in shapes.items()},
                     config={"torch_dtype": "float32"})
    write_checkpoint(root / "ft", {n: random_tensor(rng, s, "fp32") for n, s in shapes.items()})
    return root


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_error_line(result, exit_code: int) -> str:
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.output
    return lines[0]


# -- item 1: --overwrite deletes only a previous safeblend output or an empty directory ----------


def test_empty_output_name_is_a_usage_error_and_the_cwd_survives(pair, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    line = _one_error_line(_cli("merge", pair / "base", pair / "ft", "-o", "", "--overwrite", "-q"), 2)
    assert "output path is empty" in line
    assert (work / "notes.txt").read_text() == "mine" and sorted(os.listdir(work)) == ["notes.txt"]
    with pytest.raises(SpecError, match="output path is empty"):
        merge(pair / "base", pair / "ft", "", overwrite=True)
    assert sorted(os.listdir(work)) == ["notes.txt"]


def test_overwrite_refuses_a_directory_safeblend_did_not_write(pair, tmp_path):
    home = tmp_path / "home"
    (home / "sub").mkdir(parents=True)
    (home / "thesis.tex").write_text("years of work")
    (home / "sub" / "data.csv").write_text("1,2")
    before = _snapshot(home)
    line = _one_error_line(_cli("merge", pair / "base", pair / "ft", "-o", home, "--overwrite", "-q"), 1)
    assert "not a previous safeblend output" in line and "thesis.tex" in line
    assert _snapshot(home) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"], "nothing left beside OUT"


def test_overwrite_replaces_a_previous_output_but_not_one_with_files_added(pair, tmp_path):
    out = tmp_path / "out"
    args = ["merge", pair / "base", pair / "ft", "-o", out, "-q"]
    assert _cli(*args).exit_code == 0
    assert _cli(*args, "--weight", "0.3", "--overwrite").exit_code == 0  # a previous output: replaced
    (out / "eval-results.json").write_text("{}")
    before = _snapshot(out)
    line = _one_error_line(_cli(*args, "--overwrite"), 1)
    assert "eval-results.json" in line and "did not write" in line
    assert _snapshot(out) == before
    (out / "eval-results.json").unlink()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _cli("merge", pair / "base", pair / "ft", "-o", empty, "--overwrite", "-q").exit_code == 0
    assert (empty / "safeblend.json").is_file()


def test_overwrite_refuses_a_file_and_a_symlink_at_out(pair, tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "a.txt").write_text("a")
    (tmp_path / "link").symlink_to(target)
    line = _one_error_line(_cli("merge", pair / "base", pair / "ft", "-o", tmp_path / "link", "--overwrite",
                                "-q"), 1)
    assert "symbolic link" in line
    (tmp_path / "file").write_text("f")
    line = _one_error_line(_cli("merge", pair / "base", pair / "ft", "-o", tmp_path / "file", "--overwrite",
                                "-q"), 1)
    assert "is a file" in line
    assert (target / "a.txt").read_text() == "a" and (tmp_path / "file").read_text() == "f"


# -- item 2: output-is-an-input by real path and identity, every input file ----------------------


def test_output_that_is_the_base_through_a_symlink_is_refused(pair, tmp_path):
    real = tmp_path / "real-base"
    write_checkpoint(real, {"w": np.ones((4, 4), np.float32)})
    # Make it look like a previous output so that only the input check can stop the overwrite.
    (real / "safeblend.json").write_text(json.dumps({"safeblend_manifest": 1, "shards": [
        {"file": "model.safetensors", "size": 0, "sha256": ""}], "files": {}}))
    write_checkpoint(tmp_path / "ft", {"w": np.zeros((4, 4), np.float32)})
    (tmp_path / "base-link").symlink_to(real)
    before = _snapshot(real)
    line = _one_error_line(_cli("merge", tmp_path / "base-link", tmp_path / "ft", "-o", real, "--overwrite",
                                "-q"), 2)
    assert "must not be, contain or lie inside an input" in line
    assert _snapshot(real) == before


def test_a_shard_linked_into_out_counts_as_an_input(pair, tmp_path):
    out = tmp_path / "out"
    merge(pair / "base", pair / "ft", out)
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").symlink_to(out / "model.safetensors")  # the base's data lives in OUT
    before = (out / "model.safetensors").read_bytes()
    line = _one_error_line(_cli("merge", base, pair / "ft", "-o", out, "--overwrite", "-q"), 2)
    assert "must not be, contain or lie inside an input" in line
    assert (out / "model.safetensors").read_bytes() == before


def test_an_adapter_file_linked_into_out_counts_as_an_input(pair, tmp_path):
    from safeblend.output_paths import check_output_not_input

    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"x")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").symlink_to(out / "adapter_model.safetensors")
    with pytest.raises(SpecError, match="inside an input"):
        check_output_not_input(out, [pair / "base", adapter])
    check_output_not_input(tmp_path / "elsewhere", [pair / "base", adapter])  # no clash: no error


# -- item 3: the demo replaces only its own previous demo ----------------------------------------


def test_demo_refuses_directories_it_did_not_create_and_reuses_its_own(tmp_path):
    mine = tmp_path / "proj"
    (mine / "base").mkdir(parents=True)
    (mine / "base" / "model.safetensors").write_bytes(b"my real model")
    before = _snapshot(mine)
    line = _one_error_line(_cli("demo", mine, "--size", "tiny"), 1)
    assert "not a safeblend demo" in line
    assert _snapshot(mine) == before
    demo = tmp_path / "demo"
    assert _cli("demo", demo, "--size", "tiny").exit_code == 0
    again = _cli("demo", demo, "--size", "tiny", "--weight", "0.3")  # its own demo: replaced
    assert again.exit_code == 0, again.output
    (demo / "finetune" / "notes.txt").write_text("added by hand")
    line = _one_error_line(_cli("demo", demo, "--size", "tiny"), 1)
    assert "notes.txt" in line
    assert (demo / "finetune" / "notes.txt").read_text() == "added by hand"


# -- item 4: staging names never lead to deleting foreign files ----------------------------------


def test_a_stale_safeblend_old_directory_is_never_deleted(pair, tmp_path):
    out = tmp_path / "out"
    merge(pair / "base", pair / "ft", out)
    old = tmp_path / ".out.safeblend-old"
    old.mkdir()
    (old / "someone-elses.txt").write_text("keep")
    merge(pair / "base", pair / "ft", out, weight=0.2, overwrite=True)
    assert (old / "someone-elses.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.safeblend-old", "out"]


def test_a_planted_symlink_at_the_staging_name_is_refused(pair, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / ".safeblend-lock").write_text("")
    (victim / "precious.txt").write_text("keep")
    (tmp_path / ".out.safeblend-partial").symlink_to(victim)
    before = _snapshot(victim)
    line = _one_error_line(_cli("merge", pair / "base", pair / "ft", "-o", tmp_path / "out", "--overwrite",
                                "-q"), 1)
    assert "symbolic link" in line
    assert _snapshot(victim) == before


def test_a_lock_file_symlinked_elsewhere_is_never_truncated(pair, tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    staging = tmp_path / ".out.safeblend-partial"
    staging.mkdir()
    (staging / ".safeblend-lock").symlink_to(precious)
    result = _cli("merge", pair / "base", pair / "ft", "-o", tmp_path / "out", "--overwrite", "-q")
    _one_error_line(result, 1)
    assert precious.read_text() == "keep me"


def test_a_foreign_directory_at_the_staging_name_is_not_cleared(pair, tmp_path):
    staging = tmp_path / ".out.safeblend-partial"
    staging.mkdir()
    (staging / ".safeblend-lock").write_text("")
    (staging / ".safeblend-journal").write_text("my own journal, not safeblend's\n")
    (staging / "draft.txt").write_text("keep")
    line = _one_error_line(_cli("merge", pair / "base", pair / "ft", "-o", tmp_path / "out", "--overwrite",
                                "-q"), 1)
    assert "not a partial output of safeblend's" in line
    assert (staging / "draft.txt").read_text() == "keep"


def test_an_old_output_that_cannot_be_removed_never_breaks_the_next_run(pair, tmp_path, monkeypatch):
    """What a read-only OUT does to a non-root user: the replaced output's files cannot be
    unlinked. The result is still committed, and every later run still works."""
    out = tmp_path / "out"
    merge(pair / "base", pair / "ft", out)
    real_unlink = os.unlink

    def unlink(path, *args, dir_fd=None, **kwargs):
        if dir_fd is not None:  # how directory trees are removed (shutil.rmtree, output_paths)
            raise PermissionError(13, "Permission denied", path)
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.warns(UserWarning, match="could not be removed"):
        merge(pair / "base", pair / "ft", out, weight=0.2, overwrite=True)
    with pytest.warns(UserWarning, match="could not be removed"):
        merge(pair / "base", pair / "ft", out, weight=0.3, overwrite=True)  # the leftover does not block it
    monkeypatch.undo()
    assert json.loads((out / "safeblend.json").read_text())["safeblend_manifest"] == 1
    from safeblend.checkpoint import read_safetensors_header

    recipe = json.loads(read_safetensors_header(out / "model.safetensors").metadata["safeblend_recipe"])
    assert recipe["weights"] == [0.3]


def test_a_read_only_output_is_refused_up_front(pair, tmp_path, monkeypatch):
    out = tmp_path / "out"
    merge(pair / "base", pair / "ft", out)
    real_access = os.access
    # As root every directory is writable; stand in for a user who may not write OUT.
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == out else real_access(p, mode, **k))
    with pytest.raises(OutputError, match="read-only"):
        merge(pair / "base", pair / "ft", out, weight=0.2, overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# -- item 9: verify reports added files and never reads outside OUT ------------------------------


def _verify(out: Path):
    from safeblend.manifest import verify

    return verify(out)


def test_verify_reports_files_added_to_the_output(pair, tmp_path):
    out = tmp_path / "out"
    merge(pair / "base", pair / "ft", out)
    assert _verify(out).ok
    (out / "notes.txt").write_text("added")
    (out / "extra").mkdir()
    report = _verify(out)
    assert any("notes.txt: not listed in safeblend.json" in p for p in report.problems), report.problems
    assert any("extra: not listed in safeblend.json" in p for p in report.problems), report.problems


def test_verify_never_reads_a_path_outside_the_output(pair, tmp_path, monkeypatch):
    out = tmp_path / "out"
    merge(pair / "base", pair / "ft", out)
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")
    from safeblend import manifest as manifest_module

    data = json.loads((out / "safeblend.json").read_text())
    data["files"]["../secret.txt"] = manifest_module.file_sha256(secret)
    data["files"][str(secret)] = manifest_module.file_sha256(secret)
    (out / "safeblend.json").write_text(json.dumps(data))
    config = out / "config.json"
    (tmp_path / "config-elsewhere.json").write_bytes(config.read_bytes())
    config.unlink()
    config.symlink_to(tmp_path / "config-elsewhere.json")  # same bytes, but outside OUT
    opened: list[str] = []
    real_open = open

    def watching_open(file, *args, **kwargs):
        opened.append(os.path.realpath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", watching_open)
    report = _verify(out)
    monkeypatch.undo()
    outside = [p for p in opened if not p.startswith(str(out.resolve()) + os.sep)]
    assert not outside, outside
    assert sum("not a plain file name" in p for p in report.problems) == 2, report.problems
    assert any("config.json: is a symbolic link" in p for p in report.problems), report.problems
