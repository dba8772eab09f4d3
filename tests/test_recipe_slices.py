"""Recipes with ``slices`` (frankenmerges that stack or cut layer ranges, merges slice by slice)
and passthrough's ``scale``, each compared tensor by tensor with a float64 reference written
here from what mergekit 0.1.5 computes: output layers are the slices' layers renumbered from 0,
the embeddings come from the first slice's sources and the final norm and LM head from the
last slice's (at t = 0), gradients run across each slice, per-model filters see the source's
own layer number and merge-wide ones the output's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from safetensors import safe_open

from safeblend.cli import main
from safeblend.recipe import merge_recipe
from helpers import NUMPY_DTYPES, assert_within_tolerance, load_checkpoint, ref_slerp, write_checkpoint

LAYERS = 4
KINDS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj")
CHUNK = 100  # bytes: 50 bf16 elements, so chunks cut rows and every tensor spans several
TYPES = {"a": ["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
         "b": ["sliding_attention", "sliding_attention", "full_attention", "full_attention"],
         "c": ["full_attention"] * LAYERS}


def shapes(layers: int) -> dict[str, tuple[int, ...]]:
    out = {"model.embed_tokens.weight": (12, 16)}
    for i in range(layers):
        out.update({f"model.layers.{i}.{kind}.weight": (16, 16) for kind in KINDS})
        out[f"model.layers.{i}.input_layernorm.weight"] = (16,)
    out.update({"model.norm.weight": (16,), "lm_head.weight": (12, 16)})
    return out


def config(name: str, layers: int = LAYERS, **extra) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": layers,
            "hidden_size": 16, "vocab_size": 12, "torch_dtype": "bfloat16", "layer_types": TYPES[name], **extra}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Three bf16 Llama-shaped models of four layers; b is stored in three shards."""
    root = tmp_path_factory.mktemp("slices")
    rng = np.random.default_rng(15)
    paths = {}
    for name, shards in (("a", 1), ("b", 3), ("c", 1)):
        tensors = {n: rng.standard_normal(s).astype(NUMPY_DTYPES["bf16"]) for n, s in shapes(LAYERS).items()}
        paths[name] = write_checkpoint(root / name, tensors, shards=shards, config=config(name))
    return paths


@pytest.fixture(scope="module")
def stored(models) -> dict[str, dict[str, np.ndarray]]:
    return {k: load_checkpoint(v) for k, v in models.items()}


def run(tmp_path: Path, recipe: dict, **options) -> dict[str, np.ndarray]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    merge_recipe(path, tmp_path / "out", chunk_size=CHUNK, on_warning=lambda m: None, **options)
    return load_checkpoint(tmp_path / "out")


def source_name(name: str, layer: int) -> str:
    """``name`` (an output layer's tensor) as layer ``layer`` of a source names it."""
    parts = name.split(".")
    return ".".join([*parts[:2], str(layer), *parts[3:]])


