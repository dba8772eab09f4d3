"""The output's non-weight files: config, generation config, tokenizer, chat template.

A merged checkpoint is only usable with these beside it. They are written once, after the
checkpoint quirks (safeblend.quirks) decided them: copied from the base model's directory,
except the tokenizer files when fine-tuning added tokens (then from the fine-tuned model,
``MergePlan.files_from``); config.json gets ``torch_dtype`` set to the output's dtype and the
keys the quirks call for (``MergePlan.config``: ``vocab_size``, ``tie_word_embeddings``).
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from pathlib import Path
from typing import Any

from .dtypes import TORCH_DTYPE_NAMES
from .errors import CheckpointError
from .plan import MergePlan
from .quirks import read_config
from .writer import write_text_durably

# Files a Hugging Face model directory carries besides weights, by name pattern.
COMPANION_PATTERNS = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.tiktoken",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
)
# The files that go with a vocabulary: taken from the fine-tuned model that resized it.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.json",
                   "chat_template.jinja")


def companion_files(model_dir: Path | None) -> list[Path]:
    """The non-weight files to carry over from a model directory, config.json excluded."""
    if model_dir is None:
        return []
    return sorted(
        p for p in model_dir.iterdir()
        if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in COMPANION_PATTERNS)
    )


def write_model_files(plan: MergePlan, model_dir: Path | None, out_dir: Path, out_dtype: str | None) -> list[str]:
    """Write config and tokenizer files into ``out_dir``, each once; returns the names written."""
    sources = {p.name: p for p in companion_files(model_dir)}
    if plan.files_from is not None:
        sources.update((name, plan.files_from / name) for name in TOKENIZER_FILES
                       if (plan.files_from / name).is_file())
    for name, path in sources.items():
        shutil.copyfile(path, out_dir / name)
        with open(out_dir / name, "rb+") as handle:
            os.fsync(handle.fileno())
    written = list(sources)
    if model_dir is not None and (model_dir / "config.json").is_file():
        text = _config_text(model_dir / "config.json", out_dtype, plan.config)
        write_text_durably(out_dir / "config.json", text)
        written.append("config.json")
    return written


def _config_text(config_path: Path, out_dtype: str | None, changes: dict[str, Any]) -> str:
    config = read_config(config_path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: config must be a JSON object")
    if out_dtype in TORCH_DTYPE_NAMES:
        name = TORCH_DTYPE_NAMES[out_dtype]
        config["torch_dtype"] = name
        if "dtype" in config:  # newer transformers write "dtype" instead
            config["dtype"] = name
    config.update(changes)
    return json.dumps(config, indent=2, sort_keys=True) + "\n"
