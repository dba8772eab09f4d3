"""The base model's non-weight files: config, generation config, tokenizer, chat template.

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


def companion_files(model_dir: Path | None) -> list[Path]:
    """The non-weight files to carry over from a model directory, config.json excluded."""
    if model_dir is None:
        return []
    return sorted(
        p for p in model_dir.iterdir()
        if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in COMPANION_PATTERNS)
    )


def copy_model_files(model_dir: Path | None, out_dir: Path, out_dtype: str | None) -> list[str]:
    """Copy config (dtype updated) and tokenizer files into ``out_dir``; returns the names copied."""
    copied = []
    for path in companion_files(model_dir):
        shutil.copyfile(path, out_dir / path.name)
        with open(out_dir / path.name, "rb+") as handle:
            os.fsync(handle.fileno())
        copied.append(path.name)
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
