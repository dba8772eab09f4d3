"""Recipes mean what they mean to mergekit 0.1.5: the bugs found by running its recipes as a
mergekit user would, each against a float64 reference written here from mergekit's formulas.

mergekit's rules these tests pin down (read from its source, mergekit/config.py, plan.py and
merge_methods/*.py):

* a merge-wide parameter is the default for every listed model, the base included, and for a
  ``base_model`` that is not listed (mergekit adds it to the models);
* linear is Σ wᵢ·θᵢ over every model with its weight, divided by Σ wᵢ when ``normalize``
  (default true);
* gradients are evaluated at t = layer / (layers − 1) in the layers and at t = 0 for every
  tensor outside them, before (embeddings) and after (final norm, lm_head);
* numbers PyYAML reads as strings (``5e-1``) are numbers (pydantic converts them);
* slerp and model_stock take no per-model parameters; mergekit ignores a ``weight`` there;
* slerp divides out only norms above 1e-8, so a zero tensor is orthogonal to everything.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

import safeblend
from safeblend.errors import SpecError
from safeblend.recipe import load_recipe, merge_recipe
from helpers import assert_within_tolerance, load_checkpoint, random_tensor, ref_slerp, write_checkpoint

LAYERS = 3
SHAPES = {"model.embed_tokens.weight": (6, 8), "model.norm.weight": (8,), "lm_head.weight": (6, 8)}
SHAPES.update({f"model.layers.{i}.{kind}.weight": (8, 8) for i in range(LAYERS)
               for kind in ("self_attn.q_proj", "mlp.up_proj")})


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parity")
    rng = np.random.default_rng(15)
    base = {n: random_tensor(rng, s, "fp32") for n, s in SHAPES.items()}
    paths = {"base": write_checkpoint(root / "base", base)}
    for i in range(3):
        ft = {n: (t + 0.3 * rng.standard_normal(t.shape)).astype(np.float32) for n, t in base.items()}
        paths[f"ft{i}"] = write_checkpoint(root / f"ft{i}", ft)
    return paths


@pytest.fixture(scope="module")
def tensors(models) -> dict[str, dict[str, np.ndarray]]:
    return {k: {n: t.astype(np.float64) for n, t in load_checkpoint(v).items()} for k, v in models.items()}


def run_recipe(tmp_path: Path, recipe: dict | str, warnings: list[str] | None = None) -> dict[str, np.ndarray]:
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    sink = warnings if warnings is not None else []
    merge_recipe(path, tmp_path / "out", chunk_size=256, on_warning=sink.append)
    return load_checkpoint(tmp_path / "out")


def position(name: str) -> float:
    """mergekit's t: layer / (layers − 1) inside the layers, 0 outside them (before or after)."""
    return int(name.split(".")[2]) / (LAYERS - 1) if ".layers." in name else 0.0


def gradient(anchors: list[float], t: float) -> float:
    """mergekit's evaluate_setting for a list of numbers."""
    scaled = t * (len(anchors) - 1)
    i0 = int(scaled)
    i1 = min(len(anchors) - 1, i0 + 1)
    return (1 - (scaled - i0)) * anchors[i0] + (scaled - i0) * anchors[i1]


def check(out: dict[str, np.ndarray], reference: dict[str, np.ndarray], inputs: list[dict]) -> None:
    for name in SHAPES:
        assert_within_tolerance(out[name], reference[name], [x[name] for x in inputs], name)


# -- 1. a merge-wide parameter is every model's default, the base's included -------------------

def test_merge_wide_weight_applies_to_the_base_too(tmp_path, models, tensors):
    """The issue's recipe: safeblend wrote B exactly; mergekit writes (A + B) / 2."""
    out = run_recipe(tmp_path, {"merge_method": "linear", "models": [{"model": str(models["base"])},
                                                                      {"model": str(models["ft0"])}],
                                "parameters": {"weight": 1.0}})
    a, b = tensors["base"], tensors["ft0"]
    check(out, {n: (a[n] + b[n]) / 2 for n in SHAPES}, [a, b])


