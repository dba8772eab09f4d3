"""Reading safetensors checkpoints: header parsing, validation, sharded indexes, memory maps.

The format is one page: an 8-byte little-endian header length N, N bytes of JSON mapping each
tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the
data region that follows), an optional ``"__metadata__"`` of strings, then the data. Only the
headers are read when a checkpoint is opened; tensor bytes are reached later through read-only
memory maps, one chunk at a time, and released once consumed.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import signal
import stat
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Callable

import numpy as np

from .dtypes import DTYPES, DType
from .errors import CheckpointError


class InputChangedError(CheckpointError):
    """An input file was truncated, rewritten or replaced while the merge was reading it."""

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"  # a PEFT adapter, read by safeblend.lora
# The safetensors library refuses headers above 100 MB; a larger one is corrupt, not big.
MAX_HEADER_BYTES = 100_000_000
_PAGE = mmap.PAGESIZE
# How far beyond a consumed range release() also drops pages (see there): a PMD-sized folio.
RELEASE_MARGIN = 2 * 2**20
# Input files mapped at once (each holds two descriptors); older idle ones are closed (_OpenMaps).
MAX_OPEN_MAPS = 256
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

    def byte_range(self, first: int, count: int) -> tuple[int, int]:
        """(absolute offset, length) in the file of elements [first, first + count)."""
        size = self.dtype.itemsize
        return self.start + first * size, count * size

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
    # (device, inode, size, mtime) when the header was read: the file the merge planned with.
    identity: tuple[int, int, int, int] | None = None
    _map: mmap.mmap | None = field(default=None, repr=False)
    _map_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _fd: int = field(default=-1, repr=False)  # kept open while mapped: holds the read lease

    def _mapped(self) -> mmap.mmap:
        """The file's read-only map, opened on first use; the caller holds ``_map_lock`` and
        uses the map before releasing it (an idle map may be closed by ``_open_maps``).

        The file must still be the one whose header was read (same inode, size and mtime).
        A read lease is taken where the system grants one (``input_guard``), so that a
        truncation stops the merge with a clear error instead of a SIGBUS when a mapped page
        beyond the new end is touched.
        """
        if self._map is not None and not input_guard.holds(self) and os.fstat(self._fd).st_size != self.size:
            # Without a lease, a truncation is caught here, before the next chunk is read.
            raise InputChangedError(f"{self.path}: changed while being read (its size is no longer "
                                    f"{self.size} bytes)")
        if self._map is None:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _check_identity(self.path, os.fstat(fd), self.identity)
                input_guard.lease(self, fd)
                self._map = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            except BaseException:
                input_guard.forget(self)
                os.close(fd)
                raise
            self._fd = fd
            self._map.madvise(mmap.MADV_SEQUENTIAL)
            _open_maps.opened(self)
        else:
            _open_maps.used(self)
        return self._map

    def check_unchanged(self) -> None:
        """InputChangedError if the file on disk is no longer the one the merge read: its
        lease was broken, or its inode, size or modification time differ."""
        if self._fd >= 0 and input_guard.broken(self):
            raise InputChangedError(f"{self.path}: changed while being read (another process opened it for "
                                    "writing or truncated it)")
        try:
            st = os.stat(self.path)
        except OSError:
            raise InputChangedError(f"{self.path}: changed while being read (it is gone)") from None
        _check_identity(self.path, st, self.identity)

    def view(self, info: TensorInfo, first: int, count: int) -> np.ndarray:
        """A read-only 1-D array over elements [first, first + count) of a tensor, no copy."""
        offset, _ = info.byte_range(first, count)
        with self._map_lock:  # a live view keeps the map open (close raises BufferError)
            return np.frombuffer(self._mapped(), dtype=info.dtype.numpy, count=count, offset=offset)

    def byte_view(self, start: int, length: int) -> memoryview:
        """A read-only memoryview over absolute bytes [start, start + length) of the file."""
        with self._map_lock:
            return memoryview(self._mapped())[start : start + length]

    def prefetch(self, start: int, length: int) -> None:
        """Ask the kernel to start reading a byte range ahead of use (asynchronous readahead)."""
        if length > 0:
            with self._map_lock:
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
        with self._map_lock:
            if self._map is not None and length > 0:
                start, length = max(0, start - RELEASE_MARGIN), length + 2 * RELEASE_MARGIN
                lo, hi = _page_span(start, length, len(self._map))
                self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        """Unmap the file (views taken from it must no longer be used)."""
        with self._map_lock:
            self._unmap(force=True)

    def _unmap(self, force: bool) -> bool:
        """Close the map and its descriptor (the caller holds ``_map_lock``). Without
        ``force``, a map that a live view still uses is kept; returns whether it was closed."""
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view is still alive; the map goes when it does
                if not force:
                    return False
            self._map = None
        if self._fd >= 0:
            input_guard.forget(self)
            os.close(self._fd)
            self._fd = -1
        _open_maps.closed(self)
        return True


class _OpenMaps:
    """Bounds the input files held open at once (each map holds two descriptors): beyond
    ``MAX_OPEN_MAPS``, the least recently used idle map is closed, to be reopened (and checked
    against its identity again) if read later. A model of 10k+ shards then needs a few hundred
    descriptors, not tens of thousands."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._order: "OrderedDict[int, SafetensorsFile]" = OrderedDict()

    def opened(self, f: "SafetensorsFile") -> None:
        with self._lock:
            self._order[id(f)] = f
            over = len(self._order) - MAX_OPEN_MAPS
            victims = [v for k, v in self._order.items() if k != id(f)][: max(0, over) * 4]
        for victim in victims:  # outside our lock: a victim's own lock is taken without waiting
            if over <= 0:
                break
            if victim._map_lock.acquire(blocking=False):
                try:
                    if victim._unmap(force=False):
                        over -= 1
                finally:
                    victim._map_lock.release()

    def used(self, f: "SafetensorsFile") -> None:
        with self._lock:
            if id(f) in self._order:
                self._order.move_to_end(id(f))

    def closed(self, f: "SafetensorsFile") -> None:
        with self._lock:
            self._order.pop(id(f), None)


