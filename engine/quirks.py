"""Checkpoint quirks seen in real fine-tunes, reconciled before planning.

- **Vocabulary resized by fine-tuning** (added tokens): the fine-tuned embedding/LM head has
  more rows than the base's. The shared rows are merged; the added rows are copied from the
  fine-tuned model (``OutputTensor.tail``); config ``vocab_size`` and the tokenizer files come
  from that model. Fewer rows than the base is an error.
- **Tied embeddings**: when one model stores ``lm_head`` and another ties it to the input
  embedding (``tie_word_embeddings``), the tied model's embedding stands in for its LM head;
  the output stores ``lm_head`` and its config says ``tie_word_embeddings: false`` (in its
  ``text_config`` too). The pair is found in any transformers layout (safeblend.layouts).
- **Tensors only some inputs have**: an error listing them, or with ``allow_missing="take"``
  a copy from the base when it has them, else from the first model that does.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from math import prod
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint, TensorInfo
from .errors import CheckpointError, IncompatibleInputsError, SpecError
from .layouts import align, canonical, canonical_lookup

ALLOW_MISSING = ("take",)
# (LM head, input embedding) names of architectures that can tie them.
TIE_PAIRS = (
    ("lm_head.weight", "model.embed_tokens.weight"),
    ("lm_head.weight", "transformer.wte.weight"),
    ("embed_out.weight", "gpt_neox.embed_in.weight"),
    ("output.weight", "tok_embeddings.weight"),
)
# Tensors whose first dimension is the vocabulary.
_VOCAB_NAME = re.compile(r"(^|\.)(embed_tokens|lm_head|wte|word_embeddings|embed_in|embed_out|tok_embeddings|output)"
                         r"\.weight$")


@dataclass
class Entry:
    """One output tensor's sources: merged from ``base`` and ``models`` (plus a copied
    ``tail``), or, when ``only`` is set, copied from that one input."""

    name: str
    shape: tuple[int, ...]
    base: TensorInfo | None = None
    models: list[TensorInfo] = field(default_factory=list)
    tail: TensorInfo | None = None
    only: TensorInfo | None = None


@dataclass
class Reconciled:
    entries: list[Entry]
    warnings: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)  # config.json keys to set in the output
    files_from: Path | None = None  # take tokenizer files from this model directory


def reconcile(base: Checkpoint, models: list[Checkpoint], allow_missing: str | None = None) -> Reconciled:
    """Match the inputs' tensors by name and shape, resolving the quirks above.

    Raises IncompatibleInputsError naming the tensors and models that cannot be merged.
    """
    if allow_missing not in (None, *ALLOW_MISSING):
        raise SpecError(f"allow_missing must be one of {', '.join(ALLOW_MISSING)} or None, got {allow_missing!r}")
    result = Reconciled(entries=[])
    if base.model_dir is None:
        result.warnings.append(f"{base.path}: a bare weights file with no config.json beside it: the output holds "
                               "weights only (no config or tokenizer) and will not load with from_pretrained")
    tables = [dict(c.tensors) for c in (base, *models)]
    _align_layouts([base, *models], tables, result)
    _untie([base, *models], tables, result)
    order = list(dict.fromkeys(n for table in tables for n in table))
    missing = {n for n in order if not all(n in t for t in tables)}
    if missing and allow_missing is None:
        raise IncompatibleInputsError(_missing_message(base, models, tables, order))
    resized: list[tuple[str, int, int, Checkpoint]] = []
    for name in order:
        if name in missing:
            holder = next(t[name] for t in tables if name in t)
            result.entries.append(Entry(name, holder.shape, only=holder))
            continue
        infos = [t[name] for t in tables]
        entry = Entry(name, infos[0].shape, infos[0], infos[1:])
        if any(i.shape != infos[0].shape for i in infos[1:]):
            _resize(entry, models, resized)
        result.entries.append(entry)
    if missing:
        sample = ", ".join(n for n in order if n in missing)
        result.warnings.append(f"{len(missing)} tensor(s) are missing from some inputs and copied from the one that "
                               f"has them (allow_missing=take): {_first(sample)}")
    if resized:
        _note_resize(resized, result)
    return result


def matched_pairs(base: Checkpoint, model: Checkpoint, warn) -> list[tuple[TensorInfo, TensorInfo]]:
    """(base, model) tensor pairs, in the base's order, for comparing two models tensor by
    tensor: matched as ``reconcile`` matches them for a merge (names in another transformers
    layout aligned to the base's; an LM head one model ties to its embedding and the other
    stores compared with that embedding). Each base-side info carries the pair's name.

    Raises IncompatibleInputsError when names or shapes still differ.
    """
    ckpts, tables, result = [base, model], [dict(base.tensors), dict(model.tensors)], Reconciled(entries=[])
    _align_layouts(ckpts, tables, result)
    for message in result.warnings:
        warn(message)
    aligned = [set(t) for t in tables]
    _untie(ckpts, tables, result)  # its warnings speak of a merge's output: reported here in a comparison's terms
    for ckpt, table, names in zip(ckpts, tables, aligned):
        for name in table.keys() - names:  # a tied head standing for its embedding
            warn(f"{ckpt.path} ties {name} to {table[name].name} (tie_word_embeddings) while the other model "
                 f"stores it: {name} is compared using {table[name].name}")
    missing = [n for n in tables[0] if n not in tables[1]]
    extra = [n for n in tables[1] if n not in tables[0]]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing from it (first: {', '.join(missing[:3])})")
        if extra:
            parts.append(f"{len(extra)} not in the base (first: {', '.join(extra[:3])})")
        raise IncompatibleInputsError(f"{model.path}: tensor names differ from the base {base.path}: " + "; ".join(parts))
    pairs = []
    for name, info in tables[0].items():
        other = tables[1][name]
        if other.shape != info.shape:
            raise IncompatibleInputsError(f"{model.path}: tensor {name!r} has shape {list(other.shape)} but the "
                                          f"base's is {list(info.shape)}")
        pairs.append((info if info.name == name else replace(info, name=name), other))
    return pairs


def tied_heads(ckpt: Checkpoint) -> dict[str, str]:
    """LM head name → input embedding name, for each head the checkpoint ties to its embedding:
    the embedding is stored (under any transformers layout, safeblend.layouts), the head is not,
    and config.json does not say ``tie_word_embeddings: false``."""
    if _config(ckpt).get("tie_word_embeddings", True) is False:
        return {}
    stored = {canonical(n): n for n in ckpt.tensors}
    return {head: stored[canonical(embed)] for head, embed in TIE_PAIRS
            if canonical(embed) in stored and canonical(head) not in stored}


def _align_layouts(ckpts: list[Checkpoint], tables: list[dict[str, TensorInfo]], result: Reconciled) -> None:
    """Give a fine-tune's tensors the base's names where it was saved in another transformers
    layout (safeblend.layouts: e.g. ``model.language_model.layers…`` for ``language_model.model.layers…``)."""
    for ckpt, table in zip(ckpts[1:], tables[1:]):
        renames = align(table, tables[0])
        if not renames:
            continue
        for name, target in renames.items():
            table[target] = table.pop(name)
        first = next(iter(renames.items()))
        result.warnings.append(f"{ckpt.path} names {len(renames)} tensor(s) in another transformers layout than the "
                               f"base (e.g. {first[0]} for {first[1]}); they are matched to the base's names, "
                               "which the output keeps")


def _untie(ckpts: list[Checkpoint], tables: list[dict[str, TensorInfo]], result: Reconciled) -> None:
    """Where some inputs store the LM head and others tie it, use the embedding as the head.
    Each pair's names are matched in any transformers layout (safeblend.layouts): a Llava-style
    base saves its tied embedding as ``language_model.model.embed_tokens.weight``."""
    configs = [_config(c) for c in ckpts]
    lookups = [canonical_lookup(t) for t in tables]
    for head, embed in TIE_PAIRS:
        heads = [lookup.get(canonical(head)) for lookup in lookups]  # each input's own name, or None
        embeds = [lookup.get(canonical(embed)) for lookup in lookups]
        holders = [i for i, name in enumerate(heads) if name is not None]
        if not holders or not any(embeds):
            continue  # another architecture's pair: warn only about tensors these models have
        head = heads[holders[0]]
        tied = [i for i, t in enumerate(tables) if heads[i] is None and embeds[i] is not None
                and configs[i].get("tie_word_embeddings", True) is not False]
        for i in tied:
            tables[i][head] = tables[i][embeds[i]]
        embed = next(e for e in (embeds[i] for i in (*tied, *range(len(tables)))) if e is not None)
        if tied:
            result.config.update(_untied(configs[0]))
            names = ", ".join(str(ckpts[i].path) for i in tied)
            result.warnings.append(
                f"{names} tie(s) {head} to {embed} (tie_word_embeddings) while other inputs store it: {head} is "
                f"merged using the tied model's {embed}, stored, and config.json gets tie_word_embeddings=false"
            )
        elif configs[0].get("tie_word_embeddings") is True and any(
                c.get("tie_word_embeddings") is False for c in configs[1:]):
            # Every input stores the head but some untied it: the merged head is not the embedding.
            result.config.update(_untied(configs[0]))
            result.warnings.append(f"a fine-tuned model unties {head} from {embed}; config.json gets "
                                   "tie_word_embeddings=false")


def _untied(config: dict[str, Any]) -> dict[str, Any]:
    """Config changes that untie the LM head: ``tie_word_embeddings: false``, also in a
    multimodal model's ``text_config``, from which transformers reads it for Llava-style models."""
    changes: dict[str, Any] = {"tie_word_embeddings": False}
    text = config.get("text_config")
    if isinstance(text, dict):
        changes["text_config"] = {**text, "tie_word_embeddings": False}
    return changes


