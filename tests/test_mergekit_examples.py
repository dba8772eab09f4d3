"""mergekit's own recipes — its examples/*.yml and the configurations of its basic-merge tests —
run on tiny generated models, each compared with a float64 reference of what mergekit's
formulas compute (written here from mergekit's merge_methods/*.py, never calling safeblend).

The recipes are restated in this project's words: model names become generated checkpoints,
``layer_range: [0, 40]`` becomes the generated model's [0, 3]. The frankenmerge example and the
passthrough stack and scale configurations are in test_recipe_slices.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from safeblend.errors import SpecError
from safeblend.recipe import merge_recipe
from helpers import NUMPY_DTYPES, assert_within_tolerance, load_checkpoint, ref_slerp, write_checkpoint

LAYERS = 3
SHAPES = {"model.embed_tokens.weight": (12, 16), "model.norm.weight": (16,), "lm_head.weight": (12, 16)}
SHAPES.update({f"model.layers.{i}.{kind}.weight": (16, 16) for i in range(LAYERS)
               for kind in ("self_attn.q_proj", "mlp.up_proj")})
SHAPES.update({f"model.layers.{i}.input_layernorm.weight": (16,) for i in range(LAYERS)})
CHUNK = 100  # bytes: 50 bf16 elements, so chunks cut rows and every tensor spans several


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Four bf16 Llama-shaped models: a base and three fine-tunes of it (the examples' fp16 /
    bf16 checkpoints)."""
    root = tmp_path_factory.mktemp("examples")
    rng = np.random.default_rng(2024)
    base = {n: rng.standard_normal(s).astype(NUMPY_DTYPES["bf16"]) for n, s in SHAPES.items()}
    paths = {"base": write_checkpoint(root / "base", base)}
    for name in ("a", "b", "c"):
        ft = {n: (t.astype(np.float64) + 0.05 * rng.standard_normal(t.shape)).astype(NUMPY_DTYPES["bf16"])
              for n, t in base.items()}
        paths[name] = write_checkpoint(root / name, ft)
    return paths


@pytest.fixture(scope="module")
def f64(models) -> dict[str, dict[str, np.ndarray]]:
    return {k: {n: t.astype(np.float64) for n, t in load_checkpoint(v).items()} for k, v in models.items()}


def run(tmp_path: Path, recipe: dict) -> dict[str, np.ndarray]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    merge_recipe(path, tmp_path / "out", chunk_size=CHUNK, on_warning=lambda m: None)
    return load_checkpoint(tmp_path / "out")


def t_of(name: str) -> float:
    return int(name.split(".")[2]) / (LAYERS - 1) if ".layers." in name else 0.0


def evaluate(value, name: str) -> float:
    """mergekit's evaluate_setting: a number, a gradient, or the first matching filter rule."""
    if isinstance(value, (int, float)):
        return float(value)
    if all(isinstance(v, (int, float)) for v in value):
        scaled = t_of(name) * (len(value) - 1)
        i0 = int(scaled)
        i1 = min(len(value) - 1, i0 + 1)
        return (1 - (scaled - i0)) * value[i0] + (scaled - i0) * value[i1]
    for rule in value:
        if rule.get("filter") is None or rule["filter"] in name:
            return evaluate(rule["value"], name)
    raise AssertionError(f"no rule for {name}")


def ref_linear(tensors: list[np.ndarray], weights: list[float], normalize: bool = True) -> np.ndarray:
    res = sum(w * t for w, t in zip(weights, tensors))
    return res / sum(weights) if normalize else res


def ref_magnitude(delta: np.ndarray, density: float) -> np.ndarray:
    """mergekit's magnitude(): the k = int(density·n) largest |d|. bf16 deltas tie often; where
    the k-th largest magnitude is shared, mergekit's argsort keeps an arbitrary k of them and
    safeblend keeps them all (the documented tie difference), so this keeps them all."""
    if density >= 1:
        return delta
    k = int(density * delta.size)
    tau = np.sort(np.abs(delta).ravel())[::-1][k - 1]
    return np.where(np.abs(delta) >= tau, delta, 0.0)