def test_unlisted_base_model_joins_linear_with_the_merge_wide_weight(tmp_path, models, tensors):
    """mergekit adds a base_model missing from models, with the merge-wide parameters."""
    out = run_recipe(tmp_path, {"merge_method": "linear", "base_model": str(models["base"]),
                                "models": [{"model": str(models["ft0"]), "parameters": {"weight": 3.0}},
                                           {"model": str(models["ft1"])}],
                                "parameters": {"weight": 0.5}})
    a, b, c = tensors["base"], tensors["ft0"], tensors["ft1"]
    check(out, {n: (0.5 * a[n] + 3.0 * b[n] + 0.5 * c[n]) / 4.0 for n in SHAPES}, [a, b, c])


def test_merge_wide_weight_fills_unmatched_rules_of_the_base(tmp_path, models, tensors):
    """A model's own rules first, then the merge-wide value, tensor by tensor, for the base too."""
    out = run_recipe(tmp_path, {"merge_method": "linear",
                                "models": [{"model": str(models["base"]),
                                            "parameters": {"weight": [{"filter": "mlp", "value": 3.0}]}},
                                           {"model": str(models["ft0"])}],
                                "parameters": {"weight": 1.0}})
    a, b = tensors["base"], tensors["ft0"]
    ref = {n: ((3.0 if "mlp" in n else 1.0) * a[n] + b[n]) / (4.0 if "mlp" in n else 2.0) for n in SHAPES}
    check(out, ref, [a, b])


def test_linear_without_a_base_weight_is_refused(tmp_path, models):
    """mergekit cannot merge it either (the base's weight is None): a one-line refusal."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "base_model": str(models["base"]),
                                    "models": [{"model": str(models["ft0"]), "parameters": {"weight": 1.0}}]}))
    with pytest.raises(SpecError, match="parameter 'weight' is required for linear, the base included"):
        load_recipe(path)


def test_ties_base_parameters_warn_and_merge_wide_weight_is_the_default(tmp_path, models, tensors):
    """Task-vector methods ignore the base's own parameters (warned); merge-wide weight and
    density are each fine-tune's defaults."""
    warnings: list[str] = []
    out = run_recipe(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(models["base"]),
                                "models": [{"model": str(models["base"]), "parameters": {"weight": 5.0}},
                                           {"model": str(models["ft0"])},
                                           {"model": str(models["ft1"]), "parameters": {"weight": 0.25}}],
                                "parameters": {"weight": 0.5}}, warnings)
    assert any("base model's own parameters (weight) have no effect" in w for w in warnings)
    a, b, c = tensors["base"], tensors["ft0"], tensors["ft1"]
    check(out, {n: a[n] + 0.5 * (b[n] - a[n]) + 0.25 * (c[n] - a[n]) for n in SHAPES}, [a, b, c])


# -- 2. gradients: tensors after the last layer sit at t = 0 -----------------------------------

def test_gradient_puts_final_norm_and_lm_head_at_the_first_anchor(tmp_path, models, tensors):
    anchors = [0.2, 0.9, 0.4]
    out = run_recipe(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(models["base"]),
                                "models": [{"model": str(models["ft0"]), "parameters": {"weight": anchors}}]})
    a, b = tensors["base"], tensors["ft0"]
    ref = {n: a[n] + gradient(anchors, position(n)) * (b[n] - a[n]) for n in SHAPES}
    check(out, ref, [a, b])
    # the final norm and lm_head get 0.2 (t = 0), not 0.4 (t = 1)
    for name in ("model.norm.weight", "lm_head.weight"):
        assert_within_tolerance(out[name], a[name] + 0.2 * (b[name] - a[name]), [a[name], b[name]], name)


# -- 3. numbers PyYAML reads as strings ----------------------------------------------------------

def test_exponent_numbers_without_a_decimal_point(tmp_path, models, tensors):
    text = f"""
merge_method: task_arithmetic
base_model: {models['base']}
models:
  - model: {models['ft0']}
    parameters:
      weight: 5e-1
  - model: {models['ft1']}
    parameters:
      weight: [1e-1, 3E-1]
parameters:
  lambda: 2e0
"""
    assert isinstance(yaml.safe_load(text)["models"][0]["parameters"]["weight"], str)  # what PyYAML does
    out = run_recipe(tmp_path, text)
    a, b, c = tensors["base"], tensors["ft0"], tensors["ft1"]
    ref = {n: a[n] + 2.0 * (0.5 * (b[n] - a[n]) + gradient([0.1, 0.3], position(n)) * (c[n] - a[n]))
           for n in SHAPES}
    check(out, ref, [a, b, c])


