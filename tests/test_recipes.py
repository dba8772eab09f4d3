"""Recipe files in mergekit's YAML schema: parsing, per-tensor parameters, rejected keys, CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from safeblend.cli import main
from safeblend.errors import SpecError
from safeblend.recipe import load_recipe, merge_recipe, parse_recipe
from helpers import assert_within_tolerance, load_checkpoint, random_tensor, write_checkpoint

LAYERS = 3
SHAPES = {"model.embed_tokens.weight": (6, 4), "model.norm.weight": (4,), "lm_head.weight": (6, 4)}
SHAPES.update({f"model.layers.{i}.{kind}.weight": (4, 4) for i in range(LAYERS)
               for kind in ("self_attn.q_proj", "mlp.up_proj")})


@pytest.fixture()
def models(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    base = {n: random_tensor(rng, s, "fp32") for n, s in SHAPES.items()}
    paths = {"base": write_checkpoint(tmp_path / "base", base)}
    for i in range(3):
        ft = {n: (t + 0.2 * rng.standard_normal(t.shape)).astype(np.float32) for n, t in base.items()}
        paths[f"ft{i}"] = write_checkpoint(tmp_path / f"ft{i}", ft)
    return paths


def write_recipe(tmp_path: Path, recipe: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def weights(dirs: dict[str, Path], out: Path) -> dict[str, dict[str, np.ndarray]]:
    return {k: load_checkpoint(v) for k, v in {**dirs, "out": out}.items()}


def lerp(base: np.ndarray, ft: np.ndarray, w: float) -> np.ndarray:
    return base.astype(np.float64) + w * (ft.astype(np.float64) - base.astype(np.float64))


# -- parsing --------------------------------------------------------------------------------

def test_ties_recipe_maps_to_method_parameters(models):
    recipe = parse_recipe({
        "merge_method": "ties",
        "base_model": str(models["base"]),
        "models": [
            {"model": str(models["base"])},
            {"model": str(models["ft0"]), "parameters": {"weight": 0.7, "density": [0.2, 0.8]}},
            {"model": str(models["ft1"]), "parameters": {"weight": [{"filter": "mlp", "value": 0.1}]}},
        ],
        "parameters": {"normalize": False, "lambda": 0.9, "weight": 0.5, "density": 0.4},
        "dtype": "float32",
        "out_dtype": "bfloat16",
    })
    assert recipe.method == "ties"
    assert recipe.base == str(models["base"])
    assert recipe.models == [str(models["ft0"]), str(models["ft1"])]
    assert recipe.dtype == "bf16"
    params = recipe.params
    assert params["lambda_"].constant == 0.9 and params["normalize"].constant is False
    w0, w1 = params["weight"]
    assert w0.constant == 0.7
    # model-level rules fall back to the merge-wide value where no filter matches
    assert w1.at("model.layers.0.mlp.up_proj.weight", 0) == 0.1
    assert w1.at("model.layers.0.self_attn.q_proj.weight", 0) == 0.5
    d0, d1 = params["density"]
    assert d0.at("x", 0.5) == pytest.approx(0.5) and d1.constant == 0.4


@pytest.mark.parametrize("recipe,message", [
    ({"merge_method": "passthrough", "models": [{"model": "a"}, {"model": "b"}]}, "exactly one model"),
    ({"merge_method": "frankenmerge", "models": [{"model": "a"}]}, "merge_method 'frankenmerge' is not supported;"),
    ({"merge_method": "ties", "models": [{"model": "a"}], "base_model": "b", "modules": {}},
     "key 'modules' is not supported"),
    ({"merge_method": "linear", "models": [{"model": "a"}], "name": "x"}, "unknown key 'name'"),
    ({"merge_method": "ties", "base_model": "b",
      "models": [{"model": "a", "parameters": {"weight": 1, "gamma": 0.1}}]}, "parameter 'gamma' is not supported"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": 1}}],
      "parameters": {"t": 0.5}}, "parameter 't' is not supported by ties"),
    ({"merge_method": "ties", "models": [{"model": "a", "parameters": {"weight": 1}}]}, "needs base_model"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a"}]}, "'weight' is required"),
    ({"merge_method": "slerp", "base_model": "b", "models": [{"model": "b"}, {"model": "a"}]}, "'t' is required"),
    ({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": {"filtr": "x", "value": 1}}},
                                           {"model": "c", "parameters": {"weight": 1}}]},
     "unsupported key 'filtr'"),
    ({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}},
                                           {"model": "c+lora", "parameters": {"weight": 1}}]},
     "'c\\+lora': lora is not a local PEFT adapter directory"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]},
                                           {"sources": [{"model": "a", "layer_range": [2, 4]}]}]},
     "slices\\[0\\].sources\\[0\\]: a: no such file"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": 1}}],
      "dtype": "float8"}, "dtype"),
    ({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}},
                                           {"model": "a", "parameters": {"weight": 1}}]}, "listed twice"),
    ({"merge_method": "linear", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": 1}}]},
     "model b: parameter 'weight' is required for linear, the base included"),
    ([1, 2], "a recipe is a mapping"),
])
def test_rejected_recipes_name_the_key(recipe, message):
    with pytest.raises(SpecError, match=message):
        parse_recipe(recipe, "r.yaml")


def test_int8_mask_and_low_precision_dtype_warn():
    recipe = parse_recipe({"merge_method": "ties", "base_model": "b", "dtype": "bfloat16",
                           "models": [{"model": "a", "parameters": {"weight": 1, "density": 0.5}}],
                           "parameters": {"int8_mask": True}})
    assert any("int8_mask" in w for w in recipe.warnings)
    assert any("fp32" in w for w in recipe.warnings)
    assert recipe.dtype == "bf16"


def test_invalid_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("merge_method: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_recipe(path)


# -- merges from recipes --------------------------------------------------------------------

def test_linear_recipe_is_mergekits_weighted_average(tmp_path, models):
    """No base_model: the first model is the base and its weight joins the normaliser."""
    path = write_recipe(tmp_path, {
        "merge_method": "linear",
        "models": [{"model": str(models["base"]), "parameters": {"weight": 1.0}},
                   {"model": str(models["ft0"]), "parameters": {"weight": 3.0}}],
    })
    merge_recipe(path, tmp_path / "out", on_warning=lambda m: None)
    w = weights(models, tmp_path / "out")
    for name in SHAPES:
        ref = (1.0 * w["base"][name].astype(np.float64) + 3.0 * w["ft0"][name]) / 4.0
        assert_within_tolerance(w["out"][name], ref, [w["base"][name], w["ft0"][name]], name)


def test_slerp_recipe_with_slices_filters_and_gradients(tmp_path, models):
    """The shape of mergekit's SLERP example: one slice over all layers, t by filter and layer."""
    t_rules = [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"filter": "mlp", "value": [1.0, 0.0]},
               {"value": 0.5}]
    path = write_recipe(tmp_path, {
        "slices": [{"sources": [{"model": str(models["base"]), "layer_range": [0, LAYERS]},
                                {"model": str(models["ft0"]), "layer_range": [0, LAYERS]}]}],
        "merge_method": "slerp",
        "base_model": str(models["base"]),
        "parameters": {"t": t_rules},
        "dtype": "float32",
    })
    merge_recipe(path, tmp_path / "out")
    w = weights(models, tmp_path / "out")
    for name in SHAPES:
        if ".layers." in name:
            position = int(name.split(".")[2]) / (LAYERS - 1)
            t = 0.5 * position * 2 if "self_attn" in name else 1.0 - position
        else:
            t = 0.5
        out = w["out"][name].astype(np.float64)
        if t == 0.0:
            np.testing.assert_array_equal(w["out"][name], w["base"][name])
        elif t == 1.0:
            np.testing.assert_array_equal(w["out"][name], w["ft0"][name])
        else:
            # strictly between the endpoints, and closer to the fine-tune as t grows
            d_base = np.linalg.norm(out - w["base"][name])
            d_ft = np.linalg.norm(out - w["ft0"][name])
            assert d_base / (d_base + d_ft) == pytest.approx(t, abs=0.05), name