def layer_map(slices: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Output layer k → (slice, index within the slice, slice length), in order."""
    return [(s, i, end - start) for s, (start, end) in enumerate(slices) for i in range(end - start)]


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)


def gradient(value, t: float) -> float:
    """mergekit's evaluate_setting for a number or a list of anchors."""
    if isinstance(value, (int, float)):
        return float(value)
    scaled = t * (len(value) - 1)
    i0 = int(scaled)
    i1 = min(len(value) - 1, i0 + 1)
    return (1 - (scaled - i0)) * value[i0] + (scaled - i0) * value[i1]


# -- frankenmerges ------------------------------------------------------------------------------

FRANKEN = [("a", 0, 3), ("a", 2, 4), ("b", 1, 4)]  # layer 2 of a twice; 3 + 2 + 3 = 8 layers


def franken_recipe(**extra) -> dict:
    return {"slices": [{"sources": [{"model": m, "layer_range": [a, b]}]} for m, a, b in FRANKEN],
            "merge_method": "passthrough", **extra}


def with_paths(recipe: dict, models: dict[str, Path]) -> dict:
    """The recipe with model names a, b, c replaced by the generated checkpoints' paths."""
    text = json.dumps(recipe)
    for name, path in models.items():
        text = text.replace(f'"model": "{name}"', f'"model": "{path}"').replace(f'"base_model": "{name}"',
                                                                                f'"base_model": "{path}"')
    return json.loads(text)


def test_frankenmerge_stacks_layer_ranges_byte_for_byte(tmp_path, models, stored):
    """examples/orcamini-platy-44layer.yml's shape, with a layer used twice: output layer k is
    its source layer's tensors renamed, the same bytes; embeddings from the first slice's model,
    final norm and LM head from the last slice's; config.json says 8 layers and gives each layer
    its source layer's type; the output is sharded with an index."""
    out = run(tmp_path, with_paths(franken_recipe(), models), shard_size="3KB")
    assert set(out) == set(shapes(8))
    k = 0
    for model, start, end in FRANKEN:
        for j in range(start, end):
            for name in shapes(1):
                if ".layers.0." in name:
                    ours, theirs = source_name(name, k), source_name(name, j)
                    assert np.array_equal(bits(out[ours]), bits(stored[model][theirs])), ours
            k += 1
    assert np.array_equal(bits(out["model.embed_tokens.weight"]), bits(stored["a"]["model.embed_tokens.weight"]))
    for name in ("model.norm.weight", "lm_head.weight"):
        assert np.array_equal(bits(out[name]), bits(stored["b"][name])), name
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["num_hidden_layers"] == 8
    assert written["layer_types"] == TYPES["a"][0:3] + TYPES["a"][2:4] + TYPES["b"][1:4]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(shapes(8)) and len(set(index["weight_map"].values())) > 1
    with safe_open(str(next((tmp_path / "out").glob("*.safetensors"))), "numpy") as f:
        recorded = json.loads(f.metadata()["safeblend_recipe"])
    assert recorded["slices"][2] == {"sources": [{"model": str(models["b"]), "layer_range": [1, 4]}]}


@pytest.mark.parametrize("recipe", ["frankenmerge", "conversion"])
def test_copies_by_design_are_not_reported_as_equal_to_the_base(tmp_path, models, recipe):
    """A frankenmerge (its "base" is a view of the slices' own tensors) and a one-model
    passthrough (a conversion) copy by design: no "changed nothing" warning, and
    ``output_equals_base`` says nothing (None) rather than a claim about a base."""
    data = franken_recipe() if recipe == "frankenmerge" else {
        "merge_method": "passthrough", "models": [{"model": "a"}], "dtype": "float32"}
    warnings: list[str] = []
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(with_paths(data, models), sort_keys=False))
    result = merge_recipe(path, tmp_path / "out", on_warning=warnings.append)
    assert not any("equals the base" in w for w in [*warnings, *result.warnings]), warnings
    assert result.output_equals_base is None


def test_one_slice_cuts_layers(tmp_path, models, stored):
    """One slice of fewer layers than the model has: the model cut to layers 1..2, renumbered."""
    out = run(tmp_path, with_paths({"slices": [{"sources": [{"model": "b", "layer_range": [1, 3]}]}],
                                    "merge_method": "passthrough"}, models))
    assert set(out) == set(shapes(2))
    for name in shapes(2):
        source = source_name(name, int(name.split(".")[2]) + 1) if ".layers." in name else name
        assert np.array_equal(bits(out[name]), bits(stored["b"][source])), name
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 2