_open_maps = _OpenMaps()


def ensure_descriptors(output_files: int) -> None:
    """Make room for the descriptors a merge holds: three per output shard (writer, direct
    writer, hasher) plus the bounded input maps. The soft RLIMIT_NOFILE is raised toward the
    hard one if need be; SpecError naming the limit when even that is too low."""
    import resource

    from .errors import SpecError

    needed = 3 * output_files + 2 * MAX_OPEN_MAPS + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or needed <= soft:
        return
    if hard != resource.RLIM_INFINITY and needed > hard:
        raise SpecError(f"the output's {output_files} shard file(s) need about {needed} open files, over this "
                        f"process's limit of {hard} (ulimit -n); give a larger --shard-size")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _file_identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _check_identity(path: Path, st: os.stat_result, expected: tuple[int, int, int, int] | None) -> None:
    if expected is not None and _file_identity(st) != expected:
        raise InputChangedError(f"{path}: changed while being read (its inode, size or modification time "
                                "differ from when the merge began)")


def check_inputs_unchanged(checkpoints: list) -> None:
    """Before committing an output: every input file is still the one its bytes were read from."""
    for ckpt in checkpoints:
        for f in getattr(ckpt, "files", ()):
            if isinstance(f, SafetensorsFile):
                f.check_unchanged()