def test_slice_that_cuts_layers_needs_a_config(tmp_path, models):
    """A slice of fewer layers than the models have is a cut (safeblend.slices), not models; the
    output's config.json must say how many layers it has, so a model without one is refused."""
    path = write_recipe(tmp_path, {
        "slices": [{"sources": [{"model": str(models["base"]), "layer_range": [0, 2]},
                                {"model": str(models["ft0"]), "layer_range": [0, 2]}]}],
        "merge_method": "slerp", "base_model": str(models["base"]), "parameters": {"t": 0.5},
    })
    with pytest.raises(SpecError, match="layer_range: no config.json"):
        load_recipe(path)


def test_task_arithmetic_recipe_with_per_model_gradient(tmp_path, models):
    path = write_recipe(tmp_path, {
        "merge_method": "task_arithmetic",
        "base_model": str(models["base"]),
        "models": [{"model": str(models["ft0"]), "parameters": {"weight": [0.0, 1.0]}},
                   {"model": str(models["ft1"]), "parameters": {"weight": 0.25}}],
        "parameters": {"lambda": 0.8},
    })
    merge_recipe(path, tmp_path / "out")
    w = weights(models, tmp_path / "out")
    for name in SHAPES:
        # embeddings, the final norm and lm_head all sit at the first anchor (mergekit >= 0.1.2)
        position = int(name.split(".")[2]) / (LAYERS - 1) if ".layers." in name else 0.0
        b = w["base"][name].astype(np.float64)
        ref = b + 0.8 * (position * (w["ft0"][name] - b) + 0.25 * (w["ft1"][name] - b))
        assert_within_tolerance(w["out"][name], ref, [w["base"][name], w["ft0"][name], w["ft1"][name]], name)


