"""Hostile or careless recipe files: each is a one-line error from the CLI, never a traceback
or a hang (wrong types, deep nesting, non-UTF-8 text, a FIFO or a device, alias bombs,
duplicate keys, oversized files)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from safeblend.cli import main
from helpers import random_tensor, write_checkpoint


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pair")
    rng = np.random.default_rng(1)
    base = {"model.layers.0.mlp.up_proj.weight": random_tensor(rng, (4, 4), "fp32")}
    ft = {n: t + np.float32(0.1) for n, t in base.items()}
    return write_checkpoint(root / "base", base), write_checkpoint(root / "ft", ft)


@pytest.fixture(autouse=True)
def no_hang():
    """A recipe that blocks (a FIFO read with no writer) fails the test instead of hanging it."""
    def timeout(signum, frame):
        raise TimeoutError("recipe reading hung")
    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def run_config(config: Path, out: Path):
    return CliRunner().invoke(main, ["merge", "--config", str(config), "-o", str(out)])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code in (1, 2), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(error_lines) == 1, result.output
    for fragment in fragments:
        assert fragment in error_lines[0], result.output


def recipe_text(pair, **replace: str) -> str:
    fields = {"merge_method": "task_arithmetic", "base_model": str(pair[0]), "model": str(pair[1]),
              "weight": "0.5", "extra": ""}
    fields.update(replace)
    return (f"merge_method: {fields['merge_method']}\nbase_model: {fields['base_model']}\n"
            f"models:\n  - model: {fields['model']}\n    parameters:\n      weight: {fields['weight']}\n"
            f"{fields['extra']}")


@pytest.mark.parametrize("replace,message", [
    ({"merge_method": "[ties]"}, "merge_method 'list' is not supported"),
    ({"merge_method": "{a: 1}"}, "merge_method 'dict' is not supported"),
    ({"base_model": "[a, b]"}, "base_model: model must be a path, got a list"),
    ({"model": "{x: 1}"}, "model must be a path, got a dict"),
    ({"weight": "{value: 1, filter: [x]}"}, "filter must be a string"),
    ({"weight": "[[1, 2], [3]]"}, "weight"),
    ({"weight": "{value: {a: 1}}"}, "expected a number"),
    ({"extra": "dtype: [bfloat16]\n"}, "dtype"),
    ({"extra": "parameters: [1, 2]\n"}, "parameters: expected a mapping"),
    ({"extra": "parameters: {[1]: 2}\n"}, "a key must be a string"),
    ({"extra": "parameters: {lambda: 1, lambda: 2}\n"}, "duplicate key 'lambda'"),
    ({"extra": "merge_method: ties\n"}, "duplicate key 'merge_method'"),
    ({"extra": "slices: [{sources: [{model: a, layer_range: {a: 1}}]}]\n"}, "give exactly one of"),
])
def test_wrong_types_and_duplicate_keys(tmp_path, pair, replace, message):
    config = tmp_path / "r.yaml"
    config.write_text(recipe_text(pair, **replace))
    assert_one_line_error(run_config(config, tmp_path / "out"), message)
    assert not (tmp_path / "out").exists()


def test_layer_range_of_the_wrong_type(tmp_path, pair):
    config = tmp_path / "r.yaml"
    config.write_text(f"merge_method: slerp\nbase_model: {pair[0]}\nparameters: {{t: 0.5}}\n"
                      f"slices:\n  - sources:\n    - {{model: {pair[0]}, layer_range: {{a: 1}}}}\n"
                      f"    - {{model: {pair[1]}, layer_range: [0, 1]}}\n")
    assert_one_line_error(run_config(config, tmp_path / "out"), "layer_range must be [start, end]")


@pytest.mark.parametrize("depth", [70, 50_000])
def test_deep_nesting(tmp_path, pair, depth):
    config = tmp_path / "r.yaml"
    config.write_text(recipe_text(pair, weight="[" * depth + "1" + "]" * depth))
    assert_one_line_error(run_config(config, tmp_path / "out"), "nested")


def test_non_utf8_text(tmp_path, pair):
    config = tmp_path / "r.yaml"
    config.write_bytes(recipe_text(pair).encode() + b"# \xff\xfe caf\xe9\n")
    assert_one_line_error(run_config(config, tmp_path / "out"), "not UTF-8 text")


def test_fifo_is_refused_without_blocking(tmp_path, pair):
    fifo = tmp_path / "recipe.fifo"
    os.mkfifo(fifo)
    assert_one_line_error(run_config(fifo, tmp_path / "out"), "must be a regular file")


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_dev_zero_is_refused(tmp_path):
    assert_one_line_error(run_config(Path("/dev/zero"), tmp_path / "out"), "must be a regular file")


def test_oversized_file(tmp_path, pair):
    config = tmp_path / "r.yaml"
    config.write_text(recipe_text(pair) + "#" * (1 << 20) + "\n")
    assert_one_line_error(run_config(config, tmp_path / "out"), "larger than 1024 KiB")


def test_alias_bomb(tmp_path, pair):
    """Nine levels of nine aliases: 9⁹ values once expanded, from a file of a few hundred bytes."""
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    config = tmp_path / "r.yaml"
    config.write_text(recipe_text(pair, extra="parameters:\n  lambda: 1\n  bomb:\n" +
                                  "".join(f"    {line}\n" for line in lines)))
    assert_one_line_error(run_config(config, tmp_path / "out"), "more than 100000 values")


def test_missing_file_and_directory(tmp_path):
    assert_one_line_error(run_config(tmp_path / "nope.yaml", tmp_path / "out"), "cannot read recipe")
    assert_one_line_error(run_config(tmp_path, tmp_path / "out"))


def test_invalid_yaml_names_the_line(tmp_path, pair):
    config = tmp_path / "r.yaml"
    config.write_text(recipe_text(pair) + "parameters: {lambda: [unclosed\n")
    assert_one_line_error(run_config(config, tmp_path / "out"), "not valid YAML (line")


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1e999", "[0.5, .nan]"])
def test_non_finite_numbers(tmp_path, pair, value):
    config = tmp_path / "r.yaml"
    config.write_text(recipe_text(pair, weight=value))
    assert_one_line_error(run_config(config, tmp_path / "out"), "is not a finite number")


def test_a_huge_wrong_value_is_shown_short(tmp_path, pair):
    config = tmp_path / "r.yaml"
    config.write_text(recipe_text(pair, weight="{value: {" + ", ".join(f"k{i}: {i}" for i in range(5000)) + "}}"))
    result = run_config(config, tmp_path / "out")
    assert_one_line_error(result, "expected a number")
    assert len(result.output.splitlines()[-1]) < 300


def test_a_model_listed_twice_through_a_symlink(tmp_path, pair):
    """Weighted sums would count it twice; a symlink does not hide the duplicate."""
    link = tmp_path / "ft-link"
    link.symlink_to(pair[1])
    config = tmp_path / "r.yaml"
    config.write_text(f"merge_method: linear\nmodels:\n  - {{model: {pair[1]}, parameters: {{weight: 1}}}}\n"
                      f"  - {{model: {link}, parameters: {{weight: 1}}}}\n")
    assert_one_line_error(run_config(config, tmp_path / "out"), "listed twice")
