"""sweep --as-adapters: each λ written as a PEFT adapter, which PEFT's merge_and_unload turns into
the model `safeblend merge --weight λ` writes (within safeblend.tolerance).

The adapters and reference models come from test_lora's cases: tiny transformers models and
adapters made by the real peft library (plain, rsLoRA in bf16, rank/alpha patterns, embedding
LoRA with modules_to_save, GPT-2 Conv1D with bias=all, lora_only biases with lora_bias).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

import safeblend
from safeblend.cli import main
from safeblend.errors import SpecError
from tests.helpers import assert_within_tolerance, load_checkpoint
from tests.test_lora import _peft_merged, prepared  # noqa: F401  (prepared: the module-scoped fixture)


@pytest.mark.parametrize("method, weights, params", [
    ("linear", [0.3, 0.7], {}),
    ("task-arithmetic", [0.5, 1.5], {"lambda_": 0.8}),
])
def test_each_adapter_applied_by_peft_equals_the_merge_at_its_weight(prepared, tmp_path, method, weights, params):  # noqa: F811
    p = prepared
    result = safeblend.sweep(p.base, p.adapter, tmp_path / "s", weights, method=method, as_adapters=True, **params)
    for w, out in zip(weights, result.outputs):
        adapter = Path(out.output)
        assert sorted(f.name for f in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                             "safeblend.json"]
        config, source = (json.loads((d / "adapter_config.json").read_text()) for d in (adapter, p.adapter))
        assert config.pop("lora_alpha") == pytest.approx(out.params["weights"][0] * params.get("lambda_", 1)
                                                         * source.pop("lora_alpha"), rel=1e-15)
        for k, v in source.pop("alpha_pattern", {}).items():
            assert config["alpha_pattern"].pop(k) == pytest.approx(w * params.get("lambda_", 1) * v, rel=1e-15)
        assert config.pop("alpha_pattern", {}) == {} and config == source  # nothing else changes
        merged = load_checkpoint(Path(safeblend.merge(p.base, p.adapter, tmp_path / f"m{w}", method=method,
                                                      weight=w, **params).output))
        applied = _peft_merged(p.base, adapter)  # PEFT's merge_and_unload of the λ adapter, float64
        for name, b in p.base_tensors.items():
            assert_within_tolerance(merged[name], applied[name], [b, p.theta[name]], f"{p.case} λ={w} {name}")


def test_adapter_factors_are_kept_and_full_tensors_blended(prepared, tmp_path):  # noqa: F811
    """Against the formula: A and B unchanged (the scale is in α), stored full tensors → base + c·(T − base)."""
    p = prepared
    c = 0.4
    safeblend.sweep(p.base, p.adapter, tmp_path / "s", [c], as_adapters=True)
    source = load_file(str(p.adapter / "adapter_model.safetensors"))
    written = load_file(str(tmp_path / "s" / "lambda-0.4" / "adapter_model.safetensors"))
    assert list(written) == list(source) or sorted(written) == sorted(source)
    for key, value in source.items():
        got = written[key]
        if ".lora_" in key:
            assert got.dtype == value.dtype and np.array_equal(got, value), key
        else:  # modules_to_save copies and trained biases
            name = key.removeprefix("base_model.model.").replace(".modules_to_save.default", "").replace(".base_layer.", ".")
            base = p.base_tensors[name] if name in p.base_tensors else p.base_tensors[name.partition(".")[2]]
            ref = base.astype(np.float64) + c * (value.astype(np.float64) - base.astype(np.float64))
            # A LoRA term on top (lora_bias, embedding LoRA): fp32, else rounded twice.
            module, param = key.rsplit(".", 1)
            module = module.replace(".base_layer", "").replace(".modules_to_save.default", "")
            on_top = (f"{module}.lora_B.bias" in source if param == "bias"
                      else any(k.startswith(module + ".lora_") for k in source))
            assert got.dtype == (np.float32 if on_top and base.dtype.itemsize < 4 else base.dtype), key
            assert_within_tolerance(got, ref, [base, value], key)


def test_adapter_sweep_refusals_and_cli(prepared, tmp_path):  # noqa: F811
    p = prepared
    with pytest.raises(SpecError, match="works for linear and task-arithmetic"):
        safeblend.sweep(p.base, p.adapter, tmp_path / "a", [0.5], method="slerp", as_adapters=True)
    with pytest.raises(SpecError, match="needs a PEFT LoRA adapter"):
        safeblend.sweep(p.base, p.base, tmp_path / "b", [0.5], as_adapters=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    runner = CliRunner()
    args = ["sweep", str(p.base), str(p.adapter), "-o", str(tmp_path / "s"), "--weights", "0.2,0.6", "--as-adapters",
            "--json"]
    ok = runner.invoke(main, args)
    assert ok.exit_code == 0, ok.output
    summary = json.loads(ok.stdout)
    assert [Path(o["output"]).name for o in summary["outputs"]] == ["lambda-0.2", "lambda-0.6"]
    assert all(o["params"]["as_adapter"] for o in summary["outputs"])
    again = runner.invoke(main, args)
    assert again.exit_code == 1 and "already exists" in again.stderr and "--overwrite" in again.stderr
    assert not list((tmp_path / "s").glob(".*"))  # no staging left behind
    assert runner.invoke(main, [*args, "--overwrite"]).exit_code == 0


def test_adapter_sweep_overwrite_replaces_only_its_own_outputs(prepared, tmp_path):  # noqa: F811
    """--overwrite follows the merge's rule: a directory safeblend did not write is refused and
    kept whole; a planted staging-looking directory is never touched."""
    p = prepared
    root = tmp_path / "s"
    (root / "lambda-0.5").mkdir(parents=True)
    (root / "lambda-0.5" / "notes.txt").write_text("mine")
    planted = root / ".lambda-0.5.safeblend-adapter-partial"
    planted.mkdir()
    (planted / "keep.txt").write_text("also mine")
    with pytest.raises(safeblend.SafeblendError, match="not a previous safeblend output"):
        safeblend.sweep(p.base, p.adapter, root, [0.5], as_adapters=True, overwrite=True)
    assert (root / "lambda-0.5" / "notes.txt").read_text() == "mine"
    assert (planted / "keep.txt").read_text() == "also mine"
    (root / "lambda-0.5" / "notes.txt").unlink()
    safeblend.sweep(p.base, p.adapter, root, [0.5], as_adapters=True, overwrite=True)  # empty: replaced
    safeblend.sweep(p.base, p.adapter, root, [0.5], as_adapters=True, overwrite=True)  # its own: replaced
    assert (root / "lambda-0.5" / "adapter_model.safetensors").is_file()
    assert (planted / "keep.txt").read_text() == "also mine"


def test_adapter_sweep_refuses_to_write_into_its_input(prepared, tmp_path):  # noqa: F811
    p = prepared
    with pytest.raises(safeblend.SafeblendError, match="must not be, contain or lie inside an input"):
        safeblend.sweep(p.base, p.adapter, Path(p.adapter) / "sweep", [0.5], as_adapters=True)
