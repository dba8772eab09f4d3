"""Planning: from the inputs' headers to every output tensor's action, shard and byte offset.

Everything here runs before a single data byte is read: the inputs are checked against each
other, each output tensor gets its sources and action, and the output's shard layout (file
names, headers, offsets) is fixed so the writer can lay headers down first and fill data in
place.

A float tensor that every fine-tuned model takes from the base itself (the same file, the same
byte range: the tensors a LoRA adapter leaves alone, such as embeddings, LM head and norms, or
a model given as its own fine-tune) is planned as a copy of the base, cast to the output dtype
where that differs: every task vector is zero there, so every method returns the base, and a
copy reads one input instead of two and does no arithmetic. A literal merge would differ from
the copy only by IEEE rules the copy rightly skips: an infinite base value gives inf − inf =
NaN in ``θ_base + λ·(θ_ft − θ_base)``, and −0.0 becomes +0.0; the copy keeps the base's value,
which is what θ_ft = θ_base means. A full fine-tune stored in its own files is always merged,
even where its values equal the base's. A method that changes such a tensor anyway says so
(``MergeMethod.must_compute``: passthrough's ``scale``), and it is computed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any, Callable, Literal

from .checkpoint import Checkpoint, TensorInfo
from .dtypes import DTYPES, DType
from .methods.params import layer_positions
from .model_files import check_config_file, companion_bytes
from .quantized import output_config_changes, requantized_tensors
from .quirks import reconcile  # tied embeddings, resized vocabularies, missing tensors

Action = Literal["merge", "copy"]


@dataclass
class OutputTensor:
    """One tensor of the output: where its inputs are, what to do, and where it goes."""

    name: str
    shape: tuple[int, ...]
    dtype: DType
    base: TensorInfo
    models: list[TensorInfo]
    action: Action
    shard: int = -1
    offset: int = -1  # absolute byte offset in its shard file
    # Elements past ``numel`` (rows a fine-tune added to the vocabulary) are copied from here.
    tail: TensorInfo | None = None
    requant: Any = None  # fp8 output with fresh block scales (safeblend.quantized.Requantize)

    @property
    def numel(self) -> int:
        """Elements merged (or copied) from ``base`` and ``models``; the tail follows them."""
        return self.base.numel

    @property
    def nbytes(self) -> int:
        return self.dtype.nbytes(prod(self.shape))

    def byte_range(self, first: int, count: int) -> tuple[int, int]:
        """(absolute offset in its shard, length) of elements [first, first + count)."""
        size = self.dtype.itemsize
        return self.offset + first * size, count * size

    def pieces(self) -> list["OutputTensor"]:
        """What the executor runs: this tensor's own range, then its tail as a copy."""
        if self.requant is not None and self.requant.derived:  # a scale tensor its weight's chunks write
            return []
        if self.dtype.packed:  # sub-byte elements (always a copy): moved as the bytes they are
            return [OutputTensor(self.name, (self.nbytes,), DTYPES["U8"], self.base.as_bytes(), [], "copy",
                                 self.shard, self.offset)]
        if self.tail is None:
            return [self]
        tail = OutputTensor(self.name, self.tail.shape, self.dtype, self.tail, [], "copy", self.shard,
                            self.byte_range(self.numel, 0)[0])
        return [self, tail]


@dataclass
class Shard:
    """One output file: its name, tensors in data order, header bytes and total size."""

    filename: str
    tensors: list[OutputTensor] = field(default_factory=list)
    header: bytes = b""

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def size(self) -> int:
        return len(self.header) + self.data_bytes