def ref_ties(base: np.ndarray, models: list[np.ndarray], weights: list[float], densities: list[float],
             normalize: bool, lambda_: float = 1.0) -> np.ndarray:
    """mergekit's GTATask with magnitude sparsification and sum consensus."""
    deltas = np.stack([ref_magnitude(m - base, p) for m, p in zip(models, densities)])
    w = np.array(weights).reshape(-1, *([1] * base.ndim))
    weighted = deltas * w
    majority = np.where(weighted.sum(0) >= 0, 1.0, -1.0)
    mask = np.sign(weighted) == majority
    mixed = (weighted * mask).sum(0)
    divisor = (w * mask).sum(0)
    divisor[divisor == 0] = 1
    if normalize:
        mixed = mixed / divisor
    return base + lambda_ * mixed




def check(out, ref_of, inputs) -> None:
    for name in SHAPES:
        assert_within_tolerance(out[name], ref_of(name), [x[name] for x in inputs], name)


# -- examples/*.yml ------------------------------------------------------------------------------

def test_example_linear(tmp_path, models, f64):
    """examples/linear.yml: no base_model, weights 1.0 / 0.3 / 0.5, normalize by default, fp16."""
    out = run(tmp_path, {"models": [{"model": str(models["a"]), "parameters": {"weight": 1.0}},
                                    {"model": str(models["b"]), "parameters": {"weight": 0.3}},
                                    {"model": str(models["c"]), "parameters": {"weight": 0.5}}],
                         "merge_method": "linear", "dtype": "float16"})
    assert all(t.dtype == np.float16 for t in out.values())
    check(out, lambda n: ref_linear([f64[k][n] for k in "abc"], [1.0, 0.3, 0.5]), [f64[k] for k in "abc"])