def test_frankenmerge_config_from_base_model(tmp_path, models, stored):
    """With base_model, passthrough takes no tensor from it but the output's config.json (mergekit's
    _model_out_config), its layer count set."""
    recipe = with_paths(franken_recipe(base_model="c"), models)
    out = run(tmp_path, recipe)
    assert np.array_equal(bits(out["model.embed_tokens.weight"]), bits(stored["a"]["model.embed_tokens.weight"]))
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["num_hidden_layers"] == 8
    assert written["layer_types"] == TYPES["a"][0:3] + TYPES["a"][2:4] + TYPES["b"][1:4]


@pytest.mark.parametrize("merge_wide", [None, 0.75])
def test_frankenmerge_scale_per_slice_and_gradient(tmp_path, models, stored, merge_wide):
    """The duplicated layers' o_proj scaled to 0 (mergekit's trick for repeated layers), a
    gradient scale across the last slice, the first slice unscaled (copies) or scaled by a
    merge-wide scale: scale·θ rounded once."""
    scales = [None, [{"filter": "o_proj", "value": 0.0}, {"value": 1.0}], [0.5, 1.5]]
    recipe = franken_recipe(**({"parameters": {"scale": merge_wide}} if merge_wide is not None else {}))
    first = 1.0 if merge_wide is None else merge_wide
    for item, scale in zip(recipe["slices"], scales):
        if scale is not None:
            item["sources"][0]["parameters"] = {"scale": scale}
    out = run(tmp_path, with_paths(recipe, models))
    slices = [(a, b) for _, a, b in FRANKEN]
    for name in shapes(8):
        if ".layers." in name:
            k = int(name.split(".")[2])
            s, i, length = layer_map(slices)[k]
            model, start, _ = FRANKEN[s]
            t = i / (length - 1)
            scale = {0: first, 1: 0.0 if "o_proj" in name else 1.0, 2: gradient([0.5, 1.5], t)}[s]
            source = stored[model][source_name(name, start + i)]
        else:  # before the layers: slice 0's scale; after: slice 2's gradient at t = 0
            source = stored["a" if "embed" in name else "b"][name]
            scale = first if "embed" in name else 0.5
        reference = scale * source.astype(np.float64)
        if scale in (0.0, 1.0):
            assert np.array_equal(bits(out[name]), bits(reference.astype(source.dtype))), name
        assert_within_tolerance(out[name], reference, [source, reference], name)


def test_passthrough_scale_on_a_whole_model(tmp_path, models, stored):
    """mergekit's test_passthrough_scale: o_proj zeroed, everything else as stored (copies);
    scale 0.5 into fp32 is exact."""
    recipe = with_paths({"models": [{"model": "a", "parameters": {"scale": [{"filter": "o_proj", "value": 0},
                                                                              {"filter": "q_proj", "value": 0.5},
                                                                              {"value": 1}]}}],
                         "merge_method": "passthrough", "dtype": "float32"}, models)
    out = run(tmp_path, recipe)
    for name, source in stored["a"].items():
        scale = 0.0 if "o_proj" in name else 0.5 if "q_proj" in name else 1.0
        assert out[name].dtype == np.float32
        assert np.array_equal(out[name], scale * source.astype(np.float64)), name
    assert any("o_proj" in n for n in out)


# -- merges slice by slice ------------------------------------------------------------------------