@pytest.mark.parametrize("value", ["abc", "1e5x", "nan", "inf"])
def test_a_non_number_is_refused_without_naming_an_empty_tensor(tmp_path, models, value):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(models["base"]),
                                    "models": [{"model": str(models["ft0"]), "parameters": {"weight": value}}]}))
    with pytest.raises(SpecError, match="expected a number") as info:
        merge_recipe(path, tmp_path / "out")
    assert "tensor ''" not in str(info.value)
    assert not (tmp_path / "out").exists()


# -- 4. per-model weight on slerp and model_stock ---------------------------------------------



def ref_model_stock(base: np.ndarray, models: list[np.ndarray], filter_wise: bool = False) -> np.ndarray:
    """mergekit's model_stock (merge_methods/model_stock.py) in float64."""
    shape = base.shape
    rows = (lambda x: x.reshape(1, -1)) if not filter_wise else (lambda x: x.reshape(-1, shape[-1]))
    w0, ws = rows(base), [rows(m) for m in models]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            norm = np.linalg.norm(offsets[i], axis=-1) * np.linalg.norm(offsets[j], axis=-1)
            cosines.append(np.clip((offsets[i] * offsets[j]).sum(-1) / np.maximum(norm, 1e-6), -1, 1))
    cos = np.mean(cosines, axis=0)[:, None]
    n = len(ws)
    t = n * cos / (1 + (n - 1) * cos)
    return (t * sum(ws) / n + (1 - t) * w0).reshape(shape)


def test_slerp_ignores_per_model_weight_with_a_warning(tmp_path, models, tensors):
    """mergekit's own two-model test config puts weight 0.6 / 0.4 on slerp's models."""
    warnings: list[str] = []
    out = run_recipe(tmp_path, {"merge_method": "slerp", "base_model": str(models["base"]),
                                "models": [{"model": str(models["base"]), "parameters": {"weight": 0.6}},
                                           {"model": str(models["ft0"]), "parameters": {"weight": 0.4}}],
                                "parameters": {"t": 0.35}, "dtype": "bfloat16", "out_dtype": "float32"},
                     warnings)
    assert any("'weight' has no effect on slerp" in w for w in warnings)
    a, b = tensors["base"], tensors["ft0"]
    check(out, {n: ref_slerp(a[n].ravel(), b[n].ravel(), 0.35).reshape(a[n].shape) for n in SHAPES}, [a, b])


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_ignores_per_model_weight_with_a_warning(tmp_path, models, tensors, filter_wise):
    warnings: list[str] = []
    out = run_recipe(tmp_path, {"merge_method": "model_stock", "base_model": str(models["base"]),
                                "models": [{"model": str(models["ft0"]), "parameters": {"weight": 0.6}},
                                           {"model": str(models["ft1"]), "parameters": {"weight": 0.4}}],
                                "parameters": {"filter_wise": filter_wise}}, warnings)
    assert sum("'weight' has no effect on model_stock" in w for w in warnings) == 2
    a, b, c = tensors["base"], tensors["ft0"], tensors["ft1"]
    check(out, {n: ref_model_stock(a[n], [b[n], c[n]], filter_wise) for n in SHAPES}, [a, b, c])


# -- 5. linear without normalize ---------------------------------------------------------------

def test_linear_without_normalize_is_the_plain_weighted_sum(tmp_path, models, tensors):
    """mergekit: Σ wᵢ·θᵢ over every listed model, the base with its own weight (examples/linear.yml
    with normalize off)."""
    out = run_recipe(tmp_path, {"merge_method": "linear",
                                "models": [{"model": str(models["base"]), "parameters": {"weight": 1.0}},
                                           {"model": str(models["ft0"]), "parameters": {"weight": 0.3}},
                                           {"model": str(models["ft1"]), "parameters": {"weight": 0.5}}],
                                "parameters": {"normalize": False}})
    a, b, c = tensors["base"], tensors["ft0"], tensors["ft1"]
    check(out, {n: 1.0 * a[n] + 0.3 * b[n] + 0.5 * c[n] for n in SHAPES}, [a, b, c])


