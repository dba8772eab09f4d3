"""Recipes whose vocabulary changes: mergekit's ``tokenizer_source`` and ``tokenizer:`` block.

The references here are written from mergekit 0.1.5's rules (mergekit/tokenizer/build.py and
embed.py), in float64, with the output vocabulary built by transformers' own tokenizer API
the way mergekit builds it (models visited by token id: mergekit's hash-map order is not
reproducible, safeblend fixes it):

* union: the base's tokenizer plus, as added tokens, every other model's plain tokens the base
  lacks, then every model's added tokens (the first model's settings win); the ``tokens:``
  block's keys are then added as plain tokens;
* model m's row for token t: its own (unless t is forced), else t's default: the tokens
  entry's source, or the one model that has t, or the base's row, or the mean over the models
  that have it, or zero; rows pad_to_multiple_of adds are the mean of m's rows;
* then the merge method runs on those tensors as on any other.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from safeblend.cli import main
from safeblend.recipe import merge_recipe
from helpers import assert_within_tolerance, load_checkpoint, random_tensor, ref_slerp, write_checkpoint

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

HIDDEN = 8
EMBEDS = ("model.embed_tokens.weight", "lm_head.weight")
CHUNK = 44  # 11 fp32 elements: chunks cut rows of 8
# Each model's plain vocabulary in id order, and its added tokens (content, special).
VOCABS = {
    "base": (["<unk>", *(f"w{i}" for i in range(14))], [("<s>", True)]),
    "ft1": (["<unk>", "x1", *(f"w{i}" for i in range(9, -1, -1)), "x0", "x2", "x3"], [("<s>", True), ("<im>", True)]),
    "ft2": (["<unk>", *(f"w{i}" for i in range(5, 14)), "x2", "x3", "x4", "x5", "y0", "y1"], [("<s>", True)]),
}
PADDING = {"base": 0, "ft1": 2, "ft2": 0}  # ft1's embedding has two rows past its tokens


def llama_config(vocab_size: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
            "intermediate_size": 16, "num_attention_heads": 2, "num_key_value_heads": 2, "num_hidden_layers": 1,
            "vocab_size": vocab_size, "tie_word_embeddings": False, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 64, "torch_dtype": "float32"}


def save_tokenizer(directory: Path, plain: list[str], added: list[tuple[str, bool]]) -> int:
    """A WordLevel tokenizer saved by transformers; returns its vocabulary size."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    backend = Tokenizer(WordLevel({t: i for i, t in enumerate(plain)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    backend.add_tokens([AddedToken(t, special=s, normalized=not s) for t, s in added])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>")
    fast.save_pretrained(directory)
    # transformers 4 (mergekit's) also lists the added tokens in tokenizer_config.json.
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {
        str(e["id"]): {k: e[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for e in json.loads(backend.to_str())["added_tokens"]}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return len(fast.get_vocab())


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab")
    rng = np.random.default_rng(1505)
    shapes = {"model.layers.0.self_attn.q_proj.weight": (HIDDEN, HIDDEN), "model.norm.weight": (HIDDEN,),
              "model.layers.0.self_attn.k_proj.weight": (HIDDEN, HIDDEN),
              "model.layers.0.self_attn.v_proj.weight": (HIDDEN, HIDDEN),
              "model.layers.0.self_attn.o_proj.weight": (HIDDEN, HIDDEN),
              "model.layers.0.mlp.gate_proj.weight": (16, HIDDEN), "model.layers.0.mlp.up_proj.weight": (16, HIDDEN),
              "model.layers.0.mlp.down_proj.weight": (HIDDEN, 16),
              "model.layers.0.input_layernorm.weight": (HIDDEN,),
              "model.layers.0.post_attention_layernorm.weight": (HIDDEN,)}
    base = {n: random_tensor(rng, s, "fp32") for n, s in shapes.items()}
    paths = {}
    for name, (plain, added) in VOCABS.items():
        directory = root / name
        directory.mkdir()
        rows = save_tokenizer(directory, plain, added) + PADDING[name]
        tensors = {n: (t + 0.3 * rng.standard_normal(t.shape)).astype(np.float32) if name != "base" else t
                   for n, t in base.items()}
        tensors.update({e: random_tensor(rng, (rows, HIDDEN), "fp32") for e in EMBEDS})
        paths[name] = write_checkpoint(directory, tensors, config=llama_config(rows))
    return paths


@pytest.fixture(scope="module")
def tensors(models) -> dict[str, dict[str, np.ndarray]]:
    return {k: {n: t.astype(np.float64) for n, t in load_checkpoint(v).items()} for k, v in models.items()}


# -- mergekit's rules, written out -------------------------------------------------------------


def reference_vocabulary(models: dict[str, Path], names: list[str], source: str = "union",
                         add: tuple[str, ...] = ()) -> dict[str, int]:
    """The output vocabulary as mergekit builds it, with transformers' tokenizers."""
    auto = transformers.AutoTokenizer.from_pretrained
    base = auto(models[names[0]])
    if source == "union":
        out = auto(models[names[0]])
        plain, added = {}, {}
        for name in names:
            tok = auto(models[name])
            own_added = {info.content for info in tok.added_tokens_decoder.values()}
            for token, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
                if token not in own_added:
                    plain.setdefault(token)
            for _, info in sorted(tok.added_tokens_decoder.items()):
                added.setdefault(info.content, info)
        for token in plain:
            if token not in added and token not in base.get_vocab():
                out.add_tokens(token)
        for info in added.values():
            out.add_tokens(info)
    else:
        out = auto(models[source]) if source in models else base
    for token in add:
        out.add_tokens(token)
    return out.get_vocab()


def permuted(tensors, vocab: dict[str, int], names: list[str], embed: str, has_base: bool = True,
             rules: dict | None = None, pad: int | None = None) -> dict[str, np.ndarray]:
    """Each model's rows for the output vocabulary (mergekit's PermutedEmbeddings), float64."""
    rules = rules or {}
    own = {n: {t: i for t, i in reference_vocabulary_cache[n].items()} for n in names}
    size = len(vocab)
    rows = size if not pad or size % pad == 0 else (size // pad + 1) * pad
    defaults = {}
    for token, i in vocab.items():
        present = [n for n in names if token in own[n]]
        rule = rules.get(token)
        if rule is None:
            if len(present) == len(names):
                continue
            if len(present) == 1:
                defaults[token] = tensors[present[0]][embed][own[present[0]][token]]
            elif not present:
                defaults[token] = np.zeros(HIDDEN)
            elif has_base and names[0] in present:
                defaults[token] = tensors[names[0]][embed][own[names[0]][token]]
            else:
                defaults[token] = np.mean([tensors[n][embed][own[n][token]] for n in present], axis=0)
        elif rule["source"] == "zero":
            defaults[token] = np.zeros(HIDDEN)
        else:
            model, source_token = rule["source"]
            defaults[token] = tensors[model][embed][own[model][source_token]]
    result = {}
    for n in names:
        matrix = np.zeros((rows, HIDDEN))
        for token, i in vocab.items():
            forced = rules.get(token, {}).get("force", False)
            matrix[i] = tensors[n][embed][own[n][token]] if token in own[n] and not forced else defaults[token]
        matrix[size:] = matrix[:size].mean(axis=0)
        result[n] = matrix
    return result


reference_vocabulary_cache: dict[str, dict[str, int]] = {}


@pytest.fixture(scope="module", autouse=True)
def _own_vocabularies(models):
    for name, path in models.items():
        reference_vocabulary_cache[name] = transformers.AutoTokenizer.from_pretrained(path).get_vocab()




def ref_ties(base: np.ndarray, models: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """mergekit's TIES at density 1 (nothing trimmed): sign election by the summed weighted
    deltas, the agreeing ones summed and divided by their weights (normalize)."""
    deltas = np.stack([w * (m - base) for m, w in zip(models, weights)])
    majority = np.where(deltas.sum(axis=0) >= 0, 1.0, -1.0)
    mask = np.sign(deltas) == majority
    divisor = (np.array(weights).reshape(-1, *([1] * base.ndim)) * mask).sum(axis=0)
    divisor = np.where(np.abs(divisor) < 1e-8, 1.0, divisor)
    return base + (deltas * mask).sum(axis=0) / divisor


def run(tmp_path: Path, recipe: dict, warnings: list[str] | None = None) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    sink = warnings if warnings is not None else []
    merge_recipe(path, tmp_path / "out", chunk_size=CHUNK, on_warning=sink.append)
    return tmp_path / "out"


def check_vocabulary(out: Path, vocab: dict[str, int], rows: int) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.get_vocab() == vocab
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows
    model = transformers.LlamaForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == rows
    ids = tok("w3 x4 <im> y1", return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == [vocab["w3"], vocab["x4"], vocab["<im>"], vocab["y1"]]
    assert model(ids).logits.shape == (1, 4, rows)


def load_names() -> list[str]:
    return ["model.layers.0.self_attn.q_proj.weight", "model.norm.weight", "model.layers.0.mlp.down_proj.weight"]


# -- the tests ---------------------------------------------------------------------------------


def test_union_with_linear(tmp_path, models, tensors):
    """Three vocabularies (ids reordered, tokens only some models have, an embedding with
    padding rows): the union tokenizer, and each embedding the weighted mean of the models'
    permuted rows; the output loads in transformers with the union's ids."""
    names = ["base", "ft1", "ft2"]
    weights = {"base": 0.5, "ft1": 0.3, "ft2": 0.2}
    out = run(tmp_path, {"merge_method": "linear", "base_model": str(models["base"]),
                         "models": [{"model": str(models[n]), "parameters": {"weight": weights[n]}} for n in names],
                         "tokenizer_source": "union"})
    vocab = reference_vocabulary(models, names)
    assert len(vocab) == 25
    check_vocabulary(out, vocab, len(vocab))
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.added_tokens_decoder[vocab["<im>"]].special and not tok.added_tokens_decoder[vocab["x4"]].special
    decoder = json.loads((out / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert {int(i) for i in decoder} == {i for t, i in vocab.items() if i >= 15 or t == "<unk>"}  # each added one
    w = load_checkpoint(out)
    for embed in EMBEDS:
        rows = permuted(tensors, vocab, names, embed)
        expected = sum(weights[n] * rows[n] for n in names) / sum(weights.values())
        assert_within_tolerance(w[embed], expected, [rows[n] for n in names], embed)
    for name in load_names():
        expected = sum(weights[n] * tensors[n][name] for n in names) / sum(weights.values())
        assert_within_tolerance(w[name], expected, [tensors[n][name] for n in names], name)


def test_union_with_slerp(tmp_path, models, tensors):
    """slerp's whole-tensor norms see the permuted rows (ft1's padding rows cut, its missing
    tokens the base's rows)."""
    out = run(tmp_path, {"merge_method": "slerp", "base_model": str(models["base"]),
                         "models": [{"model": str(models["base"])}, {"model": str(models["ft1"])}],
                         "parameters": {"t": 0.3}, "tokenizer_source": "union"})
    names = ["base", "ft1"]
    vocab = reference_vocabulary(models, names)
    w = load_checkpoint(out)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(vocab) == 21
    for embed in EMBEDS:
        rows = permuted(tensors, vocab, names, embed)
        assert_within_tolerance(w[embed], ref_slerp(rows["base"], rows["ft1"], 0.3), list(rows.values()), embed)


def test_union_with_ties(tmp_path, models, tensors):
    """TIES over two fine-tunes: the sign election sees the permuted rows; tokens both have
    and the base lacks (x2, x3) get, in the base, the mean of their rows."""
    names = ["base", "ft1", "ft2"]
    out = run(tmp_path, {"merge_method": "ties", "base_model": str(models["base"]),
                         "models": [{"model": str(models["ft1"]), "parameters": {"weight": 0.7, "density": 1.0}},
                                    {"model": str(models["ft2"]), "parameters": {"weight": 0.4, "density": 1.0}}],
                         "tokenizer_source": "union"})
    vocab = reference_vocabulary(models, names)
    w = load_checkpoint(out)
    for embed in EMBEDS:
        rows = permuted(tensors, vocab, names, embed)
        expected = ref_ties(rows["base"], [rows["ft1"], rows["ft2"]], [0.7, 0.4])
        assert_within_tolerance(w[embed], expected, list(rows.values()), embed)
        own = reference_vocabulary_cache
        x2_rows = [tensors[n][embed][own[n]["x2"]] for n in ("ft1", "ft2")]
        np.testing.assert_allclose(rows["base"][vocab["x2"]], (x2_rows[0] + x2_rows[1]) / 2)


def test_linear_without_base_model_averages_shared_tokens(tmp_path, models, tensors):
    """Without base_model no model is preferred: a token two models have is, in the third,
    the mean of their rows (w0..w4 in ft2: base's and ft1's)."""
    names = ["base", "ft1", "ft2"]
    out = run(tmp_path, {"merge_method": "linear", "tokenizer_source": "union",
                         "models": [{"model": str(models[n]), "parameters": {"weight": 1.0}} for n in names]})
    vocab = reference_vocabulary(models, names)
    w = load_checkpoint(out)
    for embed in EMBEDS:
        rows = permuted(tensors, vocab, names, embed, has_base=False)
        assert_within_tolerance(w[embed], sum(rows.values()) / 3, list(rows.values()), embed)


def test_forced_tokens_and_pad_to_multiple_of(tmp_path, models, tensors):
    """A forced token takes its source's row in every model; a new token (added by the block)
    takes its source; pad_to_multiple_of adds rows, each the mean of that model's rows."""
    names = ["base", "ft1"]
    block = {"source": "union", "pad_to_multiple_of": 8, "tokens": {
        "w3": {"source": str(models["ft1"]), "force": True},
        "<new>": {"source": {"kind": "model_token", "model": str(models["base"]), "token": "w7"}},
        "x0": {"source": {"kind": "zero"}, "force": True}}}
    out = run(tmp_path, {"merge_method": "linear", "base_model": str(models["base"]),
                         "models": [{"model": str(models["base"]), "parameters": {"weight": 0.6}},
                                    {"model": str(models["ft1"]), "parameters": {"weight": 0.4}}],
                         "tokenizer": block})
    vocab = reference_vocabulary(models, names, add=("w3", "<new>", "x0"))
    assert len(vocab) == 22
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.get_vocab() == vocab
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 24
    rules = {"w3": {"source": ("ft1", "w3"), "force": True}, "<new>": {"source": ("base", "w7")},
             "x0": {"source": "zero", "force": True}}
    w = load_checkpoint(out)
    for embed in EMBEDS:
        rows = permuted(tensors, vocab, names, embed, rules=rules, pad=8)
        assert_within_tolerance(w[embed], 0.6 * rows["base"] + 0.4 * rows["ft1"], list(rows.values()), embed)
        assert np.all(w[embed][vocab["x0"]] == 0)


def test_tokenizer_source_another_models_vocabulary(tmp_path, models, tensors):
    """tokenizer_source naming ft2: its tokenizer files and vocabulary; tokens ft2 has and the
    base lacks take ft2's row in the base."""
    names = ["base", "ft2"]
    out = run(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(models["base"]),
                         "models": [{"model": str(models["ft2"]), "parameters": {"weight": 0.5}}],
                         "tokenizer_source": str(models["ft2"])})
    vocab = reference_vocabulary(models, names, source="ft2")
    assert transformers.AutoTokenizer.from_pretrained(out).get_vocab() == vocab
    assert (out / "tokenizer.json").read_text() != (models["base"] / "tokenizer.json").read_text()
    w = load_checkpoint(out)
    for embed in EMBEDS:
        rows = permuted(tensors, vocab, names, embed)
        expected = rows["base"] + 0.5 * (rows["ft2"] - rows["base"])
        assert_within_tolerance(w[embed], expected, list(rows.values()), embed)


def test_tokenizer_source_base_cuts_other_vocabularies(tmp_path, models, tensors):
    """tokenizer_source: base keeps the base's 16 tokens; ft1's rows are reordered to them
    and its own tokens dropped."""
    names = ["base", "ft1"]
    out = run(tmp_path, {"merge_method": "linear", "base_model": str(models["base"]),
                         "models": [{"model": str(models[n]), "parameters": {"weight": 0.5}} for n in names],
                         "tokenizer_source": "base"})
    vocab = reference_vocabulary(models, names, source="base")
    assert len(vocab) == 16
    assert (out / "tokenizer.json").read_text() == (models["base"] / "tokenizer.json").read_text()
    w = load_checkpoint(out)
    for embed in EMBEDS:
        rows = permuted(tensors, vocab, names, embed)
        assert_within_tolerance(w[embed], (rows["base"] + rows["ft1"]) / 2, list(rows.values()), embed)


@pytest.mark.parametrize("extra, message", [
    ({"tokenizer": {"tokens": {"w1": {"force": True}}}}, "tokens['w1'].source: expected a model path"),
    ({"tokenizer": {"tokens": {"w1": {"source": "nowhere"}}}}, "'nowhere' is not a model of this merge"),
    ({"tokenizer": {"tokens": {"zz": {"source": "FT1"}}}}, "has no token 'zz'"),
    ({"tokenizer": {"tokens": {"w1": {"source": {"kind": "model_token", "model": "BASE", "token_id": 99}}}}},
     "token_id 99 is not a row"),
    ({"tokenizer": {"tokens": {"w1": {"source": "BASE", "force": "yes"}}}}, "force: expected true or false"),
    ({"tokenizer": {"tokens": {"w1": {"source": {"kind": "model_token", "model": "BASE"}}}}},
     "give one of token and token_id"),
    ({"tokenizer_source": "BROKEN"}, "tokenizer model type 'Wibble'"),
])
def test_bad_tokenizer_settings_are_one_line_errors(tmp_path, models, extra, message):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text(json.dumps({"model": {"type": "Wibble", "vocab": {}}, "added_tokens": []}))
    text = yaml.safe_dump({"merge_method": "linear", "base_model": str(models["base"]),
                           "models": [{"model": str(models["base"]), "parameters": {"weight": 0.5}},
                                      {"model": str(models["ft1"]), "parameters": {"weight": 0.5}}], **extra})
    text = text.replace("BASE", str(models["base"])).replace("FT1", str(models["ft1"])).replace("BROKEN", str(broken))
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    result = CliRunner().invoke(main, ["merge", "--config", str(path), "-o", str(tmp_path / "out")])
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code != 0 and len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def _tied_copy(source: Path, target: Path, tie: bool) -> Path:
    """``source`` with its LM head tied to the embedding (not stored) when ``tie``."""
    import shutil

    shutil.copytree(source, target)
    weights = load_checkpoint(source)
    if tie:
        del weights["lm_head.weight"]
    write_checkpoint(target, weights)
    config = json.loads((source / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": tie}))
    return target


def test_tied_heads_follow_the_permuted_embedding(tmp_path, models, tensors):
    """Every model ties its LM head: only the embedding is permuted and merged; the output
    stays tied and loads with the union's vocabulary."""
    names = ["base", "ft1"]
    tied = {n: _tied_copy(models[n], tmp_path / f"tied-{n}", tie=True) for n in names}
    out = run(tmp_path, {"merge_method": "linear", "base_model": str(tied["base"]),
                         "models": [{"model": str(tied[n]), "parameters": {"weight": 0.5}} for n in names],
                         "tokenizer_source": "union"})
    vocab = reference_vocabulary(models, names)
    w = load_checkpoint(out)
    assert "lm_head.weight" not in w
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    embed = EMBEDS[0]
    rows = permuted(tensors, vocab, names, embed)
    assert_within_tolerance(w[embed], (rows["base"] + rows["ft1"]) / 2, list(rows.values()), embed)
    model = transformers.LlamaForCausalLM.from_pretrained(out)
    assert model.get_output_embeddings().weight.shape == (len(vocab), HIDDEN)


def test_a_head_tied_in_some_models_only_is_refused(tmp_path, models):
    """mergekit would read the tied model's embedding as its head; safeblend refuses the mix
    with a changed vocabulary rather than give other default rows."""
    tied = _tied_copy(models["ft1"], tmp_path / "tied-ft1", tie=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "base_model": str(models["base"]),
                                    "models": [{"model": str(models["base"]), "parameters": {"weight": 0.5}},
                                               {"model": str(tied), "parameters": {"weight": 0.5}}],
                                    "tokenizer_source": "union"}))
    result = CliRunner().invoke(main, ["merge", "--config", str(path), "-o", str(tmp_path / "out")])
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code != 0 and len(errors) == 1 and "tied in some models only" in errors[0], result.output
    assert not (tmp_path / "out").exists()


def test_views_gather_only_the_rows_a_chunk_covers(tmp_path, models, tensors):
    """A view of the permuted tensor (what every executor reads, the GPU's through
    byte_view) holds the rows its range covers: its thread's buffer grows to the largest
    range asked for plus two rows, never to a whole embedding."""
    from safeblend.checkpoint import Checkpoint
    from safeblend.recipe import load_recipe

    names = ["base", "ft1", "ft2"]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "base_model": str(models["base"]),
                                    "models": [{"model": str(models[n]), "parameters": {"weight": 1.0}}
                                               for n in names], "tokenizer": {"pad_to_multiple_of": 16}}))
    plan = load_recipe(path).vocabulary
    ckpts = [Checkpoint.open(models[n]) for n in names]
    try:
        base, others_ = plan.wrap(ckpts[0], ckpts[1:])
        vocab = reference_vocabulary(models, names)
        embed = EMBEDS[0]
        expected = permuted(tensors, vocab, names, embed, pad=16)["ft1"].reshape(-1)
        info = others_[0].tensors[embed]
        assert info.shape == (32, HIDDEN)
        f = next(f for f in others_[0].files if f.path == info.file)
        largest = 0
        for first, count in [(0, 11), (HIDDEN * 3 + 5, 11), (HIDDEN * 20 - 3, 40), (HIDDEN * 31, HIDDEN)]:
            values = f.view(info, first, count)
            largest = max(largest, count)
            assert values.base is not None and values.base.size <= largest + 2 * HIDDEN
            np.testing.assert_allclose(values, expected[first : first + count], rtol=1e-6, atol=1e-6)
            start, length = info.byte_range(first, count)
            assert bytes(f.byte_view(start, length)) == values.tobytes()
    finally:
        for ckpt in ckpts:
            ckpt.close()


@pytest.mark.parametrize("kind", ["BPE", "Unigram"])
def test_union_rewrites_bpe_and_unigram_tokenizers(tmp_path, kind):
    """The union's tokenizer.json for the other model types safeblend rewrites: transformers
    loads it with the vocabulary mergekit builds, and it encodes the added tokens."""
    from tokenizers import Tokenizer
    from tokenizers.models import BPE, Unigram
    from tokenizers.pre_tokenizers import Whitespace

    pieces = {"base": ["<unk>", "a", "b", "c", "ab"], "ft": ["<unk>", "c", "d", "a", "cd", "dd"]}
    rng = np.random.default_rng(7)
    paths = {}
    for name, tokens in pieces.items():
        if kind == "BPE":
            merges = [tuple(t) for t in tokens if len(t) == 2]
            model = BPE({t: i for i, t in enumerate(tokens)}, merges, unk_token="<unk>")
        else:
            model = Unigram([(t, -float(len(t))) for t in tokens], unk_id=0)
        backend = Tokenizer(model)
        backend.pre_tokenizer = Whitespace()
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
        directory = tmp_path / name
        fast.save_pretrained(directory)
        rows = len(tokens)
        write_checkpoint(directory, {e: random_tensor(rng, (rows, HIDDEN), "fp32") for e in EMBEDS}
                         | {"model.norm.weight": random_tensor(rng, (HIDDEN,), "fp32")}, config=llama_config(rows))
        paths[name] = directory
    out = run(tmp_path, {"merge_method": "linear", "base_model": str(paths["base"]),
                         "models": [{"model": str(paths[n]), "parameters": {"weight": 0.5}} for n in paths],
                         "tokenizer_source": "union"})
    vocab = reference_vocabulary(paths, ["base", "ft"])
    assert len(vocab) == 8
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.get_vocab() == vocab
    assert tok("ab cd dd")["input_ids"] == [vocab["ab"], vocab["cd"], vocab["dd"]]
    assert load_checkpoint(out)[EMBEDS[0]].shape == (8, HIDDEN)


def test_slices_that_stack_layers_with_a_changed_vocabulary_are_refused(tmp_path, models):
    """A frankenmerge's views rename layers; the vocabulary's views are not built over them
    yet, so the pair is a one-line error rather than a model with unpermuted rows."""
    recipe = {"merge_method": "passthrough", "base_model": str(models["base"]), "tokenizer_source": "union",
              "slices": [{"sources": [{"model": str(models["base"]), "layer_range": [0, 1]}]},
                         {"sources": [{"model": str(models["ft1"]), "layer_range": [0, 1]}]}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    result = CliRunner().invoke(main, ["merge", "--config", str(path), "-o", str(tmp_path / "out")])
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code != 0 and len(errors) == 1, result.output
    assert "changed vocabulary" in errors[0] and "not supported" in errors[0]
    assert not (tmp_path / "out").exists()


def test_cached_hub_ids_give_the_local_directories_merge(tmp_path, models):
    """Hub ids in the local cache are read like their snapshots (tokenizer.json included, a
    ``tokens`` entry naming an id too), offline, and give the same tensors and tokenizer as the
    directories;
    an id not in the cache is a one-line error, nothing downloaded, nothing at OUT."""
    from test_hub import COMMIT, _cache_repo, _offline, _run

    cache = tmp_path / "hub"
    for name in ("base", "ft1", "ft2"):
        _cache_repo(cache, f"org/{name}", models[name], COMMIT)

    def recipe(ids: dict[str, str]) -> dict:
        return {"merge_method": "linear", "base_model": ids["base"], "tokenizer": {
                    "source": "union", "tokens": {"x2": {"source": ids["ft2"], "force": True}}},
                "models": [{"model": ids[n], "parameters": {"weight": w}}
                           for n, w in (("base", 0.5), ("ft1", 0.3), ("ft2", 0.2))]}

    outputs = {}
    for kind, ids in (("dirs", {n: str(models[n]) for n in ("base", "ft1", "ft2")}),
                      ("ids", {n: f"org/{n}" for n in ("base", "ft1", "ft2")})):
        (tmp_path / f"{kind}.yaml").write_text(yaml.safe_dump(recipe(ids), sort_keys=False))
        result = _run(["merge", "--config", f"{kind}.yaml", "-o", kind, "-q"], tmp_path, **_offline(cache))
        assert result.returncode == 0, result.stderr
        files = {name: (tmp_path / kind / name).read_bytes() for name in ("tokenizer.json", "config.json")}
        outputs[kind] = files, {n: t.tobytes() for n, t in load_checkpoint(tmp_path / kind).items()}
    assert outputs["ids"] == outputs["dirs"]  # the headers' metadata names the inputs as given

    missing = recipe({"base": "org/base", "ft1": "org/ft1", "ft2": "org/absent"})
    (tmp_path / "missing.yaml").write_text(yaml.safe_dump(missing, sort_keys=False))
    result = _run(["merge", "--config", "missing.yaml", "-o", "missing", "-q"], tmp_path, **_offline(cache))
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert result.returncode != 0 and len(errors) == 1 and "org/absent" in errors[0], result.stderr
    assert "local cache" in errors[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "missing").exists()