def test_multi_slice_linear(tmp_path, models, stored):
    """Linear over two slices with different sources and offsets: per-source weights (a gradient
    running across its slice; a filter matching the *source's* layer number), merge-wide
    normalize; embeddings from slice 0's sources at t = 0, final norm and head from slice 1's."""
    recipe = with_paths({"slices": [
        {"sources": [{"model": "a", "layer_range": [0, 2], "parameters": {"weight": 0.3}},
                     {"model": "b", "layer_range": [2, 4], "parameters": {"weight": 0.7}}]},
        {"sources": [{"model": "b", "layer_range": [0, 3], "parameters": {"weight": [0.2, 1.0]}},
                     {"model": "c", "layer_range": [1, 4],
                      "parameters": {"weight": [{"filter": "layers.2.", "value": 3.0}, {"value": 1.0}]}}]}],
        "merge_method": "linear", "parameters": {"normalize": True}, "dtype": "float32"}, models)
    out = run(tmp_path, recipe)
    slices = [[("a", 0, lambda t, n: 0.3), ("b", 2, lambda t, n: 0.7)],
              [("b", 0, lambda t, n: gradient([0.2, 1.0], t)),
               ("c", 1, lambda t, n: 3.0 if "layers.2." in n else 1.0)]]
    assert set(out) == set(shapes(5))
    for name in shapes(5):
        if ".layers." in name:
            s, i, length = layer_map([(0, 2), (0, 3)])[int(name.split(".")[2])]
            t = i / (length - 1)
            terms = [(w(t, source_name(name, start + i)), stored[m][source_name(name, start + i)])
                     for m, start, w in slices[s]]
        else:
            s = 0 if "embed" in name else 1
            terms = [(w(0.0, name), stored[m][name]) for m, _, w in slices[s]]
        reference = sum(w * x.astype(np.float64) for w, x in terms) / sum(w for w, _ in terms)
        assert_within_tolerance(out[name], reference, [x for _, x in terms], name)




def test_multi_slice_slerp(tmp_path, models, stored):
    """examples/gradient-slerp.yml in two slices: the base a in both, b then c at other offsets;
    t per slice (a merge-wide filter matching the *output's* layer number), a gradient across
    slice 1."""
    recipe = with_paths({"slices": [
        {"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [1, 3]}],
         "parameters": {"t": 0.3}},
        {"sources": [{"model": "c", "layer_range": [1, 4]}, {"model": "a", "layer_range": [0, 3]}],
         "parameters": {"t": [{"filter": "layers.3.", "value": 0.9}, {"value": [0.0, 1.0]}]}}],
        "merge_method": "slerp", "base_model": "a", "dtype": "bfloat16"}, models)
    out = run(tmp_path, recipe)
    for name in shapes(5):
        if ".layers." in name:
            k = int(name.split(".")[2])
            s, i, length = layer_map([(0, 2), (0, 3)])[k]
            base = stored["a"][source_name(name, i)]  # a starts at 0 in both slices
            other = stored["b"][source_name(name, 1 + i)] if s == 0 else stored["c"][source_name(name, 1 + i)]
            t = 0.3 if s == 0 else 0.9 if k == 3 else gradient([0.0, 1.0], i / (length - 1))
        else:
            base, other = stored["a"][name], stored["b" if "embed" in name else "c"][name]
            t = 0.3 if "embed" in name else 0.0
        reference = ref_slerp(base.astype(np.float64), other.astype(np.float64), t)
        assert_within_tolerance(out[name], reference, [base, other], name)