@dataclass
class MergePlan:
    """The whole merge, decided: tensors in output order and the shard layout."""

    tensors: list[OutputTensor]
    shards: list[Shard]
    warnings: list[str]
    config: dict[str, Any] = field(default_factory=dict)  # config.json keys the output must change
    files_from: Path | None = None  # model directory whose tokenizer files the output needs
    companion_bytes: int = 0  # config and tokenizer files copied beside the shards (safeblend.model_files)

    @property
    def total_size(self) -> int:
        """Tensor bytes written (the index's ``metadata.total_size``)."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def output_bytes(self) -> int:
        return sum(s.size for s in self.shards) + self.companion_bytes


def make_plan(
    base: Checkpoint,
    models: list[Checkpoint],
    out_dtype: str | None,
    shard_size: int,
    metadata: dict[str, str],
    allow_missing: str | None = None,
    must_compute: Callable[[str, float], bool] | None = None,
) -> MergePlan:
    """Decide every output tensor and lay out the shards.

    Args:
        base: the pre-fine-tuning checkpoint; its tensor order is the output's.
        models: the fine-tuned checkpoints.
        out_dtype: safetensors dtype name for float outputs, or None to keep the base's.
        shard_size: largest shard in bytes (a tensor larger than this gets a shard alone).
        metadata: strings recorded in every shard header (``format`` is added).
        allow_missing: ``"take"`` copies tensors only some inputs have (``safeblend.quirks``).
        must_compute: ``(name, position)`` → whether the method changes a tensor even where
            every input is the base's own bytes (passthrough's ``scale``): never a copy then.
    """
    for ckpt in models:
        check_config_file(ckpt.model_dir)  # before anything reads it: a FIFO would block
    extra_bytes = companion_bytes(base.model_dir)
    matched = reconcile(base, models, allow_missing)
    positions = layer_positions(e.name for e in matched.entries) if must_compute is not None else {}
    warnings: list[str] = list(matched.warnings)
    tensors: list[OutputTensor] = []
    uncomputable: list[OutputTensor] = []
    for entry in matched.entries:
        if entry.only is not None:  # present in one input only: copied (cast to out_dtype if float)
            only = entry.only
            dtype = DTYPES[out_dtype] if out_dtype and only.dtype.computable else only.auto_dtype
            tensors.append(OutputTensor(entry.name, only.shape, dtype, only, [], "copy"))
            continue
        name, info, sources = entry.name, entry.base, entry.models
        if info.dtype.computable and all(s.dtype.computable for s in sources):
            dtype = DTYPES[out_dtype] if out_dtype else info.auto_dtype
            if all(_same_tensor(s, info) for s in sources) and not (
                    must_compute is not None and must_compute(name, positions.get(name, 1.0))):  # (module doc)
                tensors.append(OutputTensor(name, entry.shape, dtype, info, [], "copy"))
                continue
            tensors.append(OutputTensor(name, entry.shape, dtype, info, sources, "merge", tail=entry.tail))
        else:
            tensors.append(OutputTensor(name, entry.shape, info.dtype, info, sources, "copy", tail=entry.tail))
            if info.dtype.is_float or any(s.dtype.is_float for s in sources):
                uncomputable.append(tensors[-1])
    if uncomputable:
        warnings.append(
            f"{len(uncomputable)} tensor(s) in a dtype that is not merged (e.g. {uncomputable[0].name!r}, "
            f"{uncomputable[0].base.dtype.name}) are copied from the base"
        )
    tensors = requantized_tensors(tensors, base, out_dtype)  # --dtype fp8: the base's fp8 block format
    shards = _layout(tensors, shard_size, {"format": "pt", **metadata})
    config = {**matched.config, **output_config_changes(base, out_dtype)}  # a dequantized base's quantization_config goes
    return MergePlan(tensors=tensors, shards=shards, warnings=warnings, config=config,
                     files_from=matched.files_from, companion_bytes=extra_bytes)


def _same_tensor(a: TensorInfo, b: TensorInfo) -> bool:
    """Whether ``a`` and ``b`` are one stored tensor: the same bytes of the same file, read alike."""
    return (a.file, a.start, a.nbytes, a.dtype, a.shape) == (b.file, b.start, b.nbytes, b.dtype, b.shape)


def _layout(tensors: list[OutputTensor], shard_size: int, metadata: dict[str, str]) -> list[Shard]:
    """Greedy Hugging Face-style sharding in tensor order, then headers and offsets."""
    groups: list[list[OutputTensor]] = [[]]
    filled = 0
    for t in tensors:
        if groups[-1] and filled + t.nbytes > shard_size:
            groups.append([])
            filled = 0
        groups[-1].append(t)
        filled += t.nbytes
    count = len(groups)
    shards = []
    for i, group in enumerate(groups):
        filename = "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        shard = Shard(filename, group, _header(group, metadata))
        cursor = len(shard.header)
        for t in group:
            t.shard, t.offset = i, cursor
            cursor += t.nbytes
        shards.append(shard)
    return shards


def _header(tensors: list[OutputTensor], metadata: dict[str, str]) -> bytes:
    """The safetensors header: length prefix + JSON, padded with spaces to a multiple of 8."""
    entries: dict[str, object] = {"__metadata__": metadata}
    cursor = 0
    for t in tensors:
        entries[t.name] = {"dtype": t.dtype.name, "shape": list(t.shape), "data_offsets": [cursor, cursor + t.nbytes]}
        cursor += t.nbytes
    body = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    body += b" " * (-(8 + len(body)) % 8)
    return len(body).to_bytes(8, "little") + body