class _InputGuard:
    """Read leases (``F_SETLEASE``) on mapped inputs, and the SIGIO handler they need.

    With a lease held, another process that opens the file for writing or truncates it is
    made to wait (up to /proc/sys/fs/lease-break-time, 45 s by default) while the kernel sends
    this process SIGIO. The handler, on the main thread, raises InputChangedError naming the
    file; the merge stops, its threads finish the chunks they hold, the inputs are unmapped —
    which releases the lease — and only then does the other process's change happen, so no
    mapped page is ever cut from under a reader. Leases are taken only once the main thread
    has installed the handler (SIGIO's default action would end the process) and only where
    the kernel grants them (the file's owner, no writer already, a local filesystem); without
    one, a truncation is caught before each chunk is read (the mapped file's size is checked
    then) and any change before commit by ``check_inputs_unchanged``; a truncation that lands
    while a chunk is being read can then still end the process with SIGBUS.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._previous = None  # the SIGIO handler to restore once no lease is held
        self._held: dict[int, tuple["SafetensorsFile", int]] = {}  # id(file) -> (file, fd with a lease)
        self._installed = False  # our SIGIO handler is in place

    def lease(self, f: "SafetensorsFile", fd: int) -> None:
        main = threading.current_thread() is threading.main_thread()
        with self._lock:
            if not self._installed:
                if not main:
                    return  # only the main thread can install the handler; no lease without it
                self._previous = signal.signal(signal.SIGIO, self._on_signal)
                self._installed = True
            try:
                fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
            except OSError:  # not the owner, a writer already has it open, or no lease support
                return
            self._held[id(f)] = (f, fd)

    def forget(self, f: "SafetensorsFile") -> None:
        with self._lock:
            self._held.pop(id(f), None)
            if not self._held and self._installed and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGIO, self._previous if self._previous is not None else signal.SIG_DFL)
                self._installed = False

    def holds(self, f: "SafetensorsFile") -> bool:
        """Whether ``f`` is held with a lease."""
        return id(f) in self._held

    def broken(self, f: "SafetensorsFile") -> bool:
        held = self._held.get(id(f))
        if held is None:
            return False
        fd = held[1]
        try:
            return fcntl.fcntl(fd, fcntl.F_GETLEASE) != fcntl.F_RDLCK
        except OSError:
            return True

    def _on_signal(self, signum: int, frame) -> None:
        for f, _ in list(self._held.values()):
            if self.broken(f):
                raise InputChangedError(f"{f.path}: changed while being read (another process opened it for "
                                        "writing or truncated it)")
        if callable(self._previous):
            self._previous(signum, frame)


input_guard = _InputGuard()


def _page_span(start: int, length: int, limit: int) -> tuple[int, int]:
    lo = start - start % _PAGE
    hi = min(limit, -(-(start + length) // _PAGE) * _PAGE)
    return lo, hi


def read_safetensors_header(path: Path) -> SafetensorsFile:
    """Parse and validate one file's header without touching its data.

    Raises CheckpointError naming the file and the first problem found: a file too short
    for its header, a header that is not JSON or not the expected shape, an unknown dtype,
    a byte range that does not match the shape, or ranges that overlap, leave gaps or do
    not cover the data region exactly. A file a remote source stands in for
    (``register_stand_in``; safeblend.remote) is read from there instead.
    """
    stand_in = _stand_ins.get(os.path.realpath(path))
    if stand_in is not None:
        return stand_in()
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the open, a device never end
            raise CheckpointError(f"{path}: not a regular file")
        with open(path, "rb") as handle:
            st = os.fstat(handle.fileno())
            size = st.st_size
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
    tensors, metadata = parse_safetensors_header(path, raw, size)
    return SafetensorsFile(path=path, size=size, tensors=tensors, metadata=metadata, identity=_file_identity(st))


def parse_safetensors_header(path: Path, raw: bytes, size: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate the JSON header ``raw`` of a ``size``-byte file (``path`` names it in errors):
    its tensors, with absolute byte ranges, and its ``__metadata__``."""
    header_len = len(raw)
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
    return tensors, metadata


# Weight files that another source stands in for, by real path: the remote inputs
# (safeblend.remote) register the local placeholder of each streamed file here.
_stand_ins: dict[str, Callable[[], SafetensorsFile]] = {}


def register_stand_in(path: Path, opener: Callable[[], SafetensorsFile]) -> None:
    """Make ``read_safetensors_header(path)`` return ``opener()`` instead of reading ``path``."""
    _stand_ins[os.path.realpath(path)] = opener


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


def lora_reference(item: str | os.PathLike) -> tuple[Path, Path] | None:
    """mergekit's ``MODEL+ADAPTER`` reference (the PEFT adapter merged into MODEL) as (model,
    adapter); None for anything else: an existing path with a ``+`` in its name, or a URL."""
    text = os.fspath(item)
    if "+" not in text or os.path.exists(text) or "://" in text:
        return None
    parts = text.split("+")
    if len(parts) != 2 or not all(parts):
        return None
    return Path(parts[0]), Path(parts[1])


def reference_paths(item: str | os.PathLike) -> list[Path]:
    """The paths one input reads: a ``MODEL+ADAPTER`` reference's two, else the path itself."""
    reference = lora_reference(item)
    return list(reference) if reference is not None else [Path(item)]


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
            # A weights file inside a model directory: config and tokenizer come from beside it.
            beside = root.parent if (root.parent / "config.json").is_file() else None
            return cls._from_files(root, [root], model_dir=beside)
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