def test_merge_wide_gradient_runs_across_each_slice(tmp_path, models, stored):
    """A merge-wide gradient is read at each layer's place in its own slice (mergekit's t per
    slice), not across the whole output: t = [0.2, 0.8] gives 0.2, 0.8, 0.2, 0.8."""
    recipe = with_paths({"slices": [
        {"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 2]}]},
        {"sources": [{"model": "a", "layer_range": [2, 4]}, {"model": "b", "layer_range": [2, 4]}]}],
        "merge_method": "slerp", "base_model": "a", "parameters": {"t": [0.2, 0.8]}, "dtype": "float32"}, models)
    out = run(tmp_path, recipe)
    for name in shapes(LAYERS):
        t = (0.2, 0.8)[int(name.split(".")[2]) % 2] if ".layers." in name else 0.2
        base, other = stored["a"][name], stored["b"][name]
        reference = ref_slerp(base.astype(np.float64), other.astype(np.float64), t)
        assert_within_tolerance(out[name], reference, [base, other], name)


# -- transformers loads a frankenmerge ------------------------------------------------------------

def test_transformers_loads_a_frankenmerge(tmp_path):
    """A tiny LlamaForCausalLM's layers stacked [0, 2] + [1, 3]: transformers loads 4 layers,
    output layer 2 is source layer 1, and the logits are those of the stacked modules."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    source = transformers.LlamaForCausalLM(cfg).eval()
    source.save_pretrained(tmp_path / "src")
    recipe = {"slices": [{"sources": [{"model": str(tmp_path / "src"), "layer_range": [0, 2]}]},
                         {"sources": [{"model": str(tmp_path / "src"), "layer_range": [1, 3]}]}],
              "merge_method": "passthrough"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    merge_recipe(tmp_path / "r.yaml", tmp_path / "out", on_warning=lambda m: None)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert merged.config.num_hidden_layers == 4 and len(merged.model.layers) == 4
    assert torch.equal(merged.model.layers[2].mlp.up_proj.weight, source.model.layers[1].mlp.up_proj.weight)
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        hidden = source.model.embed_tokens(ids)
        position_ids = torch.arange(ids.shape[1])[None]
        rotary = source.model.rotary_emb(hidden, position_ids)
        mask = torch.full((4, 4), float("-inf")).triu(1)[None, None]
        for j in (0, 1, 1, 2):
            out = source.model.layers[j](hidden, attention_mask=mask, position_ids=position_ids,
                                         position_embeddings=rotary)
            hidden = out[0] if isinstance(out, tuple) else out
        expected = source.lm_head(source.model.norm(hidden))
        got = merged(ids).logits
    assert torch.allclose(got, expected, atol=1e-5)


# -- refusals -------------------------------------------------------------------------------------

def run_cli(tmp_path: Path, recipe: dict):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return CliRunner().invoke(main, ["merge", "--config", str(path), "-o", str(tmp_path / "out")])


def slice_of(model: str, a: int, b: int, **params) -> dict:
    return {"model": model, "layer_range": [a, b], **({"parameters": params} if params else {})}


@pytest.mark.parametrize("recipe,fragments", [
    ({"slices": [{"sources": [slice_of("a", 0, 2)]}, {"sources": [slice_of("b", 2, 5)]}],
      "merge_method": "passthrough"}, ["slices[1].sources[0]", "layer_range [2, 5] is not within", "4 layers"]),
    ({"slices": [{"sources": [slice_of("a", 3, 1)]}, {"sources": [slice_of("b", 0, 2)]}],
      "merge_method": "passthrough"}, ["slices[0].sources[0]", "layer_range [3, 1]"]),
    ({"slices": [{"sources": [slice_of("a", 0, 2)]}, {"sources": [slice_of("b", -1, 2)]}],
      "merge_method": "passthrough"}, ["slices[1].sources[0]", "layer_range [-1, 2]"]),
    ({"slices": [{"sources": [slice_of("a", 0, 2, weight=1), slice_of("b", 0, 3, weight=1)]},
                 {"sources": [slice_of("a", 2, 4, weight=1), slice_of("b", 2, 4, weight=1)]}],
      "merge_method": "linear"}, ["slices[0].sources[1]", "spans 3 layers", "spans 2"]),
    ({"slices": [{"sources": [slice_of("a", 0, 2)], "residual_weight": 0.5}, {"sources": [slice_of("b", 0, 2)]}],
      "merge_method": "passthrough"}, ["slices[0]", "key 'residual_weight' is not supported"]),
    ({"slices": [{"sources": [slice_of("a", 0, 2)], "base_model": "a"}, {"sources": [slice_of("b", 0, 2)]}],
      "merge_method": "passthrough"}, ["slices[0]", "key 'base_model' is not supported"]),
    ({"slices": [{"sources": [{**slice_of("a", 0, 2), "weights": 1}]}, {"sources": [slice_of("b", 0, 2)]}],
      "merge_method": "passthrough"}, ["slices[0].sources[0]", "key 'weights' is not supported"]),
    ({"slices": [{"sources": [slice_of("a", 0, 2), slice_of("b", 0, 2)]}, {"sources": [slice_of("b", 2, 4)]}],
      "merge_method": "passthrough"}, ["slices[0]", "passthrough takes exactly one source per slice"]),
    ({"slices": [{"sources": [slice_of("a", 0, 2, weight=1), slice_of("b", 0, 2, weight=1)]},
                 {"sources": [slice_of("c", 2, 4, weight=1)]}],
      "merge_method": "linear"}, ["slices[1]", "1 sources where slices[0] has 2"]),
    ({"slices": [{"sources": [slice_of("a", 0, 2), slice_of("b", 0, 2)]},
                 {"sources": [slice_of("c", 2, 4), slice_of("b", 2, 4)]}],
      "merge_method": "slerp", "base_model": "a", "parameters": {"t": 0.5}},
     ["slices[1]", "do not include base_model"]),
    ({"slices": [{"sources": [slice_of("a", 0, 2, scale="x")]}, {"sources": [slice_of("b", 0, 2)]}],
      "merge_method": "passthrough"}, ["scale", "expected a number"]),
    ({"slices": [{"sources": [slice_of("a", 0, 2, weight=1)]}, {"sources": [slice_of("b", 0, 2)]}],
      "merge_method": "passthrough"}, ["parameter 'weight' is not supported per model by passthrough"]),
    ({"slices": [{"sources": [slice_of("a", 0, 2), slice_of("a", 1, 3)]}, {"sources": [slice_of("b", 0, 2)]}],
      "merge_method": "passthrough"}, ["slices[0].sources[1]", "listed twice in one slice"]),
    ({"slices": [{"sources": [slice_of("a", 0, 2), slice_of("b", 0, 2, weight=1)], "parameters": {"seed": 1}},
                 {"sources": [slice_of("a", 2, 4), slice_of("b", 2, 4, weight=1)], "parameters": {"seed": 3}}],
      "merge_method": "dare_linear", "base_model": "a", "parameters": {"density": 0.5}},
     ["parameter 'seed' must be one value for the whole merge"]),
])
def test_bad_slices_are_one_line_errors(tmp_path, models, recipe, fragments):
    result = run_cli(tmp_path, with_paths(recipe, models))
    assert result.exit_code in (1, 2), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in errors[0], result.output
    assert not (tmp_path / "out").exists()


def test_unknown_layer_naming_and_per_layer_config_lists_are_refused(tmp_path):
    """layer_range on a model whose layers safeblend cannot identify (GPT-2's h.N), and on one
    whose config lists something per layer that safeblend cannot rebuild: refused, naming it."""
    rng = np.random.default_rng(0)
    gpt2 = {f"transformer.h.{i}.mlp.c_fc.weight": rng.standard_normal((4, 4)).astype(np.float32) for i in range(2)}
    write_checkpoint(tmp_path / "gpt2", gpt2, config={"model_type": "gpt2", "n_layer": 2})
    odd = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes(2).items()}
    write_checkpoint(tmp_path / "odd", odd, config={"num_hidden_layers": 2, "no_rope_layers": [1, 0]})
    for name, fragments in (("gpt2", ["layer_range", "transformer.h.0.mlp.c_fc.weight"]),
                            ("odd", ["layer_range", "'no_rope_layers' per layer"])):
        recipe = {"slices": [{"sources": [slice_of(str(tmp_path / name), 0, 1)]},
                             {"sources": [slice_of(str(tmp_path / name), 0, 2)]}], "merge_method": "passthrough"}
        (tmp_path / f"run-{name}").mkdir()
        result = run_cli(tmp_path / f"run-{name}", recipe)
        errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
        assert result.exit_code in (1, 2) and len(errors) == 1, result.output
        assert all(f in errors[0] for f in fragments), result.output
        assert not (tmp_path / f"run-{name}" / "out").exists()
