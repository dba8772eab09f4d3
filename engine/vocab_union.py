"""Vocabularies that change in a merge: mergekit's ``tokenizer_source`` and ``tokenizer:`` block.

mergekit 0.1.5 builds one output vocabulary and gives every merged model an embedding (and LM
head) with one row per token of it, in its order; the merge method then sees those tensors as
any others (no per-token weights or masks). This module computes what mergekit computes, from
the tokenizer.json files and the checkpoints' headers, and presents each model's vocabulary
tensors as such a permuted tensor, assembled chunk by chunk (``VocabularyFile``).

The output vocabulary (transformers' ``get_vocab()``: the tokenizer model's vocabulary plus the
added tokens):

* ``base``: the base's tokenizer; a model path: that model's; ``union``: the base's, to which
  every token another model has and the base lacks is added as an added token (plain
  tokens first, then the models' own added tokens with their settings; the first model
  that adds a token decides them). Models are visited base first, then as listed, each by
  token id (mergekit visits a hash map, whose order changes from run to run).
* Every key of the ``tokens:`` block is then added as a plain added token, even one already
  in the vocabulary (it keeps its id and becomes an added token, as transformers'
  ``add_tokens`` makes it).
* Adding a token follows the tokenizers library: a token already present keeps its id, its
  settings replaced; a new one takes the next id past the model vocabulary and the added
  tokens. Only ``added_tokens`` of tokenizer.json changes, so any tokenizer model whose
  vocabulary safeblend can read (BPE, WordPiece, WordLevel, Unigram) is rewritten exactly.

Each model's row for output token t (mergekit's ``PermutedEmbeddings``):

* its own row of t, when it has t and t is not ``force``d;
* else t's default row: the ``tokens:`` entry's source (``{kind: zero}``; a model path: that
  model's row of t; ``{kind: model_token, model, token | token_id}``: that row of that model);
  without an entry, the row of the one model that has t, zero when none has it, the base's row
  when a ``base_model`` is given and has t, else the mean of the rows of the models that have t;
* rows ``pad_to_multiple_of`` adds: the mean of that model's own output rows.

Defaults and means are computed in float64 and rounded once to the tensor's dtype (mergekit
accumulates in the tensor's dtype). config.json's ``vocab_size`` becomes the output rows.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import Checkpoint, TensorInfo
from .errors import CheckpointError, SpecError
from .quirks import read_json_object, vocabulary_rows

# Tokenizer models whose vocabulary safeblend reads (a mapping, or Unigram's list of pieces).
TOKENIZER_MODELS = ("BPE", "WordPiece", "WordLevel", "Unigram")
# An added token's settings, as tokenizer.json stores them (every one is required there).
ADDED_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")
_virtual_ids = itertools.count(1)


# -- tokenizers --------------------------------------------------------------------------------


@dataclass
class Tokenizer:
    """One tokenizer.json: its parsed data, the tokenizer model's vocabulary size, and the
    vocabulary transformers' ``get_vocab()`` gives (model vocabulary, then added tokens)."""

    path: Path
    data: dict[str, Any]
    model_size: int
    vocab: dict[str, int]
    added: dict[int, dict[str, Any]]  # id → {id, content, single_word, lstrip, rstrip, normalized, special}

    def add(self, entry: dict[str, Any]) -> None:
        """Add one token as the tokenizers library's ``add_tokens`` does: an identical added
        token changes nothing; a token already present keeps its id (its settings replaced);
        a new one takes the next id past the model vocabulary and the added tokens."""
        token = entry["content"]
        settings = {k: entry[k] for k in ADDED_FIELDS}
        known = self.vocab.get(token)
        if known is not None and known in self.added and _settings(self.added[known]) == settings:
            return
        if known is None:
            known = max(self.model_size, max(self.added, default=-1) + 1)
        self.added[known] = {"id": known, **settings}
        self.vocab[token] = known

    def text(self) -> str:
        """tokenizer.json with the current added tokens (by id, as the tokenizers library saves them)."""
        data = dict(self.data)
        data["added_tokens"] = [self.added[i] for i in sorted(self.added)]
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def _settings(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: entry[k] for k in ADDED_FIELDS}


def plain_token(token: str) -> dict[str, Any]:
    """A string given to transformers' ``add_tokens``: a normalized, non-special added token."""
    return {"content": token, "single_word": False, "lstrip": False, "rstrip": False, "normalized": True,
            "special": False}


