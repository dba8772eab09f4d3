"""Tiny transformers models of the architectures fine-tunes come in, merged end to end.

For each architecture — Llama, Gemma2 (tied embeddings, LoRA on the tied LM head), Qwen2 (tied,
lm_head in modules_to_save; or embed_tokens with ensure_weight_tying; or untied), Mistral (LoRA
on lm_head), Phi3 (fused qkv/gate_up), GPT-2 (Conv1D, tied), Mixtral and Qwen2-MoE (fused
experts; a shared expert and its gate), BERT (an encoder with a tied masked-LM head) and Llava
(saved as language_model.model.*, adapted by PEFT as model.language_model.*) — a full fine-tune
and a PEFT LoRA adapter are merged at
λ = 0.6. The output must load with ``from_pretrained`` with no missing or unexpected weights (and
AutoProcessor where the base has a processor), tied embeddings must be tied or not as in PEFT's
merge, and its logits must match those of a float64 reference merge computed here from
the formula θ_base + λ·(θ_ft − θ_base), θ_ft being the fine-tune or PEFT's own float64
``merge_and_unload``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import safeblend

torch = pytest.importorskip("torch", reason="the test extra installs torch")
transformers = pytest.importorskip("transformers", reason="the test extra installs transformers")
peft = pytest.importorskip("peft", reason="the test extra installs peft")

WEIGHT = 0.6
TEXT = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
TOKENS = [[1, 17, 42, 90, 3, 55, 7, 8]]
IMAGE_TOKEN = 95


@dataclass(frozen=True)
class Arch:
    make: callable  # () -> a randomly initialised model, fp32
    lora: dict  # LoraConfig arguments
    loader: str = "AutoModelForCausalLM"
    load_options: dict = field(default_factory=dict)  # from_pretrained options for float64 inference
    inputs: dict = field(default_factory=lambda: {"input_ids": torch.tensor(TOKENS)})


def _llava(tied: bool = False):
    text = dict(TEXT, model_type="llama", tie_word_embeddings=tied)
    vision = dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                  num_attention_heads=2, image_size=16, patch_size=8)
    return transformers.LlavaForConditionalGeneration(
        transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN))


def _qwen2_tied():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TEXT, tie_word_embeddings=True))


def _llava_inputs() -> dict:
    generator = torch.Generator().manual_seed(7)
    ids = [[1, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, 17, 42, 90, 3]]  # 4 patches of 8×8
    return {"input_ids": torch.tensor(ids), "pixel_values": torch.randn((1, 3, 16, 16), generator=generator)}


ARCHS = {
    "llama": Arch(lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT, tie_word_embeddings=False)),
                  dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "gemma2-tied": Arch(lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**TEXT, head_dim=8)),
                        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"])),
    "qwen2-tied": Arch(lambda: _qwen2_tied(),
                       dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], modules_to_save=["lm_head"]),
                       ),
    "qwen2-tied-embed": Arch(lambda: _qwen2_tied(),  # untied by the copy: lm_head keeps the base's values
                             dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens"])),
    "qwen2-tied-kept": Arch(lambda: _qwen2_tied(),
                            dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                 ensure_weight_tying=True)),
    "phi3": Arch(lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(**TEXT)),
                 dict(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj", "o_proj", "down_proj"])),
    "gpt2": Arch(lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)),
                 dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "c_proj"], fan_in_fan_out=True)),
    "mixtral-moe": Arch(lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **TEXT, num_local_experts=4, num_experts_per_tok=2)), dict(r=4, lora_alpha=8,
                                                                   target_modules=["q_proj", "v_proj", "o_proj"]),
                        load_options={"experts_implementation": "eager"}),  # the grouped kernel has no float64
    "qwen2": Arch(lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TEXT, tie_word_embeddings=False)),
                  dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "mistral": Arch(lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**TEXT)),
                    dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "gate_proj", "lm_head"])),
    "qwen2-moe": Arch(lambda: transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        **TEXT, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24)),
                      dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "gate_proj", "down_proj",
                                                                 "shared_expert_gate"]),
                      load_options={"experts_implementation": "eager"}),
    "bert": Arch(lambda: transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, pad_token_id=0)),
                 dict(r=4, lora_alpha=8, target_modules=["query", "value", "dense"]), loader="AutoModelForMaskedLM"),
    "llava": Arch(_llava, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "linear_1"]),
                  loader="LlavaForConditionalGeneration", inputs=_llava_inputs()),
    # A tied text model, its embedding saved as language_model.model.embed_tokens, and a
    # modules_to_save copy of the head that PEFT names lm_head.
    "llava-tied": Arch(lambda: _llava(tied=True), dict(r=4, lora_alpha=8, target_modules=["q_proj", "linear_1"],
                                                      modules_to_save=["lm_head"]),
                       loader="LlavaForConditionalGeneration", inputs=_llava_inputs()),
}


def _randomise(model, scale: float, seed: int, trainable_only: bool = False) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if not trainable_only or p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def _load(arch: Arch, directory: Path, dtype=torch.float64):
    model, info = getattr(transformers, arch.loader).from_pretrained(directory, dtype=dtype, output_loading_info=True,
                                                                     **arch.load_options)
    return model, info


def _logits(model, arch: Arch) -> np.ndarray:
    with torch.no_grad():
        return model(**arch.inputs).logits.double().numpy()


def _processor(directory: Path) -> None:
    """A Llava processor (a word-level tokenizer, a CLIP image processor, a chat template)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {f"w{i}": i for i in range(IMAGE_TOKEN)} | {"<image>": IMAGE_TOKEN}
    vocab.update({"<pad>": 0, "<s>": 1, "</s>": 2})
    backend = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                                     pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    images = transformers.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = transformers.LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8,
                                            vision_feature_select_strategy="default",
                                            chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    processor.save_pretrained(directory)


