"""The base model's non-weight files: config, generation config, tokenizer, processors, chat template.

A merged checkpoint is only usable with these beside it. They are copied from the base model's
directory; config.json gets ``torch_dtype`` set to the output's dtype.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from pathlib import Path

from .dtypes import TORCH_DTYPE_NAMES
from .errors import CheckpointError
from .writer import write_text_durably

# Files a Hugging Face model directory carries besides weights and config.json, by name
# pattern: what transformers reads through AutoConfig/GenerationConfig, AutoTokenizer,
# AutoProcessor and its image, video, audio and feature processors (tests/test_model_files.py
# checks this list against transformers' own file-name constants and every tokenizer's vocabulary
# file names). Custom code (``*.py``) is what a ``trust_remote_code`` config's ``auto_map`` names.
COMPANION_PATTERNS = (
    "generation_config.json",
    # tokenizers
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.model",  # sentencepiece: tokenizer.model, spiece.model, sentencepiece.bpe.model, ...
    "*.tiktoken",
    "*vocab*.json",
    "*vocab*.txt",
    "*.tokenizer",
    "dict.txt",
    "emoji.json",
    "byte_maps.json",
    "bpe.codes",
    "normalizer.json",
    "word_pronunciation.json",
    "word_shape.json",
    # processors, chat templates
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "audio_tokenizer_config.json",
    "chat_template.json",
    "chat_template.jinja",
    # custom code named by config.json's auto_map
    "*.py",
)
# Folders carried over whole: extra named chat templates (``additional_chat_templates/*.jinja``).
COMPANION_DIRS = ("additional_chat_templates",)


def is_companion(name: str) -> bool:
    """Whether a top-level file of a model directory is carried over (config.json aside)."""
    return any(fnmatch.fnmatch(name, pattern) for pattern in COMPANION_PATTERNS)


def companion_files(model_dir: Path | None) -> list[Path]:
    """The non-weight files to carry over from a model directory, config.json excluded."""
    if model_dir is None:
        return []
    return sorted(p for p in model_dir.iterdir() if p.is_file() and is_companion(p.name))


def copy_model_files(model_dir: Path | None, out_dir: Path, out_dtype: str | None) -> list[str]:
    """Copy config (dtype updated) and tokenizer files into ``out_dir``; returns the names copied."""
    copied = []
    for path in companion_files(model_dir):
        shutil.copyfile(path, out_dir / path.name)
        with open(out_dir / path.name, "rb+") as handle:
            os.fsync(handle.fileno())
        copied.append(path.name)
    for folder in COMPANION_DIRS:
        source = model_dir / folder if model_dir is not None else None
        if source is not None and source.is_dir():
            for path in sorted(p for p in source.iterdir() if p.is_file()):
                (out_dir / folder).mkdir(exist_ok=True)
                shutil.copyfile(path, out_dir / folder / path.name)
                with open(out_dir / folder / path.name, "rb+") as handle:
                    os.fsync(handle.fileno())
                copied.append(f"{folder}/{path.name}")
    if model_dir is not None and (model_dir / "config.json").is_file():
        write_text_durably(out_dir / "config.json", _config_with_dtype(model_dir / "config.json", out_dtype))
        copied.append("config.json")
    return copied


def _config_with_dtype(config_path: Path, out_dtype: str | None) -> str:
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path}: cannot read config JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: config must be a JSON object")
    if out_dtype in TORCH_DTYPE_NAMES:
        name = TORCH_DTYPE_NAMES[out_dtype]
        config["torch_dtype"] = name
        if "dtype" in config:  # newer transformers write "dtype" instead
            config["dtype"] = name
    return json.dumps(config, indent=2, sort_keys=True) + "\n"
