"""Merge parameters must be finite; an overflowing or do-nothing merge says so (items of issue
14: non-finite parameters are usage errors; overflow is counted; output == base is reported)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from safeblend import merge
from safeblend.cli import main
from safeblend.errors import SpecError
from tests.helpers import load_checkpoint, random_tensor, write_checkpoint

Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("params")
    rng = np.random.default_rng(3)
    base = {Q: random_tensor(rng, (8, 6), "fp16"), "model.norm.weight": random_tensor(rng, (6,), "fp16")}
    write_checkpoint(root / "base", base)
    write_checkpoint(root / "ft", {n: random_tensor(rng, t.shape, "fp16") for n, t in base.items()})
    big = {n: (np.full(t.shape, 40000.0) * np.sign(t.astype(np.float64) + 1e-3)).astype(np.float16)
           for n, t in base.items()}
    write_checkpoint(root / "big", big)
    return root


def write_adapter(directory: Path, alpha, alpha_pattern: dict | None = None, scale_b: float = 1.0) -> Path:
    """A PEFT-format LoRA adapter (r = 2) on the q projection, written without PEFT."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": alpha, "target_modules": ["q_proj"]}
    if alpha_pattern is not None:
        config["alpha_pattern"] = alpha_pattern
    (directory / "adapter_config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(4)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": rng.standard_normal((2, 6)).astype(np.float32),
               f"{prefix}.lora_B.weight": (scale_b * rng.standard_normal((8, 2))).astype(np.float32)},
              str(directory / "adapter_model.safetensors"))
    return directory


@pytest.mark.parametrize("args, what", [
    (["--weight", "nan"], "weight: nan"),
    (["--weight", "inf"], "weight: inf"),
    (["--weight", "-inf"], "weight: -inf"),
    (["--weight", "1e300"], "weight: 1e+300"),
    (["--method", "task-arithmetic", "--lambda", "inf"], "lambda: inf"),
    (["--method", "ties", "--density", "nan"], "density"),
])
def test_non_finite_parameters_are_usage_errors(pair, tmp_path, args, what):
    result = CliRunner().invoke(main, ["merge", str(pair / "base"), str(pair / "ft"), "-o", str(tmp_path / "o"),
                                       "-q", *args])
    assert result.exit_code == 2, result.output
    assert what in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_non_finite_parameters_from_python_and_recipes(pair, tmp_path):
    rules = [{"filter": "q_proj", "value": float("nan")}, {"value": 0.5}]
    for bad in (float("nan"), [{"value": [0.5, float("inf")]}], rules):
        with pytest.raises(SpecError, match="not a finite number"):
            merge(pair / "base", pair / "ft", tmp_path / "o", weight=bad)
    with pytest.raises(SpecError, match="not a finite number"):
        merge(pair / "base", pair / "ft", tmp_path / "o", method="task-arithmetic", lambda_=float("-inf"))
    pytest.importorskip("yaml", reason="the test extra installs PyYAML")
    from safeblend.recipe import merge_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: linear\nbase_model: {pair / 'base'}\nmodels:\n"
                      f"  - model: {pair / 'ft'}\n    parameters: {{weight: .nan}}\n")
    with pytest.raises(SpecError, match="not a finite number"):
        merge_recipe(recipe, tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("alpha, pattern", [("nan", None), ("inf", None), (1e308, None), (8, {"q_proj": "nan"})])
def test_non_finite_adapter_alpha_is_refused(pair, tmp_path, alpha, pattern):
    adapter = write_adapter(tmp_path / "lora", alpha, pattern)
    result = CliRunner().invoke(main, ["merge", str(pair / "base"), str(adapter), "-o", str(tmp_path / "o"), "-q"])
    assert result.exit_code == 2, result.output
    assert "adapter_config.json" in result.output and "not a finite number" in result.output
    assert not (tmp_path / "o").exists()


def test_overflow_on_the_output_cast_is_counted_with_the_first_tensor(pair, tmp_path):
    messages: list[str] = []
    result = merge(pair / "base", pair / "big", tmp_path / "o", weight=2.0, on_warning=messages.append)
    out = load_checkpoint(tmp_path / "o")
    expected = sum(int(np.count_nonzero(~np.isfinite(t.astype(np.float32)))) for t in out.values())
    assert expected > 0
    found = [m for m in messages if "non-finite" in m]
    assert found and f"holds {expected} non-finite" in found[0] and repr(Q) in found[0], messages
    assert found[0] in result.warnings and not result.output_equals_base


@pytest.mark.parametrize("case", ["same-model", "zero-alpha", "weight-zero"])
def test_a_merge_that_changes_nothing_says_so(pair, tmp_path, case):
    ft, weight = pair / "ft", 0.5
    if case == "same-model":
        ft = pair / "base"
    elif case == "zero-alpha":
        ft = write_adapter(tmp_path / "lora", 0)
    else:
        weight = 0.0
    result = CliRunner().invoke(main, ["merge", str(pair / "base"), str(ft), "-o", str(tmp_path / "o"),
                                       "--weight", str(weight), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["output_equals_base"] is True
    assert any("equals the base" in w for w in summary["warnings"])
    assert "equals the base" in result.stderr
    # And the claim is true: every tensor equals the base's.
    base, out = load_checkpoint(pair / "base"), load_checkpoint(tmp_path / "o")
    assert all(np.array_equal(out[n].astype(np.float64), base[n].astype(np.float64)) for n in base)


def test_an_ordinary_merge_is_not_reported_as_equal_to_the_base(pair, tmp_path):
    result = merge(pair / "base", pair / "ft", tmp_path / "o", weight=0.5)
    assert result.output_equals_base is False
    assert not any("equals the base" in w or "non-finite" in w for w in result.warnings)
