"""Reading safetensors checkpoints: header parsing, validation, sharded indexes, memory maps.

The format is one page: an 8-byte little-endian header length N, N bytes of JSON mapping each
tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the
data region that follows), an optional ``"__metadata__"`` of strings, then the data. Only the
headers are read when a checkpoint is opened; tensor bytes are reached later through read-only
memory maps, one chunk at a time, and released once consumed.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

import numpy as np

from .dtypes import DTYPES, DType
from .errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"  # a PEFT adapter, read by safeblend.lora
# The safetensors library refuses headers above 100 MB; a larger one is corrupt, not big.
MAX_HEADER_BYTES = 100_000_000
_PAGE = mmap.PAGESIZE
# How far beyond a consumed range release() also drops pages (see there): a PMD-sized folio.
RELEASE_MARGIN = 2 * 2**20
_BIN_HINT = (" (PyTorch pickle weights: only safetensors is read; convert with transformers: "
             "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True))")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and absolute byte range in that file."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute offset of the first byte in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def auto_dtype(self) -> DType:
        """The dtype ``--dtype auto`` writes this tensor in: its own (a dequantized one's differs)."""
        return self.dtype

    def as_bytes(self) -> "TensorInfo":
        """The same bytes seen as a flat U8 tensor: how packed (sub-byte) tensors are copied."""
        return TensorInfo(self.name, DTYPES["U8"], (self.nbytes,), self.file, self.start, self.nbytes)


@dataclass
class SafetensorsFile:
    """One ``.safetensors`` file: its parsed header and, once opened, a read-only memory map."""

    path: Path
    size: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    _map: mmap.mmap | None = field(default=None, repr=False)
    _map_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _mapped(self) -> mmap.mmap:
        """The file's read-only map, created on first use (once, even with several threads)."""
        with self._map_lock:
            if self._map is None:
                with open(self.path, "rb") as handle:
                    self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
                self._map.madvise(mmap.MADV_SEQUENTIAL)
            return self._map

    def view(self, info: TensorInfo, first: int, count: int) -> np.ndarray:
        """A read-only 1-D array over elements [first, first + count) of a tensor, no copy."""
        offset = info.start + first * info.dtype.itemsize
        return np.frombuffer(self._mapped(), dtype=info.dtype.numpy, count=count, offset=offset)

    def byte_view(self, start: int, length: int) -> memoryview:
        """A read-only memoryview over absolute bytes [start, start + length) of the file."""
        return memoryview(self._mapped())[start : start + length]

    def prefetch(self, start: int, length: int) -> None:
        """Ask the kernel to start reading a byte range ahead of use (asynchronous readahead)."""
        if length > 0:
            mapped = self._mapped()
            lo, hi = _page_span(start, length, len(mapped))
            mapped.madvise(mmap.MADV_WILLNEED, lo, hi - lo)

    def stored_bytes(self, start: int, length: int) -> int:
        """Bytes read from disk for a byte range (``bytes_read`` in the summary): the range."""
        return length

    def release(self, start: int, length: int) -> None:
        """Drop a consumed byte range from this process's resident set.

        The map is read-only and shared, so MADV_DONTNEED only unmaps the pages from the
        process; the page cache keeps them and a later touch refaults them intact. The range
        is widened by RELEASE_MARGIN on both sides: a page fault maps the neighbouring pages
        too (fault-around, large folios), so touching one chunk re-maps the edges of the
        chunks beside it after they were released; left alone, that residue grows with the
        number of chunks (measured: 11 MiB after a 1.1B merge, 18 MiB after a 3.3B one).
        Dropping a neighbour's pages while it is still being read only costs a refault.
        """
        if self._map is not None and length > 0:
            start, length = max(0, start - RELEASE_MARGIN), length + 2 * RELEASE_MARGIN
            lo, hi = _page_span(start, length, len(self._map))
            self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        """Unmap the file (views taken from it must no longer be used)."""
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view is still alive; the map goes when it does
                pass
            self._map = None


def _page_span(start: int, length: int, limit: int) -> tuple[int, int]:
    lo = start - start % _PAGE
    hi = min(limit, -(-(start + length) // _PAGE) * _PAGE)
    return lo, hi


def read_safetensors_header(path: Path) -> SafetensorsFile:
    """Parse and validate one file's header without touching its data.

    Raises CheckpointError naming the file and the first problem found: a file too short
    for its header, a header that is not JSON or not the expected shape, an unknown dtype,
    a byte range that does not match the shape, or ranges that overlap, leave gaps or do
    not cover the data region exactly.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: file is {size} bytes, too short to be safetensors")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{path}: header length {header_len} is implausible (over {MAX_HEADER_BYTES} "
                    "bytes); the file is corrupt or not safetensors"
                )
            if 8 + header_len > size:
                raise CheckpointError(
                    f"{path}: header length {header_len} runs past the end of the {size}-byte "
                    "file (truncated or not safetensors)"
                )
            raw = handle.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    data_start = 8 + header_len
    tensors = {name: _parse_entry(path, name, entry, data_start, size - data_start) for name, entry in header.items()}
    _check_coverage(path, tensors, data_start, size)
    return SafetensorsFile(path=path, size=size, tensors=tensors, metadata=metadata)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json object hook: a name given twice in one header is corruption, not an override."""
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {key!r} appears twice")
        result[key] = value
    return result


def _parse_entry(path: Path, name: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: entry must be an object with dtype, shape, data_offsets")
    dtype_name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        known = ", ".join(DTYPES)
        raise CheckpointError(f"{where}: unknown dtype {dtype_name!r} (known: {known})")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {_clip(shape)}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_uint(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise CheckpointError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {_clip(offsets)}")
    dtype = DTYPES[dtype_name]
    bits = _shape_bytes(shape, dtype.bits, 2**67)
    if bits is None:
        raise CheckpointError(f"{where}: shape {_clip(shape)} of {dtype_name} needs over 2^64 bytes, more than any "
                              f"file (the data region here is {data_size} bytes)")
    if bits % 8:  # packed sub-byte elements must end on a byte boundary (safetensors' own rule)
        raise CheckpointError(f"{where}: shape {shape} of {dtype_name} is {bits} bits, not a whole number of "
                              f"bytes ({dtype.bits}-bit elements are packed without padding)")
    expected = bits // 8
    if offsets[1] - offsets[0] != expected:
        raise CheckpointError(
            f"{where}: holds {offsets[1] - offsets[0]} bytes but shape {shape} of {dtype_name} "
            f"needs {expected}"
        )
    return TensorInfo(name, dtype, tuple(shape), path, data_start + offsets[0], expected)


def _shape_bytes(shape: list[int], bits: int, limit: int) -> int | None:
    """Bits a shape needs, or None once it exceeds ``limit``. Stops early: the product of a
    long list of large dimensions (fuzzing found this) would otherwise grow without bound."""
    if 0 in shape:
        return 0
    total = bits
    for dim in shape:
        total *= dim
        if total > limit:
            return None
    return total


def _clip(value: object, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _is_uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_coverage(path: Path, tensors: dict[str, TensorInfo], data_start: int, size: int) -> None:
    """Byte ranges must tile the data region exactly: no overlap, no gap, no shortfall."""
    cursor = data_start
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.nbytes)):
        if info.start != cursor:
            problem = "overlaps the previous tensor" if info.start < cursor else "leaves a gap before it"
            raise CheckpointError(f"{path}: tensor {info.name!r} {problem} (data offset {info.start - data_start})")
        cursor += info.nbytes
    if cursor > size:
        raise CheckpointError(
            f"{path}: file is truncated: the header describes {cursor} bytes but the file has {size}"
        )
    if cursor < size:
        raise CheckpointError(
            f"{path}: {size - cursor} bytes after the last tensor are not described by the header"
        )


def peft_adapter_dir(path: Path) -> Path | None:
    """The PEFT adapter directory ``path`` names, else None.

    ``path`` may be the directory or a file in it; a directory with ``adapter_config.json``
    and no full-model weights (``model.safetensors`` or an index) is an adapter.
    """
    root = path.parent if path.is_file() and path.name.startswith(("adapter_config", "adapter_model")) else path
    if not (root / ADAPTER_CONFIG_NAME).is_file():
        return None
    if (root / SINGLE_NAME).is_file() or (root / INDEX_NAME).is_file():
        return None
    return root


@dataclass
class Checkpoint:
    """A model as a set of safetensors files, viewed through their headers.

    ``tensors`` keeps the checkpoint's own order: files in index/name order, and within a
    file by data offset.
    """

    path: Path
    files: list[SafetensorsFile]
    tensors: dict[str, TensorInfo]
    model_dir: Path | None  # the directory holding config/tokenizer files, if any

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Checkpoint":
        """Open a model directory or a single ``.safetensors`` file, reading headers only."""
        root = Path(path)
        if not root.exists():
            raise CheckpointError(f"{root}: no such file or directory")
        if peft_adapter_dir(root) is not None:
            raise CheckpointError(
                f"{root}: is a PEFT adapter (adapter_config.json), not a full model; give it as a fine-tuned "
                "model (FT), after the full BASE model it was trained from"
            )
        if root.is_file():
            if root.name.endswith(".safetensors.index.json"):
                return cls._from_index(root, root.parent)
            if not root.name.endswith(".safetensors"):
                hint = _BIN_HINT if root.name.endswith((".bin", ".pt", ".pth", ".bin.index.json")) else ""
                raise CheckpointError(f"{root}: not a .safetensors file or model directory{hint}")
            return cls._from_files(root, [root], model_dir=None)
        index = root / INDEX_NAME
        if index.is_file():
            return cls._from_index(index, root)
        if (root / SINGLE_NAME).is_file():
            return cls._from_files(root, [root / SINGLE_NAME], model_dir=root)
        shards = sorted(p for p in root.glob("*.safetensors") if p.is_file())
        if shards:
            return cls._from_files(root, shards, model_dir=root)
        hint = ""
        if any(root.glob("*.bin")) or any(root.glob("*.pt")) or any(root.glob("*.pth")) or any(
                root.glob("*.bin.index.json")):
            hint = " (found PyTorch .bin/.pt weights:" + _BIN_HINT.split(":", 1)[1]
        raise CheckpointError(f"{root}: no .safetensors files in this directory{hint}")

    @classmethod
    def _from_index(cls, index: Path, root: Path) -> "Checkpoint":
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise CheckpointError(f"{index}: cannot read index JSON ({exc})") from exc
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
        shard_names = list(dict.fromkeys(weight_map.values()))
        for name in shard_names:
            if not name.endswith(".safetensors"):
                raise CheckpointError(f"{index}: names shard {_clip(name)}, which is not a .safetensors file"
                                      f"{_BIN_HINT}")
            if "\0" in name:  # no file can have it; say so rather than "does not exist"
                raise CheckpointError(f"{index}: shard name {_clip(name)} contains a NUL byte")
            if Path(name).name != name:
                raise CheckpointError(f"{index}: shard name {name!r} must be a plain file name")
            if not (root / name).is_file():
                raise CheckpointError(f"{index}: names shard {name!r}, which does not exist in {root}")
        checkpoint = cls._from_files(root, [root / n for n in shard_names], model_dir=root)
        for name, shard in weight_map.items():
            info = checkpoint.tensors.get(name)
            if info is None or info.file.name != shard:
                raise CheckpointError(f"{index}: tensor {name!r} is listed in {shard} but not stored there")
        unlisted = [n for n in checkpoint.tensors if n not in weight_map]
        if unlisted:
            raise CheckpointError(
                f"{index}: {len(unlisted)} stored tensor(s) missing from weight_map, e.g. {unlisted[0]!r}"
            )
        return checkpoint

    @classmethod
    def _from_files(cls, root: Path, paths: list[Path], model_dir: Path | None) -> "Checkpoint":
        files = [read_safetensors_header(p) for p in paths]
        tensors: dict[str, TensorInfo] = {}
        for f in files:
            for info in sorted(f.tensors.values(), key=lambda t: t.start):
                if info.name in tensors:
                    raise CheckpointError(
                        f"{root}: tensor {info.name!r} is stored twice, in {tensors[info.name].file.name} "
                        f"and {f.path.name}"
                    )
                tensors[info.name] = info
        return cls(path=root, files=files, tensors=tensors, model_dir=model_dir)

    def file_of(self, info: TensorInfo) -> SafetensorsFile:
        """The open file that stores a tensor."""
        for f in self.files:
            if f.path == info.file:
                return f
        raise KeyError(info.file)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def close(self) -> None:
        for f in self.files:
            f.close()