def read_tokenizer(model_dir: Path) -> Tokenizer:
    """A model's tokenizer.json; SpecError naming the file when it is missing or not one
    safeblend can rewrite exactly."""
    path = Path(model_dir) / "tokenizer.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        model = data["model"]
        kind = model.get("type")
        vocab = model["vocab"]
        added_list = data.get("added_tokens") or []
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SpecError(f"{path}: cannot read the tokenizer ({exc.__class__.__name__}); a changed vocabulary "
                        "needs each model's tokenizer.json") from None
    if kind not in TOKENIZER_MODELS:
        raise SpecError(f"{path}: tokenizer model type {kind!r} cannot be rewritten (safeblend rewrites "
                        f"{', '.join(TOKENIZER_MODELS)})")
    try:
        tokens = {str(t): int(i) for t, i in vocab.items()} if isinstance(vocab, dict) else \
            {str(piece[0]): i for i, piece in enumerate(vocab)}
        added: dict[int, dict[str, Any]] = {}
        for entry in added_list:
            added[int(entry["id"])] = {"id": int(entry["id"]), **{k: entry[k] for k in ADDED_FIELDS}}
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise SpecError(f"{path}: an added token or vocabulary entry is incomplete ({exc.__class__.__name__}: "
                        f"{exc}); it cannot be rewritten exactly") from None
    size = len(vocab)
    for i, entry in sorted(added.items()):
        tokens[entry["content"]] = i
    return Tokenizer(path, data, size, tokens, added)


def output_tokenizer(source: str, tokenizers: list[Tokenizer], source_tokenizer: Tokenizer | None,
                     add_tokens: list[str]) -> Tokenizer:
    """The output tokenizer (module doc): ``tokenizers`` are the merged models', the base's
    first; ``source_tokenizer`` is the named model's for a path ``source``."""
    base = tokenizers[0]
    out = copy.deepcopy(source_tokenizer if source_tokenizer is not None else base)
    if source == "union":
        plain: dict[str, None] = {}
        added: dict[str, dict[str, Any]] = {}
        for tok in tokenizers:
            own_added = {e["content"] for e in tok.added.values()}
            for token, _ in sorted(tok.vocab.items(), key=lambda item: item[1]):
                if token not in own_added:
                    plain.setdefault(token)
            for i in sorted(tok.added):
                added.setdefault(tok.added[i]["content"], tok.added[i])
        for token in plain:
            if token not in added and token not in base.vocab:
                out.add(plain_token(token))
        for entry in added.values():
            out.add(entry)
    for token in add_tokens:
        out.add(plain_token(token))
    return out


# -- the rows each model gets ------------------------------------------------------------------


@dataclass(frozen=True)
class TokenRule:
    """One ``tokenizer.tokens`` entry: where a token's default row comes from, and ``force``."""

    kind: str  # "zero", "model" (that model's row of the token) or "model_token"
    model: str | None = None
    token: str | None = None
    token_id: int | None = None
    force: bool = False


