"""Tensor names across transformers layouts (engine/layouts.py), against transformers' own
checkpoint conversion mapping, and merges across layouts."""

from __future__ import annotations

import re

import numpy as np
import pytest

import safeblend
from safeblend.layouts import align, canonical, canonical_lookup

from helpers import load_checkpoint, random_tensor, write_checkpoint

# Model types and classes whose checkpoint renames are all wrapper changes (safeblend.layouts):
# the vision-language families whose adapters and fine-tunes users merge most.
FAMILIES = ["llava", "llava_next", "llava_next_video", "llava_onevision", "video_llava", "vipllava", "gemma3",
            "paligemma", "mistral3", "aya_vision", "internvl", "mllama", "aria", "got_ocr2", "legacy",
            "LlavaModel", "Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"]
_LITERAL = re.compile(r"^\^((?:[A-Za-z_0-9]|\\?\.)+)$")


def _prefix_renames() -> dict[str, list[tuple[str, str]]]:
    """transformers' renames of one literal name prefix to another, by model type or class."""
    mapping = pytest.importorskip("transformers.conversion_mapping")._build_checkpoint_conversion_mapping()
    renames: dict[str, list[tuple[str, str]]] = {}
    for key, rules in mapping.items():
        for rule in rules if isinstance(rules, list) else []:
            if type(rule).__name__ != "WeightRenaming":
                continue
            for source in rule.source_patterns:
                for target in rule.target_patterns:
                    match = _LITERAL.match(source)
                    if match and re.fullmatch(r"[A-Za-z_0-9.]+", target):
                        prefix = match.group(1).replace("\\.", ".").rstrip(".")
                        renames.setdefault(key, []).append((prefix, target.rstrip(".")))
    return renames


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_prefix_renames_keep_the_canonical_name(family):
    renames = _prefix_renames()
    assert renames.get(family), f"transformers registers no prefix renames for {family}"
    for source, target in renames[family]:
        for rest in ("layers.0.self_attn.q_proj.weight", "embed_tokens.weight", "weight"):
            assert canonical(f"{source}.{rest}") == canonical(f"{target}.{rest}"), (family, source, target)


def test_names_that_collapse_together_never_match():
    names = ["text_model.encoder.layers.0.q.weight", "vision_model.encoder.layers.0.q.weight", "logit_scale"]
    assert canonical_lookup(names) == {"logit_scale": "logit_scale"}
    assert align(["model.encoder.layers.0.q.weight"], names) == {}


def test_a_full_fine_tune_in_another_layout_merges_under_the_base_names(tmp_path):
    rng = np.random.default_rng(4)
    old = {"language_model.model.layers.0.mlp.down_proj.weight": random_tensor(rng, (4, 6), "fp32"),
           "language_model.lm_head.weight": random_tensor(rng, (10, 4), "fp32"),
           "vision_tower.vision_model.encoder.layers.0.fc1.weight": random_tensor(rng, (3, 4), "fp32"),
           "multi_modal_projector.linear_1.weight": random_tensor(rng, (4, 3), "fp32")}
    new_names = {  # as transformers' llava renames name them
        "language_model.model.layers.0.mlp.down_proj.weight": "model.language_model.layers.0.mlp.down_proj.weight",
        "language_model.lm_head.weight": "lm_head.weight",
        "vision_tower.vision_model.encoder.layers.0.fc1.weight": "model.vision_tower.encoder.layers.0.fc1.weight",
        "multi_modal_projector.linear_1.weight": "model.multi_modal_projector.linear_1.weight"}
    ft = {new_names[n]: t + 1 for n, t in old.items()}
    write_checkpoint(tmp_path / "base", old)
    write_checkpoint(tmp_path / "ft", ft)
    messages = []
    safeblend.merge(tmp_path / "base", tmp_path / "ft", tmp_path / "out", weight=0.25, on_warning=messages.append)
    merged = load_checkpoint(tmp_path / "out")
    assert sorted(merged) == sorted(old)
    for name, b in old.items():
        np.testing.assert_array_equal(merged[name], (b.astype(np.float64) + 0.25).astype(np.float32))
    assert len(messages) == 1 and "names 4 tensor(s) in another transformers layout" in messages[0]