def test_cli_linear_weight_keeps_the_affine_merge(tmp_path, models, tensors):
    """``--method linear --weight λ`` (and safeblend.merge) stay θ_base + λ·(θ_ft − θ_base)."""
    safeblend.merge(models["base"], models["ft0"], tmp_path / "out", method="linear", weight=0.3, chunk_size=256)
    out = load_checkpoint(tmp_path / "out")
    a, b = tensors["base"], tensors["ft0"]
    check(out, {n: a[n] + 0.3 * (b[n] - a[n]) for n in SHAPES}, [a, b])


# -- 6. SLERP of a zero-norm tensor ------------------------------------------------------------

@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_of_a_zero_norm_tensor_follows_mergekit(tmp_path, t):
    """A zero tensor counts as orthogonal (mergekit divides out only norms above 1e-8):
    cos(t·π/2)·a + sin(t·π/2)·b, so a zero base gives sin(t·π/2)·θ_ft, not t·θ_ft."""
    rng = np.random.default_rng(6)
    b = rng.standard_normal(300).astype(np.float32)
    tiny = (rng.standard_normal(300) * 1e-11).astype(np.float32)  # norm ~2e-10: not normalised either
    base = {"model.layers.0.zero.weight": np.zeros(300, np.float32), "model.layers.0.tiny.weight": tiny,
            "model.layers.0.both.weight": np.zeros(300, np.float32)}
    ft = {"model.layers.0.zero.weight": b, "model.layers.0.tiny.weight": b,
          "model.layers.0.both.weight": np.zeros(300, np.float32)}
    write_checkpoint(tmp_path / "a", base)
    write_checkpoint(tmp_path / "b", ft)
    out = run_recipe(tmp_path, {"merge_method": "slerp", "base_model": str(tmp_path / "a"),
                                "models": [{"model": str(tmp_path / "b")}], "parameters": {"t": t}})
    for name in base:
        a64, b64 = base[name].astype(np.float64), ft[name].astype(np.float64)
        assert_within_tolerance(out[name], ref_slerp(a64, b64, t), [a64, b64], name)
    if t == 0.3:
        expected = math.sin(0.3 * math.pi / 2) * b.astype(np.float64)
        assert_within_tolerance(out["model.layers.0.zero.weight"], expected, [b], "zero")


def test_density_on_task_arithmetic_warns_and_has_no_effect(tmp_path, models, tensors):
    """mergekit gives every task-vector method a density; task_arithmetic never uses it."""
    warnings: list[str] = []
    out = run_recipe(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(models["base"]),
                                "models": [{"model": str(models["ft0"]), "parameters": {"weight": 0.7, "density": 0.2}}],
                                "parameters": {"density": 0.5}}, warnings)
    assert any("'density' has no effect on task_arithmetic" in w for w in warnings)
    assert any("density has no effect on task_arithmetic" in w for w in warnings)
    a, b = tensors["base"], tensors["ft0"]
    check(out, {n: a[n] + 0.7 * (b[n] - a[n]) for n in SHAPES}, [a, b])


def test_merge_wide_weight_on_slerp_warns(tmp_path, models, tensors):
    """A merge-wide weight is only a default for a per-model weight slerp never reads."""
    warnings: list[str] = []
    out = run_recipe(tmp_path, {"merge_method": "slerp", "base_model": str(models["base"]),
                                "models": [{"model": str(models["ft0"])}], "parameters": {"t": 0.35, "weight": 0.5}},
                     warnings)
    assert any("parameter 'weight' has no effect on slerp" in w for w in warnings)
    a, b = tensors["base"], tensors["ft0"]
    check(out, {n: ref_slerp(a[n].ravel(), b[n].ravel(), 0.35).reshape(a[n].shape) for n in SHAPES}, [a, b])