def test_recipe_not_covering_a_tensor_fails_before_writing(tmp_path, models):
    path = write_recipe(tmp_path, {
        "merge_method": "slerp", "base_model": str(models["base"]),
        "models": [{"model": str(models["ft0"])}],
        "parameters": {"t": [{"filter": "self_attn", "value": 0.5}]},
    })
    with pytest.raises(SpecError, match="no rule matches tensor"):
        merge_recipe(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- CLI ------------------------------------------------------------------------------------

def test_cli_config_runs_the_recipe(tmp_path, models):
    path = write_recipe(tmp_path, {
        "merge_method": "dare_ties", "base_model": str(models["base"]),
        "models": [{"model": str(models[f"ft{i}"]), "parameters": {"weight": 0.5, "density": 0.5}}
                   for i in range(3)],
        "out_dtype": "bfloat16",
    })
    result = CliRunner().invoke(main, ["merge", "--config", str(path), "-o", str(tmp_path / "out"), "--json",
                                       "--seed", "5"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["method"] == "dare-ties" and summary["params"]["seed"] == 5
    out = load_checkpoint(tmp_path / "out")
    assert all(t.dtype.name == "bfloat16" for t in out.values())


@pytest.mark.parametrize("args,message", [
    (["BASE"], "BASE and MODELS come from the recipe"),
    (["--method", "ties"], "--method cannot be combined with --config"),
    (["--weight", "0.3"], "--weight cannot be combined with --config"),
    (["--density", "0.3"], "--density cannot be combined with --config"),
])
def test_cli_config_conflicts_are_usage_errors(tmp_path, models, args, message):
    path = write_recipe(tmp_path, {"merge_method": "linear", "models": [
        {"model": str(models["base"]), "parameters": {"weight": 1}},
        {"model": str(models["ft0"]), "parameters": {"weight": 1}}]})
    args = [str(models["base"]) if a == "BASE" else a for a in args]
    result = CliRunner().invoke(main, ["merge", *args, "--config", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert message in result.output


def test_cli_without_inputs_or_config(tmp_path):
    result = CliRunner().invoke(main, ["merge", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "give BASE and at least one fine-tuned MODEL, or --config RECIPE" in result.output


def test_cli_method_options(tmp_path, models):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["merge", str(models["base"]), str(models["ft0"]), str(models["ft1"]),
                                       "--method", "ties", "--weight", "0.5", "--density", "0.3",
                                       "--consensus", "count", "--no-normalize", "--lambda", "0.9",
                                       "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    params = json.loads(result.stdout)["params"]
    assert params == {"method": "ties", "weights": [0.5, 0.5], "densities": [0.3, 0.3], "lambda": 0.9,
                      "normalize": False, "consensus": "count"}
    result = CliRunner().invoke(main, ["merge", str(models["base"]), str(models["ft0"]), "--method", "linear",
                                       "--seed", "3", "-o", str(tmp_path / "o2")])
    assert result.exit_code == 2
    assert "takes no parameter 'seed'" in result.output


def test_every_mergekit_method_is_a_registered_method():
    """mergekit 0.1.5 registers these 20 methods (merge_methods/registry.py and the
    easy_define ones); each maps to a safeblend method, and every safeblend method has a name."""
    from safeblend.methods import method_names
    from safeblend.recipe import MERGEKIT_METHODS

    mergekit = {"linear", "slerp", "nuslerp", "passthrough", "model_stock", "arcee_fusion", "karcher",
                "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
                "della_linear", "multislerp", "nearswap", "ram", "ramplus_tl", "sce"}
    assert set(MERGEKIT_METHODS) == mergekit
    assert set(MERGEKIT_METHODS.values()) == set(method_names())


# -- chat_template --------------------------------------------------------------------------

TEMPLATE_A = "{% for m in messages %}<a>{{ m['content'] }}{% endfor %}"
TEMPLATE_B = "{% for m in messages %}<b>{{ m['content'] }}{% endfor %}"


def _with_tokenizer(path: Path, template: Any, jinja: str | None = None) -> None:
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 64}
    if template is not None:
        config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja is not None:
        (path / "chat_template.jinja").write_text(jinja)


def _ta_recipe(models, **extra) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(models["base"]),
            "models": [{"model": str(models[k]), "parameters": {"weight": 0.5}} for k in ("ft0", "ft1", "ft2")],
            **extra}


def test_chat_template_text_replaces_the_bases(tmp_path, models):
    """mergekit sets the tokenizer's chat template to the recipe's Jinja text: the output's
    tokenizer_config.json and the chat_template.jinja copied from the base carry it; the
    weights are the same merge as without it."""
    _with_tokenizer(models["base"], TEMPLATE_B, jinja=TEMPLATE_B)
    merge_recipe(write_recipe(tmp_path, _ta_recipe(models, chat_template=TEMPLATE_A)), tmp_path / "out")
    out = tmp_path / "out"
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE_A
    assert (out / "chat_template.jinja").read_text() == TEMPLATE_A
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 64  # the rest kept
    w = weights(models, out)
    for name in SHAPES:
        expected = w["base"][name].astype(np.float64) + sum(
            0.5 * (w[k][name].astype(np.float64) - w["base"][name]) for k in ("ft0", "ft1", "ft2"))
        assert_within_tolerance(w["out"][name], expected, [w[k][name] for k in ("base", "ft0", "ft1", "ft2")], name)


def test_chat_template_auto_takes_the_most_common(tmp_path, models):
    """auto: the template most listed models carry (the base counts; named-template sets give
    their "default"); a recipe whose models carry none keeps the base's."""
    _with_tokenizer(models["base"], TEMPLATE_A)
    _with_tokenizer(models["ft0"], [{"name": "default", "template": TEMPLATE_B + "\n"}, {"name": "x", "template": "y"}])
    _with_tokenizer(models["ft1"], None, jinja=TEMPLATE_B)
    recipe = load_recipe(write_recipe(tmp_path, _ta_recipe(models, chat_template="auto")))
    assert recipe.chat_template == TEMPLATE_B
    (models["ft1"] / "chat_template.jinja").unlink()  # one each: the first, base-then-models order
    assert load_recipe(write_recipe(tmp_path, _ta_recipe(models, chat_template="auto"))).chat_template == TEMPLATE_A
    for k in ("ft0", "ft1"):
        (models[k] / "tokenizer_config.json").unlink(missing_ok=True)
        (models[k] / "chat_template.jinja").unlink(missing_ok=True)
    (models["base"] / "tokenizer_config.json").unlink()
    assert load_recipe(write_recipe(tmp_path, _ta_recipe(models, chat_template="auto"))).chat_template is None


def test_chat_template_auto_reads_cached_hub_ids(tmp_path, models, monkeypatch):
    """auto over Hub ids counts each id's cached snapshot (they were once skipped, so the base's
    template won where the models' was the most common); an id not in the cache is refused."""
    import shutil

    import huggingface_hub.constants
    from test_hub import COMMIT, _cache_repo

    copies = {k: Path(shutil.copytree(models[k], tmp_path / "src" / k)) for k in ("base", "ft0", "ft1", "ft2")}
    _with_tokenizer(copies["base"], TEMPLATE_A)
    for k in ("ft0", "ft1"):
        _with_tokenizer(copies[k], None, jinja=TEMPLATE_B)
    cache = tmp_path / "hub"
    for k, path in copies.items():
        _cache_repo(cache, f"org/{k}", path, COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    ids = {k: f"org/{k}" for k in copies}
    assert parse_recipe(_ta_recipe(ids, chat_template="auto"), "r.yaml").chat_template == TEMPLATE_B
    with pytest.raises(SpecError, match="org/absent.*local cache"):
        parse_recipe(_ta_recipe({**ids, "ft2": "org/absent"}, chat_template="auto"), "r.yaml")


@pytest.mark.parametrize("value, message", [
    ("chatml", "chat_template 'chatml' is not supported"),
    ("{{ short }}", "is not supported"),
    (3, "chat_template must be a string"),
])
def test_chat_template_refusals_name_the_key(models, value, message):
    with pytest.raises(SpecError, match=message):
        parse_recipe(_ta_recipe(models, chat_template=value), "r.yaml")


def test_chat_template_without_a_base_tokenizer_is_refused(tmp_path, models):
    result = CliRunner().invoke(main, ["merge", "--config", str(write_recipe(tmp_path, _ta_recipe(
        models, chat_template=TEMPLATE_A))), "-o", str(tmp_path / "out")])
    assert result.exit_code != 0 and "chat_template" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


# -- tokenizer_source -----------------------------------------------------------------------

VOCAB = {"<s>": 0, "a": 1, "b": 2, "c": 3, "d": 4}  # + one added token: 6 rows, as SHAPES has


def _with_vocabulary(path: Path, vocab: dict[str, int] | list, added: str = "<pad>") -> None:
    model = {"type": "BPE", "vocab": vocab, "merges": []} if isinstance(vocab, dict) else \
        {"type": "Unigram", "vocab": vocab}
    entry = {"id": 5, "content": added, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
             "special": True}
    (path / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": model, "added_tokens": [entry]}))


@pytest.mark.parametrize("value", ["base", "union", "BASE"])
def test_tokenizer_source_with_the_bases_vocabulary_is_the_plain_merge(tmp_path, models, value):
    """Every model carrying the base's vocabulary, one row per token: mergekit's permutation of
    the embedding and LM head rows is the identity, so the output is the merge without the key
    (checked against a float64 task-arithmetic reference) and the base's tokenizer."""
    for k in ("base", "ft0", "ft1", "ft2"):
        _with_vocabulary(models[k], VOCAB if k != "ft2" else [[t, 0.0] for t in VOCAB])  # Unigram: ids by index
    recipe = _ta_recipe(models, tokenizer_source=str(models["base"]) if value == "BASE" else value)
    merge_recipe(write_recipe(tmp_path, recipe), tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "tokenizer.json").read_text() == (models["base"] / "tokenizer.json").read_text()
    w = weights(models, out)
    for name in SHAPES:
        expected = w["base"][name].astype(np.float64) + sum(
            0.5 * (w[k][name].astype(np.float64) - w["base"][name]) for k in ("ft0", "ft1", "ft2"))
        assert_within_tolerance(w["out"][name], expected, [w[k][name] for k in ("base", "ft0", "ft1", "ft2")], name)


@pytest.mark.parametrize("case, message", [
    ("no tokenizer", "cannot read the tokenizer"),
    ("another model", "token 'e' has id 6, beyond the 6 rows"),
])
def test_tokenizer_source_refusals_name_the_key(tmp_path, models, case, message):
    """What mergekit would not do the same way (a tokenizer.json missing, a token past the
    embedding's rows) is a one-line error naming tokenizer_source, before anything is written.
    Changed vocabularies themselves are merged (tests/test_recipe_tokenizer.py)."""
    for k in ("base", "ft0", "ft1", "ft2"):
        _with_vocabulary(models[k], VOCAB)
    value = "union"
    if case == "no tokenizer":
        (models["base"] / "tokenizer.json").unlink()
    else:  # the tokenizer of a model with a token past its embedding's rows
        _with_vocabulary(models["ft0"], {**VOCAB, "e": 6})
        value = str(models["ft0"])
    path = write_recipe(tmp_path, _ta_recipe(models, tokenizer_source=value))
    result = CliRunner().invoke(main, ["merge", "--config", str(path), "-o", str(tmp_path / "out")])
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code != 0 and len(errors) == 1 and message in errors[0], result.output
    assert "tokenizer_source" in errors[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("block", [
    {"source": "base"},
    {},  # source defaults to union
    {"source": "union", "pad_to_multiple_of": 3, "tokens": {"<pad>": {"source": "BASE"}}},
])
def test_tokenizer_block_with_the_bases_vocabulary_is_the_plain_merge(tmp_path, models, block):
    """The tokenizer block under the same conditions: source as tokenizer_source, a
    pad_to_multiple_of the vocabulary's size (6) already meets, an unforced entry for an added
    token every model has (it only fills rows a model lacks): the plain merge."""
    for k in ("base", "ft0", "ft1", "ft2"):
        _with_vocabulary(models[k], VOCAB)
    for config in block.get("tokens", {}).values():
        config["source"] = str(models["base"])
    recipe = load_recipe(write_recipe(tmp_path, _ta_recipe(models, tokenizer=block)))
    # A tokens entry re-adds its token as a plain added token (transformers' add_tokens, as
    # mergekit calls it): <pad> is no longer special; the weights are unchanged.
    assert (recipe.vocabulary is None) == ("tokens" not in block)
    merge_recipe(write_recipe(tmp_path, _ta_recipe(models, tokenizer=block)), tmp_path / "out")
    w = weights(models, tmp_path / "out")
    for name in SHAPES:
        expected = w["base"][name].astype(np.float64) + sum(
            0.5 * (w[k][name].astype(np.float64) - w["base"][name]) for k in ("ft0", "ft1", "ft2"))
        assert_within_tolerance(w["out"][name], expected, [w[k][name] for k in ("base", "ft0", "ft1", "ft2")], name)


@pytest.mark.parametrize("extra, message", [
    ({"tokenizer": {"tokens": {"a": {"source": "base", "force": True}}}}, "'base' is not a model of this merge"),
    ({"tokenizer": {"pad_to_multiple_of": 0}}, "positive integer"),
    ({"tokenizer": {"source": "base", "vocab": 1}}, "key 'vocab' is not supported"),
    ({"tokenizer": {"source": "base"}, "tokenizer_source": "base"}, "not both"),
])
def test_tokenizer_block_refusals_name_the_key(models, extra, message):
    for k in ("base", "ft0", "ft1", "ft2"):
        _with_vocabulary(models[k], VOCAB)
    with pytest.raises(SpecError, match=message):
        parse_recipe(_ta_recipe(models, **extra), "r.yaml")


def test_tokenizer_source_a_model_of_the_bases_vocabulary_gives_its_tokenizer(tmp_path, models):
    """tokenizer_source naming a model with the base's vocabulary (an instruct model's special
    tokens and template, say): mergekit writes that model's tokenizer and the same weights. The
    output's tokenizer files are that model's, none of the base's left; a chat_template still
    applies on top."""
    for k in ("base", "ft0", "ft1", "ft2"):
        _with_vocabulary(models[k], VOCAB)
    (models["base"] / "tokenizer.model").write_bytes(b"base only")
    _with_tokenizer(models["base"], TEMPLATE_A)
    source = tmp_path / "instruct-tokenizer"  # a tokenizer alone, no weights
    source.mkdir()
    _with_vocabulary(source, VOCAB, added="<pad>")
    (source / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<pad>"}))
    _with_tokenizer(source, TEMPLATE_B)
    merge_recipe(write_recipe(tmp_path, _ta_recipe(models, tokenizer_source=str(source))), tmp_path / "out")
    out = tmp_path / "out"
    for name in ("tokenizer.json", "special_tokens_map.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    assert not (out / "tokenizer.model").exists()
    w = weights(models, out)
    for name in SHAPES:
        expected = w["base"][name].astype(np.float64) + sum(
            0.5 * (w[k][name].astype(np.float64) - w["base"][name]) for k in ("ft0", "ft1", "ft2"))
        assert_within_tolerance(w["out"][name], expected, [w[k][name] for k in ("base", "ft0", "ft1", "ft2")], name)
    merge_recipe(write_recipe(tmp_path, _ta_recipe(models, tokenizer_source=str(source), chat_template=TEMPLATE_A)),
                 tmp_path / "out2")
    assert json.loads((tmp_path / "out2" / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE_A