def _resize(entry: Entry, models: list[Checkpoint], resized: list) -> None:
    """Accept a fine-tune's larger vocabulary (more rows); anything else is an error."""
    base = entry.base
    assert base is not None
    rows, rest = base.shape[0] if base.shape else 0, base.shape[1:]
    larger = []
    for model, info in zip(models, entry.models):
        if info.shape == base.shape:
            continue
        if len(info.shape) != len(base.shape) or info.shape[1:] != rest or not _vocab_like(entry.name, info, model):
            raise IncompatibleInputsError(f"{model.path}: tensor {entry.name!r} has shape {list(info.shape)} but "
                                          f"the base's is {list(base.shape)}")
        if info.shape[0] < rows:
            raise IncompatibleInputsError(
                f"{model.path}: tensor {entry.name!r} has {info.shape[0]} vocabulary rows, fewer than the base's "
                f"{rows}: a shrunk vocabulary cannot be merged (the rows no longer match token ids)"
            )
        larger.append((model, info))
    if len({info.shape for _, info in larger}) > 1:
        sizes = ", ".join(f"{m.path}: {i.shape[0]}" for m, i in larger)
        raise IncompatibleInputsError(f"tensor {entry.name!r}: fine-tuned models added different numbers of "
                                      f"vocabulary rows ({sizes}); merge them one at a time")
    if not base.dtype.computable:
        raise IncompatibleInputsError(f"tensor {entry.name!r}: a resized {base.dtype.name} tensor cannot be merged")
    model, info = larger[0]
    entry.shape = info.shape
    start, nbytes = info.byte_range(rows * prod(rest), (info.shape[0] - rows) * prod(rest))
    entry.tail = TensorInfo(f"{entry.name}[{rows}:]", info.dtype, (info.shape[0] - rows, *rest), info.file,
                            start, nbytes)
    resized.append((entry.name, rows, info.shape[0], model))


