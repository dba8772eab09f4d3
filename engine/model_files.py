"""The output's non-weight files: config, generation config, tokenizer, processors, chat template.

A merged checkpoint is only usable with these beside it. They are written once, after the
checkpoint quirks (safeblend.quirks) decided them: copied from the base model's directory,
except the tokenizer files when fine-tuning added tokens (then from the fine-tuned model,
``MergePlan.files_from``); config.json gets ``torch_dtype`` set to the output's dtype and the
keys the quirks call for (``MergePlan.config``; None removes a key). Only regular files are
copied (FIFOs, devices and sockets are skipped with a warning; a config.json that is not a
regular file is an error), a copy's permissions never exceed its source's, and their size is
part of the up-front free-space check.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .dtypes import TORCH_DTYPE_NAMES
from .errors import CheckpointError
from .output_paths import printable
from .quirks import read_json_object
from .writer import write_text_durably

if TYPE_CHECKING:  # planning imports this module
    from .plan import MergePlan

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
# The files that go with a vocabulary: taken from the fine-tuned model that resized it.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.json",
                   "chat_template.jinja")


def is_companion(name: str) -> bool:
    """Whether a top-level file of a model directory is carried over (config.json aside)."""
    return any(fnmatch.fnmatch(name, pattern) for pattern in COMPANION_PATTERNS)


def companion_files(model_dir: Path | None) -> list[Path]:
    """The non-weight files to carry over from a model directory, config.json excluded:
    regular files only (a symlink to one counts; FIFOs, devices and sockets do not)."""
    return [p for p in _companion_entries(model_dir) if _is_regular(p)]


def _companion_entries(model_dir: Path | None) -> list[Path]:
    if model_dir is None:
        return []
    return sorted(p for p in model_dir.iterdir() if is_companion(p.name))


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def check_config_file(model_dir: Path | None) -> None:
    """CheckpointError when a model's config.json exists but is not a regular file (a FIFO
    would block its reader, a device never end): it is never silently dropped."""
    if model_dir is None:
        return
    path = model_dir / "config.json"
    if os.path.lexists(path) and not _is_regular(path):
        raise CheckpointError(f"{path}: is not a regular file (a FIFO, device, socket or broken link)")


def companion_bytes(model_dir: Path | None) -> int:
    """Bytes the non-weight files will take in the output, for the up-front space check."""
    check_config_file(model_dir)
    paths = companion_files(model_dir)
    if model_dir is not None and _is_regular(model_dir / "config.json"):
        paths.append(model_dir / "config.json")
    return sum(os.stat(p).st_size for p in paths)


def copy_regular_file(source: Path, target: Path) -> None:
    """Copy a regular file's bytes to ``target`` and fsync it; the copy's permission bits never
    exceed the source's (a private tokenizer stays private). OSError for anything else."""
    fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the open
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(0, "not a regular file", str(source))
        out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, st.st_mode & 0o666)
        try:
            os.fchmod(out, stat.S_IMODE(os.fstat(out).st_mode) & stat.S_IMODE(st.st_mode))
            with os.fdopen(os.dup(fd), "rb") as reader, os.fdopen(os.dup(out), "wb") as writer:
                shutil.copyfileobj(reader, writer, 2**20)
            os.fsync(out)
        finally:
            os.close(out)
    finally:
        os.close(fd)


def write_model_files(plan: MergePlan, model_dir: Path | None, out_dir: Path, out_dtype: str | None,
                      warn: Callable[[str], None] | None = None) -> list[str]:
    """Write config and tokenizer files into ``out_dir``, each once; returns the names written.

    Entries that are not regular files are skipped with a warning; a config.json that is
    not one is an error (``check_config_file``).
    """
    sources: dict[str, Path] = {}
    for path in _companion_entries(model_dir):
        if _is_regular(path):
            sources[path.name] = path
        elif warn is not None:
            warn(f"{printable(path)}: skipped: not a regular file (a FIFO, device, socket or broken link)")
    if plan.files_from is not None:
        sources.update((name, plan.files_from / name) for name in TOKENIZER_FILES
                       if _is_regular(plan.files_from / name))
    for name, path in sources.items():
        copy_regular_file(path, out_dir / name)
    written = list(sources)
    for folder in COMPANION_DIRS:
        source = model_dir / folder if model_dir is not None else None
        if source is not None and source.is_dir() and not source.is_symlink():
            for path in sorted(p for p in source.iterdir() if _is_regular(p)):
                (out_dir / folder).mkdir(exist_ok=True)
                copy_regular_file(path, out_dir / folder / path.name)
                written.append(f"{folder}/{path.name}")
    check_config_file(model_dir)
    if model_dir is not None and (model_dir / "config.json").is_file():
        config = model_dir / "config.json"
        write_text_durably(out_dir / "config.json", _config_text(config, out_dtype, plan.config))
        os.chmod(out_dir / "config.json", stat.S_IMODE(os.stat(out_dir / "config.json").st_mode)
                 & stat.S_IMODE(os.stat(config).st_mode))
        written.append("config.json")
    return written


def _config_text(config_path: Path, out_dtype: str | None, changes: dict[str, Any]) -> str:
    config = read_json_object(config_path)
    if out_dtype in TORCH_DTYPE_NAMES:
        name = TORCH_DTYPE_NAMES[out_dtype]
        config["torch_dtype"] = name
        if "dtype" in config:  # newer transformers write "dtype" instead
            config["dtype"] = name
    config = {k: v for k, v in {**config, **changes}.items() if v is not None}  # None removes a key
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


# -- a recipe's chat_template -------------------------------------------------------------------


def read_chat_template(model_dir: Path) -> str | None:
    """A model's chat template as transformers' tokenizer loads it: ``chat_template.jinja`` if
    present, else ``tokenizer_config.json``'s ``chat_template`` (of a set of named templates,
    the one named "default"); None when it has none or the files cannot be read."""
    jinja = model_dir / "chat_template.jinja"
    try:
        if _is_regular(jinja):
            return jinja.read_text(encoding="utf-8")
        config = model_dir / "tokenizer_config.json"
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template") if _is_regular(config) else None
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) else None


def set_chat_template(out_dir: Path, template: str) -> None:
    """Make ``template`` the output's chat template: ``tokenizer_config.json``'s
    ``chat_template``, and the ``chat_template.jinja`` / ``chat_template.json`` copied from the
    base too where present (transformers prefers those files to the config's entry)."""
    config = out_dir / "tokenizer_config.json"
    if not config.is_file():
        raise CheckpointError(f"{config}: chat_template: the base model has no tokenizer_config.json to carry it")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{config}: chat_template: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{config}: chat_template: not a JSON object")
    data["chat_template"] = template
    write_text_durably(config, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    if (out_dir / "chat_template.jinja").is_file():
        write_text_durably(out_dir / "chat_template.jinja", template)
    processor = out_dir / "chat_template.json"
    if processor.is_file():
        write_text_durably(processor, json.dumps({"chat_template": template}, indent=2, ensure_ascii=False) + "\n")


def copy_tokenizer_files(model_dir: str | os.PathLike, out_dir: Path) -> list[str]:
    """Replace the output's tokenizer files (copied from the base) with ``model_dir``'s: a
    recipe's ``tokenizer_source`` naming a model. Returns the names copied."""
    model_dir = Path(model_dir)
    for name in TOKENIZER_FILES:
        (out_dir / name).unlink(missing_ok=True)  # none of the base's may outlive the swap
    copied = []
    for name in TOKENIZER_FILES:
        if _is_regular(model_dir / name):
            copy_regular_file(model_dir / name, out_dir / name)
            copied.append(name)
    return copied
