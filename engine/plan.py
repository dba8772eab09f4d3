"""Planning: from the inputs' headers to every output tensor's action, shard and byte offset.

Everything here runs before a single data byte is read: the inputs are checked against each
other, each output tensor gets its sources and action, and the output's shard layout (file
names, headers, offsets) is fixed so the writer can lay headers down first and fill data in
place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

from .checkpoint import Checkpoint, TensorInfo
from .dtypes import DTYPES, DType
from .errors import IncompatibleInputsError

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

    @property
    def numel(self) -> int:
        return self.base.numel

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


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

    @property
    def total_size(self) -> int:
        """Tensor bytes written (the index's ``metadata.total_size``)."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def output_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def bytes_to_read(self) -> int:
        return sum(t.base.nbytes + (sum(m.nbytes for m in t.models) if t.action == "merge" else 0)
                   for t in self.tensors)


def check_compatible(base: Checkpoint, models: list[Checkpoint]) -> None:
    """The inputs must hold the same tensor names with the same shapes (dtypes may differ)."""
    for model in models:
        missing = [n for n in base.tensors if n not in model.tensors]
        extra = [n for n in model.tensors if n not in base.tensors]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing from it (first: {', '.join(missing[:3])})")
            if extra:
                parts.append(f"{len(extra)} not in the base (first: {', '.join(extra[:3])})")
            raise IncompatibleInputsError(
                f"{model.path}: tensor names differ from the base {base.path}: " + "; ".join(parts)
            )
        for name, info in base.tensors.items():
            other = model.tensors[name]
            if other.shape != info.shape:
                raise IncompatibleInputsError(
                    f"{model.path}: tensor {name!r} has shape {list(other.shape)} but the base's is "
                    f"{list(info.shape)}"
                )


def plan(
    base: Checkpoint,
    models: list[Checkpoint],
    out_dtype: str | None,
    shard_size: int,
    metadata: dict[str, str],
) -> MergePlan:
    """Decide every output tensor and lay out the shards.

    Args:
        base: the pre-fine-tuning checkpoint; its tensor order is the output's.
        models: the fine-tuned checkpoints.
        out_dtype: safetensors dtype name for float outputs, or None to keep the base's.
        shard_size: largest shard in bytes (a tensor larger than this gets a shard alone).
        metadata: strings recorded in every shard header (``format`` is added).
    """
    check_compatible(base, models)
    warnings: list[str] = []
    tensors: list[OutputTensor] = []
    uncomputable: list[str] = []
    for name, info in base.tensors.items():
        sources = [m.tensors[name] for m in models]
        if info.dtype.computable and all(s.dtype.computable for s in sources):
            dtype = DTYPES[out_dtype] if out_dtype else info.dtype
            tensors.append(OutputTensor(name, info.shape, dtype, info, sources, "merge"))
        else:
            if info.dtype.is_float or any(s.dtype.is_float for s in sources):
                uncomputable.append(name)
            tensors.append(OutputTensor(name, info.shape, info.dtype, info, sources, "copy"))
    if uncomputable:
        warnings.append(
            f"{len(uncomputable)} tensor(s) in a dtype that is not merged (e.g. {uncomputable[0]!r}, "
            f"{base.tensors[uncomputable[0]].dtype.name}) are copied from the base"
        )
    shards = _layout(tensors, shard_size, {"format": "pt", **metadata})
    return MergePlan(tensors=tensors, shards=shards, warnings=warnings)


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