def test_example_ties(tmp_path, models, f64):
    """examples/ties.yml: density and weight gradients, filter rules, normalize, int8_mask."""
    weight_c = [{"filter": "mlp", "value": 0.5}, {"value": 0}]
    out = run(tmp_path, {"models": [
        {"model": str(models["a"]), "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
        {"model": str(models["b"]), "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}},
        {"model": str(models["c"]), "parameters": {"density": 0.33, "weight": weight_c}}],
        "merge_method": "ties", "base_model": str(models["base"]),
        "parameters": {"normalize": True, "int8_mask": True}, "dtype": "float16"})

    def ref(n):
        densities = [evaluate([1, 0.7, 0.1], n), 0.5, 0.33]
        weights = [1.0, evaluate([0, 0.3, 0.7, 1], n), evaluate(weight_c, n)]
        return ref_ties(f64["base"][n], [f64[k][n] for k in "abc"], weights, densities, normalize=True)
    check(out, ref, [f64[k] for k in ("base", "a", "b", "c")])


def test_example_bio_merge(tmp_path, models, f64):
    """examples/bio-merge.yml: ties, base not listed, normalize false, int8_mask, fp16."""
    out = run(tmp_path, {"models": [{"model": str(models["a"]), "parameters": {"density": 0.5, "weight": 0.5}},
                                    {"model": str(models["b"]), "parameters": {"density": 0.5, "weight": 0.5}}],
                         "merge_method": "ties", "base_model": str(models["base"]),
                         "parameters": {"normalize": False, "int8_mask": True}, "dtype": "float16"})
    check(out, lambda n: ref_ties(f64["base"][n], [f64["a"][n], f64["b"][n]], [0.5, 0.5], [0.5, 0.5], False),
          [f64[k] for k in ("base", "a", "b")])


def test_example_gradient_slerp(tmp_path, models, f64):
    """examples/gradient-slerp.yml: one slice over every layer, t by filter and gradient."""
    t_rules = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
               {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]
    out = run(tmp_path, {"slices": [{"sources": [{"model": str(models["base"]), "layer_range": [0, LAYERS]},
                                                 {"model": str(models["a"]), "layer_range": [0, LAYERS]}]}],
                         "merge_method": "slerp", "base_model": str(models["base"]),
                         "parameters": {"t": t_rules}, "dtype": "float16"})
    check(out, lambda n: ref_slerp(f64["base"][n], f64["a"][n], evaluate(t_rules, n)), [f64["base"], f64["a"]])


# examples/orcamini-platy-44layer.yml (a frankenmerge) and test_basic_merges.py's passthrough
# stack and scale: tests/test_recipe_slices.py.


# -- tests/test_basic_merges.py configurations ---------------------------------------------------

def two_models(models, method: str, first="a", second="b", base=None, params=None) -> dict:
    """mergekit's two_model_config: weights 0.6 / 0.4, bf16."""
    recipe = {"merge_method": method,
              "models": [{"model": str(models[first]), "parameters": {"weight": 0.6}},
                         {"model": str(models[second]), "parameters": {"weight": 0.4}}],
              "dtype": "bfloat16"}
    if base:
        recipe["base_model"] = str(models[base])
    if params:
        recipe["parameters"] = params
    return recipe


def test_basic_linear(tmp_path, models, f64):
    out = run(tmp_path, two_models(models, "linear"))
    check(out, lambda n: ref_linear([f64["a"][n], f64["b"][n]], [0.6, 0.4]), [f64["a"], f64["b"]])


def test_basic_slerp(tmp_path, models, f64):
    """base_model a is also listed with weight 0.6 (ignored by slerp), t = 0.35."""
    out = run(tmp_path, two_models(models, "slerp", base="a", params={"t": 0.35}))
    check(out, lambda n: ref_slerp(f64["a"][n], f64["b"][n], 0.35), [f64["a"], f64["b"]])


def test_basic_task_arithmetic(tmp_path, models, f64):
    out = run(tmp_path, two_models(models, "task_arithmetic", base="c"))
    check(out, lambda n: f64["c"][n] + 0.6 * (f64["a"][n] - f64["c"][n]) + 0.4 * (f64["b"][n] - f64["c"][n]),
          [f64["a"], f64["b"], f64["c"]])


def test_basic_ties(tmp_path, models, f64):
    out = run(tmp_path, two_models(models, "ties", base="c", params={"density": 0.3}))
    check(out, lambda n: ref_ties(f64["c"][n], [f64["a"][n], f64["b"][n]], [0.6, 0.4], [0.3, 0.3], True),
          [f64["a"], f64["b"], f64["c"]])


@pytest.mark.parametrize("filter_wise", [False, True])
def test_basic_model_stock(tmp_path, models, f64, filter_wise):
    """models b and c with weights (ignored), base a not listed; filter_wise both ways."""
    params = {"filter_wise": True} if filter_wise else None
    out = run(tmp_path, two_models(models, "model_stock", first="b", second="c", base="a", params=params))

    def ref(n):
        shape = f64["a"][n].shape
        rows = (lambda x: x.reshape(-1, shape[-1])) if filter_wise else (lambda x: x.reshape(1, -1))
        w0, ws = rows(f64["a"][n]), [rows(f64[k][n]) for k in "bc"]
        d0, d1 = ws[0] - w0, ws[1] - w0
        norm = np.linalg.norm(d0, axis=-1) * np.linalg.norm(d1, axis=-1)
        cos = np.clip((d0 * d1).sum(-1) / np.maximum(norm, 1e-6), -1, 1)[:, None]
        t = 2 * cos / (1 + cos)
        return (t * (ws[0] + ws[1]) / 2 + (1 - t) * w0).reshape(shape)
    check(out, ref, [f64["a"], f64["b"], f64["c"]])


def test_basic_dare_ties(tmp_path, models, f64):
    """dare_ties at density 0.66: mergekit's formula (rescale true = keep each task vector's L1
    norm, sum consensus, normalize false) with the masks of safeblend's documented generator
    (the RNG difference: torch's masks cannot be reproduced, the formula around them can)."""
    from test_methods import ref_dare

    out = run(tmp_path, two_models(models, "dare_ties", base="c", params={"density": 0.66}))
    check(out, lambda n: ref_dare(n, f64["c"][n], [f64["a"][n], f64["b"][n]], [0.6, 0.4], [0.66, 0.66],
                                  elect=True, normalize=False, rescale="l1", seed=0),
          [f64["a"], f64["b"], f64["c"]])


def test_basic_della(tmp_path, models, f64):
    """mergekit's test_della_merge (density 0.66, epsilon 0.05, lambda 0.5): its formula with
    safeblend's generator in place of torch's (the RNG difference), rescale true = L1."""
    from test_methods import ref_della

    out = run(tmp_path, two_models(models, "della", base="c", params={"density": 0.66, "epsilon": 0.05,
                                                                       "lambda": 0.5}))
    check(out, lambda n: ref_della(n, f64["c"][n], [f64["a"][n], f64["b"][n]], [0.6, 0.4], [0.66] * 2, [0.05] * 2,
                                   elect=True, normalize=True, scale=0.5), [f64["a"], f64["b"], f64["c"]])


def test_basic_della_linear(tmp_path, models, f64):
    from test_methods import ref_della

    out = run(tmp_path, two_models(models, "della_linear", base="c", params={"density": 0.5, "epsilon": 0.1}))
    check(out, lambda n: ref_della(n, f64["c"][n], [f64["a"][n], f64["b"][n]], [0.6, 0.4], [0.5] * 2, [0.1] * 2,
                                   elect=False, normalize=False), [f64["a"], f64["b"], f64["c"]])


def test_basic_della_invalid_epsilon(tmp_path, models):
    """mergekit's test_della_invalid_epsilon: epsilon 1.35 with density 0.66 is an error."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(two_models(models, "della", base="c",
                                              params={"density": 0.66, "epsilon": 1.35, "lambda": 0.5})))
    with pytest.raises(SpecError, match="density ± epsilon must lie in"):
        merge_recipe(path, tmp_path / "out", on_warning=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_ties_rescale_true_keeps_the_l1_norm(tmp_path, models, f64):
    """ties with ``rescale: true``: mergekit's rescaled_masked_tensor, L1 norm, eps 1e-7."""
    out = run(tmp_path, two_models(models, "ties", base="c", params={"density": 0.3, "rescale": True}))

    def ref(n):
        b = f64["c"][n]
        deltas = []
        for k in "ab":
            d = f64[k][n] - b
            kept = ref_magnitude(d, 0.3)
            before, after = np.abs(d).sum(), np.abs(kept).sum()
            deltas.append(kept if min(before, after) < 1e-7 else kept * (before / after))
        w = np.array([0.6, 0.4]).reshape(-1, *([1] * b.ndim))
        weighted = np.stack(deltas) * w
        mask = np.sign(weighted) == np.where(weighted.sum(0) >= 0, 1.0, -1.0)
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
        return b + (weighted * mask).sum(0) / divisor
    check(out, ref, [f64["a"], f64["b"], f64["c"]])


# -- methods beyond the linear family: mergekit's formulas, whole tensors, float64 ------------------

def ref_nuslerp(t: float, v0: np.ndarray, v1: np.ndarray, row_wise: bool, flatten: bool,
                magnitude: bool = False) -> np.ndarray:
    """mergekit's nuslerp(): vectors are the flattened tensor, its rows, or (row_wise) the
    vectors along the first dimension. ``magnitude``: |c₀·v₀| + |c₁·v₁| instead, the size of
    the terms an fp32 evaluation adds (large where nearly colinear short vectors cancel)."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(1, -1), v1.reshape(1, -1)
    elif row_wise:
        v0, v1 = np.swapaxes(v0, 0, -1), np.swapaxes(v1, 0, -1)
    u0 = v0 / np.maximum(np.linalg.norm(v0, axis=-1, keepdims=True), 1e-7)
    u1 = v1 / np.maximum(np.linalg.norm(v1, axis=-1, keepdims=True), 1e-7)
    theta = np.arccos(np.clip(np.sum(u0 * u1, axis=-1, keepdims=True), -1, 1))
    sin = np.sin(theta)
    colinear = np.abs(sin) < 1e-8
    c0 = np.where(colinear, 1 - t, np.sin((1 - t) * theta) / np.where(colinear, 1, sin))
    c1 = np.where(colinear, t, np.sin(t * theta) / np.where(colinear, 1, sin))
    res = np.abs(c0 * v0) + np.abs(c1 * v1) if magnitude else c0 * v0 + c1 * v1
    if row_wise and not flatten:
        res = np.swapaxes(res, 0, -1)
    return res.reshape(shape)


@pytest.mark.parametrize("base", [None, "c"])
@pytest.mark.parametrize("row_wise", [False, True])
@pytest.mark.parametrize("flatten", [False, True])
def test_basic_nuslerp(tmp_path, models, f64, base, row_wise, flatten):
    """mergekit's test_nuslerp_merges: with and without a base, every row_wise × flatten."""
    out = run(tmp_path, two_models(models, "nuslerp", base=base,
                                   params={"nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten}))

    def ref(n):
        if base is None:
            return ref_nuslerp(0.4, f64["a"][n], f64["b"][n], row_wise, flatten)
        b = f64[base][n]
        return b + ref_nuslerp(0.4, f64["a"][n] - b, f64["b"][n] - b, row_wise, flatten)
    check(out, ref, [f64["a"], f64["b"], f64["c"]])


def test_basic_nuslerp_weights_summing_to_zero(tmp_path, models, f64):
    recipe = two_models(models, "nuslerp", base="c", params={"nuslerp_row_wise": False, "nuslerp_flatten": False})
    recipe["models"][0]["parameters"]["weight"] = -0.5
    recipe["models"][1]["parameters"]["weight"] = 0.5
    out = run(tmp_path, recipe)
    check(out, lambda n: f64["c"][n] + ref_nuslerp(0.5, f64["a"][n] - f64["c"][n], f64["b"][n] - f64["c"][n],
                                                   False, False), [f64["a"], f64["b"], f64["c"]])


def ref_multislerp(tensors: list[np.ndarray], weights: list[float], base: np.ndarray | None,
                   eps: float = 1e-8) -> np.ndarray:
    """mergekit's multislerp(), normalize_weights true, step by step."""
    x = np.stack(tensors) - (base if base is not None else 0.0)
    flat = x.reshape(len(tensors), -1)
    w = np.array(weights) / sum(weights)
    norms = np.linalg.norm(flat, axis=-1, keepdims=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean = mean / np.linalg.norm(mean)
    tangent = units - (units * mean).sum(-1, keepdims=True) * mean
    r = (tangent * w[:, None]).sum(0)
    tau = np.linalg.norm(r) + eps
    res = (mean * np.cos(tau) + r * np.sin(tau) / tau) * (norms[:, 0] * w).sum()
    return res.reshape(tensors[0].shape) + (base if base is not None else 0.0)


@pytest.mark.parametrize("base", ["c", None])
def test_basic_multislerp(tmp_path, models, f64, base):
    out = run(tmp_path, two_models(models, "multislerp", base=base))
    check(out, lambda n: ref_multislerp([f64["a"][n], f64["b"][n]], [0.6, 0.4], f64[base][n] if base else None),
          [f64["a"], f64["b"], f64["c"]])


def test_multislerp_three_models_with_base(tmp_path, models, f64):
    recipe = two_models(models, "multislerp", base="base")
    recipe["models"].append({"model": str(models["c"]), "parameters": {"weight": [0.2, 1.0]}})
    out = run(tmp_path, recipe)
    check(out, lambda n: ref_multislerp([f64[k][n] for k in "abc"], [0.6, 0.4, evaluate([0.2, 1.0], n)],
                                        f64["base"][n]), [f64[k] for k in ("base", "a", "b", "c")])


def ref_karcher(tensors: list[np.ndarray], max_iter: int = 10, tol: float = 1e-5) -> np.ndarray:
    """mergekit's karcher_merge_tensors() with equal weights, float64."""
    alphas = [1.0 / len(tensors)] * len(tensors)
    norms = [float(np.linalg.norm(t)) for t in tensors]
    units = [t / n if n > 0 else np.zeros_like(t) for t, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if n > tol]
    a = [alphas[i] / sum(alphas[j] for j in valid) for i in valid]
    us = [units[i] for i in valid]
    u = sum(ai * ui for ai, ui in zip(a, us))
    u = us[0].copy() if np.linalg.norm(u) < tol else u / np.linalg.norm(u)
    for _ in range(max_iter):
        T = np.zeros_like(u)
        for ai, ui in zip(a, us):
            d = np.clip(np.sum(u * ui), -1, 1)
            theta = math.acos(d)
            if theta >= tol:
                T += ai * (theta / math.sin(theta)) * (ui - d * u)
        nt = np.linalg.norm(T)
        if nt < tol:
            break
        u = math.cos(nt) * u + math.sin(nt) * T / nt
        if np.linalg.norm(u) > tol:
            u = u / np.linalg.norm(u)
    return sum(al * n for al, n in zip(alphas, norms)) * u


@pytest.mark.parametrize("base", ["c", None])
def test_basic_karcher(tmp_path, models, f64, base):
    """mergekit's test_karcher_merge (max_iter 5, tol 1e-5): the base is one more model."""
    out = run(tmp_path, two_models(models, "karcher", base=base, params={"max_iter": 5, "tol": 1e-5}))
    keys = ["a", "b"] + ([base] if base else [])
    check(out, lambda n: ref_karcher([f64[k][n] for k in keys], 5, 1e-5), [f64[k] for k in keys])


def test_basic_nearswap(tmp_path, models, f64):
    """mergekit's test_nearswap_merge: base a (also listed), t = 0.0001; and a larger t."""
    for t in (0.0001, 0.05):
        out = run(tmp_path / str(t), two_models(models, "nearswap", base="a", params={"t": t}))

        def ref(n):
            a, b = f64["a"][n], f64["b"][n]
            w = np.clip(t / np.maximum(np.abs(a - b), 1e-6), 0, 1)
            return w * b + (1 - w) * a
        check(out, ref, [f64["a"], f64["b"]])


def ref_breadcrumbs_trim(delta: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """mergekit's magnitude_outliers(): drop the n_top = int(γ·n) largest, keep the next
    int(ρ·n) (n_top lowered when the two exceed n); ties at a threshold kept together (the
    documented tie difference). mergekit keeps nothing where n_top is 0; these cases avoid it."""
    if density >= 1:
        return delta
    n = delta.size
    target, top = int(density * n), int(gamma * n)
    bottom = n - target - top
    if bottom < 0:
        top, bottom = top + bottom, 0
    magnitudes = np.sort(np.abs(delta).ravel())[::-1]
    keep = np.abs(delta) >= magnitudes[n - bottom - 1]
    if top > 0:
        keep &= np.abs(delta) < magnitudes[top - 1]
    # else: mergekit's slice [bottom:-0] keeps nothing at all (16-element norms here, γ·n < 1);
    # safeblend keeps the int(ρ·n) largest, the documented difference
    return np.where(keep, delta, 0.0)


def check_elected(out, b, deltas, weights, normalize, names=SHAPES, inputs=()) -> None:
    """TIES-style election against a float64 reference whose vote S = Σ wᵢ·dᵢ is exact (decimal
    weights scaled to integers: the products and sums of bf16 deltas are then exact). Where S
    is exactly 0 the election is a tie, decided by the rounding of the weights in any finite
    arithmetic; either outcome is accepted there."""
    for name in names:
        d = np.stack([x[name] for x in deltas])
        w = np.array(weights).reshape(-1, *([1] * b[name].ndim))
        votes = (np.round(w * 1000) * d).sum(0)
        outcomes = []
        for sign in (1.0, -1.0):
            sigma = np.where(votes > 0, 1.0, np.where(votes < 0, -1.0, sign))
            mask = np.sign(w * d) == sigma
            mixed = (w * d * mask).sum(0)
            if normalize:
                divisor = (w * mask).sum(0)
                mixed = mixed / np.where(divisor == 0, 1.0, divisor)
            outcomes.append(b[name] + mixed)
        tie = votes == 0
        chosen = np.where(tie & (np.abs(out[name] - outcomes[1]) < np.abs(out[name] - outcomes[0])),
                          outcomes[1], outcomes[0])
        assert_within_tolerance(out[name], chosen, [b[name], *[x[name] for x in inputs]], name)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("params", [None, {"density": 0.5, "gamma": 0.05}, {"density": 0.9, "gamma": 0.3}])
def test_basic_breadcrumbs(tmp_path, models, f64, method, params):
    """mergekit's test_breadcrumbs_merge (density 1: the task vectors untouched), and trims."""
    out = run(tmp_path, two_models(models, method, base="c", params=params))
    density, gamma = (params or {}).get("density", 1.0), (params or {}).get("gamma", 0.01)

    deltas = [{n: ref_breadcrumbs_trim(f64[k][n] - f64["c"][n], density, gamma) for n in SHAPES} for k in "ab"]
    if method == "breadcrumbs":
        check(out, lambda n: f64["c"][n] + 0.6 * deltas[0][n] + 0.4 * deltas[1][n], [f64["a"], f64["b"], f64["c"]])
    else:  # normalize false by default
        check_elected(out, f64["c"], deltas, [0.6, 0.4], False, inputs=[f64["a"], f64["b"]])


def test_basic_ram_and_ramplus_tl(tmp_path, models, f64):
    """mergekit's test_ram_merge and test_ramplus_tl_merge (r 0.05, alpha 1.0); weights ignored."""
    from test_elementwise_methods import ref_ram

    out = run(tmp_path / "ram", two_models(models, "ram", base="c"))
    check(out, lambda n: ref_ram(f64["c"][n], [f64["a"][n], f64["b"][n]]), [f64["a"], f64["b"], f64["c"]])
    out = run(tmp_path / "plus", two_models(models, "ramplus_tl", base="c", params={"r": 0.05, "alpha": 1.0}))
    check(out, lambda n: ref_ram(f64["c"][n], [f64["a"][n], f64["b"][n]], 1e-5, 0.05, 1.0),
          [f64["a"], f64["b"], f64["c"]])


def test_basic_sce(tmp_path, models, f64):
    """mergekit's test_sce_merge: select_topk 0.5, weights ignored."""
    from test_elementwise_methods import ref_sce

    out = run(tmp_path, two_models(models, "sce", base="c", params={"select_topk": 0.5}))
    check(out, lambda n: ref_sce(f64["c"][n], [f64["a"][n], f64["b"][n]], 0.5), [f64["a"], f64["b"], f64["c"]])


def ref_arcee_fusion(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """mergekit's ArceeFusionMergeTask: per-row KL of the softmaxes times |b − a|, threshold at
    median + 1.5·IQR of the importances (exact quantiles: these tensors are under 10⁶ elements)."""
    rows_a, rows_b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])

    def softmax(x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    p, q = softmax(rows_b) + 1e-8, softmax(rows_a) + 1e-8
    kl = np.sum(p * np.log(p / q), axis=-1)
    importance = (np.abs(rows_b - rows_a) * kl[:, None]).ravel()
    ordered = np.sort(importance)
    q1, median, q3 = (ordered[int(x * (ordered.size - 1))] for x in (0.25, 0.5, 0.75))
    mask = (importance >= median + 1.5 * (q3 - q1)).reshape(a.shape)
    return np.where(mask, b, a)


def test_example_arcee_fusion(tmp_path, models, f64):
    """examples/arcee_fusion.yml: base model_a, also listed, fused with model_b."""
    out = run(tmp_path, {"models": [{"model": str(models["a"])}, {"model": str(models["b"])}],
                         "merge_method": "arcee_fusion", "base_model": str(models["a"]), "dtype": "bfloat16"})
    check(out, lambda n: ref_arcee_fusion(f64["a"][n], f64["b"][n]), [f64["a"], f64["b"]])
    taken = sum(int(np.count_nonzero(out[n].astype(np.float64) != f64["a"][n])) for n in SHAPES)
    assert 0 < taken < sum(f64["a"][n].size for n in SHAPES) // 2  # some entries fused, most kept


def test_basic_passthrough_copy(tmp_path, models, f64):
    """mergekit's test_gpt2_copy / test_granite_copy: one model through passthrough, bf16 → fp32."""
    out = run(tmp_path, {"merge_method": "passthrough", "models": [{"model": str(models["a"])}], "dtype": "float32"})
    for name in SHAPES:
        assert out[name].dtype == np.float32
        np.testing.assert_array_equal(out[name].astype(np.float64), f64["a"][name])