@dataclass
class VocabularyPlan:
    """The output vocabulary and, per merged model, the rows of its vocabulary tensors."""

    models: list[str]  # real paths, the base's first (the order rows name models by)
    tokenizer: Tokenizer  # the output's
    tokens: list[str]  # by output id
    rows: int  # output rows: the vocabulary, padded to ``pad_to_multiple_of``
    own: list[np.ndarray]  # per model, per output id: its own row, or -1 (a default row)
    defaults: dict[int, tuple[tuple[int, int], ...]]  # output id → (model, row) pairs averaged; () is zero
    input_rows: list[int]  # per model: rows of its vocabulary tensors
    tensor_names: list[str]
    source_dir: Path | None = None  # a model whose tokenizer files the output takes
    same_tokenizer: bool = True  # the output's tokenizer.json is its source's, unchanged
    warnings: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.tokens)

    def changes_weights(self) -> bool:
        """Whether any model's vocabulary tensors differ from what it stores."""
        identity = np.arange(self.size)
        return self.rows != self.size or any(
            rows != self.size or not np.array_equal(own, identity) for own, rows in zip(self.own, self.input_rows))

    def wrap(self, base: Checkpoint, models: list[Checkpoint]) -> tuple[Checkpoint, list[Checkpoint]]:
        """The merge's checkpoints with their vocabulary tensors permuted (``VocabularyFile``)."""
        ckpts = [base, *models]
        index = {path: i for i, path in enumerate(self.models)}
        order = []
        for ckpt in ckpts:
            k = index.get(os.path.realpath(ckpt.path))
            if k is None:
                raise CheckpointError(f"{ckpt.path}: not a model the recipe's vocabulary was planned for")
            order.append(k)
        operands: list[dict[str, tuple[TensorInfo, Any]] | None] = [None] * len(self.models)
        for ckpt, k in zip(ckpts, order):
            files = {f.path: f for f in ckpt.files}
            table = {}
            for name in self.tensor_names:
                info = ckpt.tensors.get(name)
                if info is None or len(info.shape) != 2 or info.shape[0] != self.input_rows[k]:
                    raise CheckpointError(f"{ckpt.path}: tensor {name!r} changed since the recipe was read")
                table[name] = (info, files[info.file])
            operands[k] = table
        wrapped = []
        for ckpt, k in zip(ckpts, order):
            vfile = VocabularyFile(Path(f"{ckpt.path}#vocabulary-{next(_virtual_ids)}"), self, k, operands)
            tensors = {name: vfile.tensors.get(name, info) for name, info in ckpt.tensors.items()}
            wrapped.append(Checkpoint(path=ckpt.path, files=[vfile, *ckpt.files], tensors=tensors,
                                      model_dir=ckpt.model_dir))
        return wrapped[0], wrapped[1:]

    def write_files(self, out_dir: Path) -> None:
        """The output's tokenizer files and config.json ``vocab_size`` (after the base's were copied)."""
        from .model_files import copy_tokenizer_files
        from .writer import write_text_durably

        if self.source_dir is not None:
            copy_tokenizer_files(self.source_dir, out_dir)
        if not self.same_tokenizer:  # else the source's own files stand, byte for byte
            self._write_tokenizer(out_dir)
        model_config = out_dir / "config.json"
        if model_config.is_file():
            config = read_json_object(model_config)
            text = config.get("text_config")
            if "vocab_size" not in config and isinstance(text, dict) and "vocab_size" in text:
                config["text_config"] = {**text, "vocab_size": self.rows}
            else:
                config["vocab_size"] = self.rows
            write_text_durably(model_config, json.dumps(config, indent=2, sort_keys=True) + "\n")

    def _write_tokenizer(self, out_dir: Path) -> None:
        """tokenizer.json with the added tokens, and the files that list them again."""
        from .writer import write_text_durably

        write_text_durably(out_dir / "tokenizer.json", self.tokenizer.text())
        config_path = out_dir / "tokenizer_config.json"
        if config_path.is_file():
            config = read_json_object(config_path)
            if isinstance(config.get("added_tokens_decoder"), dict):
                config["added_tokens_decoder"] = {
                    str(i): {k: e[k] for k in sorted(ADDED_FIELDS)} for i, e in sorted(self.tokenizer.added.items())}
                write_text_durably(config_path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        legacy = out_dir / "added_tokens.json"
        if legacy.is_file():  # slow tokenizers' added tokens: those past the model vocabulary
            entries = {e["content"]: i for i, e in sorted(self.tokenizer.added.items())
                       if i >= self.tokenizer.model_size}
            write_text_durably(legacy, json.dumps(entries, indent=2, ensure_ascii=False) + "\n")


def _declared_vocab_size(model_dir: Path) -> int | None:
    """config.json's ``vocab_size`` (or its ``text_config``'s), if it states one."""
    path = model_dir / "config.json"
    if not path.is_file():
        return None
    config = read_json_object(path)
    text = config.get("text_config")
    value = config.get("vocab_size", text.get("vocab_size") if isinstance(text, dict) else None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def plan_vocabulary(what: str, source: str, model_dirs: list[str], has_base: bool, rules: dict[str, TokenRule],
                    pad_to_multiple_of: int | None, rules_what: str = "tokenizer") -> VocabularyPlan:
    """Plan the output vocabulary and every model's rows (module doc).

    ``model_dirs`` are the merged models (the base first; repeats are one model), ``source``
    is base, union or a model directory, ``has_base`` whether the recipe names a base_model.
    Raises SpecError starting with ``what`` (``rules_what`` for a ``tokens`` entry) for anything
    mergekit would not do the same way.
    """
    paths = list(dict.fromkeys(os.path.realpath(p) for p in model_dirs))
    shown = {os.path.realpath(p): p for p in reversed(model_dirs)}
    tokenizers = [read_tokenizer(Path(p)) for p in paths]
    input_rows, names, widths = [], None, set()
    for path in paths:
        ckpt = Checkpoint.open(Path(path))
        try:
            rows = vocabulary_rows(ckpt)
            widths.update(ckpt.tensors[n].shape[1] for n in rows)
        finally:
            ckpt.close()
        if not rows:
            raise SpecError(f"{what}: {shown[path]}: no embedding or LM head tensor to give the vocabulary's rows")
        if len(set(rows.values())) > 1:
            raise SpecError(f"{what}: {shown[path]}: its vocabulary tensors have different rows ({rows})")
        if names is not None and sorted(rows) != names:
            raise SpecError(f"{what}: {shown[path]} stores vocabulary tensors {sorted(rows)} but the base "
                            f"{names}; a changed vocabulary needs the same ones in every model (an LM head tied "
                            "in some models only is not supported)")
        names = sorted(rows)
        input_rows.append(next(iter(rows.values())))
    assert names is not None
    if len(widths) > 1:
        raise SpecError(f"{what}: the models' embeddings have different widths ({sorted(widths)})")
    for path, tok, rows in zip(paths, tokenizers, input_rows):
        # mergekit drops a model's tokens past config.json's vocab_size: refused here instead.
        declared = _declared_vocab_size(Path(path))
        limit = min(rows, declared) if declared is not None else rows
        beyond = [t for t, i in tok.vocab.items() if i >= limit]
        if beyond:
            raise SpecError(f"{what}: {tok.path}: token {beyond[0]!r} has id {tok.vocab[beyond[0]]}, beyond the "
                            f"{limit} rows of {shown[path]}'s embedding (mergekit drops such tokens); not supported")
    source_tokenizer, source_dir = None, None
    if source not in ("base", "union"):
        source_dir = Path(source)
        source_tokenizer = read_tokenizer(source_dir)
    tokenizer = output_tokenizer(source, tokenizers, source_tokenizer, list(rules))
    ids = sorted(tokenizer.vocab.values())
    if ids != list(range(len(ids))):
        gap = next(i for i, v in enumerate(ids) if v != i)
        raise SpecError(f"{what}: the output vocabulary's ids are not 0..{len(ids) - 1} (no token has id {gap}); "
                        "mergekit would index rows past the embedding")
    tokens = [""] * len(ids)
    for token, i in tokenizer.vocab.items():
        tokens[i] = token
    own = [np.array([tok.vocab.get(t, -1) for t in tokens], dtype=np.int64) for tok in tokenizers]
    size = len(tokens)
    rows = size if not pad_to_multiple_of or size % pad_to_multiple_of == 0 else \
        (size // pad_to_multiple_of + 1) * pad_to_multiple_of
    plan = VocabularyPlan(models=paths, tokenizer=tokenizer, tokens=tokens, rows=rows, own=own, defaults={},
                          input_rows=input_rows, tensor_names=names, source_dir=source_dir)
    plan.same_tokenizer = tokenizer.added == (source_tokenizer or tokenizers[0]).added
    _assign_defaults(plan, rules_what, tokenizers, rules, has_base)
    return plan


def _assign_defaults(plan: VocabularyPlan, what: str, tokenizers: list[Tokenizer], rules: dict[str, TokenRule],
                     has_base: bool) -> None:
    """Each output token's default row (module doc), as (model, row) pairs to average; a
    forced token's own rows are dropped (every model then takes the default)."""
    index = {path: k for k, path in enumerate(plan.models)}
    missing = []
    for i, token in enumerate(plan.tokens):
        present = [k for k, own in enumerate(plan.own) if own[i] >= 0]
        rule = rules.get(token)
        if rule is None:
            if len(present) == len(plan.models):
                continue  # every model has its own row
            if len(present) == 1 or (present and has_base and 0 in present):
                k = present[0] if len(present) == 1 else 0
                plan.defaults[i] = ((k, int(plan.own[k][i])),)
            elif not present:
                plan.defaults[i] = ()
                missing.append(token)
            else:
                plan.defaults[i] = tuple((k, int(plan.own[k][i])) for k in present)
            continue
        key = f"{what}.tokens[{token!r}]"
        if rule.kind == "zero":
            plan.defaults[i] = ()
        else:
            k = index.get(os.path.realpath(rule.model)) if rule.model is not None else None
            if k is None:
                raise SpecError(f"{key}.source: {rule.model!r} is not a model of this merge")
            if rule.kind == "model":
                if plan.own[k][i] < 0:
                    raise SpecError(f"{key}.source: {rule.model} has no token {token!r}")
                plan.defaults[i] = ((k, int(plan.own[k][i])),)
            else:
                row = rule.token_id if rule.token is None else tokenizers[k].vocab.get(rule.token)
                if row is None or not 0 <= row < plan.input_rows[k]:
                    shown_token = f"token {rule.token!r}" if rule.token is not None else f"token_id {rule.token_id}"
                    raise SpecError(f"{key}.source: {shown_token} is not a row of {rule.model}'s embedding")
                plan.defaults[i] = ((k, int(row)),)
        if rule.force:
            for own in plan.own:
                own[i] = -1
    if missing:
        plan.warnings.append(f"{len(missing)} token(s) of the output vocabulary are in none of the merged models "
                             f"(e.g. {missing[0]!r}): their rows are zero, as in mergekit")


# -- the permuted tensors ----------------------------------------------------------------------


class VocabularyFile:
    """A virtual safetensors file holding one model's vocabulary tensors as the output
    vocabulary orders them (``VocabularyPlan``), in the model's dtype.

    A view gathers whole rows into a per-thread buffer (the rows a chunk touches: at most the
    chunk plus two rows), reading the model's own rows run by run and a default row from the
    models it names; it stays valid until the same thread's next view of this file, which the
    executors never take before consuming the last. The mean rows ``pad_to_multiple_of`` adds
    are computed once per tensor by a pass over its rows in blocks.
    """

    BLOCK_BYTES = 4 << 20  # rows per block of the mean's pass
    READS_PER_DROP = 8  # row runs read between two drops of their pages (``_drop``)

    def __init__(self, path: Path, plan: VocabularyPlan, model: int,
                 operands: list[dict[str, tuple[TensorInfo, Any]] | None]) -> None:
        self.path = path
        self.metadata: dict[str, str] = {}
        self.plan = plan
        self.model = model
        self._operands = operands
        self.tensors: dict[str, TensorInfo] = {}
        cursor = 0
        for name in plan.tensor_names:
            info = operands[model][name][0]  # type: ignore[index]
            width = info.shape[1]
            virtual = TensorInfo(name, info.dtype, (plan.rows, width), path, cursor,
                                 info.dtype.nbytes(plan.rows * width))
            self.tensors[name] = virtual
            cursor += virtual.nbytes
        self.size = cursor
        self._order = list(self.tensors.values())
        self._local = threading.local()
        self._lock = threading.Lock()
        self._means: dict[str, np.ndarray] = {}

    # The interface of SafetensorsFile that the executors use.

    def view(self, info: TensorInfo, first: int, count: int) -> np.ndarray:
        """Elements [first, first + count) of a permuted tensor."""
        width = info.shape[1]
        r0, r1 = first // width, (first + count - 1) // width + 1 if count else first // width
        buffer = self._buffer(info, (r1 - r0) * width)
        self._rows(info.name, r0, r1, buffer.reshape(r1 - r0, width))
        lo = first - r0 * width
        return buffer[lo : lo + count]

    def byte_view(self, start: int, length: int) -> memoryview:
        if length == 0:
            return memoryview(b"")
        info, first, count = self._locate(start, length)
        return memoryview(np.ascontiguousarray(self.view(info, first, count)).view(np.uint8))

    def prefetch(self, start: int, length: int) -> None:
        """Pass a prefetch on to the span of the model's own rows a range reads."""
        if length <= 0:
            return
        info, first, count = self._locate(start, length)
        width = info.shape[1]
        r0, r1 = first // width, min((first + count - 1) // width + 1, self.plan.size)
        own = self.plan.own[self.model][r0:r1]
        own = own[own >= 0]
        if own.size:
            real, f = self._operands[self.model][info.name]  # type: ignore[index]
            lo, hi = int(own.min()), int(own.max()) + 1
            if hi - lo <= 4 * (r1 - r0) + 4:  # a scattered gather is left to the page cache
                f.prefetch(*real.byte_range(lo * width, (hi - lo) * width))

    def release(self, start: int, length: int) -> None:
        """Nothing to do: each view dropped the input rows it read (``_rows``)."""

    def stored_bytes(self, start: int, length: int) -> int:
        return length

    def close(self) -> None:
        self._local = threading.local()

    # Helpers.

    def _locate(self, start: int, length: int) -> tuple[TensorInfo, int, int]:
        for info in self._order:
            if info.start <= start < info.start + info.nbytes:
                size = info.dtype.itemsize
                return info, (start - info.start) // size, length // size
        raise KeyError(start)

    def _buffer(self, info: TensorInfo, count: int) -> np.ndarray:
        buffers = self._local.__dict__.setdefault("buffers", {})
        buffer = buffers.get(info.dtype.name)
        if buffer is None or buffer.size < count:
            buffer = np.empty(count, dtype=info.dtype.numpy)
            buffers[info.dtype.name] = buffer
        return buffer[:count]

    def _real_rows(self, model: int, name: str, row: int, count: int) -> np.ndarray:
        info, f = self._operands[model][name]  # type: ignore[index]
        width = info.shape[1]
        return f.view(info, row * width, count * width).reshape(count, width)

    def _rows(self, name: str, r0: int, r1: int, out: np.ndarray) -> None:
        """Output rows [r0, r1) of this model's tensor ``name`` into ``out``; the input rows
        read are then dropped from the process (``release``), each model's span at once."""
        plan, own = self.plan, self.plan.own[self.model]
        spans: dict[int, list[int]] = {}  # model → [lowest, highest + 1) row read since the last drop
        reads = [0]

        def read(model: int, row: int, count: int) -> np.ndarray:
            if reads[0] == self.READS_PER_DROP:
                self._drop(name, spans)
                reads[0] = 0
            reads[0] += 1
            span = spans.setdefault(model, [row, row + count])
            span[0], span[1] = min(span[0], row), max(span[1], row + count)
            return self._real_rows(model, name, row, count)

        r = r0
        while r < r1:
            if r >= plan.size:  # pad_to_multiple_of's rows: the mean of this model's output rows
                out[r - r0 :] = self._mean(name)
                break
            src = int(own[r])
            if src >= 0:
                n = 1
                end = min(r1, plan.size)
                while r + n < end and own[r + n] == src + n:
                    n += 1
                np.copyto(out[r - r0 : r - r0 + n], read(self.model, src, n), casting="unsafe")
                r += n
                continue
            pairs = plan.defaults[r]
            if not pairs:
                out[r - r0] = 0
            elif len(pairs) == 1:
                np.copyto(out[r - r0], read(pairs[0][0], pairs[0][1], 1)[0], casting="unsafe")
            else:
                total = np.zeros(out.shape[1], dtype=np.float64)
                for k, row in pairs:
                    total += read(k, row, 1)[0]
                np.copyto(out[r - r0], total / len(pairs), casting="unsafe")
            r += 1
        self._drop(name, spans)

    def _drop(self, name: str, spans: dict[int, list[int]]) -> None:
        """Drop the input rows read (each model's span) from the process: a gather's rows lie
        anywhere in the inputs, and each page fault maps its neighbours too (fault-around), so
        without this the pages around every row read stay mapped. Measured on a 32000 × 2048
        bf16 pair whose ids are shuffled, 8 MiB chunks: 426 MiB peak never dropping, 297 MiB
        dropping once per chunk, 197 MiB every 8 runs (the plain merge: 152 MiB; the rest is
        the gathered chunks' buffers). Rows another thread still reads are only refaulted
        from the page cache."""
        for model, (lo, hi) in spans.items():
            info, f = self._operands[model][name]  # type: ignore[index]
            f.release(*info.byte_range(lo * info.shape[1], (hi - lo) * info.shape[1]))
        spans.clear()

    def _mean(self, name: str) -> np.ndarray:
        """The mean of this model's rows [0, vocabulary size) of ``name``, in its dtype
        (computed once, in float64, by blocks of rows)."""
        with self._lock:
            mean = self._means.get(name)
            if mean is None:
                info = self.tensors[name]
                width = info.shape[1]
                step = max(1, self.BLOCK_BYTES // (8 * width))
                total = np.zeros(width, dtype=np.float64)
                block = np.empty((step, width), dtype=info.dtype.numpy)
                for r in range(0, self.plan.size, step):
                    n = min(step, self.plan.size - r)
                    self._rows(name, r, r + n, block[:n])
                    total += block[:n].astype(np.float64).sum(axis=0)
                mean = (total / self.plan.size).astype(info.dtype.numpy)
                self._means[name] = mean
            return mean
