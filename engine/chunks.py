"""The chunk vocabulary shared by every stream over tensors (the executors, reduce passes, the
drift report): how a tensor is cut, and where a chunk's bytes are (``TensorInfo.byte_range``
in an input, ``OutputTensor.byte_range`` in the output)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from .checkpoint import SafetensorsFile, TensorInfo
from .plan import MergePlan, OutputTensor


@dataclass(frozen=True)
class Chunk:
    """Elements [first, first + count) of one output tensor."""

    tensor: OutputTensor
    first: int
    count: int

    @property
    def out_range(self) -> tuple[int, int]:
        """(offset in its shard, length) of the chunk's output bytes."""
        return self.tensor.byte_range(self.first, self.count)

    def source_range(self, info: TensorInfo) -> tuple[int, int]:
        """(offset in its file, length) of the chunk's bytes of the input ``info``."""
        return info.byte_range(self.first, self.count)


def chunk_elements(chunk_bytes: int, *itemsizes: int) -> int:
    """Elements per chunk: as many as fit ``chunk_bytes`` in the widest operand (at least one)."""
    return max(1, chunk_bytes // max(itemsizes))


def element_steps(numel: int, step: int) -> Iterator[tuple[int, int]]:
    """(first, count) of each chunk of ``step`` elements (the last may be shorter)."""
    for first in range(0, numel, step):
        yield first, min(step, numel - first)


def iter_chunks(plan: MergePlan, chunk_bytes: int, kept: frozenset[str] = frozenset()) -> Iterator[Chunk]:
    """Every planned tensor but the ``kept`` ones (already in place: a resumed merge), cut into
    chunks whose largest operand is at most ``chunk_bytes``."""
    for tensor in plan.tensors:
        if tensor.name in kept:
            continue
        for t in tensor.pieces():
            step = chunk_elements(chunk_bytes, t.dtype.itemsize, t.base.dtype.itemsize,
                                  *(m.dtype.itemsize for m in t.models))
            if t.requant is not None:
                step = t.requant.step(step)  # whole fp8 block rows
            for first, count in element_steps(t.numel, step):
                yield Chunk(t, first, count)


def release_inputs(inputs: list[tuple[TensorInfo, SafetensorsFile]], first: int, count: int) -> int:
    """Drop elements [first, first + count) of each input from the process once consumed;
    returns the bytes they read from disk."""
    read = 0
    for info, f in inputs:
        start, length = info.byte_range(first, count)
        f.release(start, length)
        read += f.stored_bytes(start, length)
    return read