def _vocab_like(name: str, info: TensorInfo, model: Checkpoint) -> bool:
    return bool(_VOCAB_NAME.search(name)) or _config(model).get("vocab_size") == info.shape[0]


def _note_resize(resized: list[tuple[str, int, int, Checkpoint]], result: Reconciled) -> None:
    _, rows, new_rows, model = resized[0]
    names = ", ".join(sorted({r[0] for r in resized}))
    result.warnings.append(
        f"vocabulary resized by fine-tuning: {names} have {new_rows} rows in {model.path} but {rows} in the base; "
        f"the {rows} shared rows are merged and the {new_rows - rows} added rows are taken from {model.path}, "
        "as are vocab_size and the tokenizer files"
    )
    result.config["vocab_size"] = _config(model).get("vocab_size", new_rows)
    result.files_from = model.model_dir


def _missing_message(base: Checkpoint, models: list[Checkpoint], tables: list[dict], order: list[str]) -> str:
    parts = []
    for i, ckpt in enumerate((base, *models)):
        absent = [n for n in order if n not in tables[i]]
        if absent:
            parts.append(f"{ckpt.path} lacks {len(absent)} ({_first(', '.join(absent))})")
    return ("tensor names differ between the inputs: " + "; ".join(parts)
            + ". Pass --allow-missing take to copy each such tensor from the input that has it")


def _first(names: str, limit: int = 200) -> str:
    return names if len(names) <= limit else names[:limit].rsplit(", ", 1)[0] + ", ..."


def _config(ckpt: Checkpoint) -> dict[str, Any]:
    path = ckpt.model_dir / "config.json" if ckpt.model_dir is not None else None
    data = read_config(path) if path is not None and path.is_file() else {}
    return data if isinstance(data, dict) else {}


def read_config(path: Path) -> Any:
    """A model's config.json, parsed; CheckpointError naming it when it cannot be read."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read config JSON ({exc})") from exc


def read_json_object(path: Path) -> dict[str, Any]:
    """A model's JSON file that holds an object (config.json, tokenizer_config.json), parsed;
    CheckpointError naming it when it cannot be read or is not an object."""
    data = read_config(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: must be a JSON object")
    return data


def vocabulary_rows(ckpt: Checkpoint) -> dict[str, int]:
    """The rows of a checkpoint's vocabulary tensors (embeddings, LM heads), by name."""
    return {name: info.shape[0] for name, info in ckpt.tensors.items()
            if _VOCAB_NAME.search(name) and len(info.shape) == 2}