@dataclass
class Built:
    arch: Arch
    base: Path
    ft: Path
    adapter: Path
    reference_ft: np.ndarray  # logits of the float64 reference merge with the full fine-tune
    reference_lora: np.ndarray  # ... with PEFT's float64 merge of the adapter
    tied_lora: bool | None  # tie_word_embeddings of PEFT's merged model


def _reference_logits(arch: Arch, base_dir: Path, theta_model) -> np.ndarray:
    """Logits of θ_base + λ·(θ_ft − θ_base), float64, in a copy of the θ_ft model."""
    base = _load(arch, base_dir)[0].state_dict()
    theta = theta_model.state_dict()
    merged = {k: base[k] + WEIGHT * (v - base[k]) for k, v in theta.items()}
    theta_model.load_state_dict(merged)
    return _logits(theta_model, arch)


@pytest.fixture(scope="module", params=list(ARCHS))
def built(request, tmp_path_factory) -> Built:
    arch = ARCHS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    base = arch.make().float()
    base.save_pretrained(root / "base")
    if request.param == "llava":
        _processor(root / "base")
    _randomise(base, 0.02, seed=1)
    base.save_pretrained(root / "ft")
    ft64 = _load(arch, root / "ft")[0]
    reference_ft = _reference_logits(arch, root / "base", ft64)

    model = _load(arch, root / "base", torch.float32)[0]
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**arch.lora))
    _randomise(peft_model, 0.05, seed=2, trainable_only=True)
    peft_model.save_pretrained(root / "adapter")
    theta = peft.PeftModel.from_pretrained(_load(arch, root / "base")[0], root / "adapter").to(torch.float64)
    theta = theta.merge_and_unload()
    tied_lora = getattr(theta.config, "tie_word_embeddings", None)
    reference_lora = _reference_logits(arch, root / "base", theta)
    return Built(arch, root / "base", root / "ft", root / "adapter", reference_ft, reference_lora, tied_lora)


def _check(built: Built, out: Path, reference: np.ndarray) -> None:
    model, info = _load(built.arch, out)
    assert (info["missing_keys"], info["unexpected_keys"]) == ([], []) or (
        not info["missing_keys"] and not info["unexpected_keys"]), info
    logits = _logits(model, built.arch)
    scale = np.max(np.abs(reference))
    # Weights differ from the float64 reference by their fp32 rounding (~6e-8 relative).
    assert np.max(np.abs(logits - reference)) <= 1e-5 * scale, np.max(np.abs(logits - reference)) / scale


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_merge_loads_and_matches_the_float64_reference(built, tmp_path, kind):
    model = built.ft if kind == "full" else built.adapter
    messages = []
    safeblend.merge(built.base, model, tmp_path / "out", weight=WEIGHT, on_warning=messages.append)
    _check(built, tmp_path / "out", built.reference_ft if kind == "full" else built.reference_lora)
    if kind == "lora":  # tied embeddings stay tied, or are untied, as in PEFT's merge
        config = transformers.AutoConfig.from_pretrained(tmp_path / "out")
        assert getattr(config, "tie_word_embeddings", None) == built.tied_lora
    # Warnings name only tensors the models have.
    names = set(safeblend.checkpoint.Checkpoint.open(built.base).tensors) | {"lm_head.weight"}
    for message in messages:
        for word in message.replace(",", " ").split():
            if word.endswith(".weight"):
                assert word in names, message
    if (built.base / "processor_config.json").exists() or (built.base / "preprocessor_config.json").exists():
        processor = transformers.AutoProcessor.from_pretrained(tmp_path / "out")
        original = transformers.AutoProcessor.from_pretrained(built.base)
        assert type(processor) is type(original) and processor.chat_template == original.chat_template
        image = np.zeros((16, 16, 3), dtype=np.uint8)
        assert processor(text="w3 <image>", images=image)["input_ids"] == original(text="w3 <image>",
                                                                                  images=image)["input_ids"]


def test_sweep_with_an_adapter_equals_merge(built, tmp_path):
    safeblend.sweep(built.base, built.adapter, tmp_path / "sweep", [WEIGHT])
    safeblend.merge(built.base, built.adapter, tmp_path / "merged", weight=WEIGHT)
    swept, merged = tmp_path / "sweep" / f"lambda-{WEIGHT}", tmp_path / "merged"
    names = sorted(p.name for p in merged.iterdir())
    assert sorted(p.name for p in swept.iterdir()) == names
    for name in names:
        if (merged / name).is_file():
            assert (swept / name).read_bytes() == (merged / name).read_bytes(), name


def test_tie_warnings_name_only_tensors_the_models_have(tmp_path):
    """A tied Qwen2-style base and a fine-tune that unties (stores lm_head): the warnings speak
    of lm_head.weight and model.embed_tokens.weight, never of another architecture's pair."""
    from helpers import random_tensor, write_checkpoint

    rng = np.random.default_rng(0)
    embed = random_tensor(rng, (12, 4), "fp32")
    write_checkpoint(tmp_path / "base", {"model.embed_tokens.weight": embed},
                     config={"model_type": "qwen2", "tie_word_embeddings": True})
    write_checkpoint(tmp_path / "ft", {"model.embed_tokens.weight": embed + 1, "lm_head.weight": embed - 1},
                     config={"model_type": "qwen2", "tie_word_embeddings": False})
    messages = []
    safeblend.merge(tmp_path / "base", tmp_path / "ft", tmp_path / "out", on_warning=messages.append)
    assert messages and all("transformer.wte" not in m and "embed_in" not in m and "tok_embeddings" not in m
                            for m in messages), messages
    assert any("lm_head.weight" in m and "model.embed_tokens.weight" in m for m in messages), messages


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_diff_matches_the_float64_reference(built, kind):
    """``safeblend diff`` of each architecture's fine-tune or adapter: the sums over all tensors
    equal those over the fine-tuned model's parameters (each tied pair once, as that model holds
    it; a head it unties compared with the base's embedding, as merge does)."""
    if kind == "full":
        theta = _load(built.arch, built.ft)[0]
    else:
        theta = peft.PeftModel.from_pretrained(_load(built.arch, built.base)[0], built.adapter).to(torch.float64)
        theta = theta.merge_and_unload()
    base = _load(built.arch, built.base)[0].state_dict()
    aa = dd = max_abs = 0.0
    for name, p in theta.named_parameters():  # tied parameters once
        a, delta = base[name].numpy(), p.detach().numpy().astype(np.float32).astype(np.float64) - base[name].numpy()
        aa, dd = aa + float(np.sum(a * a)), dd + float(np.sum(delta * delta))
        max_abs = max(max_abs, float(np.max(np.abs(delta))))
    report = safeblend.diff(built.base, built.ft if kind == "full" else built.adapter)
    overall = report.overall()
    assert overall.aa == pytest.approx(aa, rel=1e-12)
    assert overall.dd == pytest.approx(dd, rel=1e-9)
    assert overall.max_abs == pytest.approx(max_abs, rel=1e-6)
    names = set(safeblend.checkpoint.Checkpoint.open(built.base).tensors) | {"lm_head.weight"}
    for message in report.warnings:  # they name only tensors the models have
        assert all(w in names for w in message.replace(",", " ").split() if w.endswith(".weight")), message
